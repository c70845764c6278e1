"""Device-side augmentation: per-sample crop, flip and ColorJitter, then normalisation.

Training order: crop (uint8) -> float [0,1] -> horizontal flip -> ColorJitter -> normalise.
ColorJitter works on [0,1] images BEFORE normalisation (phase one's Kornia attempt jittered
normalised tensors and fell from SRCC 0.92 to 0.83), with torchvision's math
(`torchvision.transforms.functional.adjust_*`): factors and the order of the four operations
drawn per sample, as torchvision does per image on the CPU.

Random parameters are drawn on the host for the whole GLOBAL batch from a generator seeded by
(seed, step) alone (plan.step_seed), and each process applies the rows of its share: the
augmentation of sample i of step s does not depend on the number of processes, ranks still see
different augmentations (different samples), and a resumed run draws what an uninterrupted one
would, with no generator state to checkpoint. A micro-batch's numbers (crop origins, flips, scores,
and the jitter's per-sample factors already laid out per blend pass by `jitter_table`) travel to
the device in ONE packed copy; everything after that is a fixed sequence of batched tensor
operations with static shapes and no host round trip (no per-sample Python, no data-dependent
indexing, no tensor made from Python data: the constants are made at set-up, `Augmenter.to`),
about 80 kernels eager, which torch.compile fuses into a few.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor

from ..config import AugmentConfig
from ..constants import GRAY
from .plan import AUGMENT, step_seed

# ---------------------------------------------------------------- pixel operations


def crop(pixels: Tensor, offsets: Tensor, widths: Tensor, y0: Tensor, x0: Tensor, flip: Tensor, size: int) -> Tensor:
    """Per-sample crops (and flips) gathered from a flat uint8 HWC buffer.

    pixels: (total,) uint8, images back to back; offsets: (B,) byte offset of each sample's
    image; widths, y0, x0: (B,) long; flip: (B,) bool. Returns (B, size, size, 3) uint8.
    """
    # Every crop row is a contiguous run of 3*size bytes starting on a pixel: index rows of a
    # strided view of the buffer (one index per row, not per byte), then mirror the flipped ones.
    rows = pixels.unfold(0, 3 * size, 3)  # (pixels - size + 1, 3*size) view, no copy
    ar = torch.arange(size, device=pixels.device)
    starts = (offsets // 3 + x0)[:, None] + (y0[:, None] + ar) * widths[:, None]  # (B, S), in pixels
    patches = rows[starts].view(len(starts), size, size, 3)
    return torch.where(flip.view(-1, 1, 1, 1), patches.flip(2), patches)


def to_unit(patches: Tensor) -> Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 in [0, 1]."""
    return patches.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(x - mean) / std per channel; mean, std: (3,)."""
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def adjust_hue(x: Tensor, turn: Tensor) -> Tensor:
    """RGB -> HSV, H += shift (mod 1), -> RGB: torchvision's adjust_hue in fewer passes.

    turn: (B, 3) = 6 + 6 * shift + (5, 3, 1) per sample (`jitter_table`, on the host). V and S do
    not change, so out = max - (max - min) * clamp(min(k, 4 - k), 0, 1) with k = (n + 6H') mod 6,
    n = 5, 3, 1 for R, G, B (the closed form of torchvision's six-way HSV -> RGB table) and
    6H' = 6H + 6 shift. torchvision's _rgb2hsv cases give 6H = (q + 6) mod 6 with
    q = num / (max - min) in [-1, 5], so k = (q + turn) mod 6: one pass from q to all three k."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    cr = maxc - minc
    num = torch.where(maxc == r, g - b, torch.where(maxc == g, torch.add(b - r, cr, alpha=2.0),
                                                     torch.add(r - g, cr, alpha=4.0)))
    q = num / cr.clamp(min=torch.finfo(cr.dtype).tiny)  # gray pixels: cr = 0 and num = 0, so q = 0
    k = torch.remainder(q.unsqueeze(1) + turn.view(-1, 3, 1, 1), 6.0)  # (B, 3, H, W)
    return maxc.unsqueeze(1) - cr.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def gray_weights(device: torch.device | str = "cpu") -> Tensor:
    """(1, 3, 1, 1) float32: torchvision's grayscale weights, made once per device (at set-up:
    a tensor made from Python data on a GPU is a blocking copy)."""
    return torch.tensor(GRAY, device=device).view(1, 3, 1, 1)


def jitter_table(factors: Tensor, hue: Tensor | None, order: Tensor) -> Tensor:
    """What the device jitter reads per sample, computed where the draws are (the host).

    factors: (B, 3) brightness, contrast, saturation factors (1 = off); hue: (B,) shifts, or None
    when hue is off; order: (B, 4) long, each row a permutation of 0=brightness, 1=contrast,
    2=saturation, 3=hue. Brightness, contrast and saturation are one formula, torchvision's blend
    clamp(f * x + (1 - f) * m, 0, 1) with m = 0, the image's mean gray or the pixel's gray, so
    the device runs P whole-batch blend passes: the 4 order positions without hue; with hue, the
    3 positions that can come before it, hue once, then the 3 that can come after it (each sample
    uses 3 of the 6, f = 1 in the others: an exact identity). Per pass p: the factor f_p, the
    contrast weight c_p (m is the mean gray when 1) and the keep weight k_p (0 for brightness:
    m = 0). Returns (B, 3P) float64 [f | c | k], then with hue the three `adjust_hue` turns."""
    op_f = factors.double().gather(1, order.clamp(max=2))  # (B, 4): the factor of each position's op
    blend = order != 3
    if hue is None:
        f, ops = torch.where(blend, op_f, 1.0), order
    else:
        at = order.argsort(1)[:, 3:]  # hue's position (B, 1)
        pos = torch.arange(4, device=order.device)
        f = torch.cat([torch.where(blend & (pos < at), op_f, 1.0)[:, :3],
                       torch.where(blend & (pos > at), op_f, 1.0)[:, 1:]], 1)
        ops = torch.cat([order[:, :3], order[:, 1:]], 1)
    columns = [f, (ops == 1).double(), (ops != 0).double()]
    if hue is not None:
        n = torch.arange(5.0, 0.0, -2.0, dtype=torch.float64, device=order.device)  # R, G, B
        columns.append(6.0 + 6.0 * hue.double()[:, None] + n)
    return torch.cat(columns, 1)


def jitter(x: Tensor, table: Tensor, hue: bool, gray: Tensor) -> Tensor:
    """ColorJitter of a batch from its `jitter_table` (float32, on x's device): P blend passes,
    hue once between them. Whole-batch tensor math: no gather, no host sync, static shapes.
    x: (B, 3, H, W) float in [0, 1]; gray: `gray_weights` on x's device. Float32, even under
    autocast."""
    passes = 6 if hue else 4
    f, c, k = (table[:, i * passes:(i + 1) * passes] for i in range(3))

    def blend(x: Tensor, p: int) -> Tensor:
        g = (x * gray).sum(1, keepdim=True)  # (B, 1, H, W)
        # lerp with weight 0 or 1 is exact: the pixel's gray or the image's mean gray, then 0 or itself
        m = torch.lerp(g, g.mean((2, 3), keepdim=True), c[:, p].view(-1, 1, 1, 1)) * k[:, p].view(-1, 1, 1, 1)
        return torch.lerp(m, x, f[:, p].view(-1, 1, 1, 1)).clamp_(0.0, 1.0)  # torchvision's blend; f = 1 gives x

    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        for p in range(3 if hue else 4):
            x = blend(x, p)
        if hue:
            x = adjust_hue(x, table[:, 3 * passes:3 * passes + 3])
            for p in range(3, 6):
                x = blend(x, p)
    return x


# ---------------------------------------------------------------- random parameters


@dataclass
class AugmentParams:
    """Per-sample random draws for one batch (host tensors, first dim B)."""

    u_y: Tensor  # (B,) uniform [0,1): crop top as a fraction of the free rows
    u_x: Tensor  # (B,) uniform [0,1): crop left as a fraction of the free columns
    flip: Tensor  # (B,) bool
    brightness: Tensor | None  # (B,) factors, None when off
    contrast: Tensor | None
    saturation: Tensor | None
    hue: Tensor | None  # (B,) shifts
    order: Tensor  # (B, 4) long permutations

    def __getitem__(self, sl: slice) -> "AugmentParams":
        return AugmentParams(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[sl]
                                for f in fields(self)})


def sample_jitter(g: torch.Generator, n: int, cfg: AugmentConfig) -> tuple[Tensor | None, ...]:
    """ColorJitter draws for n samples, as torchvision's get_params: factor ranges
    [max(0, 1-v), 1+v], hue [-h, h], a uniform random order. Returns (b, c, s, h, order)."""

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)

    out = []
    for v in (cfg.brightness, cfg.contrast, cfg.saturation):
        out.append(uniform(max(0.0, 1.0 - v), 1.0 + v).float() if v > 0 else None)
    out.append(uniform(-cfg.hue, cfg.hue).float() if cfg.hue > 0 else None)
    order = torch.rand(n, 4, generator=g).argsort(1)  # uniform over the 24 permutations
    return (*out, order)


