"""Using a trained model: `load_model(path).score(images)`, the library behind `iqa-dist predict`.

A model directory is self-contained (artifacts/card.py): weights plus the card that says how the training
images were resized, normalised and scored. Scoring follows the same test protocol as evaluation
(data/protocol.py): with the defaults, `score` gives an image the prediction that `iqa-dist evaluate`
gave it. `crops` and `flip` are explicit extras (more patches, mirrored patches averaged in).
"""

from __future__ import annotations

import glob
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from ..artifacts.card import WEIGHTS_FILE, ModelCard, model_dir
from ..data.augment import Augmenter
from ..data.decode import decode, fit, to_rgb, upright
from ..data.store import EvalSet, ImageStore
from ..errors import UserError, first_line
from ..models.hyperiqa import HyperIQA, build_model
from .maps import DEFAULT_CROPS, QualityMap
from .predictions import patch_predictions, predict_images

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


class Scorer:
    """A trained model that scores images on its training dataset's scale."""

    def __init__(self, model: HyperIQA, card: ModelCard, device: torch.device, scale: str | None = None,
                 resize_as: str | None = None, folder: Path | None = None) -> None:
        self.folder = folder  # the model directory it was read from (None: built in memory)
        self.model = model.to(device).eval()
        self.card = card
        self.device = device
        self.size = card.size
        self.augmenter = Augmenter.evaluation(card.size, card.mean, card.std).to(device)  # crop + normalise
        self.scale = card.scale(scale)  # which dataset's scale scores are on (a joint model needs a choice)
        self.scale_name = scale or card.dataset  # that dataset's name, or "normalized"
        # new images are prepared as that dataset's were: its resize, its EXIF orientation choice
        self.resize, self.exif = card.image_policy(scale, resize_as)

    def prepare(self, image) -> np.ndarray:
        """A path, PIL image or uint8 array/tensor (HWC or CHW) -> resized uint8 HWC RGB, exactly
        as the cache decodes and resizes a dataset's files."""
        if isinstance(image, (str, Path)):
            pixels, h, w, why = decode(str(image), self.resize, self.size, self.exif)
            if why:
                raise UserError(f"{image}: {why}")
            return np.frombuffer(pixels, np.uint8).reshape(h, w, 3)
        if isinstance(image, Image.Image):
            img = to_rgb(upright(image) if self.exif else image)
        else:
            img = to_rgb(pixels_image(image))  # grey and RGBA arrays as PIL reads such files: alpha dropped
        img, problem = fit(img, self.resize, self.size)
        if problem:
            raise UserError(problem)
        return np.asarray(img)

    def score_arrays(self, arrays: Sequence[np.ndarray], crops: int | None = None, flip: bool = False,
                     batch_patches: int = 256) -> np.ndarray:
        """Scores of prepared HWC uint8 images: the mean over the protocol's patches (the card's
        count, or `crops`), and over their mirror images too with `flip`."""
        images = EvalSet.of(ImageStore.of_images(list(arrays)), self.card.protocol, crops or self.card.test_patch_num,
                            self.size)
        return self.score_set(images, flip, batch_patches)

    def score_set(self, images: EvalSet, flip: bool = False, batch_patches: int = 256) -> np.ndarray:
        """Scores of an EvalSet's images (pixels on the host or on this scorer's device)."""
        images = replace(images, store=images.store.to(self.device))
        preds = predict_images(self.model, images, self.augmenter, batch_patches, self.device, flip=flip)
        return self.scale.to_score(preds.double().cpu().numpy())

    def score(self, images, crops: int | None = None, flip: bool = False) -> np.ndarray:
        """Scores (on the training dataset's scale) of image files, PIL images (any mode) or uint8
        arrays and tensors (HxW, or 1, 3 or 4 channels, HWC or CHW: `pixels_image`); one image, a
        list, or a 4-D batch."""
        return self.score_arrays([self.prepare(im) for im in each(images)], crops, flip)

    def quality_maps(self, images, crops: int = DEFAULT_CROPS, flip: bool = False) -> list[QualityMap]:
        """Each image's patch scores on a regular grid of `crops` patches (scoring/maps.py), whatever
        the card's protocol: a map's mean patch score is the image's score under the grid
        protocol. Images in any form `score` takes."""
        return self.map_arrays([self.prepare(im) for im in each(images)], crops, flip)

    def map_arrays(self, arrays: Sequence[np.ndarray], crops: int = DEFAULT_CROPS, flip: bool = False,
                   batch_patches: int = 256) -> list[QualityMap]:
        """Quality maps of prepared HWC uint8 images (`prepare`)."""
        images = EvalSet.of(ImageStore.of_images(list(arrays)), "grid", crops, self.size)
        store = images.store.to(self.device)
        preds = [p.cpu() for p in patch_predictions(self.model, replace(images, store=store), self.augmenter,
                                                    batch_patches, self.device, flip=flip)]
        raw = torch.cat(preds) if preds else torch.zeros(0, crops)  # (N, crops) model outputs
        patch_scores = self.scale.to_score(raw.double().numpy())
        scores = self.scale.to_score(raw.mean(1).double().numpy())  # as predict_images averages: the score itself
        return [QualityMap(score=float(scores[i]), origins=images.origins[i].numpy(), scores=patch_scores[i],
                           patch=self.size, height=a.shape[0], width=a.shape[1]) for i, a in enumerate(arrays)]

    @property
    def units(self) -> str:
        """What a score is, for labels: 'score, koniq10k scale (1-100)'."""
        trained = self.card.datasets.get(self.scale_name)
        span = f" ({trained.score_range[0]:g}-{trained.score_range[1]:g})" if trained else ""
        return f"score, {self.scale_name} scale{span}"


