"""The training step, written once: `iqa-dist train` runs it and `iqa-dist bench train` times it.

A step is this process's share of the global batch (`Batches.get`: plan -> one upload -> device
augmentation), forward and backward per micro-batch, the per-sample losses reduced once, gradient
clipping, the guard, the update and the weight EMA (`train_step`), and its bookkeeping
(`Trainer.step`: the learning rate of the step written in, the step counter and the loss window).

One owner for each piece of per-step state: the learning rate is `optim.Schedule`'s function of
the step, written into the groups by `Trainer.set_lr` only; the EMA is updated in `train_step`
only, with the guard's device flag; the guard (guard.py) only detects and decides; the regularisers'
uniforms are `batches.KeyedNoise`'s function of (seed, step, sample). The eager step (`EagerStep`)
and the graphed one (graph.GraphedStep) share all four, so they train the same numbers.

World-size invariance: train.batch_size is GLOBAL. Step s draws its B samples (and their
augmentation) identically on every process; process r takes chunk (micro * world + r) of them.
The step sums a micro-batch's per-sample losses and divides by B / world: the micro-batch
gradients add up, DDP's mean over processes divides by world, and the result is the mean over
the global batch, even when chunks are uneven. The ranking term pairs every sample with every
other of the GLOBAL batch (predictions gathered across processes with their gradients), so it
too is the same loss on 1 GPU and on 64.

No host round trip per step: the non-finite and preemption flags are read one step late
(StepGuard), and the fused optimizer itself skips a non-finite step on the device (under fp16
the loss scaler hands the fused kernel its own overflow flag, also without a host read), so no
update is ever taken from a non-finite loss or gradient. The host work (the plan, the random
draws, the packing) is marked `part("host")` and touches no device tensor; everything else is
device work that never waits for the device (tests/test_audit.py proves it on the CPU with
`bench.audit.StepAudit`). The other `part` names label the step's stretches for the audit's kernel
counts and for torch.profiler traces.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields

import torch
from accelerate import Accelerator
from rich.console import Console
from torch import nn

from ..config import Config
from ..data.augment import Augmenter
from ..distributed.gather import gather_global
from ..distributed.shards import Shares
from ..parts import part
from .batches import Batch, Batches
from .compile import compile_model, compile_step
from .guard import BadStep, StepGuard
from .losses import sample_losses
from .optim import Schedule, WeightEMA, build_optimizer
from .preemption import PreemptionFlag


def train_step(t: "Trainer", batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of each micro-batch (gradients synced on the last one only), clipping,
    the guard (which also settles the previous step: BadStep for a bad one), the update, the EMA.
    With a teacher, it predicts each micro-batch's patches too: trained models (optim.teachers,
    training/teacher.py), or under self-distillation the EMA (step s's teacher is the average of
    steps 1..s-1). Returns (summed loss, gradient norm), both on the
    device."""
    total = None
    for m, mb in enumerate(batch.micro):
        with t.acc.no_sync(t.model) if m < len(batch.micro) - 1 else contextlib.nullcontext():
            with part("forward"):
                pred = t.forward(mb.x, mb.noise).float()
            taught = None
            if t.teacher is not None:  # eval mode (no dropout, no drop path): the same patch, no gradient
                with part("teacher"), torch.no_grad(), t.acc.autocast():
                    taught = t.teacher(mb.x).float()
            with part("loss"):
                ranked = (gather_global(pred, batch.sizes), batch.targets, batch.groups) if t.rank_weight > 0 else None
                summed = sample_losses(pred, mb.target, t.rank_weight, ranked, mb.offset, taught,
                                       t.distill_weight).sum()
                total = summed.detach() if total is None else total + summed.detach()
            with part("backward"):
                t.acc.backward(summed / t.per_process)
    with part("clip"):
        norm = t.acc.clip_grad_norm_(t.model.parameters(), t.grad_clip or math.inf)
    with part("guard"):
        skipped = t.guard.check(t.state.step, total, norm)
    with part("optimizer"):
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
    if t.ema is not None:  # held still by the flag when the update was skipped
        with part("ema"):
            t.ema.update(skipped)
    return total, norm


