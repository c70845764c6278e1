"""The `datasets` cache: decode and resize every image once, pre-extract patches once.

Two levels, each fingerprinted and built atomically under a file lock:
- the image cache `<root>/<dataset>-<fp>/`: every usable image of the source, decoded, resized,
  uint8 HWC raw bytes (reading is a memcpy, no decode), with score, name and content group;
- a view `<image cache>/views/<fp>/`: a split (train/val/test image ids) plus the fixed, seeded
  evaluation patches of the val and test images and, with data.train_patches=cached, K stored
  training patches per train image. A new split or patch setting costs no decoding.

Patches are stored as one strip per image, (n*P, P, 3): patch k is the crop at (k*P, 0), so
training, cached patches and evaluation all read through the same `ImageStore` + crop.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import datasets
import numpy as np
import torch
from filelock import FileLock
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import synthetic
from .config import Config
from .decode import decode_job
from .errors import UserError
from .sources import Problem, SourceData, assign_splits, read_source

CACHE_VERSION = 2  # 2: a fixed WxH resize follows each image's orientation
IMAGE_FEATURES = datasets.Features({
    "image_id": datasets.Value("int64"),
    "name": datasets.Value("string"),
    "score": datasets.Value("float64"),
    "group": datasets.Value("string"),
    "height": datasets.Value("int32"),
    "width": datasets.Value("int32"),
    "pixels": datasets.Value("large_binary"),  # uint8 HWC, row-major: np.frombuffer + reshape
})
PATCH_FEATURES = datasets.Features({
    "image_id": datasets.Value("int64"),
    "height": datasets.Value("int32"),  # n * P
    "width": datasets.Value("int32"),  # P
    "boxes": datasets.Sequence(datasets.Value("int32")),  # y0, x0 of each patch in the cached image
    "pixels": datasets.Value("large_binary"),  # (n*P, P, 3) strip of n patches
})
datasets.disable_progress_bars()  # we draw our own (rich) bars


def cache_root(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir or os.environ.get("IQA_DIST_CACHE") or Path.home() / ".cache" / "iqa_dist").expanduser()


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- reading the cache


class BinaryColumn:
    """Zero-copy numpy views of a large_binary column of a memory-mapped dataset."""

    def __init__(self, ds: datasets.Dataset, column: str) -> None:
        assert ds._indices is None, "cache datasets are never shuffled or selected"
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
    scores: torch.Tensor
    ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return self.pixels.numel()

    def to(self, device: torch.device | str) -> "ImageStore":
        """The same store with its pixels moved (the metadata stays on the host)."""
        return ImageStore(self.pixels.to(device), self.offsets, self.heights, self.widths, self.scores, self.ids)

    def gather(self, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pixels, offsets, widths) of host `rows`, on `device`, ready for `augment.crop`.

        Device-resident: the whole buffer, no copy. Host: the rows copied into one (pinned) buffer."""
        off, w = self.offsets[rows], self.widths[rows]
        if same_device(self.pixels.device, device):
            return self.pixels, off.to(device, non_blocking=True), w.to(device, non_blocking=True)
        sizes = self.heights[rows] * w * 3
        flat = torch.cat([self.pixels[o:o + n] for o, n in zip(off.tolist(), sizes.tolist())])
        new_off = torch.cumsum(sizes, 0) - sizes
        if device.type == "cuda" and flat.device.type == "cpu":
            flat = flat.pin_memory()
        return flat.to(device, non_blocking=True), new_off.to(device), w.to(device)


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


