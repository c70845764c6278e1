"""The dataset sources: each reads a dataset's own published files into records.

A source returns every annotated row as a `Record` (file, score, content group, official split)
plus the rows it could not use (`Problem`: file, row, reason). Decoding happens in `data/cache.py`,
splitting in `data/splits.py`. The file formats are listed in the README's "Data" table.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import UserError
from . import synthetic
from .records import SPLIT_WORDS, SourceData
from .tables import IMAGE_COLUMNS, collect_records, need_file, score_range, read_xlsx, csv_header, read_csv

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
    records, problems = collect_records(rows, root, image_dir, "image_name", column, rng, ann.name,
                                 split_of=lambda row, name: sets.get(name, ""))
    return SourceData(records, problems, files, score_range(records, rng), "512x384", column)


def read_spaq(root: Path, cfg: DataConfig) -> SourceData:
    """SPAQ: Annotations/MOS and Image attribute scores.xlsx (or a .csv export of it) + TestImage/."""
    column = cfg.score_column or "MOS"
    base = root / "Annotations" / "MOS and Image attribute scores"
    if base.with_suffix(".csv").is_file():
        ann = base.with_suffix(".csv")
        rows = read_csv(ann, ["Image name", column])
    else:
        ann = need_file(base.with_suffix(".xlsx"), "SPAQ annotations, .xlsx or .csv")
        rows = read_xlsx(ann, ["Image name", column])
    image_dir = cfg.image_dir or "TestImage"
    records, problems = collect_records(rows, root, image_dir, "Image name", column, (0.0, 100.0), ann.name)
    return SourceData(records, problems, [ann], (0.0, 100.0), "short:512", column)


def read_kadid10k(root: Path, cfg: DataConfig) -> SourceData:
    """KADID-10k: dmos.csv (dist_img, ref_img, dmos 1-5, var) + images/; grouped by reference."""
    column = cfg.score_column or "dmos"
    ann = root / "dmos.csv"
    rows = read_csv(ann, ["dist_img", "ref_img", column])
    records, problems = collect_records(rows, root, cfg.image_dir or "images", "dist_img", column, (1.0, 5.0),
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
    records, problems = collect_records(rows, root, image_dir, "name", column, (0.0, 5.0), ann.name, group_col="prompt")
    return SourceData(records, problems, [ann], (0.0, 5.0), "none", column)


def read_livec(root: Path, cfg: DataConfig) -> SourceData:
    """LIVE Challenge: Data/AllImages_release.mat + Data/AllMOS_release.mat + Images/; the first
    7 entries are the training images of the original study and are dropped (1,162 remain)."""
    import scipy.io

    names_file = need_file(root / "Data" / "AllImages_release.mat", "LIVEC image list")
    mos_file = need_file(root / "Data" / "AllMOS_release.mat", "LIVEC MOS")
    try:
        names = [str(np.asarray(c).ravel()[0]) for c in scipy.io.loadmat(names_file)["AllImages_release"].ravel()]
        mos = np.asarray(scipy.io.loadmat(mos_file)["AllMOS_release"], dtype=float).ravel()
    except (KeyError, ValueError, IndexError, OSError) as e:
        raise UserError(f"{names_file.parent}: cannot read the LIVEC .mat files: {e}") from None
    if len(names) != len(mos):
        raise UserError(f"{names_file}: {len(names)} names but {mos_file.name} holds {len(mos)} scores")
    rows = [(i + 1, {"name": n, "mos": str(m)}) for i, (n, m) in enumerate(zip(names, mos))][7:]
    records, problems = collect_records(rows, root, cfg.image_dir or "Images", "name", "mos", (0.0, 100.0),
                                 "AllMOS_release.mat entry")
    return SourceData(records, problems, [names_file, mos_file], (0.0, 100.0), "none", "mos")


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
            raise UserError(f"{root}: no CSV file here: give the annotation file with data.csv_file" if not found else
                            f"{root}: {len(found)} CSV files ({', '.join(p.name for p in found)}): say which holds "
                            "the annotations with data.csv_file")
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

    records, problems = collect_records(rows, root, cfg.image_dir, image_col, score_col, (None, None), ann.name,
                                 group_col=group_col, split_of=split_of if has_split else None)
    return SourceData(records, problems, [ann], score_range(records, (None, None)), "none", score_col)


def read_synthetic(root: Path, cfg: DataConfig) -> SourceData:
    """The embedded synthetic dataset, generated into `root` first (synthetic.py): a CSV source
    underneath, on a 0-100 scale."""
    synthetic.build(root, crops=cfg.synthetic_size or synthetic.DEFAULT_CROPS)
    data = read_csv_source(root, replace(cfg, dataset="csv", csv_file="meta.csv", image_column="image",
                                         score_column="score"))
    data.score_range = (0.0, 100.0)
    return data


# The one dataset registry: a reader for each of data.dataset's choices (config.DATASETS).
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
