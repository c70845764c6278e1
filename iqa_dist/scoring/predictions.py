"""Scoring: per-image predictions from the test protocol's patches, gathered once, metrics once;
the one path of training-time evaluation, `iqa-dist evaluate` and `iqa-dist predict`.

Whole images are pinned to processes (a contiguous shard each, uneven allowed, no padding
samples); each process averages its images' patch predictions; the (image_id, prediction) pairs
are gathered and every image is counted exactly once, whatever the world size. SRCC, PLCC, KRCC
and RMSE are then computed once over all images (never averaged over ranks).
"""

from __future__ import annotations

from typing import Iterator

import torch
from accelerate import Accelerator
from torch import nn

from ..data.augment import Augmenter
from ..data.store import EvalSet
from ..distributed.gather import gather_predictions
from ..parts import part
from .metrics import correlation_metrics


@torch.no_grad()
def predict_images(model: nn.Module, images: EvalSet, augmenter: Augmenter, batch_patches: int,
                   device: torch.device, fixed_shapes: bool = False, flip: bool = False) -> torch.Tensor:
    """Mean prediction over each image's protocol patches: the one scoring path of training-time
    evaluation, `evaluate` and `predict`. Returns (N,) float32 on `device`.

    fixed_shapes pads the last batch with copies of its last image (their predictions dropped),
    so that a compiled model sees one input shape; flip also averages in the mirrored patches
    (predict's test-time augmentation)."""
    out = [pred.mean(1) for pred in patch_predictions(model, images, augmenter, batch_patches, device, fixed_shapes,
                                                      flip)]
    return torch.cat(out) if out else torch.zeros(0, device=device)


@torch.no_grad()
def patch_predictions(model: nn.Module, images: EvalSet, augmenter: Augmenter, batch_patches: int,
                      device: torch.device, fixed_shapes: bool = False, flip: bool = False) -> Iterator[torch.Tensor]:
    """Every patch's prediction, a batch of images at a time: (k, n) float32 on `device` for the
    batch's k images and their n protocol patches each (`predict_images` averages them; a quality
    map keeps them). Options as `predict_images`'s."""
    was_training = model.training
    model.eval()
    n = images.patches
    per_batch = max(1, batch_patches // n)
    try:
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
            yield pred.view(len(rows), n)[:real]
    finally:
        model.train(was_training)


def evaluate_split(model: nn.Module, images: EvalSet, augmenter: Augmenter, batch_patches: int,
                   accelerator: Accelerator, to_score, fixed_shapes: bool = False) -> dict:
    """Metrics over all images of a split whose shard for this process is `images`.

    to_score maps model outputs to the dataset's scale. Returns the metrics plus ids/preds/targets."""
    preds = to_score(predict_images(model, images, augmenter, batch_patches, accelerator.device, fixed_shapes))
    ids, preds_all = gather_predictions(accelerator, images.store.ids, preds)
    targets = gather_predictions(accelerator, images.store.ids, images.store.scores.to(accelerator.device))[1]
    metrics = correlation_metrics(preds_all, targets)
    return {**metrics, "ids": ids, "preds": preds_all, "targets": targets}
