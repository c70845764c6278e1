"""Using a trained model: `load_model(path).score(images)` and `iqa-dist predict`.

A model directory is self-contained: model.safetensors + config.json (backbone settings, patch
size, normalisation, score scale and the training dataset's resize policy). Scoring is
deterministic: each image is resized as the training images were, cut into a fixed grid of
patches (plus their mirror images with --flip), and the patch scores are averaged.
"""

from __future__ import annotations

import csv
import glob
import json
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from safetensors.torch import load_file

from .augment import normalize
from .decode import decode, fit, to_rgb
from .config import ModelConfig
from .errors import UserError
from .model import HyperIQA, build_model
from .progress import output_console

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


def model_dir(path: str | Path) -> Path:
    """A model directory, or a run directory holding one in model/."""
    path = Path(path)
    if (path / "model" / "model.safetensors").is_file():
        path = path / "model"
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise UserError(f"{path}: not a model directory (needs model.safetensors and config.json)")
    return path


def grid_origins(height: int, width: int, size: int, n: int) -> list[tuple[int, int]]:
    """n patch origins on a regular grid covering the image (n=1: the centre)."""
    rows = max(1, int(round(np.sqrt(n * height / width))))
    cols = max(1, int(np.ceil(n / rows)))
    ys = np.linspace(0, height - size, rows + 2)[1:-1] if rows == 1 else np.linspace(0, height - size, rows)
    xs = np.linspace(0, width - size, cols + 2)[1:-1] if cols == 1 else np.linspace(0, width - size, cols)
    spots = [(int(round(y)), int(round(x))) for y in ys for x in xs]
    return spots[:n]


