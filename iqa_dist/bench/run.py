"""`iqa-dist bench`: throughput figures measured side by side in one run, with the machine.

Each bench of BENCHES adds its part of the report (`augment`, `data`, `train` with its
`projection`, `scaling`, `kernels`, `predict`, `eval`, `serve`); `all` runs ALL. The report is written as
JSON with the machine and the settings, and `show.py` prints it. Every measured figure is a
`timing.Rate`; a non-positive or non-finite one fails the command rather than be reported.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import Config
from ..output import console as make_console
from .graphs import bench_graph
from .kernels import bench_kernels
from .pipeline import bench_augment, bench_data
from .profile import bench_profile
from .scaling import INTER_GBPS, INTRA_GBPS, bench_scaling
from .scoring import bench_eval, bench_predict
from .serving import bench_serve
from .timing import machine, rates, spreads
from .training import bench_train, projection


@dataclass(kw_only=True)
class BenchSettings:
    """What the benches measure with (`iqa-dist bench`'s options, checked)."""

    device: torch.device
    work: Path  # where the source JPEGs and caches go
    batches: list[int] = field(default_factory=lambda: [32])  # patches per batch; train and scaling take several
    steps: int = 6  # timed batches per figure, after warm-up
    images: int = 24  # KonIQ-size source JPEGs
    workers: int = 2  # DataLoader workers of phase one's pipeline; predict's decoding workers
    backbones: list[str] = field(default_factory=list)  # train, scaling, kernels; [] = the device's default
    precisions: list[str] = field(default_factory=list)  # train, scaling; [] = the device's default
    compile: bool = False  # train, eval, kernels: torch.compile too
    global_batch: int = 96  # scaling: the global batch projected
    intra_gbps: float = INTRA_GBPS  # scaling: all-reduce bus bandwidth per GPU within a node
    inter_gbps: float = INTER_GBPS  # ... and across nodes
    check_steps: int = 50  # graph: graphed steps compared with the same steps eager
    clients: list[int] = field(default_factory=lambda: [1, 16])  # serve: concurrent clients, a figure each
    max_batch: int = 16  # serve: the server's --max-batch
    max_wait_ms: float = 10.0  # serve: the server's --max-wait-ms

    @property
    def compiles(self) -> list[bool]:
        return [False, True] if self.compile else [False]

    @property
    def cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def backbone(self) -> str:
        """The one backbone of the benches that measure one (scaling, graph, profile)."""
        return (self.backbones or ["tiny" if self.cpu else "swin-t"])[0]

    @property
    def precision(self) -> str:
        return (self.precisions or ["fp32" if self.cpu else "bf16"])[0]


def _augment(cfg: Config, s: BenchSettings, console) -> dict:
    return {"augment": bench_augment(cfg, s.images, s.batches[0], s.steps, s.workers, s.device, s.work, console)}


def _data(cfg: Config, s: BenchSettings, console) -> dict:
    return {"data": bench_data(cfg, s.images, s.batches[0], s.steps, s.workers, s.device, s.work, console)}


def _train(cfg: Config, s: BenchSettings, console) -> dict:
    backbones = s.backbones or (["tiny"] if s.cpu else ["swin-t", "swin-s", "swin-b"])
    precisions = s.precisions or (["fp32"] if s.cpu else ["fp32", "bf16"])
    rows = bench_train(cfg, backbones, precisions, s.compiles, s.batches, s.images, s.steps, s.device, s.work, console)
    return {"train": rows, "projection": projection(rows)}


def _scaling(cfg: Config, s: BenchSettings, console) -> dict:
    return {"scaling": bench_scaling(cfg, s.backbone, s.precision, s.batches, s.images, s.steps, s.device, s.work, console,
                                     s.global_batch, s.intra_gbps, s.inter_gbps)}


def _kernels(cfg: Config, s: BenchSettings, console) -> dict:
    backbone = (s.backbones or ["swin-t"])[0]  # counted at batch 2: Swin-T is cheap on a CPU too
    return {"kernels": [bench_kernels(cfg, backbone, compiled, s.images, s.batches[0], s.steps, s.device, s.work,
                                      console) for compiled in s.compiles]}


def _predict(cfg: Config, s: BenchSettings, console) -> dict:
    return {"predict": bench_predict(cfg, s.images, s.workers, 16, s.device, s.work, console, max(1, s.steps // 2))}


def _eval(cfg: Config, s: BenchSettings, console) -> dict:
    return {"eval": bench_eval(cfg, s.images, s.batches[0] * 2, s.compiles, s.device, s.work, max(1, s.steps // 4))}


def _graph(cfg: Config, s: BenchSettings, console) -> dict:
    return {"graph": bench_graph(cfg, s.backbone, s.precision, s.batches, s.images, s.steps, s.device, s.work, console,
                                 s.check_steps)}


def _profile(cfg: Config, s: BenchSettings, console) -> dict:
    return {"profile": bench_profile(cfg, s.backbone, s.precision, s.batches[0], s.compiles, s.images, s.steps, s.device,
                                     s.work, console)}


def _serve(cfg: Config, s: BenchSettings, console) -> dict:
    return {"serve": bench_serve(cfg, s.images, s.clients, s.max_batch, s.max_wait_ms, s.device, s.work, console,
                                 max(1, s.steps // 2))}


# what `iqa-dist bench WHAT` measures, in the order `all` runs its share of them
BENCHES = {"augment": _augment, "data": _data, "train": _train, "eval": _eval, "scaling": _scaling,
           "kernels": _kernels, "predict": _predict, "graph": _graph, "profile": _profile, "serve": _serve}
ALL = ("augment", "data", "train", "eval")


def run_bench(what: str, cfg: Config, settings: BenchSettings, output: Path | None = None) -> dict:
    """Measures `what` (a key of BENCHES, or "all"), writes the report as JSON (`output`, default
    runs/bench-WHAT-TIME.json) and returns it."""
    console = make_console(stderr=True)
    report = {"machine": machine(), "device": str(settings.device),
              "settings": {"what": what, **{k: str(v) if isinstance(v, (Path, torch.device)) else v
                                           for k, v in asdict(settings).items()}}}
    for name in ALL if what == "all" else (what,):
        report.update(BENCHES[name](cfg, settings, console))
    report["spread"] = spreads(report)  # (max - min) / median of each figure's timed blocks
    out = output or Path("runs") / f"bench-{what}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    console.print(f"wrote {out}", highlight=False)
    broken = [k for k, v in rates(report).items() if not (math.isfinite(v) and v > 0)]
    if broken:  # never hide a broken measurement
        raise RuntimeError(f"benchmark figures that are not positive numbers: {', '.join(broken)}")
    return report
