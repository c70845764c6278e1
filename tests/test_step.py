"""The training step: one function for `train` and `bench`, no host round trip, a guard that
never lets a non-finite step update the weights, compile that matches eager, padded evaluation."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from iqa_dist import bench, step as step_mod
from iqa_dist.augment import Augmenter
from iqa_dist.config import AugmentConfig, load_config
from iqa_dist.evaluate import predict_images
from iqa_dist.model import build_model
from iqa_dist.store import EvalSet, ImageStore
from iqa_dist.optim import build_optimizer, build_schedule
from iqa_dist.step import Batch, BadStep, MicroBatch, PreemptionFlag, StepGuard, train_step
from iqa_dist.train import TrainState, maybe_compile, update_best



def tiny_cfg(*extra: str):
    return load_config("demo", ["model.pretrained=none", *extra])


def setup(cfg, seed: int = 0):
    acc = Accelerator(cpu=True)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_schedule(optimizer, cfg, 100, 10)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    return acc, model, optimizer, scheduler, StepGuard(acc, optimizer, PreemptionFlag())


def batch(n: int = 8, size: int = 64, seed: int = 0, bad: bool = False) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.rand(n, generator=g)
    if bad:
        y[0] = float("nan")
    return Batch([MicroBatch(x, y, 0)])


def test_bench_times_the_training_step_itself():
    """No second copy of the step: bench times rig.StepRig, which calls step.train_step and
    step.next_batch (and compiles them as `train` does: tests/test_audit.py)."""
    from iqa_dist import rig

    assert "StepRig.build(" in inspect.getsource(bench._train_rates)
    source = inspect.getsource(rig.StepRig)
    assert "train_step(" in source and "next_batch(" in source
    assert rig.train_step is step_mod.train_step and rig.next_batch is step_mod.next_batch
    assert "backward(" not in source  # the step's work lives only in step.py


def test_a_non_finite_step_never_updates_and_stops_before_the_next():
    """Deferred guard: the fused optimizer skips the bad step on the device; the host learns of it
    at the next step's check, before that step's update, and raises naming the bad step."""
    acc, model, optimizer, scheduler, guard = setup(tiny_cfg())
    assert guard.deferred  # fused AdamW on this device: the flags are read one step late
    train_step(acc, model, optimizer, scheduler, batch(seed=1), 0, 8.0, 0.0, 1.0, guard)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}
    train_step(acc, model, optimizer, scheduler, batch(seed=2, bad=True), 1, 8.0, 0.0, 1.0, guard)  # no raise yet
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # skipped on the device
    after = optimizer.state_dict()["state"][0]
    assert all(torch.equal(after[k], v) for k, v in moments.items())  # moments and step count untouched
    with pytest.raises(BadStep) as bad:
        train_step(acc, model, optimizer, scheduler, batch(seed=3), 2, 8.0, 0.0, 1.0, guard)
    assert bad.value.step == 1 and bad.value.what == "loss"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the next step did not update either


def test_flush_reads_the_last_step():
    acc, model, optimizer, scheduler, guard = setup(tiny_cfg())
    train_step(acc, model, optimizer, scheduler, batch(bad=True), 0, 8.0, 0.0, 1.0, guard)
    with pytest.raises(BadStep):
        guard.flush()


def test_update_best_selects_and_stops_on_patience():
    state = TrainState()
    history = []
    for step, srcc in [(2, 0.5), (4, 0.5), (6, 0.4)]:  # no gain after the first evaluation
        state.step = step
        history.append(update_best(state, srcc, patience=2))
    assert history == [True, False, False] and state.best_step == 2 and state.stopped_early
    fresh = TrainState()
    fresh.step = 1
    assert update_best(fresh, math.nan, patience=0) and fresh.best_step == 1  # the first always exports
    fresh.step = 2
    assert update_best(fresh, 0.1, patience=0) and not fresh.stopped_early  # NaN never counts as a best


def test_schedule_warms_up_then_follows_the_cosine():
    cfg = tiny_cfg("optim.warmup_steps=4", "optim.min_lr_ratio=0.1", "optim.lr=1.0", "optim.lr_ratio=2")
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg, fused=False)
    schedule = build_schedule(opt, cfg, total_steps=24, steps_per_epoch=8)
    lrs = []
    for _ in range(24):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    t = (14 - 4) / 20
    assert lrs[14] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert opt.param_groups[1]["lr"] == pytest.approx(2 * schedule.get_last_lr()[0])  # lr_ratio


def test_augmentation_is_batched_with_one_upload():
    """The jitter runs as whole-batch tensor ops from one packed upload: the result equals the
    per-op reference and the device function takes no host tensors."""
    aug = Augmenter(AugmentConfig(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1), 16, (0.5,) * 3, (0.25,) * 3, 0)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    pixels = torch.from_numpy(image.ravel().copy())
    n = 12
    params = aug.draw(n)
    y0, x0 = aug.crop_origin(params, torch.full((n,), 40), torch.full((n,), 50))
    packed = aug.upload(torch.zeros(n, dtype=torch.long), torch.full((n,), 50), y0, x0, params, torch.arange(n).float(),
                        torch.device("cpu"))
    assert packed.shape == (n, 6 + 3 * 6 + 3) and packed.dtype == torch.float64  # the numbers, the jitter table
    x, scores = aug.apply(pixels, packed)
    assert x.shape == (n, 3, 16, 16) and torch.equal(scores, torch.arange(n).float())
    torch.testing.assert_close(x, aug.train(pixels, torch.zeros(n, dtype=torch.long), torch.full((n,), 50), y0, x0,
                                            params))


def test_compiled_step_matches_eager_and_compiles_once():
    """torch.compile (the aot_eager backend here: the graph capture and autograd that inductor
    builds on, without its slow C++ build on 2 cores) gives the eager step's losses, and the
    training loop's fixed shapes compile once."""
    from torch._dynamo.utils import counters

    def losses(compile_: bool) -> list[float]:
        cfg = tiny_cfg(f"train.compile={str(compile_).lower()}", "train.compile_backend=aot_eager")
        acc, model, optimizer, scheduler, guard = setup(cfg)
        forward = maybe_compile(model, cfg, _quiet())
        out = []
        for step in range(3):
            loss, _ = train_step(acc, forward, optimizer, scheduler, batch(seed=step), step, 8.0, 0.0, 1.0, guard)
            out.append(float(loss))
        return out

    eager = losses(False)
    counters.clear()
    compiled = losses(True)
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert counters["stats"]["unique_graphs"] <= 2  # forward graph(s) captured once, not per step


def test_padded_evaluation_scores_every_image_once():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (70, 80, 3), dtype=np.uint8) for _ in range(5)]
    sizes = torch.tensor([im.size for im in images])
    store = ImageStore(torch.from_numpy(np.concatenate([im.ravel() for im in images])), torch.cumsum(sizes, 0) - sizes,
                       torch.full((5,), 70), torch.full((5,), 80), torch.zeros(5), torch.arange(5))
    origins = torch.from_numpy(rng.integers(0, 6, (5, 3, 2)))
    evalset = EvalSet(store, origins)
    aug = Augmenter.evaluation(64, model.mean, model.std)
    plain = predict_images(model, evalset, aug, batch_patches=6, device=torch.device("cpu"))
    padded = predict_images(model, evalset, aug, batch_patches=6, device=torch.device("cpu"), fixed_shapes=True)
    assert plain.shape == padded.shape == (5,)  # 2 images per batch: the last batch padded, its copy dropped
    torch.testing.assert_close(plain, padded)


def _quiet():
    from rich.console import Console

    return Console(quiet=True)

