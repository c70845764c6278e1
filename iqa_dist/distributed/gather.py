"""What crosses processes besides the gradients: predictions gathered with their gradient for
the ranking loss (`gather_global`), and per-image predictions gathered once for the metrics.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator


# Not torch.distributed.nn.functional.all_gather, which does this: torch 2.14 deprecates it (a
# FutureWarning per call) for the private torch.distributed._functional_collectives.
class _GatherGlobal(torch.autograd.Function):
    """Every process's predictions, concatenated in rank order (the global batch order), with the
    gradient flowing back to each process's own slice: all processes' losses use every prediction,
    so the backward sums their gradients (an all-reduce) and keeps this process's part."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        padded = F.pad(local, (0, max(sizes) - len(local)))  # all_gather needs equal sizes
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


def gather_global(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    if len(sizes) == 1:
        return local
    return _GatherGlobal.apply(local, sizes, dist.get_rank())


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
