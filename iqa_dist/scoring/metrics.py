"""Correlation metrics over images: SRCC, PLCC, KRCC, RMSE, computed once over all images."""

from __future__ import annotations

import math

import numpy as np
from rich.table import Table

from ..output import fmt

METRIC_KEYS = ("srcc", "plcc", "krcc", "rmse", "n")  # what a metrics dict holds, in table order


def correlation_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """SRCC, PLCC (plain Pearson, as HyperIQA reports), KRCC, RMSE over images, and n."""
    import scipy.stats  # here: importing it costs half a second that most commands never need

    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if len(pred) < 2 or np.ptp(pred) == 0 or np.ptp(target) == 0:
        nan = math.nan  # correlations are undefined for constant inputs
        return {"srcc": nan, "plcc": nan, "krcc": nan, "rmse": float(np.sqrt(np.mean((pred - target) ** 2))),
                "n": len(pred)}
    return {
        "srcc": float(scipy.stats.spearmanr(pred, target)[0]),
        "plcc": float(scipy.stats.pearsonr(pred, target)[0]),
        "krcc": float(scipy.stats.kendalltau(pred, target)[0]),
        "rmse": float(np.sqrt(np.mean((pred - target) ** 2))),
        "n": len(pred),
    }


def metrics_table(rows: dict[str, dict]) -> Table:
    """rows: split (or any label) -> metrics dict (srcc, plcc, krcc, rmse, n)."""
    table = Table()
    table.add_column("split")
    for m in METRIC_KEYS:
        table.add_column(m.upper() if m != "n" else "images", justify="right")
    for name, m in rows.items():
        table.add_row(name, *(fmt(m.get(k)) for k in METRIC_KEYS))
    return table
