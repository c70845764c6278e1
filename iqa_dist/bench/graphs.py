"""`iqa-dist bench graph`: train.cuda_graph against the eager step, side by side in one process.

Per batch: the real step end to end eager (`Batches.get` + `Trainer.step`) and graphed
(`training.graph.GraphedStep`: captured once after warm-up, replayed), each with the host's CPU
milliseconds per step beside the wall milliseconds per step (a launch-bound step costs the host
as long as the device; a graphed one should cost the host almost nothing), the capture's time and
peak memory; what those rates make of one run at global batch 96 on 1-8 GPUs (`project`). Then
the equality check: `check_steps` graphed steps against the same body run eagerly
from the same start (same weights, numbers and keyed noise), losses per step and weights after.
Without CUDA the graphed figure is the same body run eagerly (nothing is captured): only the
equality check's eager side means something there.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console

from ..config import Config
from ..training.graph import GraphedStep
from .inputs import koniq_step
from .rig import StepRig
from .timing import measure


def bench_graph(cfg: Config, backbone: str, precision: str, batches: list[int], n_images: int, steps: int,
                device: torch.device, work: Path, console: Console, check_steps: int = 50) -> dict:
    c, store = koniq_step(cfg, backbone, n_images, work, device)
    rows = []
    for batch in batches:
        console.print(f"graph: {backbone} {precision} batch {batch}", highlight=False)
        rows.append({"batch": batch, **_rates(c, store, precision, batch, steps, device)})
    console.print(f"graph: {check_steps} graphed steps against the same steps eager, batch {batches[0]}",
                  highlight=False)
    check = equality(c, store, precision, batches[0], check_steps, device)
    return {"backbone": backbone, "precision": precision, "captured": device.type == "cuda", "rows": rows,
            "projection": project(rows), "check": check}


def project(rows: list[dict], global_batch: int = 96) -> list[dict]:
    """One run at a fixed global batch on N GPUs, each at the rate measured here for its share
    (global / N): eager and graphed patches/s and their multiple of one GPU's; communication left
    out (`bench scaling` adds it), so an upper bound on the speed."""
    rate = {r["batch"]: r for r in rows}
    if global_batch not in rate:
        return []
    one = rate[global_batch]
    return [{"gpus": global_batch // b, "per_gpu_batch": b, "eager": global_batch // b * r["eager"],
             "graphed": global_batch // b * r["graphed"],
             "eager_x_one_gpu": global_batch // b * r["eager"] / one["eager"],
             "graphed_x_one_gpu": global_batch // b * r["graphed"] / one["eager"]}
            for b, r in sorted(rate.items(), reverse=True) if global_batch % b == 0]


def _host_ms(fn, steps: int) -> float:
    """CPU milliseconds this process spends per call of fn (all its threads)."""
    t0 = time.process_time()
    for _ in range(steps):
        fn()
    return 1000 * (time.process_time() - t0) / steps


def _rates(c: Config, store, precision: str, batch: int, steps: int, device: torch.device) -> dict:
    out = {}
    for mode in ("eager", "graphed"):
        rig = StepRig.build(c, store, precision, batch, device)
        if mode == "graphed":
            g = GraphedStep(rig.trainer, rig.batches, capture=device.type == "cuda")
            fn = g.step
            t0 = time.perf_counter()
            for _ in range(g.warmup + 1):  # warm-up steps, the capture, the first replay
                fn()
            _sync(device)
            out["capture_s"] = time.perf_counter() - t0
        else:
            fn = rig.end_to_end
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rate = measure(fn, batch, steps, device)
        host = _host_ms(fn, steps)
        _sync(device)
        rig.trainer.settle()
        out[mode] = rate
        out[f"{mode}_step_ms"] = 1000 * batch / rate
        out[f"{mode}_host_ms"] = host
        out[f"{mode}_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    out["speedup"] = out["graphed"] / out["eager"]
    return out


def equality(c: Config, store, precision: str, batch: int, steps: int, device: torch.device) -> dict:
    """`steps` steps captured and replayed (on CUDA; without it the graphed body run eagerly)
    against the same steps of the eager step (`EagerStep`, what `train` runs without
    train.cuda_graph), from the same start, dropout and drop path on (both read the same keyed
    noise): the largest relative difference of a step's loss, and of the weights after; and the
    same between two eager runs, the noise floor of the kernels themselves (cuDNN's convolutions
    are pinned to deterministic ones for the check)."""
    deterministic, benchmark = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        runs = [_run(c, store, precision, batch, steps, device, graphed) for graphed in (True, False, False)]
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, benchmark
    (lg, wg), (le, we), (lf, wf) = runs

    def rel(a, b, wa, wb):
        return ((a - b).abs() / b.abs().clamp(min=1e-12)).max().item(), ((wa - wb).norm() / wb.norm()).item()

    loss_rel, weight_rel = rel(lg, le, wg, we)
    floor_loss, floor_weights = rel(lf, le, wf, we)
    return {"steps": steps, "batch": batch, "captured": device.type == "cuda", "loss_max_rel": loss_rel,
            "weights_rel": weight_rel, "floor_loss_max_rel": floor_loss, "floor_weights_rel": floor_weights,
            "dropout": c.model.dropout, "drop_path": c.model.drop_path,
            "first_losses": lg[:3].tolist(), "last_loss": lg[-1].item(), "last_loss_eager": le[-1].item()}


def _run(c: Config, store, precision: str, batch: int, steps: int, device: torch.device, graphed: bool):
    """(per-step losses, flat weights after) of `steps` graphed steps (captured on CUDA) or eager
    steps from a fresh rig, on the host."""
    rig = StepRig.build(c, store, precision, batch, device)
    step = GraphedStep(rig.trainer, rig.batches, capture=device.type == "cuda").step if graphed else rig.end_to_end
    losses = []
    for _ in range(steps):
        step()
        losses.append(rig.trainer.last.clone())  # read before the next replay overwrites it; no host read
    rig.trainer.settle()
    weights = torch.cat([p.detach().double().flatten() for p in rig.trainer.bare.parameters()]).cpu()
    return torch.stack(losses).double().cpu(), weights


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
