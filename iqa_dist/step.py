"""The training step, written once: `iqa-dist train` runs it and `iqa-dist bench train` times it.

A step is this process's share of the global batch (`Batches.get`: plan -> one upload -> device
augmentation), forward and backward per micro-batch, the per-sample losses reduced once, gradient
clipping, the guard, the update, the schedule and the weight EMA (`train_step`), and its
bookkeeping (`Trainer.step`: the step counter and the loss window).

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
`audit.StepAudit`). The other `part` names label the step's stretches for the audit's kernel
counts and for torch.profiler traces.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from rich.console import Console
from torch import nn

from .audit import part
from .augment import Augmenter
from .compile import compile_step
from .config import Config
from .optim import WeightEMA, build_optimizer, build_schedule
from .plan import NOISE, Shares, step_seed
from .store import ImageStore


@dataclass
class MicroBatch:
    x: torch.Tensor  # (b, 3, S, S) normalised patches on the device
    target: torch.Tensor  # (b,) training targets on the device
    offset: int  # index of its first sample in the global batch
    noise: torch.Tensor | None = None  # (b, noise_width) uniforms keying the regularisers (NoiseSource)


@dataclass
class Batch:
    """One optimizer step's share of this process."""

    micro: list[MicroBatch]
    targets: torch.Tensor | None = None  # (B,) every target of the global batch (ranking loss only)
    sizes: list[int] | None = None  # every process's share (ranking loss only)
    groups: torch.Tensor | None = None  # (B,) every sample's dataset (ranking loss only)


