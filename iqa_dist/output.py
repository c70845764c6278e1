"""How everything is shown: consoles, the one number format, tables (rich or markdown), plots.

In a terminal: rich's tables at the terminal's width. In files and pipes (cluster logs): one
message per line at any length (no hard wrap at 80 columns, no titles folded inside a table's
width). Only the main process prints (`console_for`).
"""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

LOG_WIDTH = 1000  # columns of a non-terminal console: wide enough that no message or table folds


def console(stderr: bool = False, quiet: bool = False, file=None) -> Console:
    """The terminal's console, or in files and pipes one that never wraps a message."""
    probe = Console(stderr=stderr, quiet=quiet, file=file)
    if probe.is_terminal:
        return probe
    return Console(stderr=stderr, quiet=quiet, file=file, width=LOG_WIDTH, soft_wrap=True)


def console_for(main_process: bool) -> Console:
    """stderr for the main process; the other processes print nothing (no output storm)."""
    return console(stderr=True, quiet=not main_process)


def fmt(v) -> str:
    """One number format for every table: correlations (|v| <= 1) to 4 places, other floats to 4
    significant digits, thousands and more whole with separators (1,229), '-' for missing or NaN;
    anything else as str."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) <= 1 else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def fmt_epoch(v) -> str:
    """Epochs: two decimals (0.25, 6.00), never in a correlation's format."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.2f}"


def print_table(out: Console, title: str, table: Table) -> None:
    """The title on its own line (a Table title would fold at the table's width), then the table."""
    out.print(title, highlight=False)
    out.print(table)


def markdown_table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    """A markdown table; align: one letter per column, l or r (left when not given)."""
    rules = ["---:" if a == "r" else "---" for a in align.ljust(len(header), "l")]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join(rules) + "|",
                      *("| " + " | ".join(r) + " |" for r in rows)])


def show_rows(out: Console, title: str, header: list[str], rows: list[list[str]], markdown: bool = False) -> None:
    """A table of text cells, first column left and the others right: rich, or markdown to paste."""
    if markdown:
        out.print(f"{title}\n\n{markdown_table(header, rows, 'l' + 'r' * (len(header) - 1))}\n", markup=False,
                  highlight=False)
        return
    table = Table()
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    print_table(out, title, table)


def pyplot(option: str):
    """matplotlib's pyplot on the file-only Agg backend, imported when a plot is asked for (an
    optional extra); without it, one line naming the `option` that needs it."""
    from .errors import UserError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(f"{option} needs matplotlib: pip install 'iqa-dist[plot]'") from None
    return plt
