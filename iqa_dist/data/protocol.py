"""The test-time protocol: which patches of an image are scored, written once.

Training-time evaluation, `iqa-dist evaluate` and `iqa-dist predict` all take their patch origins
from `patch_origins`, so a model scores an image the same way wherever it is scored:

- random (the default, what HyperIQA and the IQA literature report): n crops at uniformly random
  positions, seeded by the image's own pixels (a CRC-32 of its resized uint8 bytes). The same
  image always gets the same crops, whatever its file name, split, process or world size, and
  `predict` can reproduce them from the file alone.
- grid: n crops on a regular grid covering the image (n=1: the centre).

The prediction for an image is the mean of its patch predictions.
"""

from __future__ import annotations

import zlib

import numpy as np

SEED = 20200614  # salt of the random protocol (HyperIQA's CVPR 2020 session date); part of the protocol


def pixel_seed(pixels: np.ndarray | bytes | memoryview) -> int:
    """CRC-32 of an image's uint8 HWC bytes: its identity for the random protocol."""
    return zlib.crc32(pixels if isinstance(pixels, (bytes, memoryview)) else np.ascontiguousarray(pixels).data)


def grid_origins(height: int, width: int, size: int, n: int) -> np.ndarray:
    """n patch origins (y0, x0) on a regular grid covering the image (n=1: the centre). (n, 2)."""
    rows = max(1, int(round(np.sqrt(n * height / width))))
    cols = max(1, int(np.ceil(n / rows)))
    ys = np.linspace(0, height - size, rows + 2)[1:-1] if rows == 1 else np.linspace(0, height - size, rows)
    xs = np.linspace(0, width - size, cols + 2)[1:-1] if cols == 1 else np.linspace(0, width - size, cols)
    spots = [(int(round(y)), int(round(x))) for y in ys for x in xs]
    while len(spots) < n:  # very elongated images: fewer grid cells than patches, repeat the grid
        spots += spots[:n - len(spots)]
    return np.array(spots[:n], dtype=np.int64).reshape(n, 2)


def random_origins(seed: int, height: int, width: int, size: int, n: int) -> np.ndarray:
    """n uniformly random patch origins (y0, x0), a pure function of the seed. (n, 2)."""
    rng = np.random.default_rng([SEED, seed])
    ys = rng.integers(0, height - size + 1, n)
    xs = rng.integers(0, width - size + 1, n)
    return np.stack([ys, xs], 1).astype(np.int64)


def patch_origins(kind: str, pixels: np.ndarray | bytes | memoryview, height: int, width: int, size: int,
                  n: int) -> np.ndarray:
    """The protocol's n patch origins (y0, x0) for one image of height x width (uint8 HWC `pixels`)."""
    if kind == "grid":
        return grid_origins(height, width, size, n)
    if kind == "random":
        return random_origins(pixel_seed(pixels), height, width, size, n)
    raise ValueError(f"unknown test protocol {kind!r}")  # config validation names the choices
