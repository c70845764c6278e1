"""Building the `datasets` cache: decode and resize every image once.

Two levels, each fingerprinted and built atomically under a file lock:
- the image cache `<root>/<dataset>-<fp>/`: every usable image of the source, decoded, resized,
  uint8 HWC raw bytes (reading is a memcpy, no decode), with score, name and content group;
- a view `<image cache>/views/<fp>/`: a split (train/val/test image ids) and, with
  data.train_patches=cached, K stored training patches per train image, as one strip per image
  (n*P, P, 3) whose patch k is the crop at (k*P, 0). A new split costs no decoding.

Evaluation patches are not stored: the test protocol's crops are cut from the cached images on
the device (protocol.py). Reading the cache is store.py's job.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

import datasets
import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..config import Config
from ..errors import UserError, no_space, out_of_space
from ..sources.readers import read_source, source_root
from ..sources.records import Problem, SourceData
from .decode import decode_job, target_size
from .identity import file_hashes, writer_lock
from .splits import assign_splits
from .store import HASHES, META, BinaryColumn, View, open_images

CACHE_VERSION = 4  # 2: a fixed WxH resize follows each image's orientation; 3: data.exif; 4: files by content
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
    "pixels": datasets.Value("large_binary"),  # (n*P, P, 3) strip of n patches
})
datasets.disable_progress_bars()  # we draw our own (rich) bars


def cache_root(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir or os.environ.get("IQA_DIST_CACHE") or Path.home() / ".cache" / "iqa_dist").expanduser()


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- building


def _atomic_build(final: Path, build, console: Console, what: str, need=lambda: 0) -> bool:
    """Runs build(partial_dir) under a lock unless `final` is complete and intact; renames on
    success only, so an interrupted build never leaves a directory that passes for complete. A
    damaged one (a file cut short or gone since it was built) is said and built again; a full disk
    is one line (`need()`: the bytes the build would take). True if it built."""
    if (final / META).is_file() and not damaged(final):  # read without a lock: a read-only cache is used as it is
        console.print(f"[green]{what}: up to date[/] ({final}); nothing to do", highlight=False)
        return False
    with writer_lock(final) as writable:
        if not writable:
            state = "is damaged" if (final / META).is_file() else "is not built"
            raise UserError(f"{what}: {final} {state}, and {final.parent} cannot be written (a read-only cache): "
                            "build it where the cache can be written (iqa-dist prepare with the same options), or "
                            "give a writable --data.cache_dir")
        _remove_stale_partials(final)
        if (final / META).is_file():
            damage = damaged(final)
            if not damage:  # another process built it while this one waited
                console.print(f"[green]{what}: up to date[/] ({final}); nothing to do", highlight=False)
                return False
            console.print(f"[yellow]{what}: {final} is damaged ({damage}): building it again[/]", highlight=False)
            shutil.rmtree(final)
        # host and pid: file locks are not reliable across nodes on every shared file system
        partial = final.with_name(f".{final.name}.partial-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            partial.mkdir(parents=True)
            build(partial)
            if not (final / META).is_file():  # nobody finished meanwhile
                shutil.rmtree(final, ignore_errors=True)  # a leftover without meta.json is incomplete
                os.replace(partial, final)
        except Exception as e:
            if not out_of_space(e, final.parent):
                raise
            shutil.rmtree(partial, ignore_errors=True)  # free what it took before measuring what is free
            raise no_space(final.parent, need(), f"the {what}", "nothing was cached: free space, or build it "
                           "elsewhere with --data.cache_dir (prepare: --cache-dir)") from None
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return True


def sizes(folder: Path) -> dict[str, int]:
    """What a cache level holds, for its meta.json: each file's size by path (not the views of an
    image cache, which are levels of their own, and not meta.json)."""
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name != META and f.relative_to(folder).parts[0] != "views"}


def damaged(folder: Path) -> str:
    """Why a complete cache level cannot be read as it was built ("" when it can): a file missing
    or of another size than meta.json recorded. Cheap: stats, no reading (older levels without
    sizes pass)."""
    recorded = json.loads((folder / META).read_text()).get("sizes", {})
    for name, size in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} holds {path.stat().st_size:,} bytes where {size:,} were written"
    return ""


def _remove_stale_partials(final: Path) -> None:
    """Partial builds left by killed processes of this host (their pid is gone): removed. Another
    host's are left alone (its process may be building still)."""
    host = socket.gethostname()
    for partial in final.parent.glob(f".{final.name}.partial-{host}-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def _decoded_bytes(data: SourceData, resize: str) -> int:
    """About what the image cache takes: each image's pixels after the resize policy, from the
    files' headers (no decoding)."""
    total = 0
    for r in data.records:
        try:
            with Image.open(r.path) as im:
                w, h = target_size(im.width, im.height, resize)
            total += w * h * 3
        except (OSError, SyntaxError, ValueError):
            pass
    return total


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.speed} it/s"),
                    TimeRemainingColumn(), console=console, disable=not console.is_terminal)


