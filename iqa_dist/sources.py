"""Dataset sources: each reads a dataset's own published files into records, and splits them.

A source returns every annotated row as a `Record` (file, score, content group, official split)
plus the rows it could not use (`Problem`: file, row, reason). Decoding happens in `cache.py`.
File formats: REFERENCE.md §4.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import DataConfig
from .errors import UserError

SPLITS = ("train", "val", "test")
_SPLIT_WORDS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


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
    official_splits: bool = False  # records carry the dataset's own split
    notes: list[str] = field(default_factory=list)


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserError(f"{path}: missing ({what})")
    return path


def read_csv(path: Path, required: list[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows as (line number, mapping); fails naming the file if a required column is absent."""
    _need(path, "annotation file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in required if c not in columns]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}")
        return [(i + 2, {k.strip(): (v or "").strip() for k, v in row.items() if k}) for i, row in enumerate(reader)]


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
    records, problems = [], []
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
            split = _SPLIT_WORDS.get(row["set"].lower())
            if split is None:
                raise UserError(f"{sets_file} row {line}: set {row['set']!r} is not training/validation/test")
            sets[row["image_name"]] = split
    rng = KONIQ_SCALES.get(column, (None, None))
    image_dir = cfg.image_dir or "1024x768"
    records, problems = _collect(rows, root, image_dir, "image_name", column, rng, ann.name,
                                 split_of=lambda row, name: sets.get(name, ""))
    return SourceData(records, problems, files, _range(records, rng), "512x384", column,
                      official_splits=bool(sets))


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
    sheet = openpyxl.load_workbook(path, read_only=True, data_only=True).active
    lines = sheet.iter_rows(values_only=True)
    header = [str(c).strip() if c is not None else "" for c in next(lines, ())]
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


_IMAGE_COLUMNS = ("image", "name", "image_name", "dist_name", "dist_img", "path", "filename", "file")
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
    header = read_csv(ann, [])
    columns = list(header[0][1]) if header else []
    image_col = cfg.image_column or next((c for c in _IMAGE_COLUMNS if c in columns), "")
    score_col = cfg.score_column or next((c for c in _SCORE_COLUMNS if c in columns), "")
    if not image_col or not score_col:
        what = "image" if not image_col else "score"
        raise UserError(f"{ann}: no {what} column found among {', '.join(columns) or 'no columns'}; "
                        f"set data.{'image' if what == 'image' else 'score'}_column")
    rows = read_csv(ann, [image_col, score_col])
    group_col = next((c for c in _GROUP_COLUMNS if c in columns), "")
    has_split = "split" in columns

    def split_of(row, name):
        return _SPLIT_WORDS.get(row.get("split", "").lower(), "")

    records, problems = _collect(rows, root, cfg.image_dir, image_col, score_col, (None, None), ann.name,
                                 group_col=group_col, split_of=split_of if has_split else None)
    return SourceData(records, problems, [ann], _range(records, (None, None)), "none", score_col,
                      official_splits=has_split)


def _range(records: list[Record], declared) -> tuple[float, float]:
    if declared[0] is not None:
        return declared
    scores = [r.score for r in records]
    return (min(scores), max(scores)) if scores else (0.0, 1.0)


READERS = {
    "koniq10k": read_koniq10k,
    "spaq": read_spaq,
    "kadid10k": read_kadid10k,
    "agiqa3k": read_agiqa3k,
    "livec": read_livec,
    "csv": read_csv_source,
}


def read_source(cfg: DataConfig, root: Path) -> SourceData:
    if not root.is_dir():
        raise UserError(f"data.root={str(root)!r}: no such folder")
    data = READERS[cfg.dataset](root, cfg)
    if not data.records and not data.problems:
        raise UserError(f"{root}: the annotations list no images")
    return data


# ---------------------------------------------------------------- splits


def assign_splits(records: list[Record], cfg: DataConfig) -> tuple[dict[str, list[int]], list[str]]:
    """Record indices per split (train/val/test, all non-empty) and notes for the metadata.

    random: seeded, by content group; official: the dataset's own; otherwise split file(s).
    Validation, when the chosen split has none, is a seeded share of the training groups.
    """
    notes: list[str] = []
    if cfg.split == "all":  # evaluation only (e.g. cross-dataset): every image is a test image
        return {"train": [], "val": [], "test": list(range(len(records)))}, ["split=all: every image in test"]
    if cfg.split == "random":
        train, test = _group_split(records, list(range(len(records))), cfg.test_fraction, cfg.split_seed)
        splits = {"train": train, "test": test, "val": []}
    elif cfg.split == "official":
        if not any(r.split for r in records):
            raise UserError(f"data.split=official: {cfg.dataset} publishes no official split here "
                            "(KonIQ needs koniq10k_distributions_sets.csv; csv needs a split column)")
        splits = {s: [i for i, r in enumerate(records) if r.split == s] for s in SPLITS}
        left = sum(1 for r in records if not r.split)
        if left:
            notes.append(f"{left} images have no official split and are left out")
    else:
        splits = _file_splits(records, cfg.split, notes)
    if not splits["val"]:
        splits["train"], splits["val"] = _group_split(records, splits["train"], cfg.val_fraction, cfg.split_seed + 1)
        notes.append(f"validation: a seeded {cfg.val_fraction:.0%} of the training contents (seed {cfg.split_seed})")
    _check_disjoint(records, splits)
    for s in SPLITS:
        if not splits[s]:
            raise UserError(f"data.split={cfg.split}: the {s} split is empty")
    return splits, notes