class _GatherGlobal(torch.autograd.Function):
    """Every process's predictions, concatenated in rank order (the global batch order), with the
    gradient flowing back to each process's own slice: all processes' losses use every prediction,
    so the backward sums their gradients (an all-reduce) and keeps this process's part."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        padded = F.pad(local, (0, max(sizes) - len(local)))  # all_gather needs equal sizes
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


def gather_global(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    if len(sizes) == 1:
        return local
    return _GatherGlobal.apply(local, sizes, dist.get_rank())


def sample_losses(pred: torch.Tensor, target: torch.Tensor, rank_weight: float = 0.0,
                  ranked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, offset: int = 0
                  ) -> torch.Tensor:
    """Per-sample training losses (b,): L1, plus rank_weight x this sample's share of the pairwise
    ranking hinge over the global batch. Their sum over the global batch divided by B is the
    objective: mean L1 + rank_weight x the mean hinge over ordered pairs with different targets
    from the same dataset (different datasets' scores are not comparable, so never a pair).

    ranked: (all predictions (B,), all targets (B,), all dataset ids (B,)) of the global batch,
    in which this micro-batch starts at `offset`. Required when rank_weight > 0. The caller (the step) does the reduction, once."""
    pred = pred.float()
    losses = (pred - target).abs()
    if rank_weight > 0:
        p_all, t_all, g_all = ranked
        g = g_all[offset:offset + len(pred)]
        same = g[:, None] == g_all[None, :]  # (b, B)
        sign = torch.sign(target[:, None] - t_all[None, :]) * same
        hinge = F.relu(-(pred[:, None] - p_all[None, :]) * sign)
        all_same = g_all[:, None] == g_all[None, :]
        pairs = ((torch.sign(t_all[:, None] - t_all[None, :]) != 0) & all_same).sum().clamp(min=1)
        losses = losses + rank_weight * len(t_all) * hinge.sum(1) / pairs
    return losses


class StepGuard:
    """Decides, for every process together and without waiting for the device, whether each step
    was applied, and applies what follows from it: the schedule step and the EMA update.

    The flag: 1 when the loss or the gradient norm is non-finite (three kernels: a sum, times
    zero, NaN to one), else 0, so exactly {0, 1} (all-reduced by max with several processes). With
    a fused optimizer the update skips itself on the device when it is 1 (the optimizer's
    `found_inf`; under fp16 the loss scaler passes its own overflow flag instead), and the flag
    reaches the host one step late through a pinned, non-blocking copy: `check` at step s reads
    step s-1's flag before step s's update. Only then does step s-1 count: an applied step steps
    the schedule and updates the EMA (the weights have not moved since: step s's update comes
    after), a skipped one changes nothing, so the schedule is a function of applied updates. A
    non-finite loss (or, except under fp16, gradient) stops the run with BadStep, leaving the
    weights, moments, schedule and EMA from before the bad step; under fp16 a non-finite gradient
    with a finite loss is the loss scaler's overflow: skipped, and training goes on.

    Without a fused optimizer the flag is read at once (a host sync). With one process a stop
    request is the host's own flag; with several, [skipped, loss non-finite, stop requested]
    travel in one all-reduce, so every process stops at the same step and names the same cause."""

    def __init__(self, acc: Accelerator, optimizer: torch.optim.Optimizer, preempt: "PreemptionFlag",
                 scheduler=None, ema: WeightEMA | None = None) -> None:
        self.acc, self.preempt, self.scheduler, self.ema = acc, preempt, scheduler, ema
        self.inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer
        self.fp16 = acc.scaler is not None  # a loss scaler: overflows are skipped, not fatal
        self.deferred = bool(self.inner.defaults.get("fused"))
        self.shared = acc.num_processes > 1
        width = 3 if self.shared else 2 if self.fp16 else 1  # [skipped(, loss non-finite(, stop))]
        # the host's copy of the flags, allocated once (pinned: a non-blocking copy)
        self.host = torch.zeros(width, pin_memory=acc.device.type == "cuda")
        self.host_values = self.host.numpy()  # the same memory, read without a torch call
        self.pending: tuple[int, torch.Tensor, torch.Tensor, torch.cuda.Event | None] | None = None
        self.preempted = False  # a preemption flag has been read
        self.skipped = 0  # steps skipped so far (fp16 overflows)

    def check(self, step: int, loss: torch.Tensor, norm: torch.Tensor) -> None:
        """After step `step`'s backward and clipping, before its update. Raises BadStep for a
        non-finite step (this one, or the previous one when deferred) before the update."""
        skipped = torch.nan_to_num((loss + norm.to(loss.dtype)) * 0.0, nan=1.0).view(1)  # 0 finite, 1 not
        flags = skipped
        if self.fp16 or self.shared:
            flags = torch.cat([skipped, torch.nan_to_num(loss * 0.0, nan=1.0).view(1)])
        if self.shared:
            stop = torch.full((1,), float(self.preempt.requested()), device=flags.device)
            flags = self.acc.reduce(torch.cat([flags, stop]), "max")
        if not self.deferred:
            self._read(step, flags.cpu().numpy(), loss)
            return
        if not self.fp16:  # under fp16 the loss scaler hands the fused kernel its own overflow flag
            self.inner.found_inf = flags[0]  # the fused kernel skips the whole update when it is 1
        self.flush()
        self.host.copy_(flags, non_blocking=True)
        event = None
        if flags.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.pending = (step, flags, loss, event)  # flags: the copy's source stays alive until it is read

    def flush(self) -> None:
        """Settles the pending step (waiting for its flags): at log, eval and checkpoint points."""
        if self.pending is not None:
            step, _, loss, event = self.pending
            self.pending = None
            if event is not None:
                event.synchronize()
            self._read(step, self.host_values, loss)

    def _read(self, step: int, flags, loss: torch.Tensor) -> None:
        """flags on the host: [skipped], with fp16 [skipped, loss non-finite], with several
        processes [skipped, loss non-finite, stop requested]."""
        self.preempted = self.preempted or (bool(flags[2]) if self.shared else self.preempt.requested())
        if flags[0]:
            # rare: with one process and no scaler the loss says which (one read of the device, on the way out)
            loss_bad = bool(flags[1]) if len(flags) > 1 else not torch.isfinite(loss).item()
            if loss_bad or not self.fp16:
                raise BadStep(step, "loss" if loss_bad else "gradient")
            self.skipped += 1  # an fp16 overflow: the scaler skipped the update and lowered its scale
            return
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            with part("ema"):
                self.ema.update()


class BadStep(Exception):
    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"non-finite {what} at step {step}")
        self.step, self.what = step, what


def train_step(t: "Trainer", batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of each micro-batch (gradients synced on the last one only), clipping,
    the guard (which settles the previous step: its schedule step and EMA update), the update.
    Returns (summed loss, gradient norm), both on the device."""
    total = None
    for m, mb in enumerate(batch.micro):
        with t.acc.no_sync(t.model) if m < len(batch.micro) - 1 else contextlib.nullcontext():
            with part("forward"):
                pred = t.forward(mb.x, mb.noise).float()
            with part("loss"):
                ranked = (gather_global(pred, batch.sizes), batch.targets, batch.groups) if t.rank_weight > 0 else None
                summed = sample_losses(pred, mb.target, t.rank_weight, ranked, mb.offset).sum()
                total = summed.detach() if total is None else total + summed.detach()
            with part("backward"):
                t.acc.backward(summed / t.per_process)
    with part("clip"):
        norm = t.acc.clip_grad_norm_(t.model.parameters(), t.grad_clip or math.inf)
    with part("guard"):
        t.guard.check(t.state.step, total, norm)
    with part("optimizer"):
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
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

    def mean(self) -> float:
        """This process's mean loss over the window (the progress line)."""
        return self.total / max(1, self.n)

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
    """The loop's counters, checkpointed with the model (register_for_checkpointing)."""

    step: int = 0  # optimizer steps taken
    best_srcc: float = -math.inf
    best_step: int = 0
    bad_evals: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    world_size: int = 0  # processes that wrote the checkpoint (0: a checkpoint from before it was recorded)
    loss: LossMeter = field(default_factory=LossMeter)  # the window's loss; its host totals are checkpointed

    def update_best(self, srcc: float, patience: int) -> bool:
        """Model selection and early stopping after an evaluation at this step: True when this is a
        new best (exported). The first evaluation always is; a non-finite SRCC never improves."""
        srcc = srcc if math.isfinite(srcc) else -math.inf
        best = srcc > self.best_srcc or self.best_step == 0
        if best:
            self.best_srcc, self.best_step, self.bad_evals = srcc, self.step, 0
        else:
            self.bad_evals += 1
        self.stopped_early = 0 < patience <= self.bad_evals
        return best

    def state_dict(self) -> dict:
        counters = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "loss"}
        return {**counters, "window_loss": self.loss.total, "window_n": self.loss.n}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.loss.reset()
        self.loss.total, self.loss.n = state.pop("window_loss", 0.0), state.pop("window_n", 0)
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
    scheduler: torch.optim.lr_scheduler.LRScheduler
    guard: StepGuard
    ema: WeightEMA | None  # the weights' moving average (train.ema_decay > 0)
    state: TrainState
    per_process: float  # global batch / processes: the step's loss divisor (uneven shares allowed)
    patches: int  # this process's patches per step
    rank_weight: float
    grad_clip: float
    norm: torch.Tensor | None = None  # the last step's gradient norm, on the device
    settled: int = -1  # the step whose results the host last read

    @classmethod
    def build(cls, cfg: Config, model: nn.Module, acc: Accelerator, *, shares: Shares, total_steps: int,
              steps_per_epoch: int, augmenter: Augmenter, preempt: "PreemptionFlag", console: Console) -> "Trainer":
        """The model on the accelerator's device with its optimizer, schedule and EMA, prepared by
        Accelerate, and the step's function compiled as train.compile says."""
        optimizer = build_optimizer(model.to(acc.device), cfg)
        scheduler = build_schedule(optimizer, cfg, total_steps, steps_per_epoch)
        ema = WeightEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        prepared, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        return cls(acc=acc, model=prepared, forward=compile_step(prepared, augmenter, cfg, console), bare=model,
                   optimizer=optimizer, scheduler=scheduler, ema=ema, state=TrainState(),
                   guard=StepGuard(acc, optimizer, preempt, scheduler=scheduler, ema=ema),
                   per_process=shares.per_process, patches=sum(sl.stop - sl.start for sl in shares.slices()),
                   rank_weight=cfg.optim.rank_weight, grad_clip=cfg.optim.grad_clip)

    def step(self, batch: Batch) -> None:
        """One optimizer step on this process's share of a global batch, and its bookkeeping."""
        try:
            loss, self.norm = train_step(self, batch)
        except BadStep as bad:  # found at the next step's check (deferred): undo the counting since
            self._rewind(bad)
            raise
        self.state.step += 1
        with part("loss"):  # the loss window: one add on the device
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
        return self.scheduler.get_last_lr()[0]

    def _rewind(self, bad: BadStep) -> None:
        """The counters back to before the bad step (none of its update was applied)."""
        self.state.loss.n -= (self.state.step - bad.step) * self.patches
        self.state.step = bad.step


