"""Quality maps: where a model finds an image better or worse.

HyperIQA scores patches and averages them, so the patches' own scores come with every score. A
map lays `n` patches on the grid protocol's regular grid (data/protocol.py) over the image as the
model sees it (resized by the model card's policy) and keeps each patch's score; the mean of
those scores is the image's score under the grid protocol with `n` patches. `Scorer.quality_maps`
makes them, `iqa-dist predict --map` draws them (`render`), and `iqa-dist serve` returns them as
JSON (`to_json`), which the page draws the same way: overlapping patches averaged per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..output import pyplot

DEFAULT_CROPS = 48  # patches of a map unless told (--crops): a 6 x 8 grid on a 512x384 image
COLOURS = "RdYlGn"  # red for the worse patches, green for the better ones; the page uses the same ramp


@dataclass
class QualityMap:
    """One image's patch scores on a regular grid, in the resized image's pixel coordinates."""

    score: float  # the image's score under the grid protocol with these patches (the mean of `scores`)
    origins: np.ndarray  # (n, 2) int64: each patch's top-left corner (y0, x0)
    scores: np.ndarray  # (n,) float64: each patch's score, on the model's scale
    patch: int  # patch side, px
    height: int  # the image as the model sees it (after the card's resize), px
    width: int

    def pixels(self) -> np.ndarray:
        """(height, width) float64: each pixel's mean over the patches that cover it; NaN where
        none does (the grid centres a single row or column, leaving the margins uncovered)."""
        total = np.zeros((self.height, self.width))
        count = np.zeros((self.height, self.width))
        p = self.patch
        for (y, x), s in zip(self.origins.tolist(), self.scores.tolist()):
            total[y:y + p, x:x + p] += s
            count[y:y + p, x:x + p] += 1
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def to_json(self) -> dict:
        """The map as `iqa-dist serve` returns it (scores to 4 decimals, as predict writes them)."""
        return {"score": round(self.score, 4), "patch": self.patch, "width": self.width, "height": self.height,
                "origins": self.origins.tolist(), "scores": [round(s, 4) for s in self.scores.tolist()]}


def render(qmap: QualityMap, image: np.ndarray, path: Path, title: str, units: str) -> None:
    """`image` (the resized uint8 HWC image the map is of) with the map over it as a half-transparent
    heat map and a colour bar in the score's `units`, saved as a PNG at `path`."""
    plt = pyplot("--map")
    fig, ax = plt.subplots(figsize=(7.0, 7.0 * qmap.height / qmap.width + 0.6), dpi=100)
    ax.imshow(image)
    values = qmap.pixels()
    low, high = float(qmap.scores.min()), float(qmap.scores.max())
    if high - low < 1e-6:  # a flat map: one colour, and a colour bar that still reads
        low, high = low - 0.5, high + 0.5
    heat = ax.imshow(np.ma.masked_invalid(values), cmap=COLOURS, vmin=low, vmax=high, alpha=0.5)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(heat, ax=ax, fraction=0.035, pad=0.02)
    bar.set_label(units)
    bar.solids.set_alpha(1)  # the bar in full colour: the overlay's transparency is not a score
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