@dataclass
class View:
    """A prepared dataset: the image cache, its split, and the pre-extracted patches."""

    path: Path
    meta: dict  # this view's metadata (split ids, patch settings)
    image_meta: dict  # the image cache's metadata (source, counts, skipped rows, score range)
    images: datasets.Dataset  # every cached image; row = image_id

    def ids(self, split: str) -> np.ndarray:
        return np.asarray(self.meta["splits"][split], dtype=np.int64)

    def scores(self) -> np.ndarray:
        return self.images.data.table.column("score").to_numpy()

    def names(self, ids: np.ndarray) -> list[str]:
        column = self.images.data.table.column("name")
        return [column[int(i)].as_py() for i in ids]

    def image_store(self, split: str) -> ImageStore:
        ids = self.ids(split)
        return store_from_rows(self.images, ids, self.scores()[ids], ids)

    def patch_store(self, kind: str, rows: range | None = None) -> ImageStore:
        """Patch strips of kind val / test (evaluation) or train (cached training patches);
        `rows` selects a shard (each process holds only the images it evaluates)."""
        path = self.path / f"{kind}_patches"
        if not path.is_dir():
            raise UserError(f"{self.path}: no {kind} patches in this cache (rebuild with data.train_patches=cached)")
        ds = datasets.load_from_disk(str(path))
        rows = np.arange(len(ds)) if rows is None else np.asarray(rows, dtype=np.int64)
        ids = ds.data.table.column("image_id").to_numpy()[rows]
        return store_from_rows(ds, rows, self.scores()[ids], ids)


# ---------------------------------------------------------------- building


def _atomic_build(final: Path, build, console: Console, what: str) -> None:
    """Runs build(partial_dir) under a lock unless `final` is complete; renames on success only,
    so an interrupted build never leaves a directory that passes for complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / "meta.json").is_file():
            console.print(f"[green]{what}: up to date[/] ({final}); nothing to do")
            return
        # host and pid: file locks are not reliable across nodes on every shared file system
        partial = final.with_name(f".{final.name}.partial-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            build(partial)
            if not (final / "meta.json").is_file():  # nobody finished meanwhile
                shutil.rmtree(final, ignore_errors=True)  # a leftover without meta.json is incomplete
                os.replace(partial, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.speed} it/s"),
                    TimeRemainingColumn(), console=console, disable=not console.is_terminal)


def source_root(cfg: Config) -> Path:
    """The folder a source reads; the synthetic dataset is generated into the cache first."""
    if cfg.data.dataset == "synthetic":
        crops = cfg.data.synthetic_size or synthetic.DEFAULT_CROPS
        return synthetic.build(cache_root(cfg) / f"synthetic-src-v{synthetic.VERSION}-{crops}", crops=crops)
    if not cfg.data.root:
        raise UserError(f"data.root is not set: give the folder holding the {cfg.data.dataset} files (--root DIR)")
    return Path(cfg.data.root).expanduser().resolve()


def _read(cfg: Config) -> SourceData:
    root = source_root(cfg)
    data_cfg = cfg.data
    if cfg.data.dataset == "synthetic":  # a CSV source underneath
        from dataclasses import replace
        data_cfg = replace(cfg.data, dataset="csv", csv_file="meta.csv", image_column="image", score_column="score")
        data = read_source(data_cfg, root)
        data.score_range = (0.0, 100.0)
        return data
    return read_source(data_cfg, root)


def image_fingerprint(cfg: Config, data: SourceData) -> dict:
    """What the image cache depends on: files (name, size, mtime), annotations' content, policy."""
    files = []
    for r in data.records:
        st = r.path.stat()
        files.append((r.name, st.st_size, st.st_mtime_ns, r.score, r.group))
    return {
        "version": CACHE_VERSION,
        "dataset": cfg.data.dataset,
        "score_column": data.score_column,
        "resize": resolve_resize(cfg, data),
        "min_side": cfg.model.img_size,
        "skip_bad": cfg.data.skip_bad,
        "annotations": [hashlib.sha256(p.read_bytes()).hexdigest() for p in data.annotation_files],
        "files": _hash(files),
        "problems": _hash([str(p) for p in data.problems]),
    }


def resolve_resize(cfg: Config, data: SourceData) -> str:
    return data.resize if cfg.data.resize == "auto" else cfg.data.resize