class NoiseSource:
    """The regularisers' uniforms of a global batch: (B, width), drawn on the device from a
    generator seeded by (seed, step) alone. Every process draws the same matrix and takes its
    samples' rows, so dropout and drop path are keyed by sample: 1 process or 64, micro-batched or
    not, and resumed or not, sample i of step s is regularised the same way. Nothing to checkpoint."""

    def __init__(self, seed: int, width: int, device: torch.device) -> None:
        self.seed, self.width = seed, width
        self.generator = torch.Generator(device=device) if width else None

    def draw(self, step: int, n: int, device: torch.device) -> torch.Tensor | None:
        if not self.width:
            return None
        self.generator.manual_seed(step_seed(self.seed, step, NOISE))  # host state only: no sync
        return torch.rand((n, self.width), generator=self.generator, device=device)


@dataclass(kw_only=True)
class Batches:
    """The global batches of a plan (plan.BatchPlan or JointPlan), as this process's share of each:
    augmented on the device, one upload per micro-batch, with the regularisers' uniforms (noise).
    Targets are the store's (normalised) training targets."""

    store: ImageStore
    plan: object  # plan.BatchPlan | plan.JointPlan: rows (and cached patch indices) of each step
    augmenter: Augmenter
    shares: Shares
    device: torch.device
    rank_weight: float = 0.0  # > 0: every process also gets the global batch's targets and datasets
    noise: NoiseSource | None = None

    def get(self, step: int) -> Batch:
        """This process's share of global batch `step`."""
        store, augmenter, device = self.store, self.augmenter, self.device
        with part("host"):  # the plan, the draws, the crop origins and the packing: host memory only
            rows, k = self.plan.batch(step)
            params = augmenter.draw(len(rows), step)  # drawn for the whole global batch on every process
            targets = store.training_targets()
            uploads = []
            for sl in self.shares.slices():
                r = rows[sl]
                pixels, offsets, widths = store.gather(r, device)
                if k is None:  # fresh random crops inside each image
                    y0, x0 = augmenter.crop_origin(params[sl], store.heights[r], store.widths[r])
                else:  # patch k of each cached strip
                    y0, x0 = k[sl] * augmenter.size, torch.zeros(len(r), dtype=torch.long)
                uploads.append((sl.start, pixels, augmenter.upload(offsets, widths, y0, x0, params[sl], targets[r],
                                                                   device)))
            if self.rank_weight > 0:
                groups = store.dataset[rows] if store.dataset is not None else torch.zeros(len(rows), dtype=torch.long)
                every = [_upload(t, device) for t in (targets[rows], groups)]
        with part("noise"):
            u = self.noise.draw(step, len(rows), device) if self.noise is not None else None
        micro = []
        with part("augment"):
            for start, pixels, packed in uploads:
                x, target = augmenter.apply(pixels, packed)
                micro.append(MicroBatch(x, target, start, None if u is None else u[start:start + len(target)]))
        if self.rank_weight <= 0:
            return Batch(micro)
        return Batch(micro, every[0], self.shares.sizes(), every[1])


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting: pinned, then a non-blocking copy."""
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


class PreemptionFlag:
    """A request to checkpoint at the end of the step and exit: SIGUSR1 or SIGTERM to this
    process, Ctrl-C (SIGINT) once training runs (`interrupts`; a second Ctrl-C a second later
    quits at once), or the file named by $IQA_DIST_STOP_FILE appearing (the SLURM scripts and
    `iqa-dist launch` touch it: no signal has to get through torchrun's agent)."""

    def __init__(self) -> None:
        self.raised = False
        self.interrupted_at: float | None = None
        self.stop_file = os.environ.get("IQA_DIST_STOP_FILE", "")
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.raised = True

    def interrupts(self, announce: bool) -> None:
        """From now on Ctrl-C checkpoints like SIGTERM (before, during data preparation, it simply
        stops). The main process says so once, in one line."""
        def handle(signum: int, frame) -> None:
            now = time.monotonic()
            # the terminal's Ctrl-C and the launcher's forwarded one arrive together: only a press
            # a second later is the user's second Ctrl-C
            if self.interrupted_at is not None and now - self.interrupted_at > 1.0:
                raise KeyboardInterrupt
            if self.interrupted_at is None and announce:
                os.write(2, b"Ctrl-C: checkpointing after this step (Ctrl-C again to quit at once)\n")
            self.interrupted_at = self.interrupted_at or now
            self.raised = True

        signal.signal(signal.SIGINT, handle)

    def requested(self) -> bool:
        return self.raised or bool(self.stop_file and os.path.exists(self.stop_file))
