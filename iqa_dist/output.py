"""How everything is shown: consoles, the one number format, tables (rich or markdown), plots.

In a terminal: rich's tables at the terminal's width. In files and pipes (cluster logs): one
message per line at any length (no hard wrap at 80 columns, no titles folded inside a table's
width). Only the main process prints (`console_for`). Comparison tables (`fitted_table`) fit a
width: the terminal's, or in files and pipes $COLUMNS or PIPE_WIDTH; words and numbers are never
cut, the least important columns are left out instead.
"""

from __future__ import annotations

import math
import os

from rich.console import Console
from rich.table import Table
from rich.text import Text

LOG_WIDTH = 1000  # columns of a non-terminal console: wide enough that no message or table folds
PIPE_WIDTH = 100  # columns a comparison table fits in files and pipes when $COLUMNS does not say


def console(stderr: bool = False, quiet: bool = False, file=None, wide: bool = False) -> Console:
    """The terminal's console, or in files and pipes (and `wide`: tables at their full width, for
    `less -S`) one that never wraps a message."""
    probe = Console(stderr=stderr, quiet=quiet, file=file)
    if probe.is_terminal and not wide:
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
    """The title on its own line (a Table title would fold at the table's width; a long one, a
    path, wraps where the terminal ends it, not cut into lines), then the table."""
    out.print(title, highlight=False, soft_wrap=True)
    out.print(table)


def markdown_table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    """A markdown table; align: one letter per column, l or r (left when not given)."""
    rules = ["---:" if a == "r" else "---" for a in align.ljust(len(header), "l")]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join(rules) + "|",
                      *("| " + " | ".join(r) + " |" for r in rows)])


def table_width(out: Console) -> int:
    """The columns a comparison table may take: the terminal's; in files and pipes $COLUMNS when
    set, else PIPE_WIDTH (a log stays readable in a pager or an editor)."""
    if out.is_terminal:
        return out.width
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else PIPE_WIDTH


def wrapped_lines(text: str, width: int) -> int:
    """How many lines `text` takes at `width` columns, wrapped between words (as rich wraps it)."""
    count = 0
    for line in text.split("\n"):
        count += 1
        used = 0  # columns taken on the current line
        for word in line.split():
            if used and used + 1 + len(word) > width:
                count += 1
                used = len(word)
            else:
                used += (1 if used else 0) + len(word)
    return count


def fitted_table(header: list[str], rows: list[list[str]], width: int | None, drop: list[str] = (),
                 left: int = 1) -> tuple[Table, list[str]]:
    """A rich table of text cells at most `width` columns wide (None: as wide as its cells), and
    the headers of the columns it left out. A cell or header wraps only between words, so no
    number, run name or word is ever cut: each column is at least its longest word wide. When
    even that is too wide, the columns named in `drop` are left out, in that order (the least
    important first). Spare width goes a column at a time to the column whose cells take the
    most lines (the table as short as it can be), then likewise to the headers. The first `left`
    columns are left-aligned, the others right-aligned (numbers)."""
    def longest_word(text: str) -> int:
        return max((len(w) for line in text.split("\n") for w in line.split()), default=0)

    def longest_line(text: str) -> int:
        return max(len(line) for line in text.split("\n"))

    columns = [[r[i] for r in rows] for i in range(len(header))]
    least = [max([longest_word(header[i]), *map(longest_word, columns[i])]) for i in range(len(header))]
    cells = [max([least[i], *map(longest_line, columns[i])]) for i in range(len(header))]
    whole = [max(cells[i], longest_line(header[i])) for i in range(len(header))]
    kept, dropped, order = list(range(len(header))), [], [header.index(h) for h in drop if h in header]

    def frame(n: int) -> int:  # rich's default box: a rule left of every column and at the end, 1 space each side
        return 3 * n + 1

    if width is None:
        widths = dict(enumerate(whole))
    else:
        while order and sum(least[i] for i in kept) + frame(len(kept)) > width:
            i = order.pop(0)
            kept.remove(i)
            dropped.append(header[i])
        widths = {i: least[i] for i in kept}
        spare = width - sum(widths.values()) - frame(len(kept))
        for texts, target in ((columns, cells), ([[h] for h in header], whole)):
            while spare > 0:
                short = [i for i in kept if widths[i] < target[i]]
                if not short:
                    break
                i = max(short, key=lambda i: max(wrapped_lines(t, widths[i]) for t in texts[i]))
                widths[i] += 1
                spare -= 1
    table = Table()
    for i in kept:
        table.add_column(Text(header[i]), justify="left" if i < left else "right", width=widths[i])
    for r in rows:
        table.add_row(*(Text(r[i]) for i in kept))
    return table, dropped


def show_rows(out: Console, title: str, header: list[str], rows: list[list[str]], markdown: bool = False,
              drop: list[str] = (), wide: bool = False, hint: str = "--markdown shows every column") -> None:
    """A table of text cells, first column left and the others right: rich, fitted to the
    terminal (`fitted_table`; the columns it leaves out are named, with `hint`; `wide`: every
    column at its full width), or markdown to paste."""
    if markdown:
        out.print(f"{title}\n\n{markdown_table(header, rows, 'l' + 'r' * (len(header) - 1))}\n", markup=False,
                  highlight=False)
        return
    width = None if wide else table_width(out)
    table, dropped = fitted_table(header, rows, width, drop)
    print_table(out, title, table)
    if dropped:
        out.print(f"(left out to fit {width} columns: {', '.join(dropped)}; {hint})", highlight=False, markup=False)


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
