"""The published HyperIQA weights as this model's state dict: SSL92/hyperIQA's and pyiqa's files.

Both publish HyperNet(16, 112, 224, 112, 56, 28, 14, 7) on a ResNet-50, the computation that the
koniq-resnet50 preset builds (tests/test_fidelity.py rebuilds the original and compares), under
their own parameter names:
- SSL92 (`koniq_pretrained.pkl`): `torch.save(model_hyper.state_dict())`, loaded strictly:
  `res.*` (the ResNet-50 without fc, with `res.lda{1,2,3}_pool.0` and `res.lda{1..4}_fc`),
  `conv1.{0,2,4}`, `fc{1..4}w_conv`, `fc5w_fc`, `fc{1..5}b_fc`;
- pyiqa (`HyperIQA-resnet50-koniq10k-*.pth`): a dict whose `params` holds `base_model.*` (timm's
  features_only ResNet-50), `lda_modules.{0..3}`, `conv1.*`, `fc_w_modules.{0..4}`, `fc_b_modules.{0..4}`.

A file is read with `torch.load(weights_only=True)`: both formats are plain tensors, and a file
that needs arbitrary code to unpickle is refused, never run. Every key of the file must map to a
weight of this model and every weight must come from the file (BatchNorm's `num_batches_tracked`
counters, which no forward reads and older torch did not save, may be absent), with its shape.
`Published` says how each was trained and scored, for the model card.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import UserError, first_line

# HyperNet(16, 112, 224, 112, 56, 28, 14, 7) on ResNet-50, stage 4 alone into the hyper network
# (2048 -> 1024 -> 512 -> 112, ReLU after each), as ModelConfig fields; no dropout or drop path
HYPERNET = dict(img_size=224, fusion="last", hyper_hidden=[1024, 512], hyper_in=112, lda_out=16, target_in=224,
                target_hidden=[112, 56, 28, 14], feature_size=7, dropout=0.0, drop_path=0.0, pretrained="none")

Rule = tuple[str, Callable[[re.Match], str]]  # file key pattern -> this model's key


def _i(m: re.Match, group: int = 1, minus: int = 0) -> int:
    return int(m[group]) - minus


SSL92_RULES: list[Rule] = [
    (r"res\.lda([123])_pool\.0\.weight", lambda m: f"lda.{_i(m, minus=1)}.conv.weight"),
    (r"res\.lda([1-4])_fc\.(weight|bias)", lambda m: f"lda.{_i(m, minus=1)}.fc.{m[2]}"),
    (r"res\.(.+)", lambda m: f"backbone.{m[1]}"),  # torchvision's ResNet names, as timm's
    (r"conv1\.([024])\.(weight|bias)", lambda m: f"hyper.reduce.{m[1]}.{m[2]}"),
    (r"fc([1-4])w_conv\.(weight|bias)", lambda m: f"hyper.weight_convs.{_i(m, minus=1)}.{m[2]}"),
    (r"fc5w_fc\.(weight|bias)", lambda m: f"hyper.last_weight.{m[1]}"),
    (r"fc([1-5])b_fc\.(weight|bias)", lambda m: f"hyper.bias_fcs.{_i(m, minus=1)}.{m[2]}"),
]
PYIQA_RULES: list[Rule] = [
    (r"base_model\.(.+)", lambda m: f"backbone.{m[1]}"),
    (r"lda_modules\.([0-2])\.0\.weight", lambda m: f"lda.{m[1]}.conv.weight"),  # Conv2d, AvgPool2d, Flatten, Linear
    (r"lda_modules\.([0-2])\.3\.(weight|bias)", lambda m: f"lda.{m[1]}.fc.{m[2]}"),
    (r"lda_modules\.3\.2\.(weight|bias)", lambda m: f"lda.3.fc.{m[1]}"),  # AvgPool2d, Flatten, Linear
    (r"conv1\.([024])\.(weight|bias)", lambda m: f"hyper.reduce.{m[1]}.{m[2]}"),
    (r"fc_w_modules\.([0-3])\.(weight|bias)", lambda m: f"hyper.weight_convs.{m[1]}.{m[2]}"),
    (r"fc_w_modules\.4\.2\.(weight|bias)", lambda m: f"hyper.last_weight.{m[1]}"),  # pool, flatten, Linear
    (r"fc_b_modules\.([0-4])\.2\.(weight|bias)", lambda m: f"hyper.bias_fcs.{m[1]}.{m[2]}"),
]


@dataclass(frozen=True)
class Published:
    """One published format: its names, its network, and how its weights were trained and scored."""

    name: str  # --format
    about: str  # whose weights, how trained and scored (the model card's words)
    backbone: str  # the timm name of its ResNet-50 (the ImageNet weights it started from)
    rules: tuple[Rule, ...]
    score_range: tuple[float, float]  # the scale its outputs are on
    resize: str  # how its images were resized (data.resize syntax)
    protocol: str  # test-time patches (data.test_protocol) ...
    patches: int  # ... and how many, averaged per image

    def model_config(self) -> ModelConfig:
        return ModelConfig(backbone=self.backbone, **HYPERNET)


SSL92 = Published(
    name="ssl92", backbone="resnet50.tv_in1k", rules=tuple(SSL92_RULES), score_range=(0.0, 100.0), resize="384x512!",
    protocol="random", patches=25,
    about="SSL92/hyperIQA's KonIQ-10k model (Su et al., CVPR 2020), from torchvision's ImageNet ResNet-50: trained on "
          "KonIQ's MOS_zscore (0-100) with every image resized to 384 wide x 512 high (the original's squash, whatever "
          "the orientation), scored as the mean of 25 random 224-px crops; its training split is not published")
PYIQA = Published(
    name="pyiqa", backbone="resnet50", rules=tuple(PYIQA_RULES), score_range=(0.0, 1.0), resize="none", protocol="grid",
    patches=25,
    about="pyiqa's own HyperIQA retrain on KonIQ-10k (chaofengc/IQA-PyTorch, timm's ResNet-50): scores on pyiqa's scale "
          "(about 0-1, so RMSE against KonIQ's 0-100 MOS_zscore means nothing; SRCC and PLCC do), images at their own "
          "size, 25 crops of 224 px averaged (random before pyiqa 0.1.12, uniform since: here laid on iqa-dist's grid); "
          "its training split is not published")
FORMATS = {f.name: f for f in (SSL92, PYIQA)}


def read_published(path: Path, forced: str | None = None) -> tuple[Published, dict[str, Tensor]]:
    """The file's format (detected, or `forced`) and its tensors under the file's own names."""
    state = _load(path)
    if isinstance(state.get("params"), dict):  # pyiqa's load_pretrained_network reads ckpt["params"]
        state = state["params"]
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    bad = next((k for k, v in state.items() if not isinstance(v, Tensor)), None)
    if bad is not None:
        raise UserError(f"{path}: {bad!r} holds a {type(state[bad]).__name__}, not a tensor: not a weights file of "
                        "HyperIQA (SSL92 or pyiqa)")
    if forced:
        return FORMATS[forced], state
    if "fc1w_conv.weight" in state or any(k.startswith("res.") for k in state):
        return SSL92, state
    if "fc_w_modules.0.weight" in state or any(k.startswith("base_model.") for k in state):
        return PYIQA, state
    some = ", ".join(list(state)[:3]) or "none"
    raise UserError(f"{path}: not a HyperIQA weights file of a known format: its keys ({some}, ...) are neither "
                    "SSL92's (res.*, fc1w_conv.*) nor pyiqa's (params: base_model.*, fc_w_modules.*); force one with "
                    f"--format {' or '.join(FORMATS)} if it is")


def to_state_dict(fmt: Published, file_state: dict[str, Tensor], expected: dict[str, Tensor], path: Path
                  ) -> dict[str, Tensor]:
    """The file's tensors under this model's names, in its order, each key used and each shape
    checked against `expected` (the model's state dict: its tensors may be on the meta device);
    anything else is one UserError naming what is wrong."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in file_state.items():
        ours = _rename(fmt.rules, key)
        if ours is None or ours not in expected:
            unknown.append(key)
            continue
        if tuple(value.shape) != tuple(expected[ours].shape):
            raise UserError(f"{path}: {key} is {_shape(value)}, where {fmt.name}'s HyperNet(16, 112, 224, 112, 56, 28, "
                            f"14, 7) has {_shape(expected[ours])}: the weights of another network")
        out[ours] = value.to(expected[ours].dtype)
    missing = [k for k in expected if k not in out and not k.endswith("num_batches_tracked")]
    if unknown or missing:
        said = []
        if unknown:
            said.append(f"{len(unknown)} key(s) that are no {fmt.name} HyperIQA weight (e.g. {', '.join(unknown[:3])})")
        if missing:
            said.append(f"no value for {len(missing)} of its weights (e.g. {', '.join(missing[:3])})")
        raise UserError(f"{path}: not the {fmt.name} HyperIQA format: it has {' and '.join(said)}"
                        + ("" if len(out) else f"; another format? (--format {' | '.join(FORMATS)})"))
    # BatchNorm step counters no forward reads: the file's where saved, else 0
    counters = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in expected.items() if k.endswith("num_batches_tracked")}
    return {k: out[k] if k in out else counters[k] for k in expected}


def _rename(rules: tuple[Rule, ...], key: str) -> str | None:
    for pattern, name in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return name(m)
    return None


def _shape(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "a scalar"


def _load(path: Path) -> dict:
    """torch.load with weights_only=True: plain tensors and containers, never code."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):  # a damaged pickle, not a refused one
            raise UserError(f"{path}: cannot be read as a torch weights file (UnpicklingError: {first_line(e, 160)}); "
                            "a download cut short? fetch it again") from None
        # weights_only's refusal of anything but tensors and plain containers
        raise UserError(f"{path}: refused: unpickling it would run code it names ({first_line(e, 120)}); "
                        "published HyperIQA weights are plain tensors, read without running anything") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # a cut zip archive, a cut pickle, another file
        raise UserError(f"{path}: cannot be read as a torch weights file ({type(e).__name__}: {first_line(e, 160)}); "
                        "a download cut short? fetch it again") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict of HyperIQA weights")
    return obj
