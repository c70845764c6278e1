"""The optimization recipe: optimizer and parameter groups, the learning-rate schedule, the
weight EMA. Nothing here knows about processes: Accelerate wraps the optimizer from outside.
"""

from __future__ import annotations

import copy
import math

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


def build_schedule(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int, steps_per_epoch: int):
    """Linear warmup (optimizer steps, scaled with the batch by Config.effective_warmup) then cosine
    to min_lr_ratio (or constant), per optimizer step; the head group
    drops to 0 after optim.freeze_hyper_after epochs (the original code's frozen hyper network)."""
    o, warmup = cfg.optim, cfg.effective_warmup()

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "constant":
            return 1.0
        t = (step - warmup) / max(1, total_steps - warmup)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    def head(step: int) -> float:
        frozen = o.freeze_hyper_after and step >= o.freeze_hyper_after * steps_per_epoch
        return 0.0 if frozen else factor(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor, head])


class WeightEMA:
    """An exponential moving average of a model's weights, kept in fp32 on the model's device:
    after each optimizer step, ema += (1 - decay) * (weights - ema), one foreach kernel, no host
    sync. `model` is a full copy whose parameters ARE the average (evaluate or export it as
    is). Running statistics (BatchNorm's) are copied, not averaged, in one more foreach copy;
    constant buffers (Swin's position indices and attention masks) are never copied. The live
    weights are the ones given here: optimizers and Accelerate update them in place, so the EMA
    needs no unwrapping of a DDP or compiled model per step. Checkpointed with the run
    (state_dict / load_state_dict, registered with Accelerate), so a resume continues it exactly.

    Two ways to be updated. Normally the guard calls `applied` once it has read that a step was
    applied: one step late, or at a log, evaluation or checkpoint point (when depends on where the
    host reads). A teacher (self-distillation) must be the same average at every step whatever
    the host reads, so with `in_step` the step itself updates it on the device right after the
    update (`update(skipped)`, the guard's flag holding it still for a skipped step), and
    `applied` only counts."""

    def __init__(self, model: nn.Module, decay: float, in_step: bool = False) -> None:
        self.decay, self.in_step = decay, in_step
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.updates = 0
        self.pairs = (list(self.model.parameters()), list(model.parameters()))
        running = [(copy_m, m) for copy_m, m in zip(self.model.modules(), model.modules())
                   if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
        self.stats = ([b for c, _ in running for b in c.buffers(recurse=False)],
                      [b for _, m in running for b in m.buffers(recurse=False)])
        if any(p.dtype != torch.float32 for p in self.pairs[1]):
            raise ValueError("WeightEMA averages fp32 weights (mixed precision keeps them fp32)")  # a bug, never input

    @torch.no_grad()
    def update(self, skipped: torch.Tensor | None = None) -> None:
        """One step of the average: on the host's word (`skipped` None; counted here), or inside
        the step with the guard's device flag (`skipped` 1: nothing moves; counted by `applied`)."""
        ema, live = self.pairs
        if skipped is None:
            torch._foreach_lerp_(ema, live, 1.0 - self.decay)
            if self.stats[0]:
                torch._foreach_copy_(*self.stats)
            self.updates += 1
            return
        flag, rate = skipped.reshape(()), 1.0 - self.decay  # 0-d: one device number scales every tensor
        moved = torch._foreach_sub(live, ema)
        torch._foreach_mul_(moved, (flag * -rate).add_(rate))  # 1 - decay when applied, 0 when skipped
        torch._foreach_add_(ema, moved)
        floats = [(c, m) for c, m in zip(*self.stats) if c.is_floating_point()]
        if floats:  # running statistics: copied after an applied step (a lerp by 1), kept after a skipped one
            torch._foreach_lerp_([c for c, _ in floats], [m for _, m in floats], [1.0 - flag] * len(floats))

    def applied(self) -> None:
        """The guard's word that a step was applied: the update, unless the step made it already."""
        if self.in_step:
            self.updates += 1
        else:
            self.update()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]
