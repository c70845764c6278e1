"""Dataset sources: each reads a dataset's own published files into records.

A source returns every annotated row as a `Record` (file, score, content group, official split)
plus the rows it could not use (`Problem`: file, row, reason). Decoding happens in `cache.py`,
splitting in `splits.py`. The file formats are listed in the README's "Data" table.
"""

from __future__ import annotations

import contextlib
import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import synthetic
from .errors import UserError

if TYPE_CHECKING:  # config imports this module's registry; the type is only for annotations
    from .config import DataConfig

SPLITS = ("train", "val", "test")
SPLIT_WORDS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class Record:
    """One annotated image."""

    name: str  # path relative to the dataset root: the image's identity in split files and outputs
    path: Path  # absolute file path
    score: float  # on the dataset's own scale
    group: str  # content id: images sharing it never straddle splits (KADID: the reference image)
    where: str  # annotation file and row, for messages: "dmos.csv row 12"
    split: str = ""  # the dataset's official split, when it publishes one


@dataclass
class Problem:
    """A row that cannot be used."""

    where: str
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where} ({self.name}): {self.reason}"


@dataclass
class SourceData:
    records: list[Record]
    problems: list[Problem]
    annotation_files: list[Path]  # read to build the records (fingerprinted by content)
    score_range: tuple[float, float]  # the scale's bounds (data min/max where the scale is unknown)
    resize: str  # the literature's resize policy for this dataset (data.resize=auto)
    score_column: str


EXTRA = "\0extra"  # read_csv's key for the fields of a row beyond the header's columns


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserError(f"{path}: missing ({what})")
    return path


