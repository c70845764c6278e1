"""Using a trained model: `load_model(path).score(images)`, the library behind `iqa-dist predict`.

A model directory is self-contained (card.py): weights plus the card that says how the training
images were resized, normalised and scored. Scoring follows the same test protocol as evaluation
(protocol.py): with the defaults, `score` gives an image the prediction that `iqa-dist evaluate`
gave it. `crops` and `flip` are explicit extras (more patches, mirrored patches averaged in).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from .augment import normalize
from .card import WEIGHTS_FILE, ModelCard, model_dir
from .decode import decode, fit, to_rgb, upright
from .errors import UserError
from .model import HyperIQA, build_model
from .protocol import patch_origins

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


class Scorer:
    """A trained model that scores images on its training dataset's scale."""

    def __init__(self, model: HyperIQA, card: ModelCard, device: torch.device, scale: str | None = None,
                 resize_as: str | None = None) -> None:
        self.model = model.to(device).eval()
        self.card = card
        self.device = device
        self.size = card.size
        self.mean = torch.tensor(card.mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(card.std, dtype=torch.float32, device=device)
        self.scale = card.scale(scale)  # which dataset's scale scores are on (a joint model needs a choice)
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
            a = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
            if a.dtype != np.uint8 or a.ndim != 3:
                raise UserError(f"expected a uint8 HxWx3 or 3xHxW image, got {a.dtype} {a.shape}")
            img = Image.fromarray(a.transpose(1, 2, 0) if a.shape[0] == 3 and a.shape[2] != 3 else a)
        img, problem = fit(img, self.resize, self.size)
        if problem:
            raise UserError(problem)
        return np.asarray(img)

    @torch.no_grad()
    def score_arrays(self, arrays: Sequence[np.ndarray], crops: int | None = None, flip: bool = False,
                     batch_patches: int = 256) -> np.ndarray:
        """Scores of prepared HWC uint8 images: the mean over the protocol's patches (the card's
        count, or `crops`), and over their mirror images too with `flip`."""
        n = crops or self.card.test_patch_num
        patches, counts = [], []
        for a in arrays:
            origins = patch_origins(self.card.protocol, a, a.shape[0], a.shape[1], self.size, n)
            patches += [a[y:y + self.size, x:x + self.size] for y, x in origins]
            counts.append(len(origins))
        x_all = torch.from_numpy(np.stack(patches)) if patches else torch.zeros(0, self.size, self.size, 3, dtype=torch.uint8)
        preds = []
        for start in range(0, len(x_all), batch_patches):
            x = x_all[start:start + batch_patches].to(self.device).permute(0, 3, 1, 2).float() / 255.0
            views = [x, x.flip(-1)] if flip else [x]
            out = torch.stack([self.model(normalize(v, self.mean, self.std)).float() for v in views]).mean(0)
            preds.append(out.cpu())
        flat = torch.cat(preds).numpy() if preds else np.zeros(0)
        per_image = np.split(flat, np.cumsum(counts)[:-1]) if counts else []
        return np.array([self.scale.to_score(float(p.mean())) for p in per_image], dtype=np.float64)

    def score(self, images, crops: int | None = None, flip: bool = False) -> np.ndarray:
        """Scores (on the training dataset's scale) of PIL images, file paths or uint8 tensors."""
        if isinstance(images, (str, Path, Image.Image, np.ndarray, torch.Tensor)) and not (
                isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4):
            images = [images]
        return self.score_arrays([self.prepare(im) for im in images], crops, flip)


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


def load_model(path: str | Path, device: str | torch.device | None = None, scale: str | None = None,
               resize_as: str | None = None) -> Scorer:
    """A model directory (or a run directory) as a Scorer; `scale`: the dataset (of those it
    trained on) whose scale scores are on, or "normalized"; a one-dataset model's by default;
    `resize_as`: the dataset whose resize policy new images get [default: the scale's]."""
    folder = model_dir(path)
    card = ModelCard.read(folder)
    torch.set_flush_denormal(True)  # trained weights make CPU math hit slow denormals (train.py)
    model = build_model(card.model_config())
    weights = folder / WEIGHTS_FILE
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as e:  # a truncated or foreign file: safetensors' own error, or a shape mismatch
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{weights}: cannot be read as this model's weights ({type(e).__name__}: {first}); the file "
                        "is damaged (a copy cut short?) or belongs to another model: export or copy it again") from None
    return Scorer(model, card, resolve_device(device), scale, resize_as)


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
