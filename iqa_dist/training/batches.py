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
    noise: torch.Tensor | None = None  # (b, noise_width) uniforms keying the regularisers (NoiseSource)


@dataclass
class Batch:
    """One optimizer step's share of this process."""

    micro: list[MicroBatch]
    targets: torch.Tensor | None = None  # (B,) every target of the global batch (ranking loss only)
    sizes: list[int] | None = None  # every process's share (ranking loss only)
    groups: torch.Tensor | None = None  # (B,) every sample's dataset (ranking loss only)


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
    """The global batches of a plan (BatchPlan or JointPlan), as this process's share of each:
    augmented on the device, one upload per micro-batch, with the regularisers' uniforms (noise).
    Targets are the store's (normalised) training targets."""

    store: ImageStore
    plan: BatchPlan | JointPlan  # rows (and cached patch indices) of each step
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
