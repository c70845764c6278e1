"""Training targets: each dataset's scores mapped to a common scale by an affine map fitted
on its training split (data.score_norm), recorded in the model card so predictions can be
reported on any training dataset's scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Scale:
    """target = (score - shift) / scale, fitted on a dataset's training split."""

    kind: str = "none"  # none | range | zscore (data.score_norm)
    shift: float = 0.0
    scale: float = 1.0

    @classmethod
    def fit(cls, kind: str, scores: np.ndarray) -> "Scale":
        """From the TRAINING split's scores only: a test set never moves it."""
        scores = np.asarray(scores, dtype=np.float64)
        if kind == "none":
            return cls()
        if kind == "range":
            lo, hi = float(scores.min()), float(scores.max())
            return cls(kind, lo, (hi - lo) or 1.0)
        return cls(kind, float(scores.mean()), float(scores.std()) or 1.0)

    def to_target(self, score):
        return (score - self.shift) / self.scale

    def to_score(self, pred):
        return pred * self.scale + self.shift
