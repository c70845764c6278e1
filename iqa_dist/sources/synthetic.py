"""The embedded synthetic dataset: graded distortions of the photos bundled with scikit-image.

Nothing is downloaded. Each content is a crop of one bundled photo; each image is that content
under one distortion (or a mixture) at one strength, scored 0-100 by its SSIM against the
pristine content (`score`; 100 = pristine).
It is written as PNG files plus a CSV, so `iqa-dist prepare` reads it through the same path as
any dataset on disk. It exists for the demo and the tests: it exercises every real code path and
gives a task that a tiny model learns in minutes.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ..constants import GRAY

VERSION = 3  # bump when the generated images change: it is part of the cache fingerprint
PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right",
    "hubble_deep_field", "immunohistochemistry", "retina",
)
KINDS = ("blur", "noise", "jpeg", "downsample", "contrast", "saturation")
LEVELS = (0.25, 0.5, 0.75, 1.0)
DEFAULT_SIDE = 128  # px of each content crop
DEFAULT_CROPS = 9  # contents per photo (9 photos x 9 = 81 contents, 2,511 images)


def photo(name: str) -> np.ndarray:
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(skimage.data, name)()


def contents(side: int, crops: int) -> list[tuple[str, np.ndarray]]:
    """Deterministic content crops: each photo downscaled so its shorter side is twice `side`,
    then `crops` windows of side x side spread on a regular grid. Returns [(content id, uint8 HxWx3)]."""
    out = []
    grid = int(np.ceil(np.sqrt(crops)))
    for name in PHOTOS:
        img = Image.fromarray(photo(name)[..., :3])
        scale = 2 * side / min(img.size)
        img = img.resize((max(2 * side, round(img.width * scale)), max(2 * side, round(img.height * scale))),
                         Image.BICUBIC)
        a = np.asarray(img)
        h, w = a.shape[:2]
        spots = [(int(y), int(x)) for y in np.linspace(0, h - side, grid) for x in np.linspace(0, w - side, grid)]
        for k, (y, x) in enumerate(spots[:crops]):
            out.append((f"{name}-{k}", np.ascontiguousarray(a[y:y + side, x:x + side])))
    return out


def distort(img: np.ndarray, kind: str, s: float, rng: np.random.Generator) -> np.ndarray:
    """One distortion at strength s in [0, 1] (0 = unchanged)."""
    if s == 0:
        return img
    pil = Image.fromarray(img)
    if kind == "blur":
        return np.asarray(pil.filter(ImageFilter.GaussianBlur(radius=3.0 * s)))
    if kind == "noise":
        noisy = img.astype(np.float32) + rng.normal(0, 60.0 * s, img.shape)
        return np.clip(noisy, 0, 255).round().astype(np.uint8)
    if kind == "jpeg":
        buf = io.BytesIO()
        pil.save(buf, "JPEG", quality=int(round(60 - 56 * s)))
        return np.asarray(Image.open(buf).convert("RGB"))
    if kind == "downsample":
        f = 1 + 5 * s
        small = pil.resize((max(1, round(pil.width / f)), max(1, round(pil.height / f))), Image.BILINEAR)
        return np.asarray(small.resize(pil.size, Image.NEAREST))
    if kind == "contrast":
        x = img.astype(np.float32)
        return np.clip(x.mean() + (x - x.mean()) * (1 - 0.85 * s), 0, 255).round().astype(np.uint8)
    if kind == "saturation":
        x = img.astype(np.float32)
        gray = x @ np.array(GRAY, np.float32)
        return np.clip(gray[..., None] + (x - gray[..., None]) * (1 - s), 0, 255).round().astype(np.uint8)
    raise ValueError(kind)


def score(pristine: np.ndarray, distorted: np.ndarray) -> float:
    """0-100 from SSIM (colour) against the pristine content: 100 x (1 - sqrt(1 - SSIM)).

    It falls with the strength of every distortion and, unlike the nominal strength, follows
    what is visible: a blur that leaves a flat sky unchanged costs little, the same blur on
    foliage a lot. The square root spreads the crowded top of the SSIM scale (a quarter of the
    images have SSIM > 0.9) so the L1 loss separates mild distortions too."""
    from skimage.metrics import structural_similarity

    ssim = structural_similarity(pristine, distorted, channel_axis=2, data_range=255)
    return round(100.0 * (1.0 - np.sqrt(1.0 - min(1.0, max(0.0, float(ssim))))), 3)


def _render(job: tuple[str, int, str, np.ndarray]) -> list[dict]:
    """Writes one content's 31 images; returns their rows. Seeded by the content's index, so the
    result does not depend on which process renders it."""
    folder, c, content, img = job
    rng = np.random.default_rng([VERSION, c])
    variants: list[list[tuple[str, float]]] = [[]]
    variants += [[(k, s)] for k in KINDS for s in LEVELS]
    for _ in range(6):  # mixtures of two distortions
        k1, k2 = rng.choice(len(KINDS), 2, replace=False)
        variants.append([(KINDS[k1], float(rng.choice(LEVELS[:3]))), (KINDS[k2], float(rng.choice(LEVELS[:3])))])
    rows = []
    for v, parts in enumerate(variants):
        out = img
        for kind, s in parts:
            out = distort(out, kind, s, rng)
        label = "+".join(f"{k}{s:g}" for k, s in parts) or "pristine"
        name = f"images/{content}_{v:02d}_{label}.png"
        Image.fromarray(out).save(Path(folder) / name)
        rows.append({"image": name, "score": score(img, out), "content": content, "distortion": label})
    return rows


def build(folder: Path, crops: int = DEFAULT_CROPS, side: int = DEFAULT_SIDE) -> Path:
    """Writes the dataset (PNG images + meta.csv) to `folder` unless it is already complete.
    Contents render in parallel (one process per core); a file lock lets one caller build while
    the others (every rank of a multi-process run) wait."""
    import multiprocessing
    import os

    from filelock import FileLock

    marker = folder / "complete.json"
    spec = {"version": VERSION, "crops": crops, "side": side}
    if marker.is_file() and json.loads(marker.read_text()) == spec:  # complete: read without a lock (a read-only cache)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if marker.is_file() and json.loads(marker.read_text()) == spec:
            return folder
        (folder / "images").mkdir(parents=True, exist_ok=True)
        jobs = [(str(folder), c, content, img) for c, (content, img) in enumerate(contents(side, crops))]
        # spawn: this process may hold torch's threads, which a fork can deadlock on
        with multiprocessing.get_context("spawn").Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
            rows = [row for part in pool.imap(_render, jobs) for row in part]
        with open(folder / "meta.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        marker.write_text(json.dumps(spec))
    return folder
