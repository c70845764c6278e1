"""The optimization recipe: optimizer and parameter groups, the learning-rate schedule (a
function of the step), the weight EMA. Nothing here knows about processes: Accelerate wraps the optimizer from outside.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import Config
from ..models.hyperiqa import HyperIQA


def build_optimizer(model: HyperIQA, cfg: Config, fused: bool | None = None) -> torch.optim.Optimizer:
    """Adam (L2 decay in the gradient, as the original HyperIQA) or AdamW (decoupled decay), two
    groups: "backbone" at lr, "head" at lr * lr_ratio (optim.lda_group says where LDA goes).
    Fused kernels where torch has them (CUDA, CPU): one launch for the whole update, and the step
    can skip itself on the device (guard.StepGuard). Real parameter lists, not iterators."""
    o, lrs = cfg.optim, cfg.group_lrs()  # optim.lr, scaled for the batch size by optim.lr_scaling
    groups = model.parameter_groups(o.lda_group)
    params = [{"params": groups[name], "lr": lrs[name], "name": name} for name in ("backbone", "head")]
    cls = torch.optim.Adam if o.optimizer == "adam" else torch.optim.AdamW
    device = next(model.parameters()).device
    fused = device.type in ("cuda", "cpu") if fused is None else fused
    return cls(params, weight_decay=o.weight_decay, fused=fused)


def group_sizes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    return {g["name"]: sum(p.numel() for p in g["params"]) for g in optimizer.param_groups}


def allreduce_bytes(parameters: int, cfg: Config) -> int:
    """Bytes of gradients each process all-reduces per optimizer step (every parameter trains)."""
    return parameters * (2 if cfg.train.grad_compression == "bf16" else 4)


@dataclass(frozen=True)
class Schedule:
    """Each parameter group's learning rate as a function of the optimizer step and of nothing
    else (nanoGPT's `get_lr(it)`): linear warmup (optimizer steps, scaled with the batch by
    Config.effective_warmup), then cosine to min_lr_ratio (or constant); the head group drops to 0
    after optim.freeze_hyper_after epochs (the original code's frozen hyper network). A skipped, a
    rewound, a graphed or a resumed step can never put it out of step, and nothing of it is
    checkpointed: `Trainer.set_lr` writes `lrs(step)` into the groups before each step."""

    peaks: tuple[float, ...]  # each group's peak lr, in the optimizer's group order (backbone, head)
    warmup: int  # optimizer steps of linear warmup
    total: int  # optimizer steps of the whole run (the cosine's length; --extend stretches it)
    min_ratio: float  # the cosine's floor, a fraction of the peak
    constant: bool  # optim.schedule=constant: no decay after the warmup
    head_stops: int  # the step from which the head group's lr is 0 (0: never)

    @classmethod
    def of(cls, cfg: Config, total_steps: int, steps_per_epoch: int) -> "Schedule":
        o, lrs = cfg.optim, cfg.group_lrs()
        return cls(peaks=(lrs["backbone"], lrs["head"]), warmup=cfg.effective_warmup(), total=total_steps,
                   min_ratio=o.min_lr_ratio, constant=o.schedule == "constant",
                   head_stops=o.freeze_hyper_after * steps_per_epoch)

    def factor(self, step: int) -> float:
        """The peak's multiplier at `step` (0-based: the step about to be taken)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.constant:
            return 1.0
        t = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    def lrs(self, step: int) -> list[float]:
        """Every group's learning rate at `step`."""
        f = self.factor(step)
        frozen = 0 < self.head_stops <= step
        return [self.peaks[0] * f, 0.0 if frozen else self.peaks[1] * f]

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Writes `lrs(step)` into the groups: a number, or in place into the device tensor a graphed
        step reads (train.cuda_graph), so a replay sees it without a host read."""
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer
        for group, lr in zip(inner.param_groups, self.lrs(step)):
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr


class WeightEMA:
    """An exponential moving average of a model's weights, kept in fp32 on the model's device.
    `model` is a full copy whose parameters ARE the average (evaluate or export it as is); the
    live weights are the ones given here: optimizers and Accelerate update them in place, so the
    EMA needs no unwrapping of a DDP or compiled model per step. Running statistics (BatchNorm's)
    are copied, not averaged; constant buffers (Swin's position indices and attention masks) are
    never copied. Checkpointed with the run (state_dict / load_state_dict, registered with
    Accelerate), so a resume continues it exactly.

    Updated in one place, the step itself (`train_step`), right after the optimizer, with the
    guard's device flag: an applied step moves it by (1 - decay), a skipped one (the flag is 1)
    moves nothing. So step s's EMA (a self-distillation teacher included) is the average of steps
    1..s whatever and whenever the host reads, eager or graphed, on any number of processes."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.pairs = (list(self.model.parameters()), list(model.parameters()))
        running = [(copy_m, m) for copy_m, m in zip(self.model.modules(), model.modules())
                   if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
        self.stats = [(c, m) for c, m in zip([b for c, _ in running for b in c.buffers(recurse=False)],
                                             [b for _, m in running for b in m.buffers(recurse=False)])
                      if c.is_floating_point()]  # num_batches_tracked (an integer count) is never read in eval
        if any(p.dtype != torch.float32 for p in self.pairs[1]):
            raise ValueError("WeightEMA averages fp32 weights (mixed precision keeps them fp32)")  # a bug, never input

    @torch.no_grad()
    def update(self, skipped: torch.Tensor) -> None:
        """One step of the average, held still by `skipped` (0-d or (1,) device flag, 1: the step's
        update was skipped). Four foreach kernels and no host read: torch has no foreach lerp by a
        device scalar, so the rate goes in through a multiply."""
        ema, live = self.pairs
        flag, rate = skipped.reshape(()), 1.0 - self.decay  # 0-d: one device number scales every tensor
        moved = torch._foreach_sub(live, ema)
        torch._foreach_mul_(moved, (flag * -rate).add_(rate))  # 1 - decay when applied, 0 when skipped
        torch._foreach_add_(ema, moved)
        if self.stats:  # running statistics: copied after an applied step (a lerp by 1), kept after a skipped one
            torch._foreach_lerp_([c for c, _ in self.stats], [m for _, m in self.stats],
                                 [1.0 - flag] * len(self.stats))

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])  # older checkpoints also hold an update count: not needed
