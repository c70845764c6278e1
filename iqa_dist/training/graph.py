"""train.cuda_graph: the whole training step (augmentation, forward, loss, backward, clipping, the
guard, the fused update, the EMA) captured once as one CUDA graph and replayed, so the host issues
one launch per step instead of ~1,400 kernels: what makes a small per-GPU batch fast.

A graph replays the same kernels on the same memory with the same arguments, so everything that
changes per step reaches the kernels as device memory written in place:
- the batch's numbers (crop origins, flips, jitter factors, targets; the step number) are packed
  by the host into one pinned buffer (two, alternating, so the host never overwrites one the
  device is still copying from) and copied into ONE static device buffer before each replay;
  the pixels are the store's one resident buffer;
- the regularisers' uniforms are the eager step's `KeyedNoise`, a hash of the step read from that
  buffer (so a graphed and an eager run of one seed train the same numbers);
- the learning rate is a device tensor per parameter group that `Trainer.set_lr` fills in place;
- the guard's flag latches on the device (`LatchedGuard`), and its one download goes to a pinned
  buffer made once.
`bench kernels` proves on the CPU that the graphed body is capturable (the same buffers every step,
no host number in a kernel, no allocation of host memory); the capture itself needs CUDA.

The first `warmup` steps run the same body eagerly (on a side stream on CUDA, as capture wants:
cuBLAS handles, the optimizer's state and autograd's buffers exist before it), then the body is
captured and replayed from the next step on. Without CUDA (`capture=False`) the body simply runs
eagerly every step: what the CPU tests train and audit.
"""

from __future__ import annotations

import contextlib

import torch

from ..data.store import same_device
from ..errors import UserError
from ..parts import part
from .batches import Batch, Batches, MicroBatch
from .guard import BadStep, LatchedGuard
from .trainer import Trainer, train_step


def refusal(*, processes: int, device: torch.device) -> str:
    """Why train.cuda_graph cannot run here, in one line ("" when it can). The config refuses fp16
    and train.compile itself; GraphedStep refuses a data set that is not resident on the GPU."""
    if device.type != "cuda":
        return f"train.cuda_graph needs a CUDA device (this run is on {device.type})"
    if processes > 1:
        return ("train.cuda_graph runs one process for now: with several, the all-reduce inside the graph or "
                "outside it is still to be measured on a multi-GPU node")
    return ""