class LossMeter:
    """The train loss since the last evaluation: summed on the device every step (no host read),
    moved to host totals at sync points (`settle`), reduced over processes once per use."""

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None  # the device sum not yet settled
        self.total = 0.0  # this process's settled sum of per-sample losses
        self.n = 0  # ... over this many patches (settled or not: counted on the host)

    def add(self, summed: torch.Tensor, n: int) -> None:
        self.pending = summed.detach().clone() if self.pending is None else self.pending.add_(summed.detach())
        self.n += n

    def settle(self) -> None:
        """The host read: the device sum joins the host total."""
        if self.pending is not None:
            self.total += float(self.pending)
            self.pending = None

    def reduce(self, acc: Accelerator) -> tuple[float, int]:
        """(sum, patches) over every process: one all-reduce with several processes."""
        if acc.num_processes == 1:
            return self.total, self.n
        totals = acc.reduce(torch.tensor([self.total, self.n], device=acc.device, dtype=torch.float64), "sum").tolist()
        return totals[0], int(totals[1])

    def consolidate(self, acc: Accelerator) -> None:
        """Before a checkpoint: the main process holds the global sums, the others zero. Accelerate
        saves registered objects from the main process only, so this is what a resumed run restores
        on every process (and `reduce` stays right)."""
        if acc.num_processes > 1:
            total, n = self.reduce(acc)
            self.total, self.n = (total, n) if acc.is_main_process else (0.0, 0)

    def reset(self) -> None:
        self.pending, self.total, self.n = None, 0.0, 0


@dataclass
class TrainState:
    """The loop's counters, checkpointed with the model (register_for_checkpointing); the best
    step and early stopping are selection.update_best's to change."""

    step: int = 0  # optimizer steps taken
    best_srcc: float = -math.inf
    best_plcc: float = -math.inf  # ties in val SRCC are broken by PLCC, then by lower RMSE (selection.selection_key)
    best_rmse: float = math.inf
    best_step: int = 0
    bad_evals: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    world_size: int = 0  # processes that wrote the checkpoint (0: a checkpoint from before it was recorded)
    # the regularisers' uniforms: keyed (batches.KeyedNoise) since it became the one stream; a run
    # begun before keeps its generator (NoiseSource), so its resume stays exact
    noise_stream: str = "keyed"
    loss: LossMeter = field(default_factory=LossMeter)  # the window's loss; its host totals are checkpointed

    def state_dict(self) -> dict:
        counters = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "loss"}
        return {**counters, "window_loss": self.loss.total, "window_n": self.loss.n}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.loss.reset()
        self.loss.total, self.loss.n = state.pop("window_loss", 0.0), state.pop("window_n", 0)
        state.setdefault("noise_stream", "generator")  # a checkpoint from before the keyed stream
        self.__dict__.update(state)


