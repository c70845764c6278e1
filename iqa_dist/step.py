"""The training step, written once: `iqa-dist train` runs it and `iqa-dist bench train` times it.

A step is this process's share of the global batch (next_batch: plan -> one upload -> device
augmentation), forward and backward per micro-batch, the per-sample losses reduced once, gradient
clipping, the guard, the update, the schedule and the weight EMA (train_step).

World-size invariance: train.batch_size is GLOBAL. Step s draws its B samples (and their
augmentation) identically on every process; process r takes chunk (micro * world + r) of them.
The step sums a micro-batch's per-sample losses and divides by B / world: the micro-batch
gradients add up, DDP's mean over processes divides by world, and the result is the mean over
the global batch, even when chunks are uneven. The ranking term pairs every sample with every
other of the GLOBAL batch (predictions gathered across processes with their gradients), so it
too is the same loss on 1 GPU and on 64.

No host round trip per step: the non-finite and preemption flags are read one step late
(StepGuard), and the fused optimizer itself skips a non-finite step on the device, so no
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
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator

from .audit import part
from .augment import Augmenter
from .optim import WeightEMA
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
                  ranked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, offset: int = 0,
                  group: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample training losses (b,): L1, plus rank_weight x this sample's share of the pairwise
    ranking hinge over the global batch. Their sum over the global batch divided by B is the
    objective: mean L1 + rank_weight x the mean hinge over ordered pairs with different targets
    from the same dataset (different datasets' scores are not comparable, so never a pair).

    ranked: (all predictions (B,), all targets (B,), all dataset ids (B,)) of the global batch,
    in which this micro-batch starts at `offset`; group: this micro-batch's dataset ids (b,).
    Required when rank_weight > 0. The caller (the step) does the reduction, once."""
    pred = pred.float()
    losses = (pred - target).abs()
    if rank_weight > 0:
        p_all, t_all, g_all = ranked
        g = g_all[offset:offset + len(pred)] if group is None else group
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


def train_step(acc: Accelerator, model, optimizer, batch: Batch, step: int, per_process: float, rank_weight: float,
               grad_clip: float, guard: StepGuard) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of each micro-batch (gradients synced on the last one only), clipping,
    the guard (which settles the previous step: its schedule step and EMA update), the update.
    Returns (summed loss, gradient norm), both on the device."""
    total = None
    for m, mb in enumerate(batch.micro):
        with acc.no_sync(model) if m < len(batch.micro) - 1 else contextlib.nullcontext():
            with part("forward"):
                pred = model(mb.x, mb.noise).float()
            with part("loss"):
                ranked = (gather_global(pred, batch.sizes), batch.targets, batch.groups) if rank_weight > 0 else None
                summed = sample_losses(pred, mb.target, rank_weight, ranked, mb.offset).sum()
                total = summed.detach() if total is None else total + summed.detach()
            with part("backward"):
                acc.backward(summed / per_process)
    with part("clip"):
        norm = acc.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    with part("guard"):
        guard.check(step, total, norm)
    with part("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return total, norm


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


def next_batch(store: ImageStore, plan, augmenter: Augmenter, shares: Shares, step: int, device: torch.device,
               rank_weight: float = 0.0, noise: NoiseSource | None = None) -> Batch:
    """This process's share of global batch `step` of `plan` (plan.BatchPlan or JointPlan):
    augmented on the device, one upload per micro-batch, with the regularisers' uniforms (noise).
    Targets are the store's (normalised) training targets."""
    with part("host"):  # the plan, the draws, the crop origins and the packing: host memory only
        rows, k = plan.batch(step)
        params = augmenter.draw(len(rows), step)  # drawn for the whole global batch on every process
        targets = store.training_targets()
        uploads = []
        for sl in shares.slices():
            r = rows[sl]
            pixels, offsets, widths = store.gather(r, device)
            if k is None:  # fresh random crops inside each image
                y0, x0 = augmenter.crop_origin(params[sl], store.heights[r], store.widths[r])
            else:  # patch k of each cached strip
                y0, x0 = k[sl] * augmenter.size, torch.zeros(len(r), dtype=torch.long)
            uploads.append((sl.start, pixels, augmenter.upload(offsets, widths, y0, x0, params[sl], targets[r], device)))
        if rank_weight > 0:
            groups = store.dataset[rows] if store.dataset is not None else torch.zeros(len(rows), dtype=torch.long)
            every = [_upload(t, device) for t in (targets[rows], groups)]
    with part("noise"):
        u = noise.draw(step, len(rows), device) if noise is not None else None
    micro = []
    with part("augment"):
        for start, pixels, packed in uploads:
            x, target = augmenter.apply(pixels, packed)
            micro.append(MicroBatch(x, target, start, None if u is None else u[start:start + len(target)]))
    if rank_weight <= 0:
        return Batch(micro)
    return Batch(micro, every[0], shares.sizes(), every[1])


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
