"""The typed config: one dataclass per section, each field with its unit and default.

Each field carries a trailing comment: it is the field's documentation (`iqa-dist train --help`
prints it), so keep it one line with the unit. Validation is in `__post_init__`; derived values
are methods of `Config`. Reading presets and overrides into it is `loading.py`'s job. How to
launch (processes, machines) is not here: that is `accelerate launch`'s business.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..errors import UserError

# The datasets a source reads (sources/readers.py has a reader for each)
DATASETS = ("koniq10k", "spaq", "kadid10k", "agiqa3k", "livec", "csv", "synthetic")
PROTOCOLS = ("random", "grid")  # test-time patch layouts (data/protocol.py)
# How and where a run runs, not what it trains: a resumed run may change them (the data themselves
# are checked by content when resuming), and run tables never show them as a difference.
ENVIRONMENT = frozenset({"run.root", "run.name", "run.log_with", "preset", "data.cache_dir", "data.workers",
                         "data.root", "data.resident", "train.log_every", "train.keep_checkpoints"})


@dataclass
class DataConfig:
    """Dataset, split, cache and patch settings."""

    dataset: str = "koniq10k"  # source: koniq10k | spaq | kadid10k | agiqa3k | livec | csv | synthetic
    root: str = ""  # folder holding the dataset's published files (unused by synthetic)
    cache_dir: str = ""  # cache root; "" = $IQA_DIST_CACHE or ~/.cache/iqa_dist
    score_column: str = ""  # annotation column trained on; "" = the source's default (KonIQ: MOS_zscore)
    csv_file: str = ""  # csv source: annotation file, relative to root; "" = the only *.csv in root
    image_column: str = ""  # csv source: column with image paths; "" = the first of image, name, image_name, dist_name, dist_img, path, filename, file
    image_dir: str = ""  # folder of images relative to root; "" = the source's default
    resize: str = "auto"  # auto (the source's literature default) | none | WxH (e.g. 512x384, turned with the photo) | WxH! (exactly W wide, H high) | short:N
    exif: bool = True  # apply a photo's EXIF orientation tag (upright, as a viewer shows it); false: pixels as stored
    split: str = "random"  # random | official | all (evaluation only) | split file(s), comma-separated (CSV, JSON or .txt)
    split_seed: int = 0  # seed of random splits and of the held-out validation part
    test_fraction: float = 0.2  # random split: share of contents (images or references) in test
    val_fraction: float = 0.1  # share of the training contents held out for validation (model selection)
    synthetic_size: int = 0  # synthetic source: images per content; 0 = its default
    train_patch_num: int = 20  # patches per training image per epoch
    test_patch_num: int = 20  # patches per val/test image at test time, predictions averaged per image
    test_protocol: str = "random"  # test-time patches: random (seeded by the image's pixels, as HyperIQA) | grid (a regular grid)
    train_patches: str = "random"  # random = fresh device crops each epoch | cached = sample from K stored patches
    cached_patch_num: int = 40  # K: patches stored per training image when train_patches=cached
    score_norm: str = "none"  # training targets: none = raw scores (HyperIQA) | range = (s - min) / (max - min) | zscore = (s - mean) / std, from the training split
    datasets: list = field(default_factory=list)  # joint training: [{name, weight, root?, score_column?, resize?, split?, ...}]; [] = data.dataset alone
    roots: dict = field(default_factory=dict)  # joint training: dataset name -> its root (--data.roots.spaq=/data/spaq)
    resident: str = "auto"  # where training pixels live: auto | device | host
    skip_bad: bool = False  # drop unreadable/invalid rows (listed in the cache metadata) instead of failing
    workers: int = 0  # decode processes for the cache build; 0 = min(8, CPU count)

    def __post_init__(self) -> None:
        _choice("data.dataset", self.dataset, DATASETS)
        _choice("data.train_patches", self.train_patches, ("random", "cached"))
        _choice("data.score_norm", self.score_norm, ("none", "range", "zscore"))
        _choice("data.resident", self.resident, ("auto", "device", "host"))
        _choice("data.test_protocol", self.test_protocol, PROTOCOLS)
        if not re.fullmatch(r"auto|none|[1-9]\d*x[1-9]\d*!?|short:[1-9]\d*", self.resize):
            raise UserError(f"data.resize={self.resize!r}: expected auto, none, WxH (e.g. 512x384), WxH! (exactly that, "
                            "whatever the orientation) or short:N, sizes above 0")
        for name in ("test_fraction", "val_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise UserError(f"data.{name}={getattr(self, name)}: must lie strictly between 0 and 1")
        for name in ("train_patch_num", "test_patch_num", "cached_patch_num"):
            _positive(f"data.{name}", getattr(self, name))
        if self.train_patches == "cached" and self.cached_patch_num < self.train_patch_num:
            raise UserError(
                f"data.cached_patch_num={self.cached_patch_num} is below data.train_patch_num="
                f"{self.train_patch_num}: each epoch samples train_patch_num of the K stored patches"
            )
        self.members()  # validates data.datasets

    def members(self) -> list["DataConfig"]:
        """One DataConfig per dataset trained on: this one, or each entry of data.datasets (its
        own files, split and resize; the shared patch and cache settings from here)."""
        if not self.datasets:
            return [self]
        if self.score_norm == "none":
            raise UserError("data.datasets: joint training needs a common target scale: set data.score_norm to "
                            "zscore or range (each computed on that dataset's training split)")
        if self.root:
            raise UserError(f"data.root={self.root!r} with data.datasets: give each dataset's folder with "
                            f"data.roots.NAME=DIR (e.g. --data.roots.{self.datasets[0].get('name', 'koniq10k')}={self.root})")
        allowed = ("name", "weight", "root", *DATASET_FIELDS)
        out, names = [], []
        for i, entry in enumerate(self.datasets):
            where = f"data.datasets[{i}]"
            if not isinstance(entry, dict) or "name" not in entry:
                raise UserError(f"{where}: expected a mapping with at least a name, e.g. {{name: spaq, weight: 1}}")
            unknown = sorted(set(entry) - set(allowed))
            if unknown:
                raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
            _choice(f"{where}.name", entry["name"], DATASETS)
            if entry["name"] in names:
                raise UserError(f"{where}: {entry['name']} is listed twice")
            names.append(entry["name"])
            if not isinstance(entry.get("weight", 1.0), (int, float)) or not entry.get("weight", 1.0) > 0:
                raise UserError(f"{where}.weight={entry.get('weight')!r}: must be a positive number")
            fresh = {f: getattr(DataConfig(), f) for f in DATASET_FIELDS}
            own = {k: str(v) for k, v in entry.items() if k in DATASET_FIELDS}
            root = str(self.roots.get(entry["name"], entry.get("root", "")))
            out.append(dataclasses.replace(self, dataset=entry["name"], root=root, datasets=[], roots={},
                                           **{**fresh, **own}))
        unknown_roots = sorted(set(self.roots) - set(names))
        if unknown_roots:
            raise UserError(f"data.roots: {', '.join(unknown_roots)} is not among data.datasets ({', '.join(names)})")
        return out

    def weights(self) -> list[float]:
        """Each member's share of a global batch (proportional)."""
        return [float(e.get("weight", 1.0)) for e in self.datasets] if self.datasets else [1.0]


