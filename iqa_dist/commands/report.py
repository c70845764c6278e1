"""`iqa-dist report`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from ..output import console, print_table
from .options import writable

NAME = "report"
HELP = "compare runs in a table (and plots)"
DESCRIPTION = """\
Compare runs: the config fields that differ, val/test SRCC and PLCC, epochs, time, throughput,
and what each run is now (finished, running, stopped and resumable, failed). Given a sweep
group: its table, each config against the baseline (paired by split), and with --plot its
picture.

examples:
  iqa-dist report runs/                                # every run under runs/
  iqa-dist report runs/A runs/B --markdown             # two runs, as a table to paste
  iqa-dist report runs/20261201-120000-sweep-grid --plot figures/   # a sweep group and its plots"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="*", help="run directories or folders of runs [default: runs/]")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    p.add_argument("--plot", default="", metavar="DIR", help="write the plots there: train_loss.png and val_srcc.png "
                   "for runs; test_srcc_by_config.png and paired_differences.png for a sweep group")


def run(args: argparse.Namespace) -> int:
    from ..experiments.report import PHASE_ONE, find_runs, koniq_only, load_run, markdown, plot, plot_group, rows

    from ..experiments.group import INFO

    writable("--plot", args.plot, folder=True)
    if len(args.runs) == 1 and (Path(args.runs[0]) / INFO).is_file():  # a sweep group: its table
        from ..experiments.collect import collect, show

        group = Path(args.runs[0])
        table = collect(group, show_table=False)
        show(table, group, console(), markdown=args.markdown)
        if args.plot and table.get("configs"):
            for path in plot_group(table, Path(args.plot)):
                console(stderr=True).print(f"wrote {path}", highlight=False)
        return 0
    runs = [load_run(p) for p in find_runs(args.runs)]
    header, body = rows(runs, "; " if args.markdown else "\n")
    out = console()
    reference = koniq_only(runs)
    if args.markdown:
        out.print(markdown(header, body, reference), markup=False, highlight=False)
    else:
        table = Table()
        for h in header:
            table.add_column(h, justify="left" if h in ("run", "differs") else "right", overflow="fold")
        for r in body:
            table.add_row(*r)
        print_table(out, f"{len(runs)} run(s)", table)
    if reference and not args.markdown:
        ref = Table()
        for h in ("config", "SRCC", "PLCC"):
            ref.add_column(h)
        for name, s, p in PHASE_ONE:
            ref.add_row(name, f"{s:.4f}", f"{p:.4f}")
        print_table(out, "phase one (KonIQ-10k, Q-Align split, selected on test)", ref)
    if args.plot:
        for path in plot(runs, Path(args.plot)):
            console(stderr=True).print(f"wrote {path}", highlight=False)
    return 0
