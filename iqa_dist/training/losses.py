"""The training objective, per sample: L1, plus the pairwise ranking hinge over the global batch,
plus the L1 to a teacher's prediction (self-distillation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_losses(pred: torch.Tensor, target: torch.Tensor, rank_weight: float = 0.0,
                  ranked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, offset: int = 0,
                  taught: torch.Tensor | None = None, distill_weight: float = 0.0) -> torch.Tensor:
    """Per-sample training losses (b,): L1, plus rank_weight x this sample's share of the pairwise
    ranking hinge over the global batch. Their sum over the global batch divided by B is the
    objective: mean L1 + rank_weight x the mean hinge over ordered pairs with different targets
    from the same dataset (different datasets' scores are not comparable, so never a pair).

    ranked: (all predictions (B,), all targets (B,), all dataset ids (B,)) of the global batch,
    in which this micro-batch starts at `offset`. Required when rank_weight > 0.
    taught: the teacher's predictions of the same patches (b,), on the same (the sample's dataset's
    normalised) scale; distill_weight x |pred - taught| is added. The caller (the step) does the
    reduction, once."""
    pred = pred.float()
    losses = (pred - target).abs()
    if rank_weight > 0:
        p_all, t_all, g_all = ranked
        g = g_all[offset:offset + len(pred)]
        same = g[:, None] == g_all[None, :]  # (b, B)
        sign = torch.sign(target[:, None] - t_all[None, :]) * same
        hinge = F.relu(-(pred[:, None] - p_all[None, :]) * sign)
        all_same = g_all[:, None] == g_all[None, :]
        pairs = ((torch.sign(t_all[:, None] - t_all[None, :]) != 0) & all_same).sum().clamp(min=1)
        losses = losses + rank_weight * len(t_all) * hinge.sum(1) / pairs
    if distill_weight > 0:
        losses = losses + distill_weight * (pred - taught.float()).abs()
    return losses