@dataclass(kw_only=True)
class Trainer:
    """Everything a training step touches, built once with keywords (`Trainer.build`): `train`
    calls `step` in its loop and `iqa-dist bench train` times the same method."""

    acc: Accelerator
    model: nn.Module  # as prepared by Accelerate (DDP on several processes): no_sync and clipping
    forward: nn.Module  # what the step calls: the prepared model, compiled under train.compile
    bare: nn.Module  # the model itself: what the optimizer updates, evaluation reads and export writes
    optimizer: torch.optim.Optimizer
    schedule: Schedule  # step -> each group's learning rate; `set_lr` writes it in before each step
    guard: StepGuard
    ema: WeightEMA | None  # the weights' moving average (train.ema_decay > 0)
    # trained models (optim.teachers), or the EMA's model (optim.distill_weight); compiled as the step
    teacher: nn.Module | None
    state: TrainState
    per_process: float  # global batch / processes: the step's loss divisor (uneven shares allowed)
    patches: int  # this process's patches per step
    rank_weight: float
    distill_weight: float  # the teacher's L1 weight: optim.distill_weight or optim.teacher_weight
    grad_clip: float
    norm: torch.Tensor | None = None  # the last step's gradient norm, on the device
    last: torch.Tensor | None = None  # the last step's summed loss, on the device (graphed: read it before the next replay)
    settled: int = -1  # the step whose results the host last read

    @classmethod
    def build(cls, cfg: Config, model: nn.Module, acc: Accelerator, *, shares: Shares, total_steps: int,
              steps_per_epoch: int, augmenter: Augmenter, preempt: "PreemptionFlag", console: Console,
              teacher: nn.Module | None = None) -> "Trainer":
        """The model on the accelerator's device with its optimizer, schedule and EMA, prepared by
        Accelerate, and the step's function compiled as train.compile says. `teacher`: trained
        models that teach (training/teacher.py; optim.teacher_weight), else the EMA with
        self-distillation (optim.distill_weight), else none."""
        optimizer = build_optimizer(model.to(acc.device), cfg)
        ema = WeightEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        prepared, optimizer = acc.prepare(model, optimizer)
        if cfg.optim.distill_weight > 0:
            teacher = ema.model
        teacher = compile_model(teacher, cfg, console, "teacher") if teacher is not None else None
        return cls(acc=acc, model=prepared, forward=compile_step(prepared, augmenter, cfg, console), bare=model,
                   optimizer=optimizer, schedule=Schedule.of(cfg, total_steps, steps_per_epoch), ema=ema,
                   teacher=teacher, state=TrainState(), guard=StepGuard(acc, optimizer, preempt),
                   per_process=shares.per_process, patches=sum(sl.stop - sl.start for sl in shares.slices()),
                   rank_weight=cfg.optim.rank_weight,
                   distill_weight=cfg.optim.distill_weight or (cfg.optim.teacher_weight if teacher is not None else 0.0),
                   grad_clip=cfg.optim.grad_clip)

    def step(self, batch: Batch) -> None:
        """One optimizer step on this process's share of a global batch, and its bookkeeping."""
        self.set_lr()
        try:
            loss, self.norm = train_step(self, batch)
        except BadStep as bad:  # found at the next step's check (deferred): undo the counting since
            self._rewind(bad)
            raise
        self.count(loss)

    def set_lr(self) -> None:
        """The learning rate of the step about to be taken, written into the groups: the one place it
        is set, for the eager and the graphed step alike."""
        self.schedule.apply(self.optimizer, self.state.step)

    def count(self, loss: torch.Tensor) -> None:
        """A step taken: the counter and the loss window (one add on the device)."""
        self.last = loss
        self.state.step += 1
        with part("loss"):
            self.state.loss.add(loss, self.patches)

    def settle(self) -> None:
        """The host reads of the step's results, at most once per step: the pending step's flags
        (BadStep for a bad one) and the loss window."""
        if self.settled == self.state.step:
            return
        try:
            self.guard.flush()
        except BadStep as bad:
            self._rewind(bad)
            raise
        self.state.loss.settle()
        self.settled = self.state.step

    def lr(self) -> float:
        """The backbone group's learning rate for the next step."""
        return self.schedule.lrs(self.state.step)[0]

    def _rewind(self, bad: BadStep) -> None:
        """The counters back to before the bad step (none of its update was applied; the learning
        rate follows the step counter)."""
        self.state.loss.n -= (self.state.step - bad.step) * self.patches
        self.state.step = bad.step


@dataclass
class EagerStep:
    """`train`'s step without train.cuda_graph (`graph.GraphedStep` with it): this process's share
    of the next global batch, then `Trainer.step`."""

    trainer: Trainer
    batches: Batches

    def step(self) -> None:
        self.trainer.step(self.batches.get(self.trainer.state.step))
