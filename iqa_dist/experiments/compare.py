"""Paired comparisons of a sweep's configs: is a difference larger than split-to-split noise?

Members of two configs trained on the same split (or with the same seed) are pairs. For each
config against the baseline: the paired test-SRCC differences, their median with a 95% bootstrap
interval (resampling the pairs, seeded: the same group gives the same interval), the Wilcoxon
signed-rank p-value (scipy, two-sided), and a verdict at 5%: better, worse, or not
distinguishable. With fewer than MIN_PAIRS pairs it says the repeats are too few instead. (The
exact Wilcoxon test cannot go below p = 0.0625 with 5 pairs: 6 or more can show a difference at 5%.)
"""

from __future__ import annotations

import statistics

import numpy as np
from scipy import stats as scipy_stats

MIN_PAIRS = 5
LEVEL = 0.05
BOOTSTRAP = 10_000
KEYS = ("test_srcc", "test_plcc", "val_srcc", "val_plcc", "test_on_test_srcc")


def shared(by: str) -> str:
    """What the two members of a pair share, by the sweep's repeats (its sweep.json "repeats"."by")."""
    return {"splits": "the same split", "seeds": "the same training seed (and the preset's split)"}.get(
        by, "the same repeat")


def summary(values: list[float]) -> dict | None:
    """median, mean, std (sample), n of the values; None when there are none."""
    if not values:
        return None
    return {"median": statistics.median(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def bootstrap_median(diffs: list[float], seed: int, level: float = 0.95) -> tuple[float, float]:
    """The `level` percentile interval of the median difference, over BOOTSTRAP resamples of the
    pairs (scipy's bootstrap, seeded: the same group gives the same interval); one pair is its own."""
    if len(diffs) < 2:  # scipy resamples two or more
        return float(diffs[0]), float(diffs[0])
    result = scipy_stats.bootstrap((np.asarray(diffs, dtype=np.float64),), np.median, confidence_level=level,
                                   n_resamples=BOOTSTRAP, method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def wilcoxon(diffs: list[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value (1.0 when every difference is zero)."""
    if not any(diffs):
        return 1.0
    return float(scipy_stats.wilcoxon(diffs).pvalue)


def verdict(pairs: int, median: float, p: float) -> str:
    if pairs < MIN_PAIRS:
        return f"too few repeats ({pairs} pair{'s' if pairs != 1 else ''}; {MIN_PAIRS} or more needed)"
    if p < LEVEL:
        return "better" if median > 0 else "worse"
    return "not distinguishable"


def paired(config: list[dict], baseline: list[dict], key: str = "test_srcc") -> list[float]:
    """config - baseline for every repeat both finished (members carry "repeat" and the metric)."""
    base = {m["repeat"]: m[key] for m in baseline if m.get(key) is not None}
    return [m[key] - base[m["repeat"]] for m in config if m.get(key) is not None and m["repeat"] in base]


def compare(members: list[dict], configs: list[str], baseline: str, seed: int = 0) -> dict[str, dict]:
    """Per config: each metric's summary over its finished repeats and, against the baseline, the
    paired test-SRCC comparison."""
    by_config = {c: [m for m in members if m.get("config") == c and m.get("finished")] for c in configs}
    out = {}
    for c in configs:
        row = {"n": len(by_config[c]), **{k: summary([m[k] for m in by_config[c] if m.get(k) is not None])
                                          for k in KEYS}}
        if c != baseline:
            diffs = paired(by_config[c], by_config[baseline])
            if diffs:
                median = statistics.median(diffs)
                p = wilcoxon(diffs)
                low, high = bootstrap_median(diffs, seed)
                row["vs_baseline"] = {"pairs": len(diffs), "diffs": diffs, "median": median, "ci95": [low, high],
                                      "p": p, "verdict": verdict(len(diffs), median, p)}
            else:
                row["vs_baseline"] = {"pairs": 0, "verdict": verdict(0, 0.0, 1.0)}
        out[c] = row
    return out
