"""The scaling model: the real step's measured rate per per-process batch, projected to 1-64
GPUs with a ring all-reduce of the gradients at stated bandwidths (an upper bound on the step).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

from ..config import Config
from ..models.hyperiqa import build_model
from ..training.optim import allreduce_bytes
from .inputs import BACKBONES, KONIQ_EPOCH
from .training import bench_train

# Interconnect bandwidth a ring all-reduce achieves per GPU (NCCL "bus bandwidth"), GB/s:
# NVLink within an H100/H200 node (~360 measured by nccl-tests of all_reduce on 8 GPUs) and one
# 400 Gb/s InfiniBand NIC per GPU across nodes (~45 after protocol overheads).
INTRA_GBPS, INTER_GBPS, GPUS_PER_NODE = 360.0, 45.0, 8


def rate_at(batch: float, rates: dict[int, float]) -> float:
    """Patches/s at a per-process batch, interpolated linearly in log2(batch) between measured
    batches (clamped outside them)."""
    known = sorted(rates)
    if batch <= known[0]:
        return rates[known[0]]
    if batch >= known[-1]:
        return rates[known[-1]]
    hi = next(b for b in known if b >= batch)
    lo = max(b for b in known if b <= batch)
    if hi == lo:
        return rates[lo]
    t = (math.log2(batch) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
    return rates[lo] + t * (rates[hi] - rates[lo])


def project(rates: dict[int, float], grad_bytes: float, global_batch: int | None, gpus: int,
            intra_gbps: float = INTRA_GBPS, inter_gbps: float = INTER_GBPS, per_node: int = GPUS_PER_NODE,
            patches: int = KONIQ_EPOCH) -> dict:
    """One projected row: N GPUs at a global batch (None: 96 per GPU). Each GPU computes its share
    at the rate measured (interpolated) for that per-GPU batch; then a ring all-reduce moves
    2 (N-1)/N x grad_bytes per GPU at the bus bandwidth (NVLink inside a node, InfiniBand beyond),
    not overlapped with the backward pass: an upper bound on the step time."""
    batch = global_batch or 96 * gpus
    per_gpu = batch / gpus
    compute = per_gpu / rate_at(per_gpu, rates)
    bandwidth = (intra_gbps if gpus <= per_node else inter_gbps) * 1e9
    comm = 2 * (gpus - 1) / gpus * grad_bytes / bandwidth if gpus > 1 else 0.0
    step = compute + comm
    return {"gpus": gpus, "global_batch": batch, "per_gpu_batch": per_gpu, "compute_ms": 1e3 * compute,
            "comm_ms": 1e3 * comm, "step_ms": 1e3 * step, "patches_per_s": batch / step,
            "epoch_s": patches / batch * step}


def bench_scaling(cfg: Config, backbone: str, precision: str, batches: list[int], n_images: int, steps: int,
                  device: torch.device, work: Path, console: Console, global_batch: int, intra_gbps: float,
                  inter_gbps: float) -> dict:
    """Measured: the real step's patches/s per per-process batch on this device. Projected: time
    per KonIQ epoch on 1-64 GPUs at `global_batch` and at 96 per GPU, with the all-reduce of the
    gradients at the stated bandwidths; and what that means for sweeps on one 8-GPU node."""
    rows = bench_train(cfg, [backbone], [precision], [False], batches, n_images, steps, device, work, console,
                       anchors=False)
    rates = {r["batch"]: r["end_to_end"] for r in rows}
    name, kwargs, size = BACKBONES[backbone]
    params = sum(p.numel() for p in build_model(replace(cfg.model, backbone=name, pretrained="none", img_size=size,
                                                              backbone_kwargs=kwargs)).parameters())
    grad = {p: allreduce_bytes(params, replace(cfg, train=replace(cfg.train, grad_compression=c)))
            for p, c in (("fp32", "none"), ("bf16", "bf16"))}
    gpus = (1, 2, 4, 8, 16, 32, 64)
    fixed = [project(rates, grad["fp32"], global_batch, n, intra_gbps, inter_gbps) for n in gpus]
    per_gpu = [project(rates, grad["fp32"], None, n, intra_gbps, inter_gbps) for n in gpus]
    one, eight = fixed[0], fixed[3]  # a run at the recipe's batch on 1 GPU, and on all 8 of a node
    sweep = {"members_per_hour_8_parallel": 8 * 3600 / (30 * one["epoch_s"]),
             "members_per_hour_one_at_a_time_on_8": 3600 / (30 * eight["epoch_s"])}
    sweep["speedup"] = sweep["members_per_hour_8_parallel"] / sweep["members_per_hour_one_at_a_time_on_8"]
    return {"measured": rows, "parameters": params, "grad_bytes": grad, "global_batch": global_batch,
            "intra_gbps": intra_gbps, "inter_gbps": inter_gbps, "fixed_batch": fixed, "per_gpu_96": per_gpu,
            "sweep_30_epochs": sweep, "backbone": backbone, "precision": precision}
