"""Model selection: the weights (and their EMA) scored on every dataset's validation split, the
better of the two kept when it is a new best on val SRCC (exported as the run's model), early
stopping on patience, and the selected model's test split scored once.

Scoring is `scoring.predictions.evaluate_split` (`iqa-dist evaluate`'s; `predict` shares its
`predict_images`), on the model's own fp32 forward (the precision the model card records),
whatever the training precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from accelerate import Accelerator
from rich.console import Console
from safetensors.torch import load_file
from torch import nn

from ..artifacts.card import WEIGHTS_FILE, ModelCard
from ..artifacts.rundir import RunDir
from ..config import Config
from ..data.augment import Augmenter
from ..data.load import Data
from ..data.store import EvalSet
from ..scoring.metrics import METRIC_KEYS
from ..scoring.predictions import evaluate_split
from .compile import compile_model
from .initial import merge_images
from .trainer import TrainState, Trainer


class OwnForward(nn.Module):
    """A model's own forward, without the mixed-precision wrapper Accelerate puts on the prepared
    instance: training-time evaluation then scores in the model card's `eval_precision` (fp32), as
    `evaluate` and `predict` do, whatever the training precision."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return type(self.model).forward(self.model, x)


@dataclass
class Validation:
    """One evaluation of the weights (and of their EMA) on every dataset's val split."""

    val: dict  # the weights' selection metrics (the only dataset's, or the combination)
    per_dataset: dict[str, dict]  # the weights', per dataset
    ema_val: dict | None = None  # the EMA's selection metrics (train.ema_decay)
    ema_per_dataset: dict[str, dict] | None = None  # the EMA's, per dataset
    chosen: str = "raw"  # which of the two was better on val: raw | ema


def combine(per_dataset: dict[str, dict], weights: list[float], select_on: str) -> dict:
    """One set of metrics for selection and tables: the dataset's own with one dataset, else the
    weight-averaged correlations (RMSE has no common scale across datasets) or `select_on`'s."""
    if len(per_dataset) == 1:
        return next(iter(per_dataset.values()))
    if select_on:
        return per_dataset[select_on]
    w = np.asarray(weights) / sum(weights)
    out = {k: float(sum(wi * m[k] for wi, m in zip(w, per_dataset.values()))) for k in ("srcc", "plcc", "krcc")}
    return {**out, "rmse": None, "n": sum(m["n"] for m in per_dataset.values())}


class Selection:
    """Scores the trainer's weights and EMA on the run's splits; exports each new best to `run`."""

    def __init__(self, *, cfg: Config, acc: Accelerator, trainer: Trainer, data: Data, card: ModelCard,
                 augmenter: Augmenter, batch: int, run: RunDir, console: Console,
                 inherited_images: dict | None = None) -> None:
        self.cfg, self.acc, self.trainer, self.data, self.card, self.run = cfg, acc, trainer, data, card, run
        self.inherited_images = inherited_images or {}  # model.init_from: what the start model trained on
        self.augmenter, self.batch = augmenter, batch
        self.model = compile_model(OwnForward(trainer.bare), cfg, console, "evaluation")

    def validate(self) -> Validation:
        """Validation of the weights (and of their EMA); the better of the two, when it is a new best
        (val SRCC), is exported as the run's model."""
        t = self.trainer
        per_dataset = self._metrics(self.model, self.data.val)
        v = Validation(self._combine(per_dataset), per_dataset)
        chosen_val, chosen_model = v.val, t.bare
        if t.ema is not None:  # never prepared: its forward is its own, as the weights' evaluation is
            v.ema_per_dataset = self._metrics(t.ema.model, self.data.val)
            v.ema_val = self._combine(v.ema_per_dataset)
            if selection_key(v.ema_val) > selection_key(v.val):
                v.chosen, chosen_val, chosen_model = "ema", v.ema_val, t.ema.model
        if update_best(t.state, chosen_val, self.cfg.train.patience):
            exported = replace(self.card, step=t.state.step, val=chosen_val, averaged=v.chosen)
            train_images = {name: {"names": view.names(view.ids("train")), "groups": view.groups(view.ids("train")),
                                   "sha256": view.file_hashes(view.ids("train"))}
                            for name, view in self.data.views.items()} if self.acc.is_main_process else {}
            self.run.export_model(chosen_model.state_dict(), exported, merge_images(train_images, self.inherited_images))
        return v

    def track_test(self, v: Validation) -> dict[str, dict] | None:
        """train.track_test: the test split scored with the weights this evaluation found better on
        val, logged but never read by selection (the summary's optimistic column)."""
        if not self.cfg.train.track_test:
            return None
        model = self.trainer.ema.model if v.chosen == "ema" else self.model
        return self._metrics(model, self.data.test(self.cfg, self.acc))

    def test_selected(self) -> tuple[dict, dict[str, dict]]:
        """Loads the selected weights and evaluates each dataset's test split once."""
        self.acc.wait_for_everyone()
        self.trainer.bare.load_state_dict(load_file(str(self.run.model_dir / WEIGHTS_FILE)))
        per_dataset = self._metrics(self.model, self.data.test(self.cfg, self.acc))
        return self._combine(per_dataset), per_dataset

    def _combine(self, per_dataset: dict[str, dict]) -> dict:
        return combine(per_dataset, self.data.weights, self.cfg.train.select_on)

    def _metrics(self, model: nn.Module, images: dict[str, EvalSet]) -> dict[str, dict]:
        """Metrics per dataset, each on its own score scale."""
        return {name: {k: r[k] for k in METRIC_KEYS} for name, r in (
            (name, evaluate_split(model, evalset, self.augmenter, self.batch, self.acc,
                                  self.card.scale(name).to_score, self.cfg.train.compile))
            for name, evalset in images.items())}


def selection_srcc(metrics: dict) -> float:
    """What selection compares first: the val SRCC, a non-finite one (a constant prediction) counting as -inf."""
    return metrics["srcc"] if math.isfinite(metrics["srcc"]) else -math.inf


def selection_key(metrics: dict) -> tuple[float, float, float]:
    """What selection compares, in order: val SRCC, then PLCC, then lower RMSE (a small validation
    set saturates SRCC, so equal SRCCs are common: the better fit breaks the tie); non-finite or
    absent figures (a joint run has no common RMSE) count as the worst."""
    def finite(x, worst: float) -> float:
        return x if x is not None and math.isfinite(x) else worst

    return selection_srcc(metrics), finite(metrics.get("plcc"), -math.inf), -finite(metrics.get("rmse"), math.inf)


def update_best(state: TrainState, val: dict, patience: int) -> bool:
    """Model selection and early stopping after an evaluation at state.step: True when this is a
    new best (to export), by `selection_key`. The first evaluation always is; a non-finite SRCC never
    improves."""
    key = selection_key(val)
    best = key > (state.best_srcc, state.best_plcc, -state.best_rmse) or state.best_step == 0
    if best:
        state.best_srcc, state.best_plcc, state.best_rmse = key[0], key[1], -key[2]
        state.best_step, state.bad_evals = state.step, 0
    else:
        state.bad_evals += 1
    state.stopped_early = 0 < patience <= state.bad_evals
    return best