def image_fingerprint(cfg: Config, data: SourceData, hashes: list[str], root: Path) -> dict:
    """What the image cache depends on: each file's name and content (sha256, in `hashes`), its
    score and group, the annotations' content, the policy. Never where the files are or when
    they were written, so a copy of the dataset elsewhere has the same cache."""
    files = [(r.name, h, r.score, r.group) for r, h in zip(data.records, hashes)]
    return {**_policy(cfg, data), "version": CACHE_VERSION, "files": _hash(files),
            "problems": _hash([[p.where, p.name, p.reason.replace(str(root), "")] for p in data.problems])}


def legacy_fingerprint(cfg: Config, data: SourceData) -> dict:
    """The fingerprint caches (and runs' meta.json) had before version 4, when files were known by
    size and mtime: a run started then resumes on unchanged files, and its cache is adopted."""
    files = []
    for r in data.records:
        st = r.path.stat()
        files.append((r.name, st.st_size, st.st_mtime_ns, r.score, r.group))
    return {**_policy(cfg, data), "version": 3, "files": _hash(files),
            "problems": _hash([str(p) for p in data.problems])}


def _policy(cfg: Config, data: SourceData) -> dict:
    return {
        "dataset": cfg.data.dataset,
        "score_column": data.score_column,
        "resize": resolve_resize(cfg, data),
        "exif": cfg.data.exif,
        "min_side": cfg.model.img_size,
        "skip_bad": cfg.data.skip_bad,
        "annotations": [hashlib.sha256(p.read_bytes()).hexdigest() for p in data.annotation_files],
    }


def resolve_resize(cfg: Config, data: SourceData) -> str:
    return data.resize if cfg.data.resize == "auto" else cfg.data.resize


def _image_rows(records_file: str, resize: str, min_side: int, workers: int, problems_file: str,
                exif: bool = True) -> Iterator[dict]:
    """Generator for datasets.Dataset.from_generator: decodes in worker processes, yields the
    usable images in order and writes the unusable ones to problems_file.

    The records come as a file, not a list: from_generator shards list-valued gen_kwargs."""
    records = json.loads(Path(records_file).read_text())
    console = Console(stderr=True)
    problems = []
    jobs = [(str(r["path"]), resize, min_side, exif) for r in records]
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


OVERSIZED = 8  # an image whose shorter side exceeds this many patches is kept at a size no patch needs


def _warn_oversized(images: datasets.Dataset, meta: dict, cfg: Config, console: Console) -> None:
    """One line when images are cached far larger than the patches need (resize none on photos
    straight from a camera): they make most of the cache, and a patch sees a sliver of each."""
    table = images.data.table
    heights, widths = table.column("height").to_numpy(), table.column("width").to_numpy()
    short = np.minimum(heights, widths)
    big = short > OVERSIZED * cfg.model.img_size
    if not big.any():
        return
    i = int(np.argmax(heights * widths))
    share = float((heights * widths * 3)[big].sum()) / 1e6
    console.print(f"[yellow]warning:[/] {int(big.sum())} of {len(short)} {meta['dataset']} images are over "
                  f"{OVERSIZED}x the {cfg.model.img_size}-px patch on their shorter side (the largest {widths[i]}x"
                  f"{heights[i]}, resize {meta['resize']}): {share:.0f} MB of the cache's "
                  f"{float((heights * widths * 3).sum()) / 1e6:.0f} MB. A patch then sees a small part of each; "
                  f"--data.resize short:{2 * cfg.model.img_size} (or WxH) keeps them smaller", highlight=False)


