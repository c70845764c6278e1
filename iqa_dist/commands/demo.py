"""`iqa-dist demo`."""

from __future__ import annotations

import argparse
import time

from rich.table import Table

from ..output import console, fmt, print_table
from .options import COMMON, add_config_arguments, add_preset, config_from, stopped

NAME = "demo"
USAGE = "iqa-dist demo [--preset NAME] [--SECTION.FIELD=VALUE ...]"
HELP = "prepare the synthetic dataset, train the demo preset, evaluate it"
DESCRIPTION = """\
The whole pipeline on the embedded synthetic dataset in a few minutes on a CPU: generate and
cache it, train a tiny Swin HyperIQA from scratch, evaluate the selected model on held-out
contents. Any config field can still be overridden (--section.field=VALUE).

examples:
  iqa-dist demo
  iqa-dist demo --train.seed 1 --data.split_seed 1     # another seed: how much the seed alone moves"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_preset(p, "demo")
    add_config_arguments(p, common=COMMON)


def run(args: argparse.Namespace) -> int:
    cfg = config_from(args)  # a bad value is reported before torch loads (seconds)
    from ..artifacts.rundir import RunDir
    from ..training.loop import Preempted, train

    t0 = time.time()
    try:
        path = train(cfg)
    except Preempted as e:
        return stopped(str(e))
    summary = RunDir(path).summary()
    if summary is None:  # not the main process
        return 0
    table = Table()
    for col in ("split", "images", "SRCC", "PLCC"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split in ("val", "test"):
        m = summary[split]
        table.add_row(split, str(m.get("n")), fmt(m.get("srcc")), fmt(m.get("plcc")))
    out = console()
    print_table(out, f"iqa-dist demo: {cfg.model.backbone} (tiny) on the synthetic dataset, held-out contents", table)
    out.print(f"wall time {time.time() - t0:.0f} s (training {summary['train_seconds']:.0f} s, "
              f"{summary['patches_per_s']} patches/s) | run directory: {path}", highlight=False)
    return 0
