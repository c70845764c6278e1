"""Evaluation: per-image predictions from fixed patches, gathered once, metrics once.

Whole images are pinned to processes (a contiguous shard each, uneven allowed, no padding
samples); each process averages its images' patch predictions; the (image_id, prediction) pairs
are gathered and every image is counted exactly once, whatever the world size. SRCC, PLCC, KRCC
and RMSE are then computed once over all images (never averaged over ranks).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats
import torch
from accelerate import Accelerator
from torch import nn

from .augment import Augmenter
from .cache import ImageStore


def correlation_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """SRCC, PLCC (plain Pearson, as HyperIQA reports), KRCC, RMSE over images, and n."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if len(pred) < 2 or np.ptp(pred) == 0 or np.ptp(target) == 0:
        nan = math.nan  # correlations are undefined for constant inputs
        return {"srcc": nan, "plcc": nan, "krcc": nan, "rmse": float(np.sqrt(np.mean((pred - target) ** 2))),
                "n": len(pred)}
    return {
        "srcc": float(scipy.stats.spearmanr(pred, target)[0]),
        "plcc": float(scipy.stats.pearsonr(pred, target)[0]),
        "krcc": float(scipy.stats.kendalltau(pred, target)[0]),
        "rmse": float(np.sqrt(np.mean((pred - target) ** 2))),
        "n": len(pred),
    }


def shard(n: int, world: int, rank: int) -> range:
    """This process's contiguous share of n items (sizes differ by at most one)."""
    return range(n * rank // world, n * (rank + 1) // world)


@torch.no_grad()
def predict_images(model: nn.Module, store: ImageStore, augmenter: Augmenter, n_patches: int, batch_patches: int,
                   device: torch.device) -> torch.Tensor:
    """Mean prediction over each image's n stored patches (strips of n*S x S). Returns (N,) float32."""
    was_training = model.training
    model.eval()
    size = augmenter.size
    per_batch = max(1, batch_patches // n_patches)
    out = []
    for start in range(0, len(store), per_batch):
        rows = torch.arange(start, min(start + per_batch, len(store)))
        pixels, offsets, widths = store.gather(rows, device)
        k = torch.arange(n_patches, device=device).repeat(len(rows))  # patch index within each strip
        sample = torch.arange(len(rows), device=device).repeat_interleave(n_patches)
        x = augmenter.eval(pixels, offsets[sample], widths[sample], k * size, torch.zeros_like(k))
        out.append(model(x).float().view(len(rows), n_patches).mean(1))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, device=device)


def gather_predictions(accelerator: Accelerator, ids: torch.Tensor, preds: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(image_id, prediction) of every process, padding removed, sorted by id; the same on all ranks."""
    both = torch.stack([ids.to(preds.device).double(), preds.double()], 1)  # (n, 2): ids exact below 2^53
    both = accelerator.pad_across_processes(both, dim=0, pad_index=-1)
    both = accelerator.gather(both).cpu().numpy()
    both = both[both[:, 0] >= 0]
    order = np.argsort(both[:, 0], kind="stable")
    ids_all, preds_all = both[order, 0].astype(np.int64), both[order, 1]
    if len(np.unique(ids_all)) != len(ids_all):
        raise RuntimeError("an image was evaluated twice: shards overlap")  # a bug, never bad input
    return ids_all, preds_all


def evaluate_split(model: nn.Module, store: ImageStore, augmenter: Augmenter, n_patches: int, batch_patches: int,
                   accelerator: Accelerator, to_score) -> dict:
    """Metrics over all images of a split whose shard for this process is `store`.

    to_score maps model outputs to the dataset's scale. Returns the metrics plus ids/preds."""
    preds = to_score(predict_images(model, store, augmenter, n_patches, batch_patches, accelerator.device))
    ids, preds_all = gather_predictions(accelerator, store.ids, preds)
    targets = gather_predictions(accelerator, store.ids, store.scores.to(accelerator.device))[1]
    metrics = correlation_metrics(preds_all, targets)
    return {**metrics, "ids": ids, "preds": preds_all, "targets": targets}


def evaluate_command(model_path: str, cfg, split: str, output: str) -> dict:
    """`iqa-dist evaluate`: a trained model on any prepared dataset (cross-dataset included).

    Patches follow the model (its patch size and test_patch_num); run it under `accelerate
    launch` to spread the images over processes."""
    import json
    from dataclasses import replace
    from pathlib import Path

    from rich.console import Console

    from .cache import describe, prepare
    from .predict import load_model, model_dir
    from .progress import metrics_table, output_console

    acc = Accelerator(cpu=not torch.cuda.is_available())  # gloo across CPU processes when there is no GPU
    console = Console(stderr=True, quiet=not acc.is_main_process)
    folder = model_dir(model_path)
    scorer = load_model(folder, acc.device)
    model_cfg = scorer.config["model"]
    n_patches = int(scorer.config.get("test_patch_num", cfg.data.test_patch_num))
    cfg = replace(cfg, model=replace(cfg.model, img_size=int(model_cfg["img_size"])),
                  data=replace(cfg.data, test_patch_num=n_patches, train_patches="random"))
    view = prepare(cfg, console)
    console.print(describe(view))
    ids = view.ids(split)
    store = view.patch_store(split, shard(len(ids), acc.num_processes, acc.process_index))
    augmenter = Augmenter.evaluation(scorer.size, scorer.config["mean"], scorer.config["std"])
    result = evaluate_split(scorer.model, store, augmenter, n_patches, 256, acc, scorer.to_score)
    metrics = {k: result[k] for k in ("srcc", "plcc", "krcc", "rmse", "n")}
    report = {"model": str(folder), "dataset": cfg.data.dataset, "root": cfg.data.root, "split": split,
              "score_scale": view.image_meta["score_range"], "trained_on": scorer.config.get("dataset"),
              "metrics": metrics}
    if acc.is_main_process:
        target = Path(output) if output else folder.parent / f"eval-{cfg.data.dataset}-{split}.json"
        target.write_text(json.dumps(report, indent=1))
        per_image = target.with_suffix(".predictions.csv")
        write_predictions(per_image, view.names(result["ids"]), result["targets"], result["preds"])
        output_console().print(metrics_table(f"{folder} on {cfg.data.dataset} ({split})", {split: metrics}))
        console.print(f"wrote {target} and {per_image.name}")
    return report


def write_predictions(path, names, targets, preds) -> None:
    """image,score,prediction per image (csv quotes names that hold commas or quotes)."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "score", "prediction"])
        writer.writerows((n, f"{t:.4f}", f"{p:.4f}") for n, t, p in zip(names, targets, preds))