@dataclass
class ModelConfig:
    """HyperIQA on a timm backbone."""

    backbone: str = "swin_tiny_patch4_window7_224.ms_in1k"  # timm model name with its weights tag (any Swin, resnet50.tv_in1k, ...)
    pretrained: str = "hub"  # hub (the tag's weights from the HF hub cache) | none (random init) | path to .safetensors/.pth
    init_from: str = ""  # start from a trained model's weights (model or run folder, or Hub repo id org/name[@rev]); its architecture, not pretrained
    backbone_kwargs: dict = field(default_factory=dict)  # extra timm kwargs, e.g. tiny Swins: embed_dim, depths, num_heads
    img_size: int = 224  # patch side in px: the backbone's input and the crop size
    fusion: str = "concat"  # hyper-network input: concat (all 4 stages, phase one) | attention | last (stage 4 only)
    hyper_hidden: list = field(default_factory=lambda: [512, 256])  # widths of the 1x1 convs before the hyper input
    hyper_in: int = 112  # channels of the hyper-network feature map
    lda_out: int = 16  # target-net input features from each of stages 1-3 (stage 4 gives target_in - 3*lda_out)
    target_in: int = 224  # target-net input width
    target_hidden: list = field(default_factory=lambda: [112, 56, 28, 14])  # target-net hidden widths (generated per image)
    feature_size: int = 7  # side of the hyper-network feature map, px of the last stage grid
    dropout: float = 0.3  # dropout in the hyper and target nets
    drop_path: float = 0.2  # stochastic depth rate of the backbone

    def __post_init__(self) -> None:
        _choice("model.fusion", self.fusion, ("concat", "attention", "last"))
        for name in ("img_size", "hyper_in", "lda_out", "target_in", "feature_size"):
            _positive(f"model.{name}", getattr(self, name))
        if len(self.target_hidden) != 4:
            raise UserError(f"model.target_hidden={self.target_hidden}: HyperIQA's target net has 4 hidden layers")
        if self.target_in <= 3 * self.lda_out:
            raise UserError(f"model.target_in={self.target_in} must exceed 3 * model.lda_out={3 * self.lda_out}")
        widths = [self.target_in, *self.target_hidden]
        for a, b in zip(widths[:-1], widths[1:]):
            if (a * b) % self.feature_size**2:
                raise UserError(
                    f"model.target_hidden: {a}x{b} target weights must divide into "
                    f"feature_size^2={self.feature_size ** 2} channels of the weight-generating conv"
                )
        for name in ("dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"model.{name}={getattr(self, name)}: must lie in [0, 1)")

    def architecture(self) -> dict[str, Any]:
        """The fields that decide the weights' names and shapes (ARCHITECTURE): two configs that
        agree on them load each other's weights."""
        return {name: getattr(self, name) for name in ARCHITECTURE}


@dataclass
class OptimConfig:
    """Optimizer, parameter groups, schedule, loss."""

    optimizer: str = "adamw"  # adamw (decoupled weight decay) | adam (L2 decay added to the gradient, as the original HyperIQA)
    lr: float = 1e-5  # backbone learning rate (the backbone parameter group)
    lr_ratio: float = 10.0  # the head group (hyper network, and LDA when lda_group=head) trains at lr * lr_ratio
    lda_group: str = "backbone"  # group of the LDA layers: backbone (as the original code) | head
    freeze_hyper_after: int = 0  # epochs after which the head group stops training (1 = the original code's accident); 0 = never
    weight_decay: float = 1e-4  # decoupled (adamw) or L2 (adam) weight decay
    schedule: str = "cosine"  # cosine (to min_lr_ratio * lr) | constant; stepped per optimizer step
    warmup_steps: int = 0  # linear warmup, optimizer steps at base_batch (scaled to keep the same number of samples)
    lr_scaling: str = "none"  # large batches: none | linear | sqrt: lr x (batch_size / base_batch) or its square root
    base_batch: int = 96  # the batch the recipe's lr and warmup were tuned at (the presets': 96)
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of the peak lr
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping (the norm is still logged)
    rank_weight: float = 0.0  # weight of the pairwise ranking loss added to L1 (phase one tried 0.3); pairs over the global batch
    distill_weight: float = 0.0  # self-distillation: weight of the L1 to the EMA teacher's prediction of the same patch (needs train.ema_decay); 0 = off
    teachers: list = field(default_factory=list)  # trained models that teach (model or run folders, Hub ids, a sweep group; several: their mean); train --teacher
    teacher_weight: float = 1.0  # with optim.teachers: weight of the L1 to their prediction of the same patch, on the student's target scale

    def __post_init__(self) -> None:
        _choice("optim.optimizer", self.optimizer, ("adamw", "adam"))
        _choice("optim.lda_group", self.lda_group, ("backbone", "head"))
        _choice("optim.schedule", self.schedule, ("cosine", "constant"))
        _choice("optim.lr_scaling", self.lr_scaling, ("none", "linear", "sqrt"))
        _positive("optim.base_batch", self.base_batch)
        _positive("optim.lr", self.lr)
        _positive("optim.lr_ratio", self.lr_ratio)
        for name in ("weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip", "rank_weight", "freeze_hyper_after",
                     "distill_weight", "teacher_weight"):
            _non_negative(f"optim.{name}", getattr(self, name))


@dataclass
class AugmentConfig:
    """On the device: crop -> [0,1] -> flip -> ColorJitter -> normalise."""

    hflip: bool = True  # random horizontal flip, p=0.5
    brightness: float = 0.1  # ColorJitter brightness: factor uniform in [1-b, 1+b]
    contrast: float = 0.1  # ColorJitter contrast: factor uniform in [1-c, 1+c]
    saturation: float = 0.1  # ColorJitter saturation: factor uniform in [1-s, 1+s]
    hue: float = 0.05  # ColorJitter hue: shift uniform in [-h, h], h <= 0.5

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation", "hue"):
            _non_negative(f"augment.{name}", getattr(self, name))
        if self.hue > 0.5:
            raise UserError(f"augment.hue={self.hue}: must be at most 0.5")


@dataclass
class TrainConfig:
    """Schedule, batch, evaluation, checkpoints, precision."""

    epochs: int = 30  # passes over train images x train_patch_num
    max_steps: int = 0  # stop after this many optimizer steps; 0 = epochs x steps per epoch
    batch_size: int = 96  # GLOBAL patches per optimizer step, whatever the number of processes
    micro_batch_size: int = 0  # most patches per process per forward (gradient accumulation above it); 0 = no limit
    eval_batch_size: int = 0  # patches per process per forward at evaluation; 0 = 2 x batch share
    patience: int = 7  # early stopping: evaluations without a val SRCC gain; 0 = never stop early
    eval_every: int = 0  # evaluate every N optimizer steps; 0 = at the end of each epoch
    checkpoint_every: int = 0  # checkpoint every N optimizer steps; 0 = at each evaluation
    keep_checkpoints: int = 2  # most recent checkpoints kept
    log_every: int = 50  # optimizer steps between progress lines in non-terminal logs
    seed: int = 0  # seeds the sampler, augmentation and model init
    mixed_precision: str = "bf16"  # bf16 | fp16 (loss scaling) | no | launcher (take accelerate's setting)
    grad_compression: str = "none"  # gradients all-reduced as: none (fp32) | bf16 (half the bytes, a DDP communication hook)
    static_graph: bool = True  # DDP static_graph (every parameter gets a gradient every step); off with micro_batch_size, which it breaks
    ema_decay: float = 0.0  # weight EMA (fp32, on the device, per optimizer step); 0 = off, e.g. 0.999; exported when better on val
    select_on: str = ""  # joint training: the dataset whose val SRCC selects the model; "" = the weight-averaged val SRCC
    track_test: bool = False  # also score the test split at every evaluation, never for selection (the summary adds the best test figure over epochs, labelled optimistic)
    compile: bool = False  # torch.compile the model for training and evaluation (compiled kernels cached beside the data cache)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs
    compile_backend: str = "inductor"  # torch.compile backend: inductor (fused kernels) | aot_eager (tracing only, for debugging)
    cuda_graph: bool = False  # capture the whole training step once as a CUDA graph and replay it (one GPU, bf16 or fp32, no compile); see the README
    deterministic: bool = False  # torch's deterministic algorithms only (an op without one fails naming itself); slower
    timeout_s: int = 600  # collective timeout: a failed rank brings the others down after this long

    def __post_init__(self) -> None:
        _choice("train.mixed_precision", self.mixed_precision, ("bf16", "fp16", "no", "launcher"))
        _choice("train.compile_mode", self.compile_mode, ("default", "reduce-overhead", "max-autotune-no-cudagraphs"))
        _choice("train.compile_backend", self.compile_backend, ("inductor", "aot_eager"))
        _choice("train.grad_compression", self.grad_compression, ("none", "bf16"))
        for name in ("epochs", "batch_size", "keep_checkpoints", "log_every", "timeout_s"):
            _positive(f"train.{name}", getattr(self, name))
        if self.cuda_graph and self.compile:
            raise UserError("train.cuda_graph does not take train.compile: choose one (the graph already removes "
                            "the launches)")
        if self.cuda_graph and self.mixed_precision == "fp16":
            raise UserError("train.cuda_graph does not take train.mixed_precision=fp16: the loss scaler updates its "
                            "scale on the host; use bf16")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"train.ema_decay={self.ema_decay}: must lie in [0, 1)")
        for name in ("max_steps", "micro_batch_size", "eval_batch_size", "patience", "eval_every", "checkpoint_every"):
            _non_negative(f"train.{name}", getattr(self, name))


