"""One process's training step, built outside `iqa-dist train` from the same parts: what `bench`
times and counts, and what the tests audit.

`StepRig` holds a model, fused optimizer, schedule, guard, weight EMA (train.ema_decay) and an
augmenter under a fresh Accelerator, and runs `step.train_step` either end to end (fed by
`step.next_batch` from a store, as `train` does) or on one fixed batch already on the device
(model only). `AnchorRig` is timm's plain classifier of the same backbone with the same batch,
precision, fused AdamW and clipping: what a user would otherwise train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from accelerate import Accelerator
from rich.console import Console

from .audit import part
from .augment import Augmenter
from .config import Config
from .model import build_model
from .optim import WeightEMA, build_optimizer, build_schedule
from .plan import BatchPlan, Shares
from .step import Batch, MicroBatch, NoiseSource, PreemptionFlag, StepGuard, next_batch, train_step
from .store import ImageStore
from .train import compile_step


def fresh_accelerator(precision: str, device: torch.device) -> Accelerator:
    """A fresh single-process Accelerator for one precision (Accelerate keeps one global state)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if precision == "bf16" else "no")


@dataclass(kw_only=True)
class StepRig:
    cfg: Config
    acc: Accelerator
    model: torch.nn.Module  # as prepared by Accelerate
    forward: torch.nn.Module  # what the step calls (compiled with train.compile)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    guard: StepGuard
    ema: WeightEMA | None
    augmenter: Augmenter
    store: ImageStore
    plan: BatchPlan
    shares: Shares
    noise: NoiseSource
    fixed: Batch  # this process's share of one batch already on the device (model only)
    step: int = 0

    @classmethod
    def build(cls, cfg: Config, store: ImageStore, precision: str, batch: int, device: torch.device,
              seed: int = 0, acc: Accelerator | None = None) -> "StepRig":
        """The step of `cfg` at a global batch of `batch` (micro-batched by train.micro_batch_size);
        `store` is moved to `device`. One process under a fresh Accelerator, or `acc`'s processes."""
        acc = acc or fresh_accelerator(precision, device)
        torch.manual_seed(seed)
        model = build_model(cfg.model).to(device).train()
        optimizer = build_optimizer(model, cfg)
        scheduler = build_schedule(optimizer, cfg, 10**6, 10**6)
        ema = WeightEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        noise = NoiseSource(seed, model.noise_width, device)
        augmenter = Augmenter(cfg.augment, cfg.model.img_size, model.mean, model.std, seed).to(device)
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        shares = Shares.plan(batch, cfg.train.micro_batch_size, acc.num_processes, acc.process_index)
        size = cfg.model.img_size
        u = noise.draw(0, batch, device)
        fixed = Batch([MicroBatch(torch.randn(sl.stop - sl.start, 3, size, size, device=device),
                                  torch.rand(sl.stop - sl.start, device=device) * 100, sl.start,
                                  None if u is None else u[sl]) for sl in shares.slices()])
        guard = StepGuard(acc, optimizer, PreemptionFlag(), scheduler=scheduler, ema=ema)
        return cls(cfg=cfg, acc=acc, model=model, forward=compile_step(model, augmenter, cfg, Console(quiet=True)),
                   optimizer=optimizer, scheduler=scheduler, guard=guard, ema=ema, augmenter=augmenter,
                   store=store.to(device), plan=BatchPlan(len(store), cfg.data.train_patch_num, batch, seed),
                   shares=shares, noise=noise, fixed=fixed)

    def model_only(self) -> None:
        """`train_step` on the fixed batch."""
        self._train(self.fixed)

    def end_to_end(self) -> None:
        """`next_batch` + `train_step`: what one step of `iqa-dist train` runs."""
        self._train(self.augment())

    def augment(self) -> Batch:
        """`next_batch` alone: the input path of the next step."""
        return next_batch(self.store, self.plan, self.augmenter, self.shares, self.step % self.plan.steps_per_epoch,
                          self.acc.device, noise=self.noise)

    def _train(self, batch: Batch) -> None:
        train_step(self.acc, self.forward, self.optimizer, batch, self.step, self.shares.per_process, 0.0,
                   self.cfg.optim.grad_clip, self.guard)
        self.step += 1

    def device_tensors(self) -> list[torch.Tensor]:
        """What lives on the device before a step: weights, optimizer state, EMA, resident pixels."""
        fixed = [t for mb in self.fixed.micro for t in (mb.x, mb.target, mb.noise) if t is not None]
        return device_tensors(self.model, self.optimizer, self.ema.model if self.ema else None,
                              [self.store.pixels, *fixed, self.augmenter.mean, self.augmenter.std, self.augmenter.gray])


class AnchorRig:
    """timm's plain classifier of the backbone: cross-entropy on random labels, the same batch,
    precision, fused AdamW and gradient clipping."""

    def __init__(self, cfg: Config, precision: str, batch: int, device: torch.device) -> None:
        import timm

        self.acc = fresh_accelerator(precision, device)
        torch.manual_seed(0)
        model = timm.create_model(cfg.model.backbone, pretrained=False, img_size=cfg.model.img_size,
                                  **cfg.model.backbone_kwargs).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type in ("cuda", "cpu"))
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.x = torch.randn(batch, 3, cfg.model.img_size, cfg.model.img_size, device=device)
        self.y = torch.randint(0, 1000, (batch,), device=device)
        self.clip = cfg.optim.grad_clip or math.inf

    def step(self) -> None:
        with part("forward"):
            logits = self.model(self.x).float()
        with part("loss"):
            loss = torch.nn.functional.cross_entropy(logits, self.y)
        with part("backward"):
            self.acc.backward(loss)
        with part("clip"):
            self.acc.clip_grad_norm_(self.model.parameters(), self.clip)
        with part("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def device_tensors(self) -> list[torch.Tensor]:
        return device_tensors(self.model, self.optimizer, None, [self.x, self.y])


def device_tensors(model: torch.nn.Module, optimizer, ema_model: torch.nn.Module | None,
                   others: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """A model's parameters and buffers, an optimizer's state tensors, and any others: what a step
    finds on the device (for audit.StepAudit)."""
    out = [*model.parameters(), *model.buffers(), *others]
    if ema_model is not None:
        out += [*ema_model.parameters(), *ema_model.buffers()]
    inner = getattr(optimizer, "optimizer", optimizer)
    out += [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return out