def _remedy(problems: list[Problem], n_rows: int, cfg: Config, resize: str) -> str:
    """What to do about bad rows. When most rows are too small for the patch, dropping them is
    not the answer: the patch size or the resize is."""
    small = sum("smaller than the" in p.reason for p in problems)
    if small * 2 > max(1, n_rows):
        return (f"{small} of {n_rows} images are smaller than the {cfg.model.img_size}-px patch after resize "
                f"{resize}: train with a preset whose patches fit (--preset), a smaller --model.img_size, or "
                f"resize them up, e.g. --data.resize short:{cfg.model.img_size}")
    return "fix them, or drop them with --data.skip_bad=true (prepare: --skip-bad)"


def _build_images(partial: Path, cfg: Config, data: SourceData, root: Path, fingerprint: dict,
                  hashes: list[str], console: Console) -> None:
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
                            workers=workers, problems_file=str(problems_file), exif=cfg.data.exif))
    except ValueError:  # datasets refuses a generator that yielded nothing: every row was bad
        if not problems_file.exists():
            raise
        ds = None
    problems = [Problem(*p) for p in json.loads(problems_file.read_text())] + data.problems
    if problems and not cfg.data.skip_bad:
        lines = "\n".join(f"  {p}" for p in problems)
        raise UserError(f"{len(problems)} bad row(s) in {cfg.data.dataset}; nothing was cached "
                        f"({_remedy(problems, len(data.records), cfg, resize)}):\n{lines}")
    if ds is None or not len(ds):
        raise UserError(f"{cfg.data.dataset}: no usable image ({_remedy(problems, len(data.records), cfg, resize)})")
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
    (partial / HASHES).write_text(json.dumps({r.name: h for r, h in zip(data.records, hashes)}))
    meta = {
        **fingerprint,
        "source_root": str(root),
        "files": files,
        "count": count,
        "score_range": list(data.score_range),
        "skipped": [str(p) for p in problems],
        "build_seconds": round(time.time() - t0, 1),
        "sizes": sizes(partial),
    }
    (partial / META).write_text(json.dumps(meta, indent=1))


def _patch_rows(images_path: str, ids: np.ndarray, n: int, size: int, seed: int) -> Iterator[dict]:
    """n seeded training crops per image (the same for every run, world size and process), as one strip.

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
        yield {"image_id": i, "height": n * size, "width": size, "pixels": strip.tobytes()}


def _build_view(partial: Path, image_path: Path, cfg: Config, spec: dict, splits: dict, notes: list[str],
                console: Console) -> None:
    if cfg.data.train_patches == "cached" and splits["train"]:
        ds = datasets.Dataset.from_generator(
            _patch_rows, features=PATCH_FEATURES, cache_dir=str(partial / "hf"), writer_batch_size=8,
            fingerprint=_hash([spec, "train"]),
            gen_kwargs=dict(images_path=str(image_path), ids=np.asarray(splits["train"], np.int64),
                            n=cfg.data.cached_patch_num, size=cfg.model.img_size, seed=spec["patch_seed"]))
        ds.save_to_disk(str(partial / "train_patches"))
        del ds
        shutil.rmtree(partial / "hf")
    counts = {s: len(v) for s, v in splits.items()}
    meta = {**spec, "splits": splits, "counts": counts, "notes": notes, "sizes": sizes(partial)}
    (partial / META).write_text(json.dumps(meta))


class DataChanged(UserError):
    """A resumed run's data are not the ones it began on."""


