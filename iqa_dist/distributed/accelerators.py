"""Every Accelerator iqa-dist makes, made here: the training run's (from its config), a plain one
for scoring (`evaluate`, `predict`), and a fresh one per precision for the benchmarks.

Without GPUs, several processes need cpu=True to use gloo; Accelerate keeps one global state
per process, so a second Accelerator with another precision needs that state reset first.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (DDPCommunicationHookType, DistributedDataParallelKwargs, InitProcessGroupKwargs,
                              is_tensorboard_available, is_wandb_available)

from ..config import Config
from ..errors import UserError


def build_accelerator(cfg: Config, run_root: Path) -> Accelerator:
    """Precision from the preset (or from `accelerate launch` with train.mixed_precision=launcher).
    DDP: gradient buckets are views of the gradients (no copy in or out of the buckets), a static
    graph (HyperIQA uses every parameter every step, so DDP can plan its all-reduces once), and
    optionally bf16 all-reduces (half the bytes on the wire; the average is then bf16-rounded)."""
    precision = None if cfg.train.mixed_precision == "launcher" else cfg.train.mixed_precision
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    if cfg.run.log_with and not available[cfg.run.log_with]():  # Accelerate would only warn
        raise UserError(f"run.log_with={cfg.run.log_with}: the {cfg.run.log_with} package is not installed "
                        f"(pip install {cfg.run.log_with}); without it the run would log nothing there")
    hook = DDPCommunicationHookType.BF16 if cfg.train.grad_compression == "bf16" else DDPCommunicationHookType.NO
    acc = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        log_with=cfg.run.log_with or None,
        project_dir=str(run_root),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.timeout_s)),
                         DistributedDataParallelKwargs(gradient_as_bucket_view=True, static_graph=static_graph(cfg),
                                                       comm_hook=hook)],
    )
    if acc.mixed_precision == "fp16" and acc.device.type == "cpu":  # the preset's, or accelerate launch's
        raise UserError("train.mixed_precision=fp16 on the CPU: Accelerate has no fp16 autocast or loss scaler there "
                        "and would train in fp32 while the run records fp16; use bf16 (the CPU's autocast) or no")
    return acc


def static_graph(cfg: Config) -> bool:
    """DDP's static graph, except with gradient accumulation: static_graph and no_sync() do not
    mix in DDP (a crash, or gradients silently no longer all-reduced: pytorch/pytorch#187732,
    huggingface/accelerate#3679)."""
    return cfg.train.static_graph and cfg.train.micro_batch_size == 0


SCORING_TIMEOUT = timedelta(hours=24)


def scoring_accelerator() -> Accelerator:
    """For `evaluate` and `predict`: every process of the launch, no precision of its own (the model
    card's evaluation precision applies). Their last collective waits for the slowest process's
    share (a folder of large images, a slow mount), so it may wait far longer than NCCL's default
    10 minutes: SCORING_TIMEOUT."""
    return Accelerator(cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=SCORING_TIMEOUT)])


def reset_accelerate_state() -> None:
    """Forgets the process-wide state Accelerate keeps, so that the next Accelerator is made afresh
    (with its own precision): for several Accelerators in one process (bench, tests)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def fresh_accelerator(precision: str, device: torch.device) -> Accelerator:
    """A fresh single-process Accelerator for one precision (bench measures several in one process)."""
    reset_accelerate_state()
    return Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if precision == "bf16" else "no")
