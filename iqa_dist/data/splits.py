"""Splits: which images train, validate (model selection) and test, by content group.

random: seeded, by content group (KADID: the reference image; AGIQA: the prompt), so no scene
straddles splits; official: the dataset's own; otherwise split file(s). Validation, when the
chosen split has none, is a seeded share of the training groups.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import UserError
from ..sources.records import SPLITS, SPLIT_WORDS, Record
from ..sources.tables import IMAGE_COLUMNS, read_csv


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
    single = next((SPLIT_WORDS[w] for w in path.stem.lower().replace("-", "_").split("_") if w in SPLIT_WORDS), "")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                return {_split_word(k, path): [_entry(e, path) for e in _names(v, path, k)] for k, v in data.items()}
            entries = [_entry(e, path) for e in _names(data, path)]
        elif path.suffix == ".csv":
            out: dict[str, list[str]] = {}
            cols = read_csv(path, [])
            name_col = next((c for c in IMAGE_COLUMNS if cols and c in cols[0][1]), "")
            if not name_col or "split" not in cols[0][1]:
                raise UserError(f"{path}: a split CSV needs an image column ({'/'.join(IMAGE_COLUMNS)}) and 'split'")
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


def _names(value, path: Path, split: str = "") -> list:
    """A JSON split's list of image names (a lone string would iterate as its characters)."""
    if not isinstance(value, list):
        where = f"{path}: {split!r}" if split else str(path)
        raise UserError(f"{where}: expected a list of image names, got {json.dumps(value)[:60]}")
    return value


def _split_word(word: str, path: Path, line: int | None = None) -> str:
    split = SPLIT_WORDS.get(str(word).lower())
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
