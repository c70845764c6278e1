"""Device-side augmentation: per-sample crop, flip and ColorJitter, then normalisation.

Training order: crop (uint8) -> float [0,1] -> horizontal flip -> ColorJitter -> normalise.
ColorJitter works on [0,1] images BEFORE normalisation (phase one's Kornia attempt jittered
normalised tensors and fell from SRCC 0.92 to 0.83), with torchvision's math
(`torchvision.transforms.functional.adjust_*`): factors and the order of the four operations
drawn per sample, as torchvision does per image on the CPU.

Random parameters are drawn on the host from one `torch.Generator` for the whole GLOBAL batch,
and each process applies the rows of its share: the augmentation of sample i of step s does not
depend on the number of processes, ranks still see different augmentations (different samples),
and the generator state is checkpointed. A micro-batch's numbers (crop origins, flips, factors,
orders, scores) travel to the device in ONE packed copy; everything after that is a fixed
sequence of batched tensor operations with static shapes and no host round trip (no per-sample
Python, no data-dependent indexing), which torch.compile fuses into a few kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor

from .config import AugmentConfig

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


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


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).unsqueeze(1)  # (B, 1, H, W)


def _blend(a: Tensor, b: Tensor, ratio: Tensor) -> Tensor:
    r = ratio.view(-1, 1, 1, 1)
    return (r * a + (1.0 - r) * b).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), f)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, _gray(x), f)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """RGB -> HSV, H += shift (mod 1), -> RGB: torchvision's adjust_hue, in fewer passes.

    V and S do not change, so out = max - (max - min) * clamp(min(k, 4 - k), 0, 1) with
    k = (n + 6H) mod 6, n = 5, 3, 1 for R, G, B (the closed form of torchvision's six-way
    HSV -> RGB table); 6H comes from torchvision's _rgb2hsv cases with one division."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    cr = maxc - minc
    num = torch.where(maxc == r, g - b, torch.where(maxc == g, b - r + 2.0 * cr, r - g + 4.0 * cr))
    h = torch.fmod(num / torch.where(cr == 0, 1.0, cr) / 6.0 + 1.0, 1.0)  # gray pixels: cr = 0, num = 0
    h6 = (h + shift.view(-1, 1, 1)) % 1.0 * 6.0  # (B, H, W) in [0, 6)
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + h6.unsqueeze(1)) % 6.0
    return maxc.unsqueeze(1) - cr.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def color_jitter(x: Tensor, brightness: Tensor | None, contrast: Tensor | None, saturation: Tensor | None,
                 hue: Tensor | None, order: Tensor) -> Tensor:
    """ColorJitter with per-sample factors and per-sample order, deterministic.

    x: (B, 3, H, W) float in [0, 1]; brightness, contrast, saturation: (B,) factors (1 = no
    change); hue: (B,) shifts in [-0.5, 0.5]; None skips an operation; order: (B, 4) long, each
    row a permutation of 0=brightness, 1=contrast, 2=saturation, 3=hue. Float32, even under
    autocast. Everything is whole-batch tensor math: no gather, no host sync, static shapes.

    Brightness, contrast and saturation are one formula, torchvision's blend
    clamp(f * x + (1 - f) * m, 0, 1) with m = 0, the image's mean gray, or the pixel's gray, so
    one `blend` per order position serves all three, with per-sample f and m (and f = 1, an exact
    identity, for a sample whose op at that position is another). Hue, the costly one, runs once:
    the positions before each sample's hue position, then hue, then the positions after it.
    """
    dev = x.device
    order = order.to(dev)
    factors = [f.to(dev).float() if f is not None else torch.ones(len(x), device=dev)
               for f in (brightness, contrast, saturation)]
    hue_at = order.argsort(1)[:, 3] if hue is not None else torch.full((len(x),), 4, device=dev)
    with torch.autocast(dev.type, enabled=False):
        x = x.float()
        before, after = (range(3), range(1, 4)) if hue is not None else (range(4), range(0))
        for k in before:
            x = _blend_at(x, order[:, k], factors, order[:, k] != 3, k < hue_at)
        if hue is not None:
            x = adjust_hue(x, hue.to(dev).float())
        for k in after:
            x = _blend_at(x, order[:, k], factors, order[:, k] != 3, k > hue_at)
    return x