@dataclass
class RunConfig:
    """Where results go."""

    name: str = ""  # run name (letters, digits and . _ + - = ,); "" = the preset's name
    root: str = "runs"  # parent folder of run directories
    log_with: str = ""  # tracker through Accelerate: tensorboard | wandb | "" (none)

    def __post_init__(self) -> None:
        _choice("run.log_with", self.log_with, ("", "tensorboard", "wandb"))
        # = and , too: a sweep member's name says its settings (lr=1e-5,split03); no / or spaces
        if not re.fullmatch(r"[A-Za-z0-9_.+=,-]*", self.name):
            raise UserError(f"run.name={self.name!r}: use letters, digits and . _ + - = , only")


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str = ""  # the preset this config was loaded from

    def __post_init__(self) -> None:
        names = [m.dataset for m in self.data.members()]
        if self.train.select_on and self.train.select_on not in names:
            raise UserError(f"train.select_on={self.train.select_on!r}: not a dataset trained on ({', '.join(names)})")
        o = self.optim
        if o.teachers and o.teacher_weight <= 0:
            raise UserError(f"optim.teacher_weight={o.teacher_weight} with {len(o.teachers)} teacher(s): a teacher needs "
                            "a weight above 0 (the default 1.0 weighs it as the labels)")
        if o.teachers and o.distill_weight > 0:
            raise UserError("optim.distill_weight and a teacher (optim.teachers): one teacher per run, the weight EMA "
                            "or trained models")
        if o.teachers and len(names) > 1:
            raise UserError(f"a teacher with joint training ({', '.join(names)}): each dataset has its own score scale; "
                            "train a student on one dataset")
        if self.optim.distill_weight > 0 and not self.train.ema_decay:
            raise UserError(f"optim.distill_weight={self.optim.distill_weight}: the teacher is the weight EMA; set "
                            "train.ema_decay too (e.g. 0.99)")

    def lr_factor(self) -> float:
        """How optim.lr_scaling scales the learning rates at this batch size."""
        ratio = self.train.batch_size / self.optim.base_batch
        return {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[self.optim.lr_scaling]

    def effective_lr(self) -> float:
        """The backbone group's peak learning rate at this batch size (the head's: `group_lrs`)."""
        return self.optim.lr * self.lr_factor()

    def group_lrs(self) -> dict[str, float]:
        """Each parameter group's peak learning rate at this batch size: the head trains at
        optim.lr_ratio times the backbone's."""
        return {"backbone": self.effective_lr(), "head": self.effective_lr() * self.optim.lr_ratio}

    def effective_warmup(self) -> int:
        """Warmup in optimizer steps at this batch size: as many samples as warmup_steps at base_batch
        (unchanged without lr scaling)."""
        if self.optim.lr_scaling == "none":
            return self.optim.warmup_steps
        return math.ceil(self.optim.warmup_steps * self.optim.base_batch / self.train.batch_size)

    def run_name(self) -> str:
        return self.run.name or Path(self.preset).stem or "run"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# section name -> its dataclass, e.g. "optim" -> OptimConfig
SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config) if f.name != "preset"
}


