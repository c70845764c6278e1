"""What a training run shows: live bars in a terminal, plain lines in cluster logs.

Only the main process has a non-quiet console (train.py makes the others quiet), so there is
no output storm from other ranks.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

METRICS = ("srcc", "plcc", "krcc", "rmse")


def output_console(**kwargs) -> Console:
    """A console for tables: the terminal's width, or 200 columns in files and pipes (logs)
    instead of rich's 80, which folds wide tables."""
    probe = Console(**kwargs)
    return probe if probe.is_terminal else Console(width=200, **kwargs)


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}" if isinstance(v, float) else str(v)


def metrics_table(title: str, rows: dict[str, dict]) -> Table:
    """rows: split name -> metrics dict."""
    table = Table(title=title)
    table.add_column("split")
    for m in (*METRICS, "n"):
        table.add_column(m.upper() if m != "n" else "images", justify="right")
    for name, m in rows.items():
        table.add_row(name, *(_fmt(m.get(k)) for k in (*METRICS, "n")))
    return table


class Display:
    def __init__(self, console: Console, total_steps: int, steps_per_epoch: int, log_every: int) -> None:
        self.console = console
        self.live = console.is_terminal and not console.quiet
        self.total, self.per_epoch, self.log_every = total_steps, steps_per_epoch, log_every
        self.t0, self.last = time.time(), (time.time(), 0)
        self.rate = 0.0
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console, disable=not self.live)
        self.run_task = self.progress.add_task("steps", total=total_steps, info="")
        self.epoch_task = self.progress.add_task("epoch", total=steps_per_epoch, info="")
        self.progress.start()

    def step(self, step: int, loss: float, lr: float) -> None:
        now = time.time()
        if step % 10 == 0 or step == self.total:  # steps/s over the last 10 steps
            t, s = self.last
            self.rate = (step - s) / max(now - t, 1e-9)
            self.last = (now, step)
        info = f"loss {loss:.4f}  lr {lr:.2e}  {self.rate:.2f} steps/s"
        epoch = step // self.per_epoch
        self.progress.update(self.run_task, completed=step, info=info)
        self.progress.update(self.epoch_task, completed=step - epoch * self.per_epoch,
                             description=f"epoch {epoch + 1}")
        if not self.live and (step % self.log_every == 0 or step == self.total):
            eta = (self.total - step) / self.rate if self.rate else float("nan")
            self.console.print(f"step {step}/{self.total} epoch {step / self.per_epoch:.2f} {info} "
                               f"eta {eta / 60:.1f} min", highlight=False)

    def evaluation(self, record: dict, state) -> None:
        val = {k[4:]: v for k, v in record.items() if k.startswith("val_")}
        best = " (best)" if state.best_step == record["step"] else f" (best {state.best_srcc:.4f} at {state.best_step})"
        title = (f"step {record['step']}  epoch {record['epoch']:.2f}  train loss {record['train_loss']:.4f}  "
                 f"{record['patches_per_s']:.0f} patches/s{best}")
        self.console.print(metrics_table(title, {"val": val}))

    def summary(self, summary: dict, path: Path) -> None:
        title = (f"selected step {summary['best_step']} (epoch {summary['best_epoch']}) of {summary['steps_run']}"
                 f"{', stopped early' if summary['stopped_early'] else ''}; "
                 f"{summary['train_seconds']:.0f} s training, {summary['patches_per_s']} patches/s")
        self.console.print(metrics_table(title, {"val": summary["val"], "test": summary["test"]}))
        self.console.print(f"run directory: {path}")

    def close(self) -> None:
        self.progress.stop()
