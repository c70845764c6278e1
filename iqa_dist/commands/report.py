"""`iqa-dist report`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from ..output import console, fitted_table, print_table, table_width
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
    p.add_argument("--wide", action="store_true", help="every column at its full width, however wide the terminal "
                   "(for less -S); without it a table fits the terminal ($COLUMNS or 100 in files and pipes) and "
                   "names the columns it left out")
    p.add_argument("--plot", default="", metavar="DIR", help="write the plots there: train_loss.png and val_srcc.png "
                   "for runs; test_srcc_by_config.png and paired_differences.png for a sweep group")


# Columns a narrow terminal leaves out, the least important first
DROP = ["patches/s", "train s", "best epoch", "val PLCC", "test PLCC", "val SRCC", "epochs"]


def run(args: argparse.Namespace) -> int:
    from ..experiments.report import PHASE_ONE, find_runs, koniq_only, load_run, markdown, plot, plot_group, rows

    from ..experiments.group import INFO

    writable("--plot", args.plot, folder=True)
    if len(args.runs) == 1 and (Path(args.runs[0]) / INFO).is_file():  # a sweep group: its table
        from ..experiments.collect import collect, show

        group = Path(args.runs[0])
        table = collect(group, show_table=False)
        show(table, group, console(wide=args.wide), markdown=args.markdown, wide=args.wide)
        if args.plot and table.get("configs"):
            for path in plot_group(table, Path(args.plot)):
                console(stderr=True).print(f"wrote {path}", highlight=False)
        return 0
    runs = [load_run(p) for p in find_runs(args.runs)]
    header, body = rows(runs, "; " if args.markdown else "\n")
    out = console(wide=args.wide)
    reference = koniq_only(runs)
    if args.markdown:
        out.print(markdown(header, body, reference), markup=False, highlight=False)
    else:
        width = None if args.wide else table_width(out)
        table, dropped = fitted_table(header, body, width, DROP, left=2 if "differs" in header else 1)
        print_table(out, f"{len(runs)} run(s)", table)
        if dropped:
            out.print(f"(left out to fit {width} columns: {', '.join(dropped)}; --wide or --markdown shows every "
                      "column)", highlight=False, markup=False)
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