def each(images) -> list:
    """One image (a file, a PIL image, an array or tensor) as a list of one; a list, or a 4-D
    batch, as it is."""
    if isinstance(images, (str, Path, Image.Image, np.ndarray, torch.Tensor)) and not (
            isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4):
        return [images]
    return images


def pixels_image(image) -> Image.Image:
    """A uint8 array or tensor as a PIL image: HxW, or 1, 3 or 4 channels (grey, RGB, RGBA) laid
    out HWC or CHW. Tensors are read CHW first (torchvision's layout), arrays HWC first (PIL's and
    numpy's); anything else is refused in one line naming what it got."""
    tensor = isinstance(image, torch.Tensor)
    a = image.detach().cpu().numpy() if tensor else np.asarray(image)
    what = f"{'tensor' if tensor else 'array'} of {a.dtype} {tuple(a.shape)}"
    if a.dtype != np.uint8:
        raise UserError(f"an image {what}: expected uint8 pixels 0-255 (e.g. (x * 255).round() of a [0, 1] image, "
                        "as uint8)")
    if a.ndim == 3:
        chw, hwc = a.shape[0] in (1, 3, 4), a.shape[2] in (1, 3, 4)
        if chw and (tensor or not hwc):
            a = a.transpose(1, 2, 0)
        elif not hwc:
            raise UserError(f"an image {what}: expected 1, 3 or 4 channels (grey, RGB, RGBA), first or last")
        a = a[..., 0] if a.shape[2] == 1 else a
    if a.ndim != 2 and a.ndim != 3:
        raise UserError(f"an image {what}: expected HxW, HxWxC or CxHxW (a batch: a list of images, or a 4-D "
                        "array of them)")
    return Image.fromarray(np.ascontiguousarray(a))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch device from the user's word; a missing GPU or an unknown name is a UserError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r}: not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available here (use --device cpu)")
    return dev


def load_model(path: str | Path | Sequence[str | Path], device: str | torch.device | None = None,
               scale: str | None = None, resize_as: str | None = None) -> "Scorer | EnsembleScorer":
    """A model directory (or a run directory, or a Hugging Face Hub repo id `org/name[@rev]` of
    one, from the hub cache) as a Scorer; `scale`: the dataset (of those it
    trained on) whose scale scores are on, or "normalized"; a one-dataset model's by default;
    `resize_as`: the dataset whose resize policy new images get [default: the scale's].
    A list of several models, or a sweep group's folder (its members' finished runs): an
    `EnsembleScorer` of them."""
    from ..experiments.group import models_of

    paths = models_of([path] if isinstance(path, (str, Path)) else list(path))
    if len(paths) != 1:
        if not paths:
            raise UserError("load_model: an empty list of models")
        return EnsembleScorer([load_model(p, device, scale, resize_as) for p in paths])
    path = paths[0]
    folder = model_dir(path)
    card = ModelCard.read(folder)
    torch.set_flush_denormal(True)  # trained weights make CPU math hit slow denormals (training/loop.py)
    model = build_model(card.model_config())
    weights = folder / WEIGHTS_FILE
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as e:  # a truncated or foreign file: safetensors' own error, or a shape mismatch
        first = first_line(e)
        raise UserError(f"{weights}: cannot be read as this model's weights ({type(e).__name__}: {first}); the file "
                        "is damaged (a copy cut short?) or belongs to another model: export or copy it again") from None
    return Scorer(model, card, resolve_device(device), scale, resize_as, folder)


