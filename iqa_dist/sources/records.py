"""What a dataset source returns: every annotated row as a `Record`, the rows it cannot use
as `Problem`s, and the files it read (`SourceData`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