def _image_rows(records_file: str, resize: str, min_side: int, workers: int, problems_file: str) -> Iterator[dict]:
    """Generator for datasets.Dataset.from_generator: decodes in worker processes, yields the
    usable images in order and writes the unusable ones to problems_file.

    The records come as a file, not a list: from_generator shards list-valued gen_kwargs."""
    records = json.loads(Path(records_file).read_text())
    console = Console(stderr=True)
    problems = []
    jobs = [(str(r["path"]), resize, min_side) for r in records]
    # spawn, not fork: forking a process that holds torch's (or rich's) threads can deadlock the
    # children; the workers import only iqa_dist.decode (PIL, numpy), so they start fast.
    with _progress(console) as bar, multiprocessing.get_context("spawn").Pool(workers) as pool:
        task = bar.add_task("decode + resize", total=len(jobs))
        image_id = 0
        for r, (pixels, h, w, why) in zip(records, pool.imap(decode_job, jobs, chunksize=4)):
            bar.advance(task)
            if why:
                problems.append([r["where"], r["name"], why])
                continue
            yield {"image_id": image_id, "name": r["name"], "score": r["score"], "group": r["group"],
                   "height": h, "width": w, "pixels": pixels}
            image_id += 1
    Path(problems_file).write_text(json.dumps(problems))


def _build_images(partial: Path, cfg: Config, data: SourceData, fingerprint: dict, console: Console) -> None:
    resize = fingerprint["resize"]
    records = [{"path": str(r.path), "name": r.name, "score": r.score, "group": r.group, "where": r.where}
               for r in data.records]
    workers = cfg.data.workers or min(8, os.cpu_count() or 1)
    problems_file = partial / "problems.json"
    (partial / "records.json").write_text(json.dumps(records))
    t0 = time.time()
    try:
        ds = datasets.Dataset.from_generator(
            _image_rows, features=IMAGE_FEATURES, cache_dir=str(partial / "hf"), writer_batch_size=16,
            fingerprint=_hash(fingerprint),
            gen_kwargs=dict(records_file=str(partial / "records.json"), resize=resize, min_side=cfg.model.img_size,
                            workers=workers, problems_file=str(problems_file)))
    except ValueError:  # datasets refuses a generator that yielded nothing: every row was bad
        if not problems_file.exists():
            raise
        ds = None
    problems = [Problem(*p) for p in json.loads(problems_file.read_text())] + data.problems
    if problems and not cfg.data.skip_bad:
        lines = "\n".join(f"  {p}" for p in problems)
        raise UserError(f"{len(problems)} bad row(s) in {cfg.data.dataset}; nothing was cached "
                        f"(fix them, or pass --skip-bad to drop them):\n{lines}")
    if ds is None or not len(ds):
        raise UserError(f"{cfg.data.dataset}: no usable image")
    count = len(ds)
    # Keep the arrow files from_generator wrote (one write, not two): they are the cache.
    files = []
    for k, f in enumerate(ds.cache_files):
        name = f"images-{k:05d}.arrow"
        os.replace(f["filename"], partial / name)
        files.append(name)
    del ds
    shutil.rmtree(partial / "hf")
    for scratch in ("records.json", "problems.json"):
        (partial / scratch).unlink()
    meta = {
        **fingerprint,
        "source_root": str(source_root(cfg)),
        "files": files,
        "count": count,
        "score_range": list(data.score_range),
        "skipped": [str(p) for p in problems],
        "build_seconds": round(time.time() - t0, 1),
    }
    if problems:
        console.print(f"[yellow]--skip-bad: dropped {len(problems)} bad row(s)[/] (listed in {partial.name}/meta.json)")
    (partial / "meta.json").write_text(json.dumps(meta, indent=1))


def open_images(path: Path) -> datasets.Dataset:
    meta = json.loads((path / "meta.json").read_text())
    parts = [datasets.Dataset.from_file(str(path / f)) for f in meta["files"]]
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _patch_rows(images_path: str, ids: np.ndarray, n: int, size: int, seed: int) -> Iterator[dict]:
    """n seeded crops per image (the same for every run, world size and process), as one strip.

    ids is an array, not a list: from_generator would shard a list."""
    images = open_images(Path(images_path))
    column = BinaryColumn(images, "pixels")
    table = images.data.table
    heights, widths = table.column("height").to_numpy(), table.column("width").to_numpy()
    for i in ids.tolist():
        h, w = int(heights[i]), int(widths[i])
        img = column[i].reshape(h, w, 3)
        rng = np.random.default_rng([seed, i])
        ys = rng.integers(0, h - size + 1, n)
        xs = rng.integers(0, w - size + 1, n)
        strip = np.concatenate([img[y:y + size, x:x + size] for y, x in zip(ys, xs)])
        yield {"image_id": i, "height": n * size, "width": size, "boxes": np.stack([ys, xs], 1).ravel().tolist(),
               "pixels": strip.tobytes()}


