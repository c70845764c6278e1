"""One process's training step, built outside `iqa-dist train` from the same parts: what `bench`
times and counts, and what the tests audit.

`StepRig` holds a `training.trainer.Trainer` built by `Trainer.build` (the model, fused optimizer, schedule,
guard, weight EMA of train.ema_decay, compiled as train.compile says) and the `step.Batches` that
feed it, under a fresh Accelerator, and runs `Trainer.step` either end to end (fed by
`Batches.get` from a store, as `train` does) or on one fixed batch already on the device (model
only). `AnchorRig` is timm's plain classifier of the same backbone with the same batch,
precision, fused AdamW and clipping: what a user would otherwise train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from accelerate import Accelerator
from rich.console import Console

from ..config import Config
from ..data.augment import Augmenter
from ..data.plan import BatchPlan
from ..data.store import ImageStore
from ..distributed.accelerators import fresh_accelerator
from ..distributed.shards import Shares
from ..models.hyperiqa import build_model
from ..parts import part
from ..training.batches import Batch, Batches, KeyedNoise, MicroBatch
from ..training.preemption import PreemptionFlag
from ..training.trainer import Trainer


@dataclass(kw_only=True)
class StepRig:
    cfg: Config
    trainer: Trainer
    batches: Batches
    fixed: Batch  # this process's share of one batch already on the device (model only)

    @classmethod
    def build(cls, cfg: Config, store: ImageStore, precision: str, batch: int, device: torch.device,
              seed: int = 0, acc: Accelerator | None = None) -> "StepRig":
        """The step of `cfg` at a global batch of `batch` (micro-batched by train.micro_batch_size);
        `store` is moved to `device`. One process under a fresh Accelerator, or `acc`'s processes."""
        acc = acc or fresh_accelerator(precision, device)
        torch.manual_seed(seed)
        model = build_model(cfg.model).train()
        augmenter = Augmenter(cfg.augment, cfg.model.img_size, model.mean, model.std, seed).to(device)
        shares = Shares.split(batch, cfg.train.micro_batch_size, acc.num_processes, acc.process_index)
        trainer = Trainer.build(cfg, model, acc, shares=shares, total_steps=10**6, steps_per_epoch=10**6,
                                augmenter=augmenter, preempt=PreemptionFlag(), console=Console(quiet=True))
        trainer.rank_weight = 0.0  # the fixed batch carries no global targets
        noise = KeyedNoise(seed, model.noise_width, batch, device)
        size = cfg.model.img_size
        u = noise.draw(0)
        fixed = Batch([MicroBatch(torch.randn(sl.stop - sl.start, 3, size, size, device=device),
                                  torch.rand(sl.stop - sl.start, device=device) * 100, sl.start,
                                  None if u is None else u[sl]) for sl in shares.slices()])
        batches = Batches(store=store.to(device), plan=BatchPlan(len(store), cfg.data.train_patch_num, batch, seed),
                          augmenter=augmenter, shares=shares, device=device, noise=noise)
        return cls(cfg=cfg, trainer=trainer, batches=batches, fixed=fixed)

    @property
    def acc(self) -> Accelerator:
        return self.trainer.acc

    def model_only(self) -> None:
        """`Trainer.step` on the fixed batch."""
        self.trainer.step(self.fixed)

    def end_to_end(self) -> None:
        """`EagerStep.step` (`Batches.get` + `Trainer.step`): what one step of `iqa-dist train` runs."""
        self.trainer.step(self.augment())

    def augment(self) -> Batch:
        """`Batches.get` alone: the input path of the next step."""
        return self.batches.get(self.trainer.state.step)

    def device_tensors(self) -> list[torch.Tensor]:
        """What lives on the device before a step: weights, optimizer state, EMA, resident pixels."""
        t, aug = self.trainer, self.batches.augmenter
        fixed = [t for mb in self.fixed.micro for t in (mb.x, mb.target, mb.noise) if t is not None]
        noise = [self.batches.noise.base] if isinstance(self.batches.noise, KeyedNoise) else []
        return device_tensors(t.model, t.optimizer, t.ema.model if t.ema else None,
                              [self.batches.store.pixels, *fixed, *noise, aug.mean, aug.std, aug.gray])


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
