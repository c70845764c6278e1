"""Evaluation: per-image predictions from the test protocol's patches, gathered once, metrics once.

`evaluate_split` is what training runs on its validation and test splits; `evaluate_model` scores
an exported model on any dataset (its own test split by default, cross-dataset with split=all).

Whole images are pinned to processes (a contiguous shard each, uneven allowed, no padding
samples); each process averages its images' patch predictions; the (image_id, prediction) pairs
are gathered and every image is counted exactly once, whatever the world size. SRCC, PLCC, KRCC
and RMSE are then computed once over all images (never averaged over ranks).
"""

from __future__ import annotations

import csv
from pathlib import Path
from dataclasses import asdict
from typing import Sequence

import numpy as np
import torch
from accelerate import Accelerator
from rich.console import Console
from torch import nn

from .audit import part
from .augment import Augmenter
from .card import ModelCard, model_dir, overlap
from .config import Config, DataConfig, load_config_for, with_overrides
from .errors import UserError
from .metrics import METRIC_KEYS, correlation_metrics
from .store import EvalSet


def shard(n: int, world: int, rank: int) -> range:
    """This process's contiguous share of n items (sizes differ by at most one)."""
    return range(n * rank // world, n * (rank + 1) // world)


@torch.no_grad()
def predict_images(model: nn.Module, images: EvalSet, augmenter: Augmenter, batch_patches: int,
                   device: torch.device, fixed_shapes: bool = False, flip: bool = False) -> torch.Tensor:
    """Mean prediction over each image's protocol patches: the one scoring path of training-time
    evaluation, `evaluate` and `predict`. Returns (N,) float32 on `device`.

    fixed_shapes pads the last batch with copies of its last image (their predictions dropped),
    so that a compiled model sees one input shape; flip also averages in the mirrored patches
    (predict's test-time augmentation)."""
    was_training = model.training
    model.eval()
    n = images.patches
    per_batch = max(1, batch_patches // n)
    out = []
    for start in range(0, len(images), per_batch):
        with part("host"):  # which images and crops: host numbers, one upload (and the pixels' when not resident)
            rows = torch.arange(start, min(start + per_batch, len(images)))
            real = len(rows)
            if fixed_shapes and real < per_batch:
                rows = torch.cat([rows, rows[-1:].expand(per_batch - real)])
            pixels, offsets, widths = images.store.gather(rows, device)
            sample = torch.arange(len(rows)).repeat_interleave(n)  # image of each patch
            origins = images.origins[rows].reshape(-1, 2)
            packed = augmenter.upload(offsets[sample], widths[sample], origins[:, 0], origins[:, 1], None,
                                      torch.zeros(len(sample)), device)
        with part("augment"):
            x = augmenter.apply(pixels, packed, train=False)[0]
        with part("forward"):
            pred = model(x).float()
            if flip:
                pred = (pred + model(x.flip(-1)).float()) / 2
            out.append(pred.view(len(rows), n).mean(1)[:real])
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


def evaluate_split(model: nn.Module, images: EvalSet, augmenter: Augmenter, batch_patches: int,
                   accelerator: Accelerator, to_score, fixed_shapes: bool = False) -> dict:
    """Metrics over all images of a split whose shard for this process is `images`.

    to_score maps model outputs to the dataset's scale. Returns the metrics plus ids/preds/targets."""
    preds = to_score(predict_images(model, images, augmenter, batch_patches, accelerator.device, fixed_shapes))
    ids, preds_all = gather_predictions(accelerator, images.store.ids, preds)
    targets = gather_predictions(accelerator, images.store.ids, images.store.scores.to(accelerator.device))[1]
    metrics = correlation_metrics(preds_all, targets)
    return {**metrics, "ids": ids, "preds": preds_all, "targets": targets}


def evaluation_config(card: ModelCard, dataset: str, split: str, overrides: Sequence[str] = (),
                      preset: str | None = None, cache_dir: str = "") -> Config:
    """The data settings an evaluation uses. On a dataset the model trained on: the training run's
    (split, seeds, fractions, resize), so "test" means the images it held out; on another dataset:
    that dataset's defaults; with an explicit preset: the preset's. The cache: `cache_dir` (the
    training run's), else the default. Overrides go on top; the patch size is the model's."""
    extra = [f"data.dataset={dataset}", f"model.img_size={card.size}", *(["data.split=all"] if split == "all" else []),
             *([f"data.cache_dir={cache_dir}"] if cache_dir else [])]
    if preset:
        return load_config_for(preset, [*extra, *overrides])
    data = card.datasets[dataset].data if dataset in card.datasets else asdict(DataConfig(dataset=dataset))
    return with_overrides({"data": {**data, "cache_dir": DataConfig().cache_dir}}, [*extra, *overrides],
                          where=f"evaluation of a {'+'.join(card.datasets)} model")


def run_cache_dir(folder, console: Console) -> str:
    """The data.cache_dir of the training run whose model `folder` is (its model/ folder), when it
    is still there: evaluation reuses that cache instead of building another. "" otherwise (the
    default cache), saying why when the run had its own."""
    from .rundir import RunDir

    run = folder.parent
    if not RunDir.is_run(run):
        return ""
    cache = ((RunDir(run).raw_config().get("data") or {}).get("cache_dir") or "")
    if cache and not Path(cache).expanduser().is_dir():
        console.print(f"the training run's data.cache_dir {cache} is not there any more: the cache is built in the "
                      "default folder (give --data.cache_dir to choose)", highlight=False)
        return ""
    return cache


def evaluate_model(path, dataset: str, split: str = "test", overrides: Sequence[str] = (), preset: str | None = None,
                   allow_train_overlap: bool = False, scale: str | None = None, accelerator: Accelerator | None = None,
                   console: Console | None = None) -> dict:
    """An exported model (a run or model directory) on a dataset's split ("test", "val" or "all"),
    under the model's own test protocol. Refuses images the model trained on (or that share a
    content group with them) unless allow_train_overlap. Scores are reported on `scale` (a
    dataset the model trained on, or "normalized"); by default on the evaluated dataset's own when
    the model trained on it, else on the only training dataset's (a jointly trained model needs a
    choice). Runs under `accelerate launch` too: the images are spread over the processes.
    Returns the report (metrics, settings, per-image predictions)."""
    from .cache import describe, prepare
    from .predict import load_model

    folder = model_dir(path)
    card = ModelCard.read(folder)
    scale = scale or (dataset if dataset in card.datasets else None)
    to_score = card.scale(scale).to_score  # a jointly trained model without a choice fails here, before any work
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())  # gloo across CPU processes without a GPU
    console = console or Console(stderr=True, quiet=not acc.is_main_process)
    cfg = evaluation_config(card, dataset, split, overrides, preset, run_cache_dir(folder, console))
    view = prepare(cfg, console)
    console.print(describe(view), highlight=False)
    which = "test" if split == "all" else split
    ids = view.ids(which)
    same, related = overlap(folder, cfg.data.dataset, view.names(ids), view.groups(ids))
    if (same or related) and not allow_train_overlap:
        raise UserError(
            f"{folder}: {same} of the {len(ids)} {cfg.data.dataset} images to score are images this model trained on"
            + (f", and {related} more show the same content as a training image" if related else "")
            + f" (the evaluation split is data.split={cfg.data.split} seed {cfg.data.split_seed}). Scores on them "
            "are not held-out results. Evaluate the run's own test split (the default: no --preset, no split "
            "overrides), or pass --allow-train-overlap to score them anyway (recorded in the report).")
    scorer = load_model(folder, acc.device, scale)
    images = view.eval_set(which, card.protocol, card.test_patch_num, card.size,
                           shard(len(ids), acc.num_processes, acc.process_index))
    augmenter = Augmenter.evaluation(card.size, card.mean, card.std).to(acc.device)
    batch = cfg.train.eval_batch_size or 256
    result = evaluate_split(scorer.model, images, augmenter, batch, acc, to_score)
    return {"model": str(folder), "dataset": cfg.data.dataset, "root": cfg.data.root, "split": split,
            "data_split": cfg.data.split, "split_seed": cfg.data.split_seed, "protocol": card.protocol,
            "patches": card.test_patch_num, "score_scale": view.image_meta["score_range"],
            "trained_on": "+".join(card.datasets), "scale": scale or card.dataset,
            "train_overlap": {"images": same, "same_content": related, "allowed": bool(allow_train_overlap)},
            "metrics": {k: result[k] for k in METRIC_KEYS},
            "per_image": {"names": view.names(result["ids"]), "targets": result["targets"].tolist(),
                          "preds": result["preds"].tolist()}}


def write_predictions(path, names, targets, preds) -> None:
    """image,score,prediction per image (csv quotes names that hold commas or quotes)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "score", "prediction"])
        writer.writerows((n, f"{t:.4f}", f"{p:.4f}") for n, t, p in zip(names, targets, preds))
