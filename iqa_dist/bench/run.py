"""`iqa-dist bench`: throughput figures measured side by side in one run, with the machine.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import torch

from ..config import Config
from ..output import console as make_console
from .kernels import bench_kernels
from .pipeline import bench_augment, bench_data
from .scaling import bench_scaling
from .scoring import bench_eval, bench_predict
from .timing import machine, spreads
from .training import bench_train, projection


def bench_command(what: str, cfg: Config, args) -> dict:
    console = make_console(stderr=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="iqa-bench-"))
    batches = [int(b) for b in str(args.batch).split(",")]
    report = {"machine": machine(), "device": str(device), "settings": vars(args).copy()}
    report["settings"].pop("command_fn", None)
    compiles = [False, True] if args.compile else [False]
    if what in ("augment", "all"):
        report["augment"] = bench_augment(cfg, args.images, batches[0], args.steps, args.workers, device, work, console)
    if what in ("data", "all"):
        report["data"] = bench_data(cfg, args.images, batches[0], args.steps, args.workers, device, work, console)
    if what in ("train", "all"):
        backbones = args.backbones.split(",") if args.backbones else (["tiny"] if device.type == "cpu" else ["swin-t", "swin-s", "swin-b"])
        precisions = args.precisions.split(",") if args.precisions else (["fp32"] if device.type == "cpu" else ["fp32", "bf16"])
        report["train"] = bench_train(cfg, backbones, precisions, compiles, batches, args.images, args.steps, device,
                                      work, console)
        report["projection"] = projection(report["train"])
    if what == "scaling":
        report["scaling"] = bench_scaling(cfg, (args.backbones or ("tiny" if device.type == "cpu" else "swin-t")).split(",")[0],
                                          (args.precisions or ("fp32" if device.type == "cpu" else "bf16")).split(",")[0],
                                          batches, args.images, args.steps, device, work, console, args.global_batch,
                                          args.intra_gbps, args.inter_gbps)
    if what == "kernels":
        backbone = (args.backbones or "swin-t").split(",")[0]  # counted at batch 2: Swin-T is cheap on a CPU too
        report["kernels"] = [bench_kernels(cfg, backbone, compiled, args.images, batches[0], args.steps, device, work,
                                           console) for compiled in compiles]
    if what == "predict":
        report["predict"] = bench_predict(cfg, args.images, args.workers, 16, device, work, console,
                                          max(1, args.steps // 2))
    if what in ("eval", "all"):
        report["eval"] = bench_eval(cfg, args.images, batches[0] * 2, compiles, device, work, max(1, args.steps // 4))
    report["spread"] = spreads(report)  # (max - min) / median of each figure's timed blocks
    out = Path(args.output) if args.output else Path("runs") / f"bench-{what}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    console.print(f"wrote {out}", highlight=False)
    if not all(math.isfinite(v) and v > 0 for v in _figures(report)):
        raise RuntimeError("a benchmark figure is not a positive number")  # never hide a broken measurement
    return report


def _figures(report: dict):
    for key in ("augment", "data"):
        for v in report.get(key, {}).values():
            if isinstance(v, float):
                yield v
    for row in report.get("train", []):
        yield from (row["model_only"], row["end_to_end"], row["anchor"])
    for row in report.get("eval", []):
        yield row["images_per_s"]
    if "predict" in report:
        yield report["predict"]["decode_main_thread"]
        yield report["predict"]["decode_workers"]
        for row in report["predict"]["rows"]:
            yield from (row["a_before"], row["b_score_files"], row["model_only"])
    for row in report.get("scaling", {}).get("measured", []):
        yield row["end_to_end"]