def _blend_at(x: Tensor, op: Tensor, factors: list[Tensor], is_blend: Tensor, now: Tensor) -> Tensor:
    """One order position for the whole batch: sample i applies op[i] (0 brightness, 1 contrast,
    2 saturation) with its factor when `now[i]`, else the identity (f = 1)."""
    f = torch.stack(factors, 1).gather(1, op.clamp(max=2)[:, None]).squeeze(1)
    f = torch.where(is_blend & now, f, 1.0).view(-1, 1, 1, 1)
    gray = (x * x.new_tensor(GRAY).view(1, 3, 1, 1)).sum(1, keepdim=True)  # (B, 1, H, W)
    m = torch.where((op == 1).view(-1, 1, 1, 1), gray.mean((2, 3), keepdim=True), gray)
    m = torch.where((op == 0).view(-1, 1, 1, 1), 0.0, m)  # brightness blends with black
    return torch.lerp(m, x, f).clamp_(0.0, 1.0)  # m + f (x - m): torchvision's blend, one kernel


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
        self.generator = torch.Generator().manual_seed(seed)
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.jitter = any(v > 0 for v in (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
        self._stats: tuple[Tensor, Tensor] | None = None  # mean and std on the device

    @classmethod
    def evaluation(cls, size: int, mean: Sequence[float], std: Sequence[float]) -> "Augmenter":
        """Crop + normalise only (what `eval` uses)."""
        return cls(AugmentConfig(hflip=False, brightness=0, contrast=0, saturation=0, hue=0), size, tuple(mean),
                   tuple(std), seed=0)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def draw(self, n: int) -> AugmentParams:
        g = self.generator
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
        """A micro-batch's per-sample numbers, packed (B, 14) float64 and copied to `device` in one
        non-blocking transfer from pinned memory: offset, width, y0, x0, flip, the four jitter
        factors, the four order codes, score. (float64 holds byte offsets exactly below 2^53.)"""
        n = len(offsets)
        if params is None:
            jitter = [torch.ones(n), torch.ones(n), torch.ones(n), torch.zeros(n)]
            flip, order = torch.zeros(n), torch.arange(4).expand(n, 4)
        else:
            identity = (1.0, 1.0, 1.0, 0.0)
            jitter = [torch.full((n,), identity[i]) if f is None else f
                      for i, f in enumerate((params.brightness, params.contrast, params.saturation, params.hue))]
            flip, order = params.flip, params.order
        columns = [offsets, widths, y0, x0, flip, *jitter]
        packed = torch.cat([torch.stack([c.double() for c in columns], 1), order.double(),
                            scores.double()[:, None]], 1)
        if device.type == "cuda":
            packed = packed.pin_memory()
        return packed.to(device, non_blocking=True)

    def _device_stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._stats is None or self._stats[0].device != device:  # once per device, not per step
            self._stats = (self.mean.to(device), self.std.to(device))
        return self._stats

    def apply(self, pixels: Tensor, packed: Tensor, train: bool = True) -> tuple[Tensor, Tensor]:
        """(normalised patches (B, 3, S, S) float32, scores (B,) float32) from an upload()."""
        off, w, y0, x0 = packed[:, :4].long().unbind(1)
        flip = packed[:, 4] > 0.5
        mean, std = self._device_stats(pixels.device)
        with torch.autocast(pixels.device.type, enabled=False):
            x = to_unit(crop(pixels, off, w, y0, x0, flip, self.size))
            if train and self.jitter:
                active = (self.cfg.brightness, self.cfg.contrast, self.cfg.saturation, self.cfg.hue)
                factors = [packed[:, 5 + i].float() if v > 0 else None for i, v in enumerate(active)]
                x = color_jitter(x, *factors, packed[:, 9:13].long())
            return normalize(x, mean, std), packed[:, 13].float()

    def train(self, pixels: Tensor, offsets: Tensor, widths: Tensor, y0: Tensor, x0: Tensor,
              params: AugmentParams) -> Tensor:
        """Training patches (B, 3, S, S), normalised; y0/x0 from crop_origin or a cached strip."""
        packed = self.upload(offsets, widths, y0, x0, params, torch.zeros(len(offsets)), pixels.device)
        return self.apply(pixels, packed)[0]

    def eval(self, pixels: Tensor, offsets: Tensor, widths: Tensor, y0: Tensor, x0: Tensor) -> Tensor:
        """Evaluation patches: the given crops, no flip or jitter, the same normalisation."""
        packed = self.upload(offsets, widths, y0, x0, None, torch.zeros(len(offsets)), pixels.device)
        return self.apply(pixels, packed, train=False)[0]