def _choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        hint = difflib.get_close_matches(str(value), allowed, n=1)
        more = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise UserError(f"{key}={value!r}: expected one of {', '.join(map(repr, allowed))}{more}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"{key}={value}: must be positive")


def _non_negative(key: str, value: float) -> None:
    if value < 0:
        raise UserError(f"{key}={value}: must not be negative")


# The trailing comment is the field's one documentation, read where it stands (field metadata would
# say it a second time, in a string, in every field's default); reading it costs milliseconds, once.
@functools.cache
def field_docs(section_cls: type) -> dict[str, str]:
    """The trailing comment of each field in the class source: its documentation."""
    docs = {}
    for line in inspect.getsource(section_cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?  # (.*)$", line)
        if m:
            docs[m.group(1)] = m.group(2).strip()
    return docs


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


# ModelConfig fields that decide the weights' names and shapes; the rest (pretrained, init_from,
# dropout, drop_path) are how a run starts or regularises, not what it holds.
ARCHITECTURE = ("backbone", "backbone_kwargs", "img_size", "fusion", "hyper_hidden", "hyper_in", "lda_out", "target_in",
                "target_hidden", "feature_size")

# Fields that describe one dataset's files: they do not carry over to another dataset.
DATASET_FIELDS = ("score_column", "csv_file", "image_column", "image_dir", "resize", "split")
