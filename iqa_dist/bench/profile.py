"""`iqa-dist bench profile`: where a step's time goes, per part, eager and compiled (and graphed).

A `torch.profiler` trace of `steps` steady steps of the real step (`Batches.get` + `Trainer.step`,
as `train` runs it, after warm-up and, compiled, after the compilation) reduced to one table: per
part of the step (the `parts.part` ranges: host, augment, forward, loss, backward, clip, guard,
optimizer, ema) the host's milliseconds inside the range and the device's milliseconds of the kernels
it launched, per step; then the wall time per step, the device's busy time (every kernel and copy)
and its idle time (wall - busy): a step whose device idles is bound by the host. With
`--compile`, dynamo's counters beside it (graphs, graph breaks, recompiles); run it under
`TORCH_LOGS=recompiles,graph_breaks,cudagraphs` for their reasons. The trace itself is written
beside the report (`--work-dir`), for chrome://tracing or Perfetto.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

from ..config import Config
from ..training.graph import GraphedStep
from .inputs import koniq_step
from .rig import StepRig

PARTS = ("host", "noise", "augment", "forward", "teacher", "loss", "backward", "clip", "guard", "optimizer", "ema")


def bench_profile(cfg: Config, backbone: str, precision: str, batch: int, compiles: list[bool], n_images: int,
                  steps: int, device: torch.device, work: Path, console: Console) -> list[dict]:
    c, store = koniq_step(cfg, backbone, n_images, work, device)
    out = []
    modes = ["compiled" if compiled else "eager" for compiled in compiles] + (["graphed"] if device.type == "cuda" else [])
    for mode in modes:
        console.print(f"profile: {backbone} {precision} batch {batch} {mode}", highlight=False)
        c_run = replace(c, train=replace(c.train, compile=mode == "compiled"))
        rig = StepRig.build(c_run, store, precision, batch, device)
        step = GraphedStep(rig.trainer, rig.batches, capture=True).step if mode == "graphed" else rig.end_to_end
        for _ in range(5):  # warm-up (compiled: the compilation; graphed: the capture)
            step()
        rig.trainer.settle()
        _sync(device)
        trace = work / f"profile-{backbone}-{mode}.json"
        out.append({"backbone": backbone, "precision": precision, "batch": batch, "mode": mode,
                    **profile_steps(step, steps, device, trace), **_dynamo(mode == "compiled")})
        rig.trainer.settle()
    return out


def profile_steps(step, steps: int, device: torch.device, trace: Path | None = None) -> dict:
    """`steps` calls of step() under torch.profiler: per part host and device ms per step, and the
    wall, device-busy and device-idle ms per step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        wall = time.perf_counter() - t0
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    # key_averages groups by (name, device type, annotation): a part is its CPU range (whose device
    # time is the kernels launched inside it); the device's busy time is its kernels and copies alone
    events = prof.key_averages()
    cpu, gpu = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    parts = {e.key: {"host_ms": e.cpu_time_total / 1e3 / steps, "device_ms": _device_us(e, total=True) / 1e3 / steps}
             for e in events if e.key in PARTS and e.device_type == cpu}
    busy = sum(_device_us(e, total=False) for e in events
               if e.device_type == gpu and not getattr(e, "is_user_annotation", False)) / 1e3 / steps
    wall_ms = 1e3 * wall / steps
    return {"steps": steps, "parts": parts, "wall_ms": wall_ms, "device_busy_ms": busy,
            "device_idle_ms": max(0.0, wall_ms - busy) if device.type == "cuda" else None,
            "trace": str(trace) if trace else None}


def _device_us(e, total: bool) -> float:
    """A profiler average's device microseconds (the range's kernels; or the kernel's own)."""
    name = "device_time_total" if total else "self_device_time_total"
    return float(getattr(e, name, 0.0) or 0.0)


def _dynamo(compiled: bool) -> dict:
    if not compiled:
        return {}
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "recompiles": sum(counters["recompiles"].values())}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