class Augmenter:
    """Draws the global batch's augmentation on the host; applies a share of it on the device."""

    def __init__(self, cfg: AugmentConfig, size: int, mean: tuple, std: tuple, seed: int) -> None:
        self.cfg = cfg
        self.size = size
        self.seed = seed
        # the constants the device work reads, made here and moved once by `to` (set-up, not per step)
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.gray = gray_weights()
        self.jitter = any(v > 0 for v in (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
        self._compiled = None  # the training augmentation under torch.compile (`compile`)

    @classmethod
    def evaluation(cls, size: int, mean: Sequence[float], std: Sequence[float]) -> "Augmenter":
        """Crop + normalise only (what evaluation uses)."""
        return cls(AugmentConfig(hflip=False, brightness=0, contrast=0, saturation=0, hue=0), size, tuple(mean),
                   tuple(std), seed=0)

    def state_dict(self) -> dict:
        return {}  # the draws are a function of (seed, step): nothing to save

    def load_state_dict(self, state: dict) -> None:
        pass  # checkpoints before draws were keyed by the step held a generator state: not needed

    def draw(self, n: int, step: int = 0) -> AugmentParams:
        """The augmentation of global batch `step` (n samples)."""
        g = torch.Generator().manual_seed(step_seed(self.seed, step, AUGMENT))
        u_y, u_x = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
        flip = torch.rand(n, generator=g) < 0.5 if self.cfg.hflip else torch.zeros(n, dtype=torch.bool)
        return AugmentParams(u_y, u_x, flip, *sample_jitter(g, n, self.cfg))

    def crop_origin(self, params: AugmentParams, heights: Tensor, widths: Tensor) -> tuple[Tensor, Tensor]:
        """Random crop tops/lefts inside each (host) image size."""
        y0 = (params.u_y * (heights - self.size + 1)).long()
        x0 = (params.u_x * (widths - self.size + 1)).long()
        return y0, x0

    def upload(self, offsets: Tensor, widths: Tensor, y0: Tensor, x0: Tensor, params: AugmentParams | None,
               scores: Tensor, device: torch.device) -> Tensor:
        """A micro-batch's `pack`, copied to `device` in one non-blocking transfer from pinned memory."""
        packed = self.pack(offsets, widths, y0, x0, params, scores)
        if device.type == "cuda":
            packed = packed.pin_memory()
        return packed.to(device, non_blocking=True)

    def pack(self, offsets: Tensor, widths: Tensor, y0: Tensor, x0: Tensor, params: AugmentParams | None,
             scores: Tensor) -> Tensor:
        """A micro-batch's per-sample numbers, packed (B, W) float64 on the host: offset, width, y0,
        x0, flip, score, then (when training with jitter) its `jitter_table`. (float64 holds byte
        offsets exactly below 2^53.)"""
        n = len(offsets)
        flip = torch.zeros(n) if params is None else params.flip
        packed = torch.stack([c.double() for c in (offsets, widths, y0, x0, flip, scores)], 1)
        if params is not None and self.jitter:
            factors = torch.stack([torch.ones(n) if f is None else f
                                   for f in (params.brightness, params.contrast, params.saturation)], 1)
            packed = torch.cat([packed, jitter_table(factors, params.hue, params.order)], 1)
        return packed

    def to(self, device: torch.device | str) -> "Augmenter":
        """Moves the constants to the device the pixels live on (once, at set-up)."""
        self.mean, self.std, self.gray = (t.to(device) for t in (self.mean, self.std, self.gray))
        return self

    def compile(self, backend: str = "inductor") -> None:
        """Compiles the training augmentation (static shapes: a resident buffer, a fixed micro-batch)
        into a few fused kernels. Evaluation's crop + normalise stays eager: its buffers differ per
        split, and each size would be one more compilation for a few cheap kernels."""
        self._compiled = torch.compile(self._apply, dynamic=False, backend=backend)

    def apply(self, pixels: Tensor, packed: Tensor, train: bool = True) -> tuple[Tensor, Tensor]:
        """(normalised patches (B, 3, S, S) float32, scores (B,) float32) from an upload()."""
        if pixels.device != self.mean.device:  # a device comparison, no sync
            raise RuntimeError(f"the augmentation's constants are on {self.mean.device} and the pixels on "
                               f"{pixels.device}: call Augmenter.to(device) at set-up")
        if train and self._compiled is not None:
            return self._compiled(pixels, packed, True)
        return self._apply(pixels, packed, train)

    def _apply(self, pixels: Tensor, packed: Tensor, train: bool) -> tuple[Tensor, Tensor]:
        off, w, y0, x0 = packed[:, :4].long().unbind(1)
        flip = packed[:, 4] > 0.5
        with torch.autocast(pixels.device.type, enabled=False):
            x = to_unit(crop(pixels, off, w, y0, x0, flip, self.size))
            if train and self.jitter:
                x = jitter(x, packed[:, 6:].float(), self.cfg.hue > 0, self.gray)
            return normalize(x, self.mean, self.std), packed[:, 5].float()
