"""The model card: what an exported model is and how it scores, beside its weights.

A model directory is `model.safetensors` + `config.json` (this card) + `train_images.json` (the
names and content groups it trained on, so that evaluating it on its own training images is
caught). `ModelCard.write` and `ModelCard.read` are the only writer and reader.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import DataConfig, ModelConfig
from .errors import UserError

CARD_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAIN_IMAGES_FILE = "train_images.json"


@dataclass
class ModelCard:
    model: dict  # ModelConfig fields (pretrained "none": every weight is in model.safetensors)
    dataset: str  # the dataset trained on: its scale is the scores' scale
    data: dict  # the training run's DataConfig fields (split, seeds, resize): evaluate reuses them
    score_range: list[float]  # the dataset's score scale [lo, hi]
    score_norm: str = "none"  # none: the model outputs scores | range: it outputs (score - lo) / (hi - lo)
    resize: str = "none"  # the resize policy the training images went through
    protocol: str = "random"  # test-time patch layout (protocol.py)
    test_patch_num: int = 20  # patches per image at test time
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # normalisation
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    step: int = 0  # the optimizer step these weights are from
    val: dict = field(default_factory=dict)  # validation metrics at that step
    weights: dict = field(default_factory=dict)  # the pretrained start: tag, source, file, sha256
    groups: dict = field(default_factory=dict)  # optimizer parameter groups: name -> parameter count

    # ------------------------------------------------------------ scores

    def to_score(self, pred):
        """Model output -> the dataset's scale (numpy, torch or float)."""
        if self.score_norm == "none":
            return pred
        lo, hi = self.score_range
        return pred * (hi - lo) + lo

    def to_target(self, score):
        """Dataset score -> the training target."""
        if self.score_norm == "none":
            return score
        lo, hi = self.score_range
        return (score - lo) / (hi - lo)

    @property
    def size(self) -> int:
        return int(self.model["img_size"])

    def model_config(self) -> ModelConfig:
        return ModelConfig(**{**self.model, "pretrained": "none"})

    def data_config(self) -> DataConfig:
        return DataConfig(**self.data)

    # ------------------------------------------------------------ files

    def write(self, folder: Path, train_names: list[str], train_groups: list[str]) -> None:
        (folder / CARD_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=1))
        (folder / TRAIN_IMAGES_FILE).write_text(json.dumps(
            {"dataset": self.dataset, "names": train_names, "groups": train_groups}))

    @classmethod
    def read(cls, folder: Path) -> "ModelCard":
        path = folder / CARD_FILE
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not a readable model card: {e}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in raw]
        if missing:
            raise UserError(f"{path}: model card without {', '.join(missing)} (exported by an older iqa-dist?)")
        return cls(**{k: v for k, v in raw.items() if k in known})

    @staticmethod
    def train_images(folder: Path) -> tuple[str, set[str], set[str]]:
        """(dataset, names, content groups) the model trained on; empty sets when not recorded."""
        path = folder / TRAIN_IMAGES_FILE
        if not path.is_file():
            return "", set(), set()
        raw = json.loads(path.read_text())
        return raw["dataset"], set(raw["names"]), set(raw["groups"])


def model_dir(path: str | Path) -> Path:
    """A model directory, or a run directory holding one in model/."""
    path = Path(path)
    if (path / "model" / WEIGHTS_FILE).is_file():
        path = path / "model"
    if not (path / WEIGHTS_FILE).is_file() or not (path / CARD_FILE).is_file():
        raise UserError(f"{path}: not a model directory (needs {WEIGHTS_FILE} and {CARD_FILE})")
    return path


def overlap(folder: Path, dataset: str, names: list[str], groups: list[str]) -> tuple[int, int]:
    """How many of these images the model trained on, and how many more share a content group
    with a training image (the same scene under another distortion)."""
    trained_on, train_names, train_groups = ModelCard.train_images(folder)
    if trained_on != dataset:
        return 0, 0
    same = np.array([n in train_names for n in names], dtype=bool)
    related = np.array([g in train_groups for g in groups], dtype=bool) & ~same
    return int(same.sum()), int(related.sum())
