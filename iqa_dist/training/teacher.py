"""Teacher-student distillation (`train --teacher MODEL`, optim.teacher_weight): trained models
predict every training patch the student sees, and the L1 to their prediction joins the loss.

`Teacher` is one module the step calls like the EMA teacher of self-distillation
(`trainer.train_step`): each member reads the student's normalised patch, renormalised to its own
mean and std where they differ, and its output is mapped onto the student's target scale (the
member's score scale for the student's dataset, then the student's own score -> target map, both
affine); several members are averaged. Everything is made on the device at set-up, so the step
reads no host number.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..errors import UserError


class Teacher(nn.Module):
    """members (frozen, eval mode) -> the mean of their predictions on the student's target scale."""

    def __init__(self, members: list[nn.Module], gains: list[float], offsets: list[float],
                 renorm: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        for m in self.members:
            m.eval().requires_grad_(False)
        self.register_buffer("gains", torch.tensor(gains, dtype=torch.float32), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.float32), persistent=False)
        self.renorm = [None if r is None else (r[0].view(1, 3, 1, 1), r[1].view(1, 3, 1, 1)) for r in renorm]

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # a teacher never drops anything: eval mode whatever the caller asks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for i, member in enumerate(self.members):
            r = self.renorm[i]
            y = member(x if r is None else x * r[0].to(x.device) + r[1].to(x.device)).float()
            y = y * self.gains[i] + self.offsets[i]
            total = y if total is None else total + y
        return total / len(self.members)


def build_teacher(cfg: Config, dataset: str, student_scale, mean: tuple, std: tuple,
                  device: torch.device) -> Teacher | None:
    """optim.teachers loaded (any model `load_model` reads: folders, runs, Hub ids, a sweep group)
    and checked against the student: the same patch size, scores on the student's dataset's scale.
    None without a teacher."""
    if not cfg.optim.teachers:
        return None
    from ..scoring.predict import EnsembleScorer, load_model

    scorer = load_model(list(cfg.optim.teachers), device)
    members = scorer.members if isinstance(scorer, EnsembleScorer) else [scorer]
    modules, gains, offsets, renorm = [], [], [], []
    for m in members:
        card, name = m.card, m.folder
        if card.size != cfg.model.img_size:
            raise UserError(f"teacher {name}: it scores {card.size}-px patches and the student trains on "
                            f"{cfg.model.img_size}-px ones (model.img_size): a teacher must see the student's patch; "
                            "choose a teacher of that patch size or set model.img_size to it")
        if dataset not in card.datasets:
            raise UserError(f"teacher {name}: it trained on {', '.join(card.datasets)}, the student on {dataset}: its "
                            "predictions are on another score scale; choose a teacher trained on the student's dataset")
        theirs = card.scale(dataset)
        # teacher output t -> score t * a + b (its scale) -> student target (score - shift) / scale
        gains.append(theirs.scale / student_scale.scale)
        offsets.append((theirs.shift - student_scale.shift) / student_scale.scale)
        if tuple(card.mean) == tuple(mean) and tuple(card.std) == tuple(std):
            renorm.append(None)
        else:  # the student's normalised pixels as this member normalises them: x' = x * a + b per channel
            ms, ss = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
            mt, st = torch.tensor(card.mean, dtype=torch.float32), torch.tensor(card.std, dtype=torch.float32)
            renorm.append(((ss / st).to(device), ((ms - mt) / st).to(device)))
        modules.append(m.model)
    return Teacher(modules, gains, offsets, renorm).to(device)
