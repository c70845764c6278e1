"""A training run's progress: a live bar in a terminal, plain lines in logs."""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..output import print_table
from ..scoring.metrics import METRIC_KEYS, metrics_table


class Display:
    """A training run's progress: a live bar in a terminal, a line every log_every steps in logs.

    The ETA uses the rate over the last ETA_WINDOW steps (evaluation pauses included, in
    proportion), so it does not swing with each evaluation the way a 10-step rate does."""

    ETA_WINDOW = 500

    def __init__(self, console: Console, total_steps: int, steps_per_epoch: int, log_every: int) -> None:
        self.console = console
        self.live = console.is_terminal and not console.quiet
        self.total, self.per_epoch, self.log_every = total_steps, steps_per_epoch, log_every
        self.times: deque[tuple[float, int]] = deque(maxlen=self.ETA_WINDOW)
        self.last_line = -1
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console, disable=not self.live)
        self.run_task = self.progress.add_task("steps", total=total_steps, info="")
        self.epoch_task = self.progress.add_task("epoch", total=steps_per_epoch, info="")
        self.progress.start()

    def step(self, step: int) -> None:
        """After every step: the bars move (no loss here: reading it would sync the device)."""
        self.times.append((time.time(), step))
        epoch = step // self.per_epoch
        self.progress.update(self.run_task, completed=step)
        self.progress.update(self.epoch_task, completed=step - epoch * self.per_epoch, description=f"epoch {epoch + 1}")

    def wants_line(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total

    def rate(self) -> float:
        """Steps per second over the window."""
        if len(self.times) < 2:
            return 0.0
        (t0, s0), (t1, s1) = self.times[0], self.times[-1]
        return (s1 - s0) / max(t1 - t0, 1e-9)

    def line(self, step: int, loss: float, lr: float) -> None:
        """The progress line of `step` (once, however many sync points the step has)."""
        if step == self.last_line:
            return
        self.last_line = step
        rate = self.rate()  # 0 until two steps are timed (e.g. the first line after a resume)
        info = f"loss {loss:.4f}  lr {lr:.2e}  " + (f"{rate:.2f} steps/s" if rate else "speed not yet measured")
        self.progress.update(self.run_task, info=info)
        if not self.live:
            eta = f" eta {(self.total - step) / rate / 60:.1f} min" if rate else ""
            self.console.print(f"step {step}/{self.total} epoch {step / self.per_epoch:.2f} {info}{eta}",
                               highlight=False)

    def evaluating(self, images: int) -> None:
        """Before an evaluation: the live bar says so, instead of standing still."""
        if self.live:
            self.progress.update(self.run_task, info=f"evaluating {images} validation images...")
            self.progress.refresh()

    def evaluation(self, record: dict, state, per_dataset: dict[str, dict] | None = None,
                   ema_per_dataset: dict[str, dict] | None = None) -> None:
        rows = {"val": {k: record.get(f"val_{k}") for k in METRIC_KEYS}}
        if per_dataset:  # joint training: each dataset, then the combination selection uses
            rows = {f"val {name}": m for name, m in per_dataset.items()} | {"val (selection)": rows["val"]}
        if ema_per_dataset:
            rows |= {f"val EMA {name}": m for name, m in ema_per_dataset.items()}
        if "ema_val_srcc" in record:
            rows["val EMA" + (" (selection)" if ema_per_dataset else "")] = {k: record.get(f"ema_val_{k}")
                                                                             for k in METRIC_KEYS}
        best = " (best)" if state.best_step == record["step"] else f" (best {state.best_srcc:.4f} at step {state.best_step})"
        title = (f"step {record['step']}  epoch {record['epoch']:.2f}  train loss {record['train_loss']:.4f}  "
                 f"{record['patches_per_s']:.0f} patches/s{best}")
        print_table(self.console, title, metrics_table(rows))

    def summary(self, summary: dict, path: Path) -> None:
        title = (f"selected step {summary['best_step']} (epoch {summary['best_epoch']}) of {summary['steps_run']}"
                 f"{', stopped early' if summary['stopped_early'] else ''}; "
                 f"{summary['train_seconds']:.0f} s training, {summary['patches_per_s']} patches/s")
        rows = {"val": summary["val"], "test": summary["test"]}
        for name, m in summary.get("datasets", {}).items():
            rows |= {f"val {name}": m["val"], f"test {name}": m["test"]}
        print_table(self.console, title + (f"; weights: {summary['weights_from']}" if "weights_from" in summary else ""),
                    metrics_table(rows))
        self.console.print(f"run directory: {path}", highlight=False)

    def close(self) -> None:
        self.progress.stop()