def read_csv(path: Path, required: list[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows as (line number, mapping); fails naming the file if a required column is absent."""
    _need(path, "annotation file")
    with _utf8(path) as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in required if c not in columns]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}")
        return [(i + 2, _row(row)) for i, row in enumerate(reader)]


def _row(row: dict) -> dict:
    """A DictReader row, stripped (name -> str); fields beyond the header (DictReader's None key)
    as a list under EXTRA, so the row can be reported instead of silently shortened."""
    out = {k.strip(): (v or "").strip() for k, v in row.items() if k}
    extra = [x for x in row.get(None) or [] if x.strip()]
    if extra:
        out[EXTRA] = extra
    return out


@contextlib.contextmanager
def _utf8(path: Path):
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
    _need(path, "annotation file")
    with _utf8(path) as f:
        header = next(csv.reader(f), [])
    columns = [c.strip() for c in header if c.strip()]
    if not columns:
        raise UserError(f"{path}: the file is empty (expected a header line with an image and a score column)")
    return columns


def _score(text: str, lo: float | None, hi: float | None) -> tuple[float, str]:
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


def _collect(rows, root: Path, image_dir: str, name_col: str, score_col: str, rng, where: str,
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
        value, why = _score(row.get(score_col, ""), lo, hi)
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


# ---------------------------------------------------------------- the sources

KONIQ_SCALES = {"MOS_zscore": (0.0, 100.0), "MOS": (1.0, 5.0)}


def read_koniq10k(root: Path, cfg: DataConfig) -> SourceData:
    """KonIQ-10k: koniq10k_scores_and_distributions.csv + 1024x768/; official split from
    koniq10k_distributions_sets.csv (its `set` column) when present."""
    column = cfg.score_column or "MOS_zscore"
    ann = root / "koniq10k_scores_and_distributions.csv"
    rows = read_csv(ann, ["image_name", column])
    sets_file = root / "koniq10k_distributions_sets.csv"
    sets: dict[str, str] = {}
    files = [ann]
    if sets_file.is_file():
        files.append(sets_file)
        for line, row in read_csv(sets_file, ["image_name", "set"]):
            split = SPLIT_WORDS.get(row["set"].lower())
            if split is None:
                raise UserError(f"{sets_file} row {line}: set {row['set']!r} is not training/validation/test")
            sets[row["image_name"]] = split
    rng = KONIQ_SCALES.get(column, (None, None))
    image_dir = cfg.image_dir or "1024x768"
    records, problems = _collect(rows, root, image_dir, "image_name", column, rng, ann.name,
                                 split_of=lambda row, name: sets.get(name, ""))
    return SourceData(records, problems, files, _range(records, rng), "512x384", column)


def read_spaq(root: Path, cfg: DataConfig) -> SourceData:
    """SPAQ: Annotations/MOS and Image attribute scores.xlsx (or a .csv export of it) + TestImage/."""
    column = cfg.score_column or "MOS"
    base = root / "Annotations" / "MOS and Image attribute scores"
    if base.with_suffix(".csv").is_file():
        ann = base.with_suffix(".csv")
        rows = read_csv(ann, ["Image name", column])
    else:
        ann = _need(base.with_suffix(".xlsx"), "SPAQ annotations, .xlsx or .csv")
        rows = _read_xlsx(ann, ["Image name", column])
    image_dir = cfg.image_dir or "TestImage"
    records, problems = _collect(rows, root, image_dir, "Image name", column, (0.0, 100.0), ann.name)
    return SourceData(records, problems, [ann], (0.0, 100.0), "short:512", column)


def _read_xlsx(path: Path, required: list[str]) -> list[tuple[int, dict[str, str]]]:
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


def read_kadid10k(root: Path, cfg: DataConfig) -> SourceData:
    """KADID-10k: dmos.csv (dist_img, ref_img, dmos 1-5, var) + images/; grouped by reference."""
    column = cfg.score_column or "dmos"
    ann = root / "dmos.csv"
    rows = read_csv(ann, ["dist_img", "ref_img", column])
    records, problems = _collect(rows, root, cfg.image_dir or "images", "dist_img", column, (1.0, 5.0),
                                 ann.name, group_col="ref_img")
    return SourceData(records, problems, [ann], (1.0, 5.0), "none", column)


def read_agiqa3k(root: Path, cfg: DataConfig) -> SourceData:
    """AGIQA-3K: data.csv (name, prompt, ..., mos_quality, mos_align); grouped by prompt, since
    several generators drew the same prompt."""
    column = cfg.score_column or "mos_quality"
    ann = root / "data.csv"
    rows = read_csv(ann, ["name", "prompt", column])
    image_dir = cfg.image_dir
    if not image_dir and rows:  # published archives differ: images/ or AGIQA-3K/ or beside data.csv
        first = rows[0][1]["name"]
        image_dir = next((d for d in ("images", "AGIQA-3K", "") if (root / d / first).is_file()), "images")
    records, problems = _collect(rows, root, image_dir, "name", column, (0.0, 5.0), ann.name, group_col="prompt")
    return SourceData(records, problems, [ann], (0.0, 5.0), "none", column)


def read_livec(root: Path, cfg: DataConfig) -> SourceData:
    """LIVE Challenge: Data/AllImages_release.mat + Data/AllMOS_release.mat + Images/; the first
    7 entries are the training images of the original study and are dropped (1,162 remain)."""
    import scipy.io

    names_file = _need(root / "Data" / "AllImages_release.mat", "LIVEC image list")
    mos_file = _need(root / "Data" / "AllMOS_release.mat", "LIVEC MOS")
    try:
        names = [str(np.asarray(c).ravel()[0]) for c in scipy.io.loadmat(names_file)["AllImages_release"].ravel()]
        mos = np.asarray(scipy.io.loadmat(mos_file)["AllMOS_release"], dtype=float).ravel()
    except (KeyError, ValueError, IndexError, OSError) as e:
        raise UserError(f"{names_file.parent}: cannot read the LIVEC .mat files: {e}") from None
    if len(names) != len(mos):
        raise UserError(f"{names_file}: {len(names)} names but {mos_file.name} holds {len(mos)} scores")
    rows = [(i + 1, {"name": n, "mos": str(m)}) for i, (n, m) in enumerate(zip(names, mos))][7:]
    records, problems = _collect(rows, root, cfg.image_dir or "Images", "name", "mos", (0.0, 100.0),
                                 "AllMOS_release.mat entry")
    return SourceData(records, problems, [names_file, mos_file], (0.0, 100.0), "none", "mos")


IMAGE_COLUMNS = ("image", "name", "image_name", "dist_name", "dist_img", "path", "filename", "file")
_SCORE_COLUMNS = ("mos", "score", "MOS", "dmos", "MOS_zscore", "quality")
_GROUP_COLUMNS = ("group", "content", "ref_name", "ref_img", "reference")


def read_csv_source(root: Path, cfg: DataConfig) -> SourceData:
    """Any CSV of image path + score (pyiqa's meta CSVs work); optional `split` column
    (train/val/test) and content column (group/content/ref_name/ref_img)."""
    if cfg.csv_file:
        ann = root / cfg.csv_file
    else:
        found = sorted(root.glob("*.csv"))
        if len(found) != 1:
            raise UserError(f"{root}: set data.csv_file; found {len(found)} CSV files ({', '.join(p.name for p in found)})")
        ann = found[0]
    columns = csv_header(ann)
    image_col = cfg.image_column or next((c for c in IMAGE_COLUMNS if c in columns), "")
    score_col = cfg.score_column or next((c for c in _SCORE_COLUMNS if c in columns), "")
    if not image_col or not score_col:
        what = "image" if not image_col else "score"
        expected = IMAGE_COLUMNS if what == "image" else _SCORE_COLUMNS
        raise UserError(f"{ann}: no {what} column found among {', '.join(columns)} (the file's columns; looked "
                        f"for {', '.join(expected)}); set data.{what}_column")
    rows = read_csv(ann, [image_col, score_col])
    group_col = next((c for c in _GROUP_COLUMNS if c in columns), "")
    has_split = "split" in columns

    def split_of(row, name):
        return SPLIT_WORDS.get(row.get("split", "").lower(), "")

    for line, row in rows if has_split else ():  # as strict as a split file: a typo is not "no split"
        if row.get("split") and row["split"].lower() not in SPLIT_WORDS:
            raise UserError(f"{ann} row {line}: split {row['split']!r} is not train/val/test (or empty: no split)")

    records, problems = _collect(rows, root, cfg.image_dir, image_col, score_col, (None, None), ann.name,
                                 group_col=group_col, split_of=split_of if has_split else None)
    return SourceData(records, problems, [ann], _range(records, (None, None)), "none", score_col)


def _range(records: list[Record], declared) -> tuple[float, float]:
    if declared[0] is not None:
        return declared
    scores = [r.score for r in records]
    return (min(scores), max(scores)) if scores else (0.0, 1.0)


def read_synthetic(root: Path, cfg: DataConfig) -> SourceData:
    """The embedded synthetic dataset, generated into `root` first (synthetic.py): a CSV source
    underneath, on a 0-100 scale."""
    synthetic.build(root, crops=cfg.synthetic_size or synthetic.DEFAULT_CROPS)
    data = read_csv_source(root, replace(cfg, dataset="csv", csv_file="meta.csv", image_column="image",
                                         score_column="score"))
    data.score_range = (0.0, 100.0)
    return data


# The one dataset registry: its keys are data.dataset's choices (SOURCES).
READERS = {
    "koniq10k": read_koniq10k,
    "spaq": read_spaq,
    "kadid10k": read_kadid10k,
    "agiqa3k": read_agiqa3k,
    "livec": read_livec,
    "csv": read_csv_source,
    "synthetic": read_synthetic,
}


def source_root(cfg: DataConfig, cache_root: Path) -> Path:
    """The folder a source reads: data.root, or for the synthetic source its folder in the cache."""
    if cfg.dataset == "synthetic":
        crops = cfg.synthetic_size or synthetic.DEFAULT_CROPS
        return cache_root / f"synthetic-src-v{synthetic.VERSION}-{crops}"
    if not cfg.root:
        raise UserError(f"data.root is not set: give the folder holding the {cfg.dataset} files (--root DIR)")
    return Path(cfg.root).expanduser().resolve()


def read_source(cfg: DataConfig, root: Path) -> SourceData:
    """Every annotated row of the dataset in `root` (see source_root), and the rows it cannot use."""
    if cfg.dataset != "synthetic" and not root.is_dir():
        raise UserError(f"data.root={str(root)!r}: no such folder")
    data = READERS[cfg.dataset](root, cfg)
    if not data.records and not data.problems:
        raise UserError(f"{root}: the annotations list no images")
    return data
SOURCES = tuple(READERS)
