"""A model directory from published HyperIQA weights (models/imports.py reads the formats).

The card says what the weights are and how their authors scored them, so that `predict` and
`evaluate` score as the original did: the source file and its sha256, the resize policy, test
protocol and score scale the weights were trained and scored with, and that their training
images are unknown (`unknown_training`: `evaluate` then says that overlap cannot be checked).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..config import DataConfig
from ..data.targets import Scale
from ..errors import UserError
from ..models.hyperiqa import build_model
from ..models.imports import Published, read_published, to_state_dict
from ..models.weights import sha256
from .card import WEIGHTS_FILE, ModelCard, TrainedOn, write_weights

DATASET = "koniq10k"  # both published models trained on KonIQ-10k


def import_published(file: Path, out: Path, forced: str | None = None) -> ModelCard:
    """Reads `file` (detected or `forced` format), checks every key and shape against the
    HyperNet it claims to be, and writes the model directory `out` (replaced whole, atomically)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir()) and not (out / WEIGHTS_FILE).is_file()):
        raise UserError(f"--out {out}: exists and is not a model directory: give a new folder")
    fmt, file_state = read_published(file, forced)
    with torch.device("meta"):  # the names, shapes and dtypes of every weight, without allocating or initialising
        expected = build_model(fmt.model_config()).state_dict()
    state = to_state_dict(fmt, file_state, expected, file)  # every key used, every weight there, every shape right
    card = published_card(fmt, file)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_weights(state, tmp / WEIGHTS_FILE)
    card.write(tmp, {})
    shutil.rmtree(out, ignore_errors=True)  # an earlier import's folder, or an empty one
    os.replace(tmp, out)
    return card


def published_card(fmt: Published, file: Path) -> ModelCard:
    """The card of an imported model: HyperNet's config, the original's data settings (resize,
    patches, protocol, EXIF ignored as PIL's plain open did) and score scale, the source file."""
    data = DataConfig(dataset=DATASET, score_column="MOS_zscore", resize=fmt.resize, exif=False,
                      test_patch_num=fmt.patches, test_protocol=fmt.protocol, train_patch_num=fmt.patches)
    weights = {"source": "import", "format": fmt.name, "tag": fmt.backbone, "file": str(file.resolve()),
               "name": file.name, "sha256": sha256(file), "about": fmt.about}
    return ModelCard(model={**asdict(fmt.model_config()), "init_from": ""},
                     datasets={DATASET: TrainedOn(asdict(data), list(fmt.score_range), fmt.resize, Scale())},
                     protocol=fmt.protocol, test_patch_num=fmt.patches, mean=list(IMAGENET_DEFAULT_MEAN),
                     std=list(IMAGENET_DEFAULT_STD), weights=weights,
                     unknown_training=f"imported from {file.name} ({fmt.name}); its authors did not publish which "
                                      "KonIQ-10k images it trained on")
