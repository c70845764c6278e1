"""Reading the cache: a prepared dataset (`View`) and the flat pixel buffers (`ImageStore`) that
training, evaluation and the benchmarks gather patches from.

The cache's Arrow files are memory-mapped by `datasets`; an `ImageStore` copies the rows it needs
into one flat uint8 buffer (one memcpy per image), which then lives on the device when it fits.
Patches are cut from it on the device (`augment.crop`), from origins computed on the host.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import datasets
import numpy as np
import torch

from ..errors import UserError
from .protocol import patch_origins

META = "meta.json"  # a cache level's metadata, written last: its presence marks the level complete
HASHES = "sha256.json"  # in an image cache: image name -> sha256 of its source file (data/identity.py)


class BinaryColumn:
    """Zero-copy numpy views of a large_binary column of a memory-mapped dataset.

    `datasets` has no zero-copy accessor for binary values (indexing builds Python bytes), so this
    reads the Arrow chunks' offset and data buffers directly; cache datasets are never shuffled
    or selected, so row i of the dataset is row i of the table."""

    def __init__(self, ds: datasets.Dataset, column: str) -> None:
        if ds._indices is not None:
            raise RuntimeError("cache datasets are never shuffled or selected")  # a bug, never bad input
        self.chunks = []
        starts = [0]
        for chunk in ds.data.table.column(column).chunks:
            offsets = np.frombuffer(chunk.buffers()[1], np.int64)[chunk.offset:chunk.offset + len(chunk) + 1]
            self.chunks.append((np.frombuffer(chunk.buffers()[2], np.uint8), offsets))
            starts.append(starts[-1] + len(chunk))
        self.starts = np.array(starts)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, row: int) -> np.ndarray:
        c = int(np.searchsorted(self.starts, row, side="right") - 1)
        data, offsets = self.chunks[c]
        i = row - self.starts[c]
        return data[offsets[i]:offsets[i + 1]]


@dataclass
class ImageStore:
    """uint8 HWC images (or patch strips) of one split, concatenated in one flat buffer.

    pixels: (total,) uint8, on the device when resident there, else in host memory.
    offsets/heights/widths: (N,) int64 and scores (N,) float32, ids (N,) int64: always on the
    host, where the batch plan and crop origins are computed without device syncs.
    """

    pixels: torch.Tensor
    offsets: torch.Tensor
    heights: torch.Tensor
    widths: torch.Tensor
    scores: torch.Tensor  # on the dataset's own scale
    ids: torch.Tensor  # image ids in the dataset's cache
    targets: torch.Tensor | None = None  # (N,) float32 training targets (normalised scores); None = the scores
    dataset: torch.Tensor | None = None  # (N,) int64: which dataset of a joint store each row comes from

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return self.pixels.numel()

    def training_targets(self) -> torch.Tensor:
        return self.scores if self.targets is None else self.targets

    def to(self, device: torch.device | str) -> "ImageStore":
        """The same store with its pixels moved (the metadata stays on the host)."""
        return replace(self, pixels=self.pixels.to(device))

    @classmethod
    def join(cls, stores: list["ImageStore"], targets: list[torch.Tensor]) -> "ImageStore":
        """One store holding several datasets' rows back to back (joint training), with each
        row's training target and dataset index."""
        sizes = [s.pixels.numel() for s in stores]
        shift = torch.tensor([0, *sizes[:-1]]).cumsum(0)
        return cls(torch.cat([s.pixels for s in stores]),
                   torch.cat([s.offsets + int(o) for s, o in zip(stores, shift)]),
                   torch.cat([s.heights for s in stores]), torch.cat([s.widths for s in stores]),
                   torch.cat([s.scores for s in stores]), torch.cat([s.ids for s in stores]),
                   torch.cat(targets).float(),
                   torch.cat([torch.full((len(s),), d, dtype=torch.int64) for d, s in enumerate(stores)]))

    @classmethod
    def of_images(cls, images: list[np.ndarray], ids: list[int] | None = None) -> "ImageStore":
        """uint8 HWC arrays in one flat host buffer (scores zero: images to score, not to train on)."""
        heights = torch.tensor([a.shape[0] for a in images], dtype=torch.int64)
        widths = torch.tensor([a.shape[1] for a in images], dtype=torch.int64)
        sizes = heights * widths * 3
        pixels = torch.from_numpy(np.concatenate([np.ascontiguousarray(a).reshape(-1) for a in images])) \
            if images else torch.zeros(0, dtype=torch.uint8)
        ids = torch.arange(len(images)) if ids is None else torch.as_tensor(ids, dtype=torch.int64)
        return cls(pixels, torch.cumsum(sizes, 0) - sizes, heights, widths, torch.zeros(len(images)), ids)

    def image(self, row: int) -> np.ndarray:
        """Row `row` as a (H, W, 3) uint8 array (a view of host pixels)."""
        o, h, w = int(self.offsets[row]), int(self.heights[row]), int(self.widths[row])
        return self.pixels[o:o + h * w * 3].cpu().numpy().reshape(h, w, 3)

    def gather(self, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pixels, offsets, widths) of host `rows`, for `augment.crop`: pixels on `device`,
        offsets and widths on the host (the caller uploads them with the batch's other numbers).

        Device-resident: the whole buffer, no copy. Host: the rows copied into one (pinned) buffer."""
        off, w = self.offsets[rows], self.widths[rows]
        if same_device(self.pixels.device, device):
            return self.pixels, off, w
        sizes = self.heights[rows] * w * 3
        flat = torch.cat([self.pixels[o:o + n] for o, n in zip(off.tolist(), sizes.tolist())])
        if device.type == "cuda" and flat.device.type == "cpu":
            flat = flat.pin_memory()
        return flat.to(device, non_blocking=True), torch.cumsum(sizes, 0) - sizes, w


@dataclass
class EvalSet:
    """Images of one split (this process's shard) and the test protocol's patch origins."""

    store: ImageStore
    origins: torch.Tensor  # (N, n, 2) int64 (y0, x0) on the host: n patches per image

    def __len__(self) -> int:
        return len(self.store)

    @property
    def patches(self) -> int:
        return self.origins.shape[1]

    @classmethod
    def of(cls, store: ImageStore, protocol: str, n: int, size: int) -> "EvalSet":
        """A store's images with the test protocol's n patch origins each (protocol.py)."""
        origins = [patch_origins(protocol, store.image(i), int(store.heights[i]), int(store.widths[i]), size, n)
                   for i in range(len(store))]
        return cls(store, torch.from_numpy(np.stack(origins)) if origins else torch.zeros(0, n, 2, dtype=torch.int64))


def same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 are the same device (Accelerate's single-process device has no index)."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def store_from_rows(ds: datasets.Dataset, rows: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> ImageStore:
    """Copies the given dataset rows' pixels into one host buffer (a memcpy per row)."""
    column = BinaryColumn(ds, "pixels")
    table = ds.data.table
    heights = table.column("height").to_numpy()[rows].astype(np.int64)
    widths = table.column("width").to_numpy()[rows].astype(np.int64)
    sizes = heights * widths * 3
    offsets = np.cumsum(sizes) - sizes
    pixels = torch.empty(int(sizes.sum()), dtype=torch.uint8)
    flat = pixels.numpy()
    for o, n, r in zip(offsets, sizes, rows):
        flat[o:o + n] = column[int(r)]
    as_t = lambda a, dt: torch.tensor(np.asarray(a), dtype=dt)  # noqa: E731 (a copy: arrow memory is read-only)
    return ImageStore(pixels, as_t(offsets, torch.int64), as_t(heights, torch.int64), as_t(widths, torch.int64),
                      as_t(scores, torch.float32), as_t(ids, torch.int64))


def open_images(path: Path) -> datasets.Dataset:
    """The image cache at `path` (its Arrow files, memory-mapped)."""
    meta = json.loads((path / META).read_text())
    parts = [datasets.Dataset.from_file(str(path / f)) for f in meta["files"]]
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


@dataclass
class View:
    """A prepared dataset: the image cache, its split, and the stored training patches (if any)."""

    path: Path
    meta: dict  # this view's metadata (split ids, patch settings)
    image_meta: dict  # the image cache's metadata (source, counts, skipped rows, score range)
    images: datasets.Dataset  # every cached image; row = image_id
    image_dir: Path  # the image cache's folder (the view is one of its views; cache.py lays them out)
    legacy_key: str = ""  # the cache_key these data had before files were identified by content (cache.py)

    def cache_key(self) -> str:
        """image cache / view folder names, both content hashes: which data a run used (meta.json)."""
        return f"{self.image_dir.name}/{self.path.name}"

    def ids(self, split: str) -> np.ndarray:
        return np.asarray(self.meta["splits"][split], dtype=np.int64)

    def scores(self) -> np.ndarray:
        return self.images.data.table.column("score").to_numpy()

    def names(self, ids: np.ndarray) -> list[str]:
        column = self.images.data.table.column("name")
        return [column[int(i)].as_py() for i in ids]

    def file_hashes(self, ids: np.ndarray) -> list[str]:
        """The sha256 of each image's source file ("" where the cache does not record it)."""
        path = self.image_dir / HASHES
        known = json.loads(path.read_text()) if path.is_file() else {}
        return [known.get(name, "") for name in self.names(ids)]

    def groups(self, ids: np.ndarray) -> list[str]:
        column = self.images.data.table.column("group")
        return [column[int(i)].as_py() for i in ids]

    def image_store(self, split: str, rows: range | None = None) -> ImageStore:
        """The images of a split (or the `rows` shard of it) in one host buffer."""
        ids = self.ids(split)
        if rows is not None:
            ids = ids[np.asarray(rows, dtype=np.int64)]
        return store_from_rows(self.images, ids, self.scores()[ids], ids)

    def eval_set(self, split: str, protocol: str, n: int, size: int, rows: range | None = None) -> EvalSet:
        """The images of a split (or a shard) with the test protocol's n patch origins each."""
        return EvalSet.of(self.image_store(split, rows), protocol, n, size)

    def patch_store(self, rows: range | None = None) -> ImageStore:
        """The stored training patch strips (data.train_patches=cached): patch k of image i is the
        crop at (k*P, 0) of strip i."""
        path = self.path / "train_patches"
        if not path.is_dir():
            raise UserError(f"{self.path}: no stored training patches in this cache (data.train_patches=cached builds them)")
        ds = datasets.load_from_disk(str(path))
        rows = np.arange(len(ds)) if rows is None else np.asarray(rows, dtype=np.int64)
        ids = ds.data.table.column("image_id").to_numpy()[rows]
        return store_from_rows(ds, rows, self.scores()[ids], ids)
