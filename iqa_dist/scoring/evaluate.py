"""`iqa-dist evaluate`'s library: an exported model scored on any dataset (its own test split by
default, cross-dataset with split=all), through scoring/predictions.py's path, refusing images it trained on.
"""

from __future__ import annotations

import csv
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
from accelerate import Accelerator
from rich.console import Console

from ..artifacts.card import ModelCard, model_dir, overlap
from ..config import Config, DataConfig, load_config_for, with_overrides
from ..data.augment import Augmenter
from ..distributed.accelerators import scoring_accelerator
from ..distributed.shards import shard
from ..errors import UserError
from .metrics import METRIC_KEYS, correlation_metrics
from .predictions import evaluate_split


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
    from ..artifacts.rundir import RunDir

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
    content group with them) unless allow_train_overlap; a model whose training images are not all
    recorded (imported weights) is scored, and the report says that overlap cannot be checked.
    Scores are reported on `scale` (a dataset the model trained on, or "normalized"); by default on
    the evaluated dataset's own when the model trained on it, else on the only training dataset's
    (a jointly trained model needs a choice). Runs under `accelerate launch` too: the images are spread over the processes.
    `path` may be a list of models or a sweep group's folder: an ensemble (`evaluate_ensemble`).
    Returns the report (metrics, settings, per-image predictions)."""
    from ..experiments.group import models_of

    paths = models_of([path] if isinstance(path, (str, Path)) else list(path))  # a sweep group: its members
    if len(paths) > 1:
        return evaluate_ensemble(paths, dataset, split, overrides, preset, allow_train_overlap, scale, accelerator,
                                 console)
    member, view, cfg, acc = _members(paths, dataset, split, overrides, preset, allow_train_overlap, scale, accelerator,
                                      console)
    [(folder, card, checked)] = member
    result = _score(folder, card, view, split, scale, cfg, acc)
    return {"model": str(folder), **_settings(cfg, split, card, view, scale), "train_overlap": checked,
            "metrics": {k: result[k] for k in METRIC_KEYS},
            "per_image": {"names": view.names(result["ids"]), "targets": result["targets"].tolist(),
                          "preds": result["preds"].tolist()}}


def evaluate_ensemble(paths: Sequence, dataset: str, split: str = "test", overrides: Sequence[str] = (),
                      preset: str | None = None, allow_train_overlap: bool = False, scale: str | None = None,
                      accelerator: Accelerator | None = None, console: Console | None = None) -> dict:
    """Several models as one: each image's prediction is the mean of the members' predictions on
    one scale, every member scored with its own test protocol on the same images (the first
    member's data settings decide which). The overlap check covers every member's training images:
    members trained on other splits of the dataset (a `sweep splits` group) have trained on images
    of this split, and are refused as any model is. The report holds each member's metrics and the
    ensemble's."""
    members, view, cfg, acc = _members(paths, dataset, split, overrides, preset, allow_train_overlap, scale,
                                       accelerator, console)
    results = [_score(folder, card, view, split, scale, cfg, acc) for folder, card, _ in members]
    ids = results[0]["ids"]
    if any(not np.array_equal(r["ids"], ids) for r in results):  # gathered sorted by id from one view
        raise RuntimeError("ensemble members were scored on different images")  # a bug, never bad input
    preds = np.mean([r["preds"] for r in results], axis=0)
    targets = results[0]["targets"]
    metrics = correlation_metrics(preds, targets)
    first = members[0][1]
    return {"model": "ensemble of " + ", ".join(str(f) for f, _, _ in members),
            **_settings(cfg, split, first, view, scale),
            "protocol": "+".join(sorted({c.protocol for _, c, _ in members})),
            "patches": "+".join(str(n) for n in sorted({c.test_patch_num for _, c, _ in members})),
            "members": [{"model": str(f), "protocol": c.protocol, "patches": c.test_patch_num,
                         "train_overlap": checked, "metrics": {k: r[k] for k in METRIC_KEYS}}
                        for (f, c, checked), r in zip(members, results)],
            "train_overlap": {"images": sum(m[2]["images"] for m in members),
                              "same_content": sum(m[2]["same_content"] for m in members),
                              "allowed": bool(allow_train_overlap),
                              "checkable": all(m[2]["checkable"] for m in members),
                              **({"unknown": "; ".join(m[2]["unknown"] for m in members if "unknown" in m[2])}
                                 if not all(m[2]["checkable"] for m in members) else {})},
            "metrics": {k: metrics[k] for k in METRIC_KEYS},
            "per_image": {"names": view.names(ids), "targets": targets.tolist(), "preds": preds.tolist(),
                          "members": [r["preds"].tolist() for r in results]}}


def _members(paths: Sequence, dataset: str, split: str, overrides: Sequence[str], preset: str | None,
             allow_train_overlap: bool, scale: str | None, accelerator: Accelerator | None, console: Console | None):
    """The models' (folder, card, overlap record) on the images to score, each refused when it
    trained on them (unless allow_train_overlap); the view of those images (the first model's data
    settings), the evaluation config, the accelerator."""
    from ..data.cache import describe, prepare

    folders = [model_dir(p) for p in paths]
    cards = [ModelCard.read(f) for f in folders]
    chosen = scale or (dataset if dataset in cards[0].datasets else None)
    for folder, card in zip(folders, cards):  # a jointly trained model without a choice fails here, before any work
        card.scale(chosen)
    if len(folders) > 1:
        from .predict import check_one_scale

        check_one_scale([(str(f), c, chosen or c.dataset) for f, c in zip(folders, cards)])
        # one set of images for every member: the first member's data settings, kept only where every
        # member prepares images alike, and big enough for the largest member's patch
        resizes = {str(f): evaluation_config(c, dataset, split, overrides, preset).data.resize
                   for f, c in zip(folders, cards)}
        if len(set(resizes.values())) > 1:
            raise UserError("ensemble: its models resize images differently (" + "; ".join(
                f"{f}: {r}" for f, r in resizes.items()) + "), so they would not score the same images; give members "
                "trained with one data.resize, or --data.resize to set it for all")
        overrides = [*overrides, f"model.img_size={max(c.size for c in cards)}"]
    acc = accelerator or scoring_accelerator()
    console = console or Console(stderr=True, quiet=not acc.is_main_process)
    cfg = evaluation_config(cards[0], dataset, split, overrides, preset, run_cache_dir(folders[0], console))
    view = prepare(cfg, console)
    console.print(describe(view), highlight=False)
    ids = view.ids("test" if split == "all" else split)
    members = []
    for folder, card in zip(folders, cards):
        same, related = overlap(folder, cfg.data.dataset, view.names(ids), view.groups(ids), view.file_hashes(ids))
        if (same or related) and not allow_train_overlap:
            raise UserError(
                f"{folder}: {same} of the {len(ids)} {cfg.data.dataset} images to score are images this model trained "
                "on" + (f", and {related} more show the same content as a training image" if related else "")
                + f" (the evaluation split is data.split={cfg.data.split} seed {cfg.data.split_seed}). Scores on them "
                "are not held-out results. Evaluate the run's own test split (the default: no --preset, no split "
                "overrides), or pass --allow-train-overlap to score them anyway (recorded in the report).")
        members.append((folder, card, {"images": same, "same_content": related, "allowed": bool(allow_train_overlap),
                                       # imported weights (or a run started from them): images it trained on that no
                                       # file lists, so the counts above cannot be complete
                                       "checkable": not card.unknown_training,
                                       **({"unknown": card.unknown_training} if card.unknown_training else {})}))
    return members, view, cfg, acc


def _score(folder: Path, card: ModelCard, view, split: str, scale: str | None, cfg: Config, acc: Accelerator) -> dict:
    """One model's predictions on this process's shard of the split, gathered: evaluate_split's result."""
    from .predict import load_model

    chosen = scale or (cfg.data.dataset if cfg.data.dataset in card.datasets else None)
    scorer = load_model(folder, acc.device, chosen)
    which = "test" if split == "all" else split
    images = view.eval_set(which, card.protocol, card.test_patch_num, card.size,
                           shard(len(view.ids(which)), acc.num_processes, acc.process_index))
    augmenter = Augmenter.evaluation(card.size, card.mean, card.std).to(acc.device)
    return evaluate_split(scorer.model, images, augmenter, cfg.train.eval_batch_size or 256, acc,
                          card.scale(chosen).to_score)


def _settings(cfg: Config, split: str, card: ModelCard, view, scale: str | None) -> dict:
    return {"dataset": cfg.data.dataset, "root": cfg.data.root, "split": split, "data_split": cfg.data.split,
            "split_seed": cfg.data.split_seed, "protocol": card.protocol, "patches": card.test_patch_num,
            "score_scale": view.image_meta["score_range"], "trained_on": "+".join(card.datasets),
            "scale": scale or (cfg.data.dataset if cfg.data.dataset in card.datasets else card.dataset)}


def write_predictions(path, names, targets, preds) -> None:
    """image,score,prediction per image (csv quotes names that hold commas or quotes)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "score", "prediction"])
        writer.writerows((n, f"{t:.4f}", f"{p:.4f}") for n, t, p in zip(names, targets, preds))
