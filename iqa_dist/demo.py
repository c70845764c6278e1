"""`iqa-dist demo`: the whole pipeline on the embedded synthetic dataset, in a few minutes on a CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.table import Table

from .progress import output_console
from .config import Config
from .train import train


def demo(cfg: Config) -> Path:
    """Prepares the synthetic dataset, trains, evaluates the selected model on held-out content."""
    t0 = time.time()
    run = train(cfg)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else None
    if summary is None:  # not the main process
        return run
    table = Table(title=f"iqa-dist demo: {cfg.model.backbone} (tiny) on the synthetic dataset, held-out contents")
    for col in ("split", "images", "SRCC", "PLCC"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split in ("val", "test"):
        m = summary[split]
        table.add_row(split, str(m.get("n")), f"{m.get('srcc', float('nan')):.4f}", f"{m.get('plcc', float('nan')):.4f}")
    console = output_console()
    console.print(table)
    console.print(f"wall time {time.time() - t0:.0f} s (training {summary['train_seconds']:.0f} s, "
                  f"{summary['patches_per_s']} patches/s) | run directory: {run}")
    return run
