"""The training step's figures: per backbone, precision, batch and compile setting, the real
step end to end, the same step model-only, and timm's plain classifier of the backbone (the
anchor); MFU and peak memory on a GPU; the epoch time that the per-GPU batch implies.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

from ..config import Config, load_config
from ..data.cache import prepare
from ..models.hyperiqa import build_model
from .inputs import BACKBONES, KONIQ_EPOCH, PEAK_BF16, recipe_options, source_images
from .rig import AnchorRig, StepRig
from .timing import measure


def flops_per_patch(model: torch.nn.Module, size: int, device: torch.device) -> float:
    """Forward + backward FLOPs of one patch, counted by torch (about 3x the forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def _peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def bench_train(cfg: Config, backbones: list[str], precisions: list[str], compiles: list[bool], batches: list[int],
                n_images: int, steps: int, device: torch.device, work: Path, console: Console,
                anchors: bool = True) -> list[dict]:
    """Per setting: the real step end to end, the same step model-only, and the timm anchor."""
    rows = []
    peak = next((v for k, v in PEAK_BF16.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    root = source_images(work / "koniq", n_images)
    for name in backbones:
        backbone, kwargs, size = BACKBONES[name]
        c = load_config("koniq-swin-t", [f"model.backbone={backbone}", "model.pretrained=none", f"model.img_size={size}",
                                         f"data.cache_dir={work / 'cache'}", *recipe_options(cfg)])
        c = replace(c, model=replace(c.model, backbone_kwargs=kwargs))
        view = prepare(load_config("koniq-swin-t", [f"data.root={root}", "data.split=random", f"model.img_size={size}",
                                                    f"data.cache_dir={work / 'cache'}"]), Console(quiet=True))
        store = view.image_store("train").to(device)
        for precision in precisions:
            for batch in batches:
                console.print(f"train: {name} {precision} batch {batch}: anchor", highlight=False)
                anchor = _anchor_rate(c, precision, batch, steps, device) if anchors else {"rate": math.nan,
                                                                                          "memory_gib": None}
                for compiled in compiles:
                    console.print(f"train: {name} {precision} batch {batch} compile={compiled}", highlight=False)
                    c_run = replace(c, train=replace(c.train, compile=compiled))
                    row = {"backbone": name, "ema_decay": c.train.ema_decay, "distill_weight": c.optim.distill_weight,
                           **_train_rates(c_run, view, store, precision, batch, steps, device)}
                    row.update(anchor=anchor["rate"], anchor_memory_gib=anchor["memory_gib"],
                               pct_of_anchor=100 * row["model_only"] / anchor["rate"])
                    if peak:
                        row["mfu_pct"] = 100 * row["end_to_end"] * row["gflop_per_patch"] * 1e9 / peak
                    rows.append(row)
    return rows


def _train_rates(c: Config, view, store, precision: str, batch: int, steps: int, device: torch.device) -> dict:
    """The real step (`Trainer.step`, what `train` runs, compiled as `train` compiles it, with the
    guard, EMA and bookkeeping) on a batch already on the device (model only) and fed by the real
    input path (`Batches.get`: cache -> device augmentation), under a real Accelerator."""
    torch.manual_seed(0)
    size = c.model.img_size
    flops = flops_per_patch(build_model(c.model).to(device).train(), size, device)
    rig = StepRig.build(c, store, precision, batch, device)
    t0 = time.perf_counter()
    rig.model_only()  # the first step compiles when compile is on
    rig.end_to_end()  # ... and the augmentation
    rig.trainer.settle()
    first = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model_only = measure(rig.model_only, batch, steps, device)
    end_to_end = measure(rig.end_to_end, batch, steps, device)
    rig.trainer.settle()
    return {"precision": precision, "compile": c.train.compile, "batch": batch, "img_size": size,
            "model_only": model_only, "end_to_end": end_to_end, "overhead_pct": 100 * (1 - end_to_end / model_only),
            "gflop_per_patch": flops / 1e9, "memory_gib": _peak_memory(device), "first_step_s": first,
            **_compiled_graphs(c)}


def _compiled_graphs(c: Config) -> dict:
    """What dynamo compiled so far in this process (with compile on): graphs, breaks, recompiles."""
    if not c.train.compile:
        return {}
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "recompiles": sum(counters["recompiles"].values())}


def _anchor_rate(c: Config, precision: str, batch: int, steps: int, device: torch.device) -> dict:
    """timm's plain classifier of the same backbone (rig.AnchorRig)."""
    anchor = AnchorRig(c, precision, batch, device)
    anchor.step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return {"rate": measure(anchor.step, batch, steps, device), "memory_gib": _peak_memory(device)}


def projection(rows: list[dict], global_batch: int = 96, patches: int = KONIQ_EPOCH, gpus=(1, 2, 4, 8)) -> list[dict]:
    """Time of a KonIQ epoch on N GPUs at a fixed global batch: each GPU runs the real step at
    batch global/N, at the end-to-end rate measured for that batch on one GPU. Communication is
    not included (it is `bench scaling`'s subject): these are lower bounds."""
    out = []
    for row in rows:
        for n in gpus:
            if row["batch"] * n == global_batch:
                rate = n * row["end_to_end"]
                out.append({"backbone": row["backbone"], "precision": row["precision"], "compile": row["compile"],
                            "gpus": n, "per_gpu_batch": row["batch"], "patches_per_s": rate,
                            "epoch_s": patches / rate})
    return out