def check_one_scale(members: list[tuple[str, ModelCard, str]]) -> None:
    """Ensemble members (name, card, the scale each reports on) must report on one scale: one
    dataset name (or normalized) whose scores span the same range in every member's card (the
    same name can hold other scores: another score column, an imported model's 0-1 scale)."""
    names = {scale for _, _, scale in members}
    if len(names) > 1:
        raise UserError(f"ensemble: its models score on different scales ({', '.join(sorted(names))}): give "
                        "--scale normalized (or a dataset every member trained on) so that their predictions "
                        "can be averaged")
    ranges = {name: tuple(card.datasets[scale].score_range) for name, card, scale in members if scale in card.datasets}
    if len(set(ranges.values())) > 1:
        raise UserError("ensemble: its models' scores of one dataset span different ranges (" + "; ".join(
            f"{n}: {r[0]:g}-{r[1]:g}" for n, r in ranges.items()) + "): other scores under one name; give "
            "--scale normalized, or members trained on the same scores")


class EnsembleScorer:
    """Several trained models as one (`load_model([A, B, ...])`): an image's score is the mean of
    the members' scores, each member preparing and scoring it as it does alone (its resize, patch
    size, protocol and count), all on one scale."""

    def __init__(self, members: Sequence[Scorer]) -> None:
        check_one_scale([(str(m.folder), m.card, m.scale_name) for m in members])
        self.members = list(members)
        self.scale_name = self.members[0].scale_name

    def member_scores(self, images, crops: int | None = None, flip: bool = False) -> np.ndarray:
        """(members, images): each member's scores of the images (any form `Scorer.score` takes)."""
        images = each(images)
        if not isinstance(images, (list, tuple, np.ndarray, torch.Tensor)):  # an iterator: read once, scored by all
            images = list(images)
        return np.stack([m.score(images, crops, flip) for m in self.members])

    def score(self, images, crops: int | None = None, flip: bool = False) -> np.ndarray:
        """The ensemble's scores: the members' mean per image."""
        return self.member_scores(images, crops, flip).mean(0)

    @property
    def units(self) -> str:
        return self.members[0].units


def score_files_ensemble(scorer: EnsembleScorer, paths: list[str], positions: list[int], **options
                         ) -> Iterator[tuple[int, float | None, str, dict[str, float]]]:
    """`score_files` for an ensemble: each member decodes and scores the files as it does alone
    (its resize, patch size and protocol), and a file's score is the members' mean; a file one
    member cannot score (too small for its patches) has no score, with that member's reason."""
    streams = [score_files(m, paths, positions, **options) for m in scorer.members]
    for rows in zip(*streams):
        p = rows[0][0]
        if any(r[0] != p for r in rows):  # one list, one batching: the same order for every member
            raise RuntimeError("ensemble members scored the files in different orders")  # a bug, never bad input
        why = next((r[2] for r in rows if r[1] is None), "")
        yield p, None if why else float(np.mean([r[1] for r in rows])), why, rows[0][3]


def expand(paths: Iterable[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (recursively, image suffixes) and globs -> (files, [(path, problem)])."""
    files, missing = [], []
    for p in paths:
        matches = sorted(glob.glob(p, recursive=True)) if any(c in p for c in "*?[") else [p]
        if not matches:
            missing.append((p, "no file matches"))
        for m in matches:
            path = Path(m)
            if path.is_dir():
                found = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
                if not found:
                    missing.append((m, f"a folder with no images in it ({', '.join(sorted(IMAGE_SUFFIXES))})"))
                files += found
            elif path.is_file():
                files.append(path)
            else:
                missing.append((m, "no such file or folder"))
    return files, missing


def score_files(scorer: Scorer, paths: list[str], positions: list[int], *, crops: int | None = None,
                flip: bool = False, batch_images: int = 16, workers: int = 0,
                decoder: str = "auto") -> Iterator[tuple[int, float | None, str, dict[str, float]]]:
    """(position, score or None, problem, timings) for each file, in list order, as soon as its
    batch is scored: decoded by `data.feed.batches` (DataLoader workers; JPEGs on the GPU where that
    keeps every image's crops), scored on the one evaluation path. timings: the batch's seconds waiting for
    the loader, decoding on the GPU, uploading, and in the model (on the first of its files)."""
    from ..data.feed import batches

    for b in batches(paths, positions, resize=scorer.resize, size=scorer.size,
                     exif=scorer.exif, protocol=scorer.card.protocol, patches=crops or scorer.card.test_patch_num,
                     batch_images=batch_images, workers=workers, device=scorer.device, decoder=decoder):
        start = time.perf_counter()
        scores = scorer.score_set(b.images, flip) if b.images is not None else []
        timings = {**b.timings, "model": time.perf_counter() - start}
        done = {p: (float(s), "") for p, s in zip(b.positions, scores)} | {p: (None, why) for p, why in b.failed}
        for p in sorted(done):
            yield p, *done[p], timings
            timings = {}
