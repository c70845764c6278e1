"""The input side of the training step: this process's share of each global batch, augmented
on the device with one upload per micro-batch, and the regularisers' keyed uniforms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.augment import Augmenter
from ..data.plan import NOISE, BatchPlan, JointPlan, step_seed
from ..data.store import ImageStore
from ..distributed.shards import Shares
from ..parts import part


@dataclass
class MicroBatch:
    x: torch.Tensor  # (b, 3, S, S) normalised patches on the device
    target: torch.Tensor  # (b,) training targets on the device
    offset: int  # index of its first sample in the global batch
    noise: torch.Tensor | None = None  # (b, noise_width) uniforms keying the regularisers (KeyedNoise)


@dataclass
class Batch:
    """One optimizer step's share of this process."""

    micro: list[MicroBatch]
    targets: torch.Tensor | None = None  # (B,) every target of the global batch (ranking loss only)
    sizes: list[int] | None = None  # every process's share (ranking loss only)
    groups: torch.Tensor | None = None  # (B,) every sample's dataset (ranking loss only)


class NoiseSource:
    """The regularisers' uniforms of runs begun before `KeyedNoise` became the one stream: (B,
    width) drawn on the device from a generator seeded by (seed, step) alone, every process the
    same matrix. Kept so that such a run resumes with the numbers it began with (TrainState's
    noise_stream); new runs never use it."""

    def __init__(self, seed: int, width: int, batch: int, device: torch.device) -> None:
        self.seed, self.width, self.batch, self.device = seed, width, batch, device
        self.generator = torch.Generator(device=device) if width else None

    def draw(self, step: int) -> torch.Tensor | None:
        if not self.width:
            return None
        self.generator.manual_seed(step_seed(self.seed, step, NOISE))  # host state only: no sync
        return torch.rand((self.batch, self.width), generator=self.generator, device=self.device)


MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32): in 16-bit halves, so no product leaves int64
    (a signed overflow would be undefined behaviour in the kernels)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of 32-bit words with full avalanche (Wellons' lowbias32), on int64 tensors in
    [0, 2^32): shifts, xors and products only, so every device computes the same bits."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    """mix32 of one word in Python integers: the host half of a key, no tensor made."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


class KeyedNoise:
    """The regularisers' uniforms of a global batch, (B, width): dropout and drop path keyed by
    sample, for the eager and the graphed step alike. A counter-based hash: u[i, j] of step s =
    mix32(base[i, j] ^ mix32(s ^ k)), where base hashes (seed, sample i of the global batch,
    column j) once at set-up. Every process computes the same matrix and takes its samples' rows,
    so sample i of step s is regularised the same way on 1 process or 64, micro-batched or not,
    resumed or not, with nothing to checkpoint. Integer ops only: the same bits on a CPU and a GPU.

    The step comes as a host int (the eager step: its key is mixed on the host, and the kernels
    read it as a scalar) or as a 0-d int64 device tensor (a graphed step, which reads it from its
    input buffer, so a replay draws new uniforms); both give the same bits. Top 24 bits -> float32
    in [0, 1 - 2^-24]."""

    def __init__(self, seed: int, width: int, batch: int, device: torch.device) -> None:
        self.width = width
        k_seed = _mix32_int(seed ^ _mix32_int(seed >> 32))
        self.k_step = _mix32_int(k_seed ^ 0x9E3779B9)  # a second key for the step word
        counter = torch.arange(batch * max(width, 1), dtype=torch.int64, device=device).view(batch, -1)
        self.base = mix32(counter ^ k_seed)  # (B, width) int64, made once

    def draw(self, step: int | torch.Tensor) -> torch.Tensor | None:
        """(B, width) float32 uniforms of step `step`."""
        if not self.width:
            return None
        if isinstance(step, torch.Tensor):
            key = mix32((step & MASK32) ^ self.k_step)
        else:
            key = _mix32_int((step & MASK32) ^ self.k_step)
        h = mix32(self.base ^ key)
        return (h >> 8).float().mul_(2.0 ** -24)


@dataclass(kw_only=True)
class Batches:
    """The global batches of a plan (BatchPlan or JointPlan), as this process's share of each:
    augmented on the device, one upload per micro-batch, with the regularisers' uniforms (noise).
    Targets are the store's (normalised) training targets."""

    store: ImageStore
    plan: BatchPlan | JointPlan  # rows (and cached patch indices) of each step
    augmenter: Augmenter
    shares: Shares
    device: torch.device
    rank_weight: float = 0.0  # > 0: every process also gets the global batch's targets and datasets
    noise: KeyedNoise | NoiseSource | None = None  # the regularisers' uniforms (NoiseSource: older runs only)

    def numbers(self, step: int) -> tuple[list[tuple[int, torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
        """The host half of `get`: per micro-batch (offset in the global batch, pixels on the device,
        its `Augmenter.pack`), and with the ranking term the global batch's targets and datasets;
        host memory only (the pixels of a device-resident store are its one buffer)."""
        store, augmenter = self.store, self.augmenter
        rows, k = self.plan.batch(step)
        params = augmenter.draw(len(rows), step)  # drawn for the whole global batch on every process
        targets = store.training_targets()
        micro = []
        for sl in self.shares.slices():
            r = rows[sl]
            pixels, offsets, widths = store.gather(r, self.device)
            if k is None:  # fresh random crops inside each image
                y0, x0 = augmenter.crop_origin(params[sl], store.heights[r], store.widths[r])
            else:  # patch k of each cached strip
                y0, x0 = k[sl] * augmenter.size, torch.zeros(len(r), dtype=torch.long)
            micro.append((sl.start, pixels, augmenter.pack(offsets, widths, y0, x0, params[sl], targets[r])))
        every = []
        if self.rank_weight > 0:
            groups = store.dataset[rows] if store.dataset is not None else torch.zeros(len(rows), dtype=torch.long)
            every = [targets[rows], groups]
        return micro, every

    def get(self, step: int) -> Batch:
        """This process's share of global batch `step`."""
        augmenter, device = self.augmenter, self.device
        with part("host"):  # the plan, the draws, the crop origins and the packing: host memory only
            micro_numbers, every = self.numbers(step)
            uploads = [(start, pixels, _upload(packed, device)) for start, pixels, packed in micro_numbers]
            every = [_upload(t, device) for t in every]
        with part("noise"):
            u = self.noise.draw(step) if self.noise is not None else None
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