class Scorer:
    """A trained model that scores images on its training dataset's scale."""

    def __init__(self, model: HyperIQA, config: dict, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.config = config
        self.device = device
        self.size = int(config["model"]["img_size"])
        self.mean = torch.tensor(config["mean"], dtype=torch.float32, device=device)
        self.std = torch.tensor(config["std"], dtype=torch.float32, device=device)
        self.resize = config.get("resize", "none")
        lo, hi = config["score_range"]
        self.to_score = (lambda p: p) if config["score_norm"] == "none" else (lambda p: p * (hi - lo) + lo)
        self.default_crops = int(config.get("test_patch_num", 20))

    def prepare(self, image) -> np.ndarray:
        """A path, PIL image or uint8 array/tensor (HWC or CHW) -> resized uint8 HWC RGB."""
        if isinstance(image, (str, Path)):
            pixels, h, w, why = decode(str(image), self.resize, self.size)
            if why:
                raise UserError(f"{image}: {why}")
            return np.frombuffer(pixels, np.uint8).reshape(h, w, 3)
        if isinstance(image, Image.Image):
            img = to_rgb(image)
        else:
            a = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
            if a.dtype != np.uint8 or a.ndim != 3:
                raise UserError(f"expected a uint8 HxWx3 or 3xHxW image, got {a.dtype} {a.shape}")
            img = Image.fromarray(a.transpose(1, 2, 0) if a.shape[0] == 3 and a.shape[2] != 3 else a)
        img, problem = fit(img, self.resize, self.size)
        if problem:
            raise UserError(problem)
        return np.asarray(img)

    @torch.no_grad()
    def score_arrays(self, arrays: Sequence[np.ndarray], crops: int | None = None, flip: bool = False,
                     batch_patches: int = 256) -> np.ndarray:
        """Scores of prepared HWC uint8 images: the mean over a grid of `crops` patches (and flips)."""
        n = crops or self.default_crops
        patches, counts = [], []
        for a in arrays:
            origins = grid_origins(a.shape[0], a.shape[1], self.size, n)
            patches += [a[y:y + self.size, x:x + self.size] for y, x in origins]
            counts.append(len(origins))
        x_all = torch.from_numpy(np.stack(patches)) if patches else torch.zeros(0, self.size, self.size, 3, dtype=torch.uint8)
        preds = []
        for start in range(0, len(x_all), batch_patches):
            x = x_all[start:start + batch_patches].to(self.device).permute(0, 3, 1, 2).float() / 255.0
            views = [x, x.flip(-1)] if flip else [x]
            out = torch.stack([self.model(normalize(v, self.mean, self.std)).float() for v in views]).mean(0)
            preds.append(out.cpu())
        flat = torch.cat(preds).numpy() if preds else np.zeros(0)
        per_image = np.split(flat, np.cumsum(counts)[:-1]) if counts else []
        return np.array([self.to_score(p.mean()) for p in per_image], dtype=np.float64)

    def score(self, images, crops: int | None = None, flip: bool = False) -> np.ndarray:
        """Scores (on the training dataset's scale) of PIL images, file paths or uint8 tensors."""
        if isinstance(images, (str, Path, Image.Image, np.ndarray, torch.Tensor)) and not (
                isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4):
            images = [images]
        return self.score_arrays([self.prepare(im) for im in images], crops, flip)


def load_model(path: str | Path, device: str | torch.device | None = None) -> Scorer:
    """A model directory (or a run directory) as a Scorer."""
    folder = model_dir(path)
    config = json.loads((folder / "config.json").read_text())
    model = build_model(ModelConfig(**{**config["model"], "pretrained": "none"}))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Scorer(model, config, dev)


# ---------------------------------------------------------------- the command


def expand(paths: Iterable[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (recursively, image suffixes) and globs -> (files, [(path, problem)])."""
    files, missing = [], []
    for p in paths:
        matches = sorted(glob.glob(p, recursive=True)) if any(c in p for c in "*?[") else [p]
        if not matches:
            missing.append((p, "no file matches"))
        for m in matches:
            path = Path(m)
            if path.is_dir():
                files += sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            elif path.is_file():
                files.append(path)
            else:
                missing.append((m, "no such file or folder"))
    return files, missing


def predict_command(model: str, paths: Sequence[str], crops: int | None, flip: bool, fmt: str, output: str,
                    batch_images: int, device: str | None) -> int:
    console = Console(stderr=True)
    scorer = load_model(model, device)
    files, failed = expand(paths)
    results: list[tuple[str, float]] = []
    progress = Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, disable=len(files) < 20 or not console.is_terminal)
    with progress:
        task = progress.add_task("score", total=len(files))
        for start in range(0, len(files), batch_images):
            chunk, arrays = [], []
            for f in files[start:start + batch_images]:
                try:
                    arrays.append(scorer.prepare(f))
                    chunk.append(f)
                except (UserError, OSError, UnidentifiedImageError) as e:
                    failed.append((str(f), str(e).removeprefix(f"{f}: ")))
            results += zip(map(str, chunk), scorer.score_arrays(arrays, crops, flip).tolist())
            progress.advance(task, len(files[start:start + batch_images]))
    out = open(output, "w", newline="") if output else sys.stdout
    try:
        if fmt == "csv":
            writer = csv.writer(out)
            writer.writerow(["path", "score"])
            writer.writerows((p, f"{s:.4f}") for p, s in results)
        elif fmt == "jsonl":
            for p, s in results:
                out.write(json.dumps({"path": p, "score": round(s, 4)}) + "\n")
        else:
            table = Table(title=f"{len(results)} image(s) scored by {model_dir(model)}")
            table.add_column("image")
            table.add_column("score", justify="right")
            for p, s in results:
                table.add_row(p, f"{s:.3f}")
            (output_console() if out is sys.stdout else Console(file=out, width=200)).print(table)
    finally:
        if output:
            out.close()
    for path, why in failed:
        console.print(f"[red]skipped[/] {path}: {why}", highlight=False)
    if failed:
        console.print(f"{len(failed)} file(s) could not be scored; {len(results)} scored")
    return 1 if failed else 0