def _build_view(partial: Path, image_path: Path, cfg: Config, spec: dict, splits: dict, notes: list[str],
                console: Console) -> None:
    patch_sets = {"val": cfg.data.test_patch_num, "test": cfg.data.test_patch_num}
    if cfg.data.train_patches == "cached":
        patch_sets["train"] = cfg.data.cached_patch_num
    for kind, n in patch_sets.items():
        if not splits[kind]:  # split=all has no train/val images
            continue
        ds = datasets.Dataset.from_generator(
            _patch_rows, features=PATCH_FEATURES, cache_dir=str(partial / "hf"), writer_batch_size=8,
            fingerprint=_hash([spec, kind]),
            gen_kwargs=dict(images_path=str(image_path), ids=np.asarray(splits[kind], np.int64), n=n, size=cfg.model.img_size,
                            seed=spec["patch_seed"] + (0 if kind != "train" else 1)))
        ds.save_to_disk(str(partial / f"{kind}_patches"))
        del ds
        shutil.rmtree(partial / "hf")
    counts = {s: len(v) for s, v in splits.items()}
    meta = {**spec, "splits": splits, "counts": counts, "notes": notes}
    (partial / "meta.json").write_text(json.dumps(meta))


def prepare(cfg: Config, console: Console | None = None) -> View:
    """Builds (or finds) the image cache and the view for `cfg`; safe when every rank calls it."""
    console = console or Console(stderr=True)
    data = _read(cfg)
    fingerprint = image_fingerprint(cfg, data)
    image_path = cache_root(cfg) / f"{cfg.data.dataset}-{_hash(fingerprint)}"
    _atomic_build(image_path, lambda p: _build_images(p, cfg, data, fingerprint, console), console,
                  f"image cache {cfg.data.dataset}")
    images = open_images(image_path)
    image_meta = json.loads((image_path / "meta.json").read_text())

    # The split is computed from the cached images, so rows skipped as bad never enter it.
    names = images.data.table.column("name").to_pylist()
    by_name = {r.name: r for r in data.records}
    kept = [by_name[n] for n in names]
    splits_idx, notes = assign_splits(kept, cfg.data)
    splits = {s: [int(i) for i in v] for s, v in splits_idx.items()}  # record index == image_id
    spec = {
        "images": image_path.name,
        "split": cfg.data.split,
        "split_seed": cfg.data.split_seed,
        "test_fraction": cfg.data.test_fraction,
        "val_fraction": cfg.data.val_fraction,
        "split_hash": _hash(splits),
        "patch_size": cfg.model.img_size,
        "test_patch_num": cfg.data.test_patch_num,
        "train_patches": cfg.data.train_patches,
        "cached_patch_num": cfg.data.cached_patch_num if cfg.data.train_patches == "cached" else 0,
        "patch_seed": cfg.data.split_seed,
    }
    view_path = image_path / "views" / _hash(spec)
    _atomic_build(view_path, lambda p: _build_view(p, image_path, cfg, spec, splits, notes, console), console,
                  f"view {cfg.data.split} split, {cfg.model.img_size}-px patches")
    meta = json.loads((view_path / "meta.json").read_text())
    return View(view_path, meta, image_meta, images)


def describe(view: View) -> str:
    c = view.meta["counts"]
    return (f"{view.image_meta['dataset']}: {view.image_meta['count']} images cached "
            f"(train {c['train']} / val {c['val']} / test {c['test']}; resize {view.image_meta['resize']}; "
            f"{view.meta['test_patch_num']} eval patches per image) at {view.path}")
