"""How every benchmark figure is measured: the median of timed blocks with their spread, and
the machine it was measured on.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "cuda": torch.version.cuda if gpu else None, "python": platform.python_version()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Rate(float):
    """Items per second: the median of BLOCKS timed blocks, with their `spread`, (max - min) /
    median: what the machine's noise did to this figure while it was measured."""

    spread: float = 0.0


BLOCKS = 3  # timed blocks per figure (their median is the figure)
NOISY = 0.10  # a spread above this is flagged where the figure is printed


def measure(fn, n_items: int, repeats: int, device: torch.device, warmup: int = 2) -> Rate:
    """Items per second of fn() (each call handles n_items) over `repeats` calls after warm-up
    calls, timed in up to BLOCKS blocks: their median, and their spread."""
    for _ in range(warmup):
        fn()
    blocks = [repeats // BLOCKS + (b < repeats % BLOCKS) for b in range(min(BLOCKS, repeats))]
    rates = []
    for calls in blocks:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        rates.append(n_items * calls / (time.perf_counter() - t0))
    return rate_of(rates)


def rate_of(blocks: list[float]) -> Rate:
    """The Rate of timed blocks' rates: their median, and their spread."""
    median = statistics.median(blocks)
    rate = Rate(median)
    rate.spread = (max(blocks) - min(blocks)) / median if median > 0 else math.nan
    return rate


def rates(report, path: str = "") -> dict[str, Rate]:
    """Every measured figure of a report, by its place (train.0.end_to_end, ...)."""
    if isinstance(report, Rate):
        return {path: report}
    items = report.items() if isinstance(report, dict) else enumerate(report) if isinstance(report, list) else ()
    return {k: v for key, value in items for k, v in rates(value, f"{path}.{key}" if path else str(key)).items()}


def spreads(report) -> dict[str, float]:
    """Every measured figure's spread, by its place."""
    return {k: v.spread for k, v in rates(report).items()}