def prepare(cfg: Config, console: Console | None = None, expect: str = "") -> View:
    """Builds (or finds) the image cache and the view for `cfg`; safe when every rank calls it.
    `expect`: the cache key a resumed run recorded (View.cache_key): data whose image cache would
    be another are refused before anything is built."""
    console = console or Console(stderr=True)
    if cfg.data.dataset == "synthetic" and cfg.data.root:  # it trained on the synthetic set after a warning line
        raise UserError(f"data.root={cfg.data.root} with data.dataset=synthetic (the demo preset's), which reads no "
                        "folder: for your own images give --data.dataset too (csv for a CSV of image paths and scores; "
                        "koniq10k, spaq, kadid10k, agiqa3k, livec for those datasets' own files)")
    root = source_root(cfg.data, cache_root(cfg))
    data = read_source(cfg.data, root)
    hashes = file_hashes([r.path for r in data.records], root, cache_root(cfg), cfg.data.workers or min(8, os.cpu_count() or 1))
    fingerprint = image_fingerprint(cfg, data, hashes, root)
    image_path = cache_root(cfg) / f"{cfg.data.dataset}-{_hash(fingerprint)}"
    legacy = cache_root(cfg) / f"{cfg.data.dataset}-{_hash(legacy_fingerprint(cfg, data))}"
    if expect and expect.split("/")[0] not in (image_path.name, legacy.name):
        raise DataChanged(f"the data differ from the run's (images, scores or annotations changed since it started; "
                        f"cache {cfg.data.dataset}: {expect} -> {image_path.name}); nothing was built. Restore them, "
                        "or start a new run")
    if (legacy / META).is_file() and not (image_path / META).is_file():
        _adopt(legacy, image_path, fingerprint, data, hashes, console)
    built = _atomic_build(image_path, lambda p: _build_images(p, cfg, data, root, fingerprint, hashes, console),
                          console, f"image cache {cfg.data.dataset}", lambda: _decoded_bytes(data, fingerprint["resize"]))
    images = open_images(image_path)
    image_meta = json.loads((image_path / META).read_text())
    if built:
        _warn_oversized(images, image_meta, cfg, console)
    if built and image_meta["skipped"]:
        console.print(f"[yellow]dropped {len(image_meta['skipped'])} bad row(s)[/] (data.skip_bad); they are listed "
                      f"in {image_path / META}", highlight=False)

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
        "train_patches": cfg.data.train_patches,
        "patch_size": cfg.model.img_size if cfg.data.train_patches == "cached" else 0,
        "cached_patch_num": cfg.data.cached_patch_num if cfg.data.train_patches == "cached" else 0,
        "patch_seed": cfg.data.split_seed + 1,
    }
    view_path = image_path / "views" / _hash(spec)
    _atomic_build(view_path, lambda p: _build_view(p, image_path, cfg, spec, splits, notes, console), console,
                  f"view {cfg.data.split} split" + (f", stored {cfg.model.img_size}-px training patches"
                                                    if spec["cached_patch_num"] else ""))
    meta = json.loads((view_path / META).read_text())
    legacy_view = _hash({**spec, "images": legacy.name})
    return View(view_path, meta, image_meta, images, image_path, legacy_key=f"{legacy.name}/{legacy_view}")


def _adopt(legacy: Path, final: Path, fingerprint: dict, data: SourceData, hashes: list[str],
           console: Console) -> None:
    """A cache built before files were identified by content, from these very files (their names,
    sizes and mtimes are the ones it was keyed by): renamed to its new key instead of decoded
    again. Its views name the old folder, so they go; a split costs no decoding."""
    with writer_lock(final) as writable:
        if not writable or (final / META).is_file() or not (legacy / META).is_file():
            return  # another process adopted it meanwhile (or the cache is read-only: built anew elsewhere)
        meta = json.loads((legacy / META).read_text())
        meta.update({k: v for k, v in fingerprint.items() if k != "files"})
        (legacy / HASHES).write_text(json.dumps({r.name: h for r, h in zip(data.records, hashes)}))
        meta["sizes"] = sizes(legacy)
        (legacy / META).write_text(json.dumps(meta, indent=1))
        shutil.rmtree(legacy / "views", ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # a leftover without meta.json is incomplete
        os.replace(legacy, final)
    console.print(f"image cache {fingerprint['dataset']}: the cache built before files were identified by content "
                  f"({legacy.name}) is reused as {final.name}", highlight=False)


def describe(view: View) -> str:
    c = view.meta["counts"]
    return (f"{view.image_meta['dataset']}: {view.image_meta['count']} images cached "
            f"(train {c['train']} / val {c['val']} / test {c['test']}; resize {view.image_meta['resize']}) at {view.path}")
