"""The table layer under the sources: annotation files (CSV, .xlsx) read into rows, and rows
into records, with every row that cannot be used named by file and row.
"""

from __future__ import annotations

import contextlib
import csv
import math
from pathlib import Path

from ..errors import UserError
from .records import Problem, Record

EXTRA = "\0extra"  # read_csv's key for the fields of a row beyond the header's columns


def need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserError(f"{path}: missing ({what})")
    return path


def read_csv(path: Path, required: list[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows as (line number, mapping); fails naming the file if a required column is absent."""
    need_file(path, "annotation file")
    with utf8_text(path) as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in required if c not in columns]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}")
        return [(i + 2, strip_row(row)) for i, row in enumerate(reader)]


def strip_row(row: dict) -> dict:
    """A DictReader row, stripped (name -> str); fields beyond the header (DictReader's None key)
    as a list under EXTRA, so the row can be reported instead of silently shortened."""
    out = {k.strip(): (v or "").strip() for k, v in row.items() if k}
    extra = [x for x in row.get(None) or [] if x.strip()]
    if extra:
        out[EXTRA] = extra
    return out


@contextlib.contextmanager
def utf8_text(path: Path):
    """The text of an annotation file (a UTF-8 byte-order mark is allowed); any other encoding is
    one error naming the file, not a traceback from the middle of reading it."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            yield f
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                        "save it as UTF-8 (\"CSV UTF-8\" in a spreadsheet)") from None


def csv_header(path: Path) -> list[str]:
    """The column names of a CSV file; an empty file (or one without a header) is an error."""
    need_file(path, "annotation file")
    with utf8_text(path) as f:
        header = next(csv.reader(f), [])
    columns = [c.strip() for c in header if c.strip()]
    if not columns:
        raise UserError(f"{path}: the file is empty (expected a header line with an image and a score column)")
    return columns


def parse_score(text: str, lo: float | None, hi: float | None) -> tuple[float, str]:
    """Parses a score; returns (value, "") or (nan, reason)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return math.nan, f"score {text!r} is not a number"
    if not math.isfinite(value):
        return math.nan, f"score {text!r} is not finite"
    if lo is not None and hi is not None and not lo <= value <= hi:
        return math.nan, f"score {value:g} is outside the scale [{lo:g}, {hi:g}]"
    return value, ""


def collect_records(rows, root: Path, image_dir: str, name_col: str, score_col: str, rng, where: str,
             group_col: str = "", split_of=None) -> tuple[list[Record], list[Problem]]:
    """Records from CSV-like rows; rows with a bad score or a missing file become problems."""
    records, problems, seen = [], [], {}
    lo, hi = rng
    for line, row in rows:
        raw_name = row.get(name_col, "")
        name = f"{image_dir}/{raw_name}" if image_dir else raw_name
        here = f"{where} row {line}"
        if not raw_name:
            problems.append(Problem(here, "?", f"empty {name_col}"))
            continue
        value, why = parse_score(row.get(score_col, ""), lo, hi)
        path = root / name
        if EXTRA in row:
            why = (f"{len(row[EXTRA])} more field(s) than the header has columns "
                   "(a name or value with a comma must be quoted)")
        elif name in seen:
            why = f"listed twice (first at row {seen[name]}): an image may have one score and one split"
        seen.setdefault(name, line)
        if why:
            problems.append(Problem(here, name, why))
        elif not path.is_file():
            problems.append(Problem(here, name, f"image file missing: {path}"))
        else:
            split = split_of(row, raw_name) if split_of else ""
            records.append(Record(name, path, value, row.get(group_col) or name, here, split))
    return records, problems


def read_xlsx(path: Path, required: list[str]) -> list[tuple[int, dict[str, str]]]:
    try:
        import openpyxl
    except ImportError:
        raise UserError(f"{path}: reading .xlsx needs openpyxl (pip install 'iqa-dist[spaq]'), "
                        "or save the sheet as a .csv beside it") from None
    try:
        sheet = openpyxl.load_workbook(path, read_only=True, data_only=True).active
        lines = sheet.iter_rows(values_only=True)
        header = [str(c).strip() if c is not None else "" for c in next(lines, ())]
    except Exception as e:  # zipfile.BadZipFile, openpyxl's InvalidFileException, KeyError on a damaged file
        raise UserError(f"{path}: not a readable .xlsx workbook ({type(e).__name__}); "
                        "save the sheet as a .csv beside it") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(h for h in header if h)}")
    return [(i + 2, {h: "" if v is None else str(v).strip() for h, v in zip(header, row) if h})
            for i, row in enumerate(lines) if any(v is not None for v in row)]


IMAGE_COLUMNS = ("image", "name", "image_name", "dist_name", "dist_img", "path", "filename", "file")


def score_range(records: list[Record], declared) -> tuple[float, float]:
    if declared[0] is not None:
        return declared
    scores = [r.score for r in records]
    return (min(scores), max(scores)) if scores else (0.0, 1.0)
