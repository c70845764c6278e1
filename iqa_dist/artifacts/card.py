"""The model card: what an exported model is and how it scores, beside its weights.

A model directory is `model.safetensors` + `config.json` (this card) + `train_images.json` (the
names, content groups and file contents (sha256) it trained on, per dataset, so that evaluating
it on its own training images is caught, under any path or name). `ModelCard.write` and
`ModelCard.read` are the only writer and reader. Imported weights (imported.py) list no training
images: their card says why (`unknown_training`). The same folder, with a README.md model card,
is a Hugging Face Hub model repo (hub.py).

Scores: the model outputs training targets. For each dataset it trained on, the card holds the
affine map between that dataset's scores and the targets (`Scale`, fitted on its training split),
so predictions can be reported on any of those datasets' scales, or on the shared target scale
("normalized"). A model trained on one dataset reports on its scale by default; a jointly trained
one must be told which.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..config import ModelConfig
from ..data.targets import Scale
from ..errors import UserError

CARD_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAIN_IMAGES_FILE = "train_images.json"
RUN_MODEL_DIR = "model"  # where a run directory keeps its selected model
NORMALIZED = "normalized"  # the shared training-target scale of a jointly trained model


@dataclass
class TrainedOn:
    """One dataset a model trained on."""

    data: dict  # that dataset's DataConfig fields (split, seeds, resize): evaluate reuses them
    score_range: list[float]  # the dataset's declared score scale [lo, hi]
    resize: str  # the resize policy its images went through
    scale: Scale = field(default_factory=Scale)
    weight: float = 1.0  # its share of each global batch (joint training)


@dataclass
class ModelCard:
    model: dict  # ModelConfig fields (pretrained "none": every weight is in model.safetensors)
    datasets: dict[str, TrainedOn]  # name -> what it trained on, in data.datasets order
    protocol: str = "random"  # test-time patch layout (data/protocol.py)
    test_patch_num: int = 20  # patches per image at test time
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_DEFAULT_MEAN))  # normalisation
    std: list[float] = field(default_factory=lambda: list(IMAGENET_DEFAULT_STD))
    step: int = 0  # the optimizer step these weights are from
    val: dict = field(default_factory=dict)  # validation metrics at that step
    weights: dict = field(default_factory=dict)  # the pretrained start: tag, source, file, sha256
    groups: dict = field(default_factory=dict)  # optimizer parameter groups: name -> parameter count
    averaged: str = "raw"  # raw: the trained weights | ema: their moving average (train.ema_decay), better on val
    # the precision every score of this model was and is computed in: training-time evaluation,
    # `evaluate` and `predict` alike, whatever the training precision (fp32 matmuls, no autocast)
    eval_precision: str = "fp32"
    # why some of its training images are not in train_images.json ("" when every one is): weights
    # imported from a file, or a run started from such weights; `evaluate` then says that overlap
    # with its training images cannot be checked
    unknown_training: str = ""

    @property
    def dataset(self) -> str:
        """The (first) dataset trained on."""
        return next(iter(self.datasets))

    @property
    def size(self) -> int:
        return int(self.model["img_size"])

    def model_config(self) -> ModelConfig:
        """The architecture to build before loading model.safetensors (which holds every weight)."""
        return ModelConfig(**{**self.model, "pretrained": "none", "init_from": ""})

    # ------------------------------------------------------------ scores

    def scale(self, name: str | None = None) -> Scale:
        """The map to the scale `name` (a dataset trained on, or "normalized"); None is the only
        dataset's scale, and a jointly trained model has no default: the choice is the user's."""
        if name == NORMALIZED:
            return Scale()
        if name is None:
            if len(self.datasets) > 1:
                raise UserError(f"this model trained jointly on {', '.join(self.datasets)}: say which scale to report "
                                f"scores on with --scale ({' | '.join([*self.datasets, NORMALIZED])})")
            name = self.dataset
        if name not in self.datasets:
            choices = "choose one of them or" if len(self.datasets) > 1 else "its scale is the default; or use"
            raise UserError(f"--scale {name}: this model trained on {', '.join(self.datasets)} only ({choices} "
                            f"{NORMALIZED}, the training-target scale); scores on another dataset's scale would need "
                            "a model trained on it")
        return self.datasets[name].scale

    def image_policy(self, name: str | None, like: str | None = None) -> tuple[str, bool]:
        """(resize policy, apply EXIF orientation) for new images: those of dataset `like` (whose
        images these resemble), else of the scale's dataset `name`. The policy belongs to the
        images, not to the scale: on the normalized scale a model whose datasets were prepared
        differently needs `like`, so that its scores stay an affine map of a dataset scale's.
        Cards from before data.exif existed had the tag ignored."""
        policies = {n: (d.resize, bool(d.data.get("exif", False))) for n, d in self.datasets.items()}
        if like is not None:
            if like not in self.datasets:
                raise UserError(f"--resize-as {like}: this model trained on {', '.join(self.datasets)} only")
            return policies[like]
        if name in self.datasets:
            return policies[name]
        if len(set(policies.values())) > 1:
            raise UserError(f"--scale {name or NORMALIZED}: this model's datasets were resized differently ("
                            + ", ".join(f"{n}: {r}{'' if e else ', EXIF ignored'}" for n, (r, e) in policies.items())
                            + "); say which images these are like with --resize-as DATASET")
        return next(iter(policies.values()))

    # ------------------------------------------------------------ files

    def write(self, folder: Path, train_images: dict[str, dict[str, list[str]]]) -> None:
        """train_images: dataset -> {"names": [...], "groups": [...], "sha256": [...]} of its training split."""
        (folder / CARD_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=1))
        (folder / TRAIN_IMAGES_FILE).write_text(json.dumps(train_images))

    @classmethod
    def read(cls, folder: Path) -> "ModelCard":
        path = folder / CARD_FILE
        try:
            raw = json.loads(path.read_text())
            datasets = {name: TrainedOn(**{**d, "scale": Scale(**d["scale"])}) for name, d in raw["datasets"].items()}
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a model card this iqa-dist reads ({type(e).__name__}: {e})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in raw.items() if k in known}, "datasets": datasets})

    @staticmethod
    def recorded_images(folder: Path) -> dict[str, dict[str, list[str]]]:
        """train_images.json as written: dataset -> {"names", "groups", "sha256"}; {} when absent."""
        path = folder / TRAIN_IMAGES_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    @staticmethod
    def train_images(folder: Path, dataset: str) -> tuple[set[str], set[str], set[str]]:
        """(names and content groups of `dataset`, file contents of every dataset) the model trained
        on; empty when none (cards from before contents were recorded have no sha256)."""
        path = folder / TRAIN_IMAGES_FILE
        if not path.is_file():
            return set(), set(), set()
        every = json.loads(path.read_text())
        own = every.get(dataset, {})
        return (set(own.get("names", [])), set(own.get("groups", [])),
                {h for d in every.values() for h in d.get("sha256", []) if h})


def write_weights(state: dict, path: Path) -> None:
    """A model's weights as safetensors, readable as the files written beside them are: safetensors
    writes its file 0600 (a private temporary file, renamed), which a model shared on a cluster
    folder must not be."""
    import os

    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, path)
    umask = os.umask(0)  # read it: only os.umask can, by setting it
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def model_dir(path: str | Path) -> Path:
    """A model directory, a run directory holding one in model/, or a Hugging Face Hub repo id
    (org/name, @revision optional) of one, found in or fetched into the hub cache (hub.py)."""
    given = str(path)
    path = Path(path)
    if not path.exists():
        from .hub import is_repo_id, resolve

        if is_repo_id(given):
            path = resolve(given)
    if (path / RUN_MODEL_DIR / WEIGHTS_FILE).is_file():
        path = path / RUN_MODEL_DIR
    if not (path / WEIGHTS_FILE).is_file() or not (path / CARD_FILE).is_file():
        raise UserError(f"{path}: not a model directory (needs {WEIGHTS_FILE} and {CARD_FILE})")
    return path


def overlap(folder: Path, dataset: str, names: list[str], groups: list[str], hashes: list[str]) -> tuple[int, int]:
    """How many of these images of `dataset` the model trained on (the same name, or the same file
    content under any name or path: `hashes`, their files' sha256), and how many more share a
    content group with a training image (the same scene under another distortion)."""
    train_names, train_groups, train_hashes = ModelCard.train_images(folder, dataset)
    same = np.array([n in train_names or bool(h) and h in train_hashes for n, h in zip(names, hashes)], dtype=bool)
    related = np.array([g in train_groups for g in groups], dtype=bool) & ~same
    return int(same.sum()), int(related.sum())
