"""Teacher-student distillation (`train --teacher MODEL`, optim.teacher_weight): trained models
predict every training patch the student sees, and the L1 to their prediction joins the loss.

`Teacher` is one module the step calls like the EMA teacher of self-distillation
(`trainer.train_step`): each member reads the student's normalised patch, renormalised to its own
mean and std where they differ, and its output is mapped onto the student's target scale (the
member's score scale for the student's dataset, then the student's own score -> target map, both
affine); several members are averaged. Everything is made on the device at set-up, so the step
reads no host number.

What a teacher trained on is the student's business too: its training images join the student's
record (train_images.json), as a start model's do, so `evaluate` refuses to call them held out.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..errors import UserError
from .initial import StartModel, merge_images


class Teacher(nn.Module):
    """members (frozen, eval mode) -> the mean of their predictions on the student's target scale."""

    def __init__(self, members: list[nn.Module], gains: list[float], offsets: list[float],
                 renorm: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        for m in self.members:
            m.eval().requires_grad_(False)
        self.gains, self.offsets = gains, offsets  # constants of the kernels they scale by: no host read
        for i, r in enumerate(renorm):  # buffers: they follow the module to its device
            if r is not None:
                self.register_buffer(f"renorm_scale{i}", r[0].view(1, 3, 1, 1), persistent=False)
                self.register_buffer(f"renorm_shift{i}", r[1].view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # a teacher never drops anything: eval mode whatever the caller asks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for i, member in enumerate(self.members):
            scale = getattr(self, f"renorm_scale{i}", None)
            y = member(x if scale is None else x * scale + getattr(self, f"renorm_shift{i}")).float()
            y = y * self.gains[i] + self.offsets[i]
            total = y if total is None else total + y
        return total / len(self.members)


def find_teachers(cfg: Config, dataset: str) -> list[StartModel]:
    """optim.teachers as model folders (a sweep group: its members' finished runs), each checked
    against the student from its card alone, before any data or weights are read: the student's
    patch size, and trained on the student's dataset (its scores on that dataset's scale)."""
    from ..experiments.group import models_of

    teachers = [StartModel.find(str(p)) for p in models_of(list(cfg.optim.teachers))]
    for t in teachers:
        if t.card.size != cfg.model.img_size:
            raise UserError(f"teacher {t.given}: it scores {t.card.size}-px patches and the student trains on "
                            f"{cfg.model.img_size}-px ones (model.img_size): a teacher must see the student's patch; "
                            "choose a teacher of that patch size or set model.img_size to it")
        if dataset not in t.card.datasets:
            raise UserError(f"teacher {t.given}: it trained on {', '.join(t.card.datasets)}, the student on {dataset}: "
                            "its predictions are on another score scale; choose a teacher trained on the student's "
                            "dataset")
    return teachers


def build_teacher(teachers: list[StartModel], dataset: str, score_range, student_scale, mean: tuple, std: tuple,
                  device: torch.device) -> Teacher | None:
    """The teachers' weights loaded into one `Teacher`, after a last check that needs the
    student's data: the teacher's scores of this dataset span the student's score range (the same
    name can hold other scores: another score column, an imported model's 0-1 scale)."""
    if not teachers:
        return None
    from ..scoring.predict import load_model

    modules, gains, offsets, renorm = [], [], [], []
    for t in teachers:
        theirs = t.card.datasets[dataset]
        if [float(v) for v in theirs.score_range] != [float(v) for v in score_range]:
            raise UserError(f"teacher {t.given}: its {dataset} scores span {theirs.score_range[0]:g}-"
                            f"{theirs.score_range[1]:g} and the student's span {score_range[0]:g}-{score_range[1]:g}: "
                            "other scores under one name (another score column or scale); choose a teacher trained "
                            "on the student's scores")
        scorer = load_model(t.folder, device, dataset)
        scale = t.card.scale(dataset)
        # teacher output u -> its score u * a + b -> the student's target (score - shift) / scale
        gains.append(scale.scale / student_scale.scale)
        offsets.append((scale.shift - student_scale.shift) / student_scale.scale)
        if tuple(t.card.mean) == tuple(mean) and tuple(t.card.std) == tuple(std):
            renorm.append(None)
        else:  # the student's normalised pixels as this teacher normalises them: x' = x * a + b per channel
            ms, ss = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
            mt, st = torch.tensor(t.card.mean, dtype=torch.float32), torch.tensor(t.card.std, dtype=torch.float32)
            renorm.append((ss / st, (ms - mt) / st))
        modules.append(scorer.model)
    return Teacher(modules, gains, offsets, renorm).to(device)


def teachers_record(teachers: list[StartModel]) -> list[dict]:
    """meta.json's `teachers`: each as given, its folder and its weights' sha256 (what --resume checks)."""
    return [{k: v for k, v in t.provenance().items() if k in ("model", "file", "sha256", "repo")} for t in teachers]


def changed_teachers(recorded: list[dict], record: list[dict]) -> str:
    """Why a resumed run's teachers (`record`, as teachers_record gives it now) are not the ones it
    began with (`recorded` in its meta.json); "" when they are."""
    now = [r["sha256"] for r in record]
    before = [r.get("sha256") for r in recorded]
    if now == before:
        return ""
    return (f"its teachers' weights are not the ones it began with ({len(before)} teacher(s), sha256 "
            f"{', '.join(str(b)[:12] for b in before)}; now {len(now)}, {', '.join(n[:12] for n in now)}): a changed "
            "teacher teaches other numbers; give the original teachers, or start a new run")


def inherited(teachers: list[StartModel], start: StartModel | None) -> tuple[dict, str]:
    """The training images the student inherits (a start model's and every teacher's) and why
    they are not all known ("" when they are)."""
    images, why = start.train_images() if start else {}, [start.unknown_training()] if start else []
    for t in teachers:
        images = merge_images(images, t.train_images())
        if t.card.unknown_training:
            why.append(f"taught by {t.given}, whose training images are unknown ({t.card.unknown_training})")
    return images, "; ".join(w for w in why if w)