def _group_split(records: list[Record], idx: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Splits idx by content group: a seeded `fraction` of the groups goes to the second part."""
    groups = sorted({records[i].group for i in idx})
    order = np.random.default_rng(seed).permutation(len(groups))
    n_out = max(1, round(fraction * len(groups))) if len(groups) > 1 else 0
    out = {groups[j] for j in order[:n_out]}
    return [i for i in idx if records[i].group not in out], [i for i in idx if records[i].group in out]


def _file_splits(records: list[Record], spec: str, notes: list[str]) -> dict[str, list[int]]:
    """Split file(s): CSV (name, split), JSON ({split: [names]} or a list of names / {"image": ...}
    entries) or .txt (a name per line). A file holding one split is named for it
    (e.g. train_koniq.json, koniq_test.json)."""
    by_name: dict[str, int] = {}
    for i, r in enumerate(records):
        by_name[r.name] = i
        by_name.setdefault(Path(r.name).name, i)
    names: dict[str, list[str]] = {s: [] for s in SPLITS}
    origin: dict[str, Path] = {}
    for part in spec.split(","):
        path = Path(part.strip()).expanduser()
        for split, entries in _read_split_file(path).items():
            names[split] += entries
            origin[split] = path
    splits: dict[str, list[int]] = {s: [] for s in SPLITS}
    for split, entries in names.items():
        unknown = [n for n in entries if n not in by_name and Path(n).name not in by_name]
        if unknown:
            raise UserError(f"{origin[split]}: {len(unknown)} {split} names match no annotated image, "
                            f"e.g. {', '.join(unknown[:3])}")
        splits[split] = sorted({by_name.get(n, by_name.get(Path(n).name)) for n in entries})
    used = {i for v in splits.values() for i in v}
    if len(used) < len(records):
        notes.append(f"{len(records) - len(used)} annotated images are in no split file and are left out")
    return splits


def _read_split_file(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        raise UserError(f"data.split: {path}: no such split file")
    single = next((_SPLIT_WORDS[w] for w in path.stem.lower().replace("-", "_").split("_") if w in _SPLIT_WORDS), "")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                return {_split_word(k, path): [_entry(e, path) for e in v] for k, v in data.items()}
            entries = [_entry(e, path) for e in data]
        elif path.suffix == ".csv":
            out: dict[str, list[str]] = {}
            cols = read_csv(path, [])
            name_col = next((c for c in _IMAGE_COLUMNS if cols and c in cols[0][1]), "")
            if not name_col or "split" not in cols[0][1]:
                raise UserError(f"{path}: a split CSV needs an image column ({'/'.join(_IMAGE_COLUMNS)}) and 'split'")
            for line, row in cols:
                out.setdefault(_split_word(row["split"], path, line), []).append(row[name_col])
            return out
        else:
            entries = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable split file: {e}") from None
    if not single:
        raise UserError(f"{path}: a list of names must say its split in the file name (train/val/test)")
    return {single: entries}


def _split_word(word: str, path: Path, line: int | None = None) -> str:
    split = _SPLIT_WORDS.get(str(word).lower())
    if split is None:
        where = f"{path} row {line}" if line else str(path)
        raise UserError(f"{where}: split {word!r} is not train/val/test")
    return split


def _entry(e, path: Path) -> str:
    if isinstance(e, str):
        return e
    if isinstance(e, dict):
        for key in ("image", "name", "image_name", "path"):
            if key in e:
                return str(e[key])
    raise UserError(f"{path}: entry {str(e)[:60]!r} has no image name")


def _check_disjoint(records: list[Record], splits: dict[str, list[int]]) -> None:
    seen: dict[str, str] = {}
    for split in SPLITS:
        for i in splits[split]:
            group = records[i].group
            if seen.setdefault(group, split) != split:
                kind = "image" if group == records[i].name else "content group"
                raise UserError(f"data.split: {kind} {group!r} is in both {seen[group]} and {split}")