class GraphedStep:
    """`Trainer.step(batches.get(step))` as one replayed graph: `step()` runs the trainer's next step."""

    def __init__(self, trainer: Trainer, batches: Batches, capture: bool, warmup: int = 3) -> None:
        t, device = trainer, trainer.acc.device
        self.trainer, self.batches, self.warmup = t, batches, warmup
        micro, every = batches.numbers(0)  # the shapes, the same every step
        if any(pixels.data_ptr() != micro[0][1].data_ptr() or not same_device(pixels.device, device)
               for _, pixels, _ in micro):
            raise UserError("train.cuda_graph needs the training images resident on the GPU (the graph reads one "
                            "buffer)")
        sizes = [packed.numel() for _, _, packed in micro] + [e.numel() for e in every] + [1]
        pinned = device.type == "cuda"
        self.host = [torch.zeros(sum(sizes), dtype=torch.float64, pin_memory=pinned) for _ in range(2)]
        self.numbers = torch.zeros(sum(sizes), dtype=torch.float64, device=device)  # the graph's one input
        views = self.numbers.split(sizes)
        self.inputs = [(start, pixels, v.view(packed.shape)) for (start, pixels, packed), v in zip(micro, views)]
        self.every = views[len(micro):-1]
        self.step_number = views[-1].view(())
        self.sizes = sizes
        t.guard = LatchedGuard(t.acc, t.optimizer, t.guard.preempt, self.step_number)
        self.capture = capture
        self.ran = 0  # steps this object has run (a resumed run warms up again before its capture)
        self.lr_ready = False
        self.side = torch.cuda.Stream(device) if capture else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None

    def _device_lr(self) -> None:
        """The update reads its learning rate from device memory that `Trainer.set_lr` fills in
        place, made at the first step: after a resume has loaded the groups (a checkpoint's tensor
        comes back on the CPU, and a CPU lr would be read once at capture and frozen). float32 on CUDA,
        the fused kernel's type; float64 on the CPU, whose kernel reads a double, so its updates
        equal eager ones."""
        device = self.trainer.acc.device
        inner = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)
        for group in inner.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device,
                                       dtype=torch.float32 if device.type == "cuda" else torch.float64)
            group["capturable"] = device.type == "cuda"
        self.lr_ready = True

    def step(self) -> None:
        """The trainer's next step: its numbers written and copied in, one replay (or, while warming
        up or without capture, the body run eagerly), then the host's bookkeeping."""
        t = self.trainer
        s = t.state.step
        if not self.lr_ready:
            self._device_lr()
        t.set_lr()  # into the device tensors the update reads (queued before this step's copy and replay)
        warming = self.capture and self.graph is None
        if warming:  # the side stream sees what the default stream queued (set-up, a resume's copies)
            self.side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(self.side) if warming else contextlib.nullcontext():
                self.write(s)
                if self.graph is not None:
                    self.graph.replay()
                    loss, norm = self.outputs
                else:
                    loss, norm = self.body()
                self.finish(s, loss, norm)
        finally:  # ... and the default stream what the side stream did (the loss window, the weights),
            if warming:  # also when a bad step stops the run and its weights are saved
                torch.cuda.current_stream().wait_stream(self.side)
        self.ran += 1
        if warming and self.ran >= self.warmup:
            self._capture()

    def write(self, s: int) -> None:
        """Step s's numbers into its pinned buffer (the two alternate: the one written now was last
        copied two steps ago, and the host has read the step after that one since), then one copy
        into the graph's input."""
        with part("host"):
            micro, every = self.batches.numbers(s)
            buf = self.host[s % 2]
            for v, numbers in zip(buf.split(self.sizes), [p for _, _, p in micro] + every):
                v.copy_(numbers.reshape(-1))
            buf[-1] = s
        self.numbers.copy_(buf, non_blocking=True)

    def finish(self, s: int, loss: torch.Tensor, norm: torch.Tensor) -> None:
        """After step s ran: the previous step's flags read (BadStep for a bad one), the counters
        and loss window."""
        t = self.trainer
        t.norm = norm
        try:
            t.guard.replayed(s)
        except BadStep as bad:  # the counters back to the bad step
            t._rewind(bad)
            raise
        t.count(loss)

    def body(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the graph holds: device work only, on the static buffers."""
        t, aug = self.trainer, self.batches.augmenter
        with part("noise"):
            u = self.batches.noise.draw(self.step_number.long())
        micro = []
        with part("augment"):
            for start, pixels, packed in self.inputs:
                x, target = aug.apply(pixels, packed)
                micro.append(MicroBatch(x, target, start, None if u is None else u[start:start + len(target)]))
        if self.every:
            batch = Batch(micro, self.every[0].float(), self.batches.shares.sizes(), self.every[1].long())
        else:
            batch = Batch(micro)
        # autocast's cache of bf16 weights is no hazard here: the forward's autocast region (Accelerate's
        # wrapper) is entered and left inside the capture, and leaving it empties the cache
        return train_step(t, batch)

    def static_tensors(self) -> list[torch.Tensor]:
        """The graph's own device memory (with its views): what an audit of `body` finds before it."""
        inner = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)
        lrs = [g["lr"] for g in inner.param_groups if torch.is_tensor(g["lr"])]
        return [self.numbers, *(packed for _, _, packed in self.inputs), *self.every, self.step_number,
                self.batches.noise.base, self.trainer.guard.latch, *lrs]

    def _capture(self) -> None:
        torch.cuda.current_stream().wait_stream(self.side)
        self.trainer.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.body()
