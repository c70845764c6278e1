"""The guard: whether each step is applied and whether the run goes on, decided for every process
together without waiting for the device. It detects and decides, and nothing else: the learning
rate is a function of the step (optim.Schedule) and the EMA is updated in the step with the
guard's flag (optim.WeightEMA), so nothing here changes when or whether the host reads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate import Accelerator

from .preemption import PreemptionFlag


class StepGuard:
    """The flag: 1 when the loss or the gradient norm is non-finite (three kernels: a sum, times
    zero, NaN to one), else 0. With several processes [skipped, loss non-finite, stop requested]
    travel in one all-reduce by MAX (torch.distributed's own, so each flag stays exactly 0 or 1
    whatever the world size: the fused kernel skips an update only when found_inf is 1.0, and a
    sum would make a 2 of it and apply the step), so every process skips the same steps and stops
    at the same step naming the same cause; a stop request rides along because it too must be
    agreed by all, and this is the step's one collective besides the gradients'.

    With a fused optimizer the update skips itself on the device when the flag is 1 (the
    optimizer's `found_inf`; under fp16 the loss scaler passes its own overflow flag instead), and
    the flag reaches the host one step late through a pinned, non-blocking copy: `check` at step s
    reads step s-1's flag before step s's update. A non-finite loss (or, except under fp16,
    gradient) stops the run with BadStep, the weights, moments and EMA from before the bad step
    kept (nothing of it was applied); under fp16 a non-finite gradient with a finite loss is the
    loss scaler's overflow: skipped, and training goes on. Without a fused optimizer the flag is
    read at once (a host sync)."""

    def __init__(self, acc: Accelerator, optimizer: torch.optim.Optimizer, preempt: PreemptionFlag) -> None:
        self.acc, self.preempt = acc, preempt
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

    def check(self, step: int, loss: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """After step `step`'s backward and clipping, before its update. Raises BadStep for a
        non-finite step (this one, or the previous one when deferred) before the update. Returns
        this step's flag on the device (1: its update is skipped), the same on every process."""
        skipped = torch.nan_to_num((loss + norm.to(loss.dtype)) * 0.0, nan=1.0).view(1)  # 0 finite, 1 not
        flags = skipped
        if self.fp16 or self.shared:
            flags = torch.cat([skipped, torch.nan_to_num(loss * 0.0, nan=1.0).view(1)])
        if self.shared:
            stop = torch.full((1,), float(self.preempt.requested()), device=flags.device)
            flags = torch.cat([flags, stop])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if not self.deferred:
            self._read(step, flags.cpu().numpy(), loss)
            return flags[0]
        if not self.fp16:  # under fp16 the loss scaler hands the fused kernel its own overflow flag
            self.inner.found_inf = flags[0]  # the fused kernel skips the whole update when it is 1
        self.flush()
        self.host.copy_(flags, non_blocking=True)
        event = None
        if flags.device.type == "cuda":
            event = torch.cuda.Event(blocking=True)  # the host sleeps on it: its CPU time is its own work
            event.record()
        self.pending = (step, flags, loss, event)  # flags: the copy's source stays alive until it is read
        return flags[0]

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


class LatchedGuard(StepGuard):
    """The guard of a step captured in a CUDA graph (train.cuda_graph, one process, no loss scaler):
    `check` runs inside the graph, so it makes no host call. The flag LATCHES on the device:
    [any step bad, the first bad step, its loss was non-finite], so once a step is bad the fused
    kernel skips every later update and the weights, moments and EMA stay from before it, whenever
    the host reads. The graph copies the latch to one pinned host buffer; after each replay the
    host records an event, reads the previous step's latch (`replayed`: that step is done), and
    raises BadStep naming the first bad step."""

    def __init__(self, acc: Accelerator, optimizer: torch.optim.Optimizer, preempt: PreemptionFlag,
                 step: torch.Tensor) -> None:
        super().__init__(acc, optimizer, preempt)
        self.step_number = step  # 0-d float64 on the device: the step being run (written before each replay)
        self.latch = torch.zeros(3, dtype=torch.float64, device=acc.device)
        self.host = torch.zeros(3, dtype=torch.float64, pin_memory=acc.device.type == "cuda")
        self.host_values = self.host.numpy()

    def check(self, step: int, loss: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        bad = torch.nan_to_num((loss + norm.to(loss.dtype)) * 0.0, nan=1.0).double()  # 0 finite, 1 not
        first = bad * (1.0 - self.latch[0])  # 1 at the first bad step only
        news = torch.stack([bad, self.step_number, torch.nan_to_num(loss * 0.0, nan=1.0).double()])
        self.latch[0].copy_(torch.maximum(self.latch[0], bad))
        self.latch[1:].lerp_(news[1:], first)  # the first bad step's number and cause, kept after it
        flag = self.latch[0].float()
        self.inner.found_inf = flag  # the fused kernel skips the update while the latch is set
        self.host.copy_(self.latch, non_blocking=True)
        return flag

    def replayed(self, step: int) -> None:
        """After step `step`'s replay: read the step before it (done by now: the host stays at most
        one step ahead of the device), then leave this one pending."""
        self.flush()
        event = None
        if self.latch.device.type == "cuda":
            event = torch.cuda.Event(blocking=True)
            event.record()
        self.pending = (step, self.latch, self.latch, event)

    def _read(self, step: int, flags, loss: torch.Tensor) -> None:
        self.preempted = self.preempted or self.preempt.requested()
        if flags[0]:
            raise BadStep(int(flags[1]), "loss" if flags[2] else "gradient")


class BadStep(Exception):
    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"non-finite {what} at step {step}")
        self.step, self.what = step, what
