"""The training step: one function for `train` and `bench`, no host round trip, a guard that
never lets a non-finite step update the weights, compile that matches eager, padded evaluation."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from iqa_dist.config import AugmentConfig, load_config
from iqa_dist.data.augment import Augmenter
from iqa_dist.data.store import EvalSet, ImageStore
from iqa_dist.distributed.accelerators import reset_accelerate_state
from iqa_dist.models.hyperiqa import build_model
from iqa_dist.scoring.predictions import predict_images
from iqa_dist.training.batches import Batch, MicroBatch
from iqa_dist.training.guard import BadStep, StepGuard
from iqa_dist.training.optim import Schedule, WeightEMA, build_optimizer
from iqa_dist.training.preemption import PreemptionFlag
from iqa_dist.training.selection import update_best
from iqa_dist.training.trainer import TrainState, Trainer

from .conftest import TINY_SWIN_KWARGS as TINY_SWIN


def tiny_cfg(*extra: str):
    return load_config("demo", ["model.pretrained=none", *extra])


def setup(cfg, seed: int = 0, scaler: torch.amp.GradScaler | None = None, ema: bool = False,
          distill: float = 0.0) -> Trainer:
    """A Trainer (batch 8 on one process) under a fresh Accelerator; `scaler`: fp16's loss scaler (Accelerate makes one on GPUs
    only, so the tests hand it one: the CPU computes in fp32, the scaling, unscaling, overflow
    check and skip are the real ones)."""
    reset_accelerate_state()
    acc = Accelerator(cpu=True)
    acc.scaler = scaler
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg)
    average = WeightEMA(model, 0.5) if ema or distill else None
    prepared, optimizer = acc.prepare(model, optimizer)
    return Trainer(acc=acc, model=prepared, forward=prepared, bare=model, optimizer=optimizer,
                   schedule=Schedule.of(cfg, 100, 10), guard=StepGuard(acc, optimizer, PreemptionFlag()), ema=average,
                   teacher=average.model if distill else None, state=TrainState(), per_process=8.0, patches=8,
                   rank_weight=0.0, distill_weight=distill, grad_clip=1.0)


def batch(n: int = 8, size: int = 64, seed: int = 0, bad: bool = False) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.rand(n, generator=g)
    if bad:
        y[0] = float("nan")
    return Batch([MicroBatch(x, y, 0)])


def test_bench_times_the_training_step_itself():
    """bench's step (rig.StepRig) is `Batches.get` + `Trainer.step` as `train` calls them: driven
    from the same state, the two leave the same weights, optimizer state, schedule and EMA."""
    from iqa_dist.bench.rig import StepRig

    cfg = load_config("koniq-swin-t", ["model.pretrained=none", f"model.backbone_kwargs={json.dumps(TINY_SWIN)}",
                                       "model.img_size=64", "train.ema_decay=0.9"])
    rng = np.random.default_rng(0)
    store = replace(ImageStore.of_images(list(rng.integers(0, 256, (4, 130, 150, 3), dtype=np.uint8))),
                    scores=torch.rand(4) * 100)
    cpu = torch.device("cpu")
    timed, direct = StepRig.build(cfg, store, "fp32", 8, cpu), StepRig.build(cfg, store, "fp32", 8, cpu)
    for step in range(3):
        timed.end_to_end()
        direct.trainer.step(direct.batches.get(step))
    a, b = timed.trainer, direct.trainer
    for t in (a, b):
        t.settle()
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), k
    assert a.lr() == b.lr() and a.state.step == 3 and a.state.loss.n == 24
    torch.testing.assert_close(a.ema.model.state_dict(), b.ema.model.state_dict(), rtol=0, atol=0)
    assert a.state.loss.total == b.state.loss.total > 0


def test_a_non_finite_step_never_updates_and_stops_before_the_next():
    """Deferred guard: the fused optimizer skips the bad step on the device; the host learns of it
    at the next step's check, before that step's update, and raises naming the bad step."""
    t = setup(tiny_cfg())
    assert t.guard.deferred  # fused AdamW on this device: the flags are read one step late
    t.step(batch(seed=1))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    moments = {k: v.clone() for k, v in t.optimizer.state_dict()["state"][0].items()}
    t.step(batch(seed=2, bad=True))  # no raise yet
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # skipped on the device
    after = t.optimizer.state_dict()["state"][0]
    assert all(torch.equal(after[k], v) for k, v in moments.items())  # moments and step count untouched
    with pytest.raises(BadStep) as bad:
        t.step(batch(seed=3))
    assert bad.value.step == 1 and bad.value.what == "loss"
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the next step did not update either


def _snapshot(t: Trainer) -> dict:
    """Everything a skipped step must leave as it was."""
    return {"weights": {k: v.clone() for k, v in t.model.state_dict().items()},
            "moments": {k: v.clone() for k, v in t.optimizer.state_dict()["state"][0].items()},
            "step": t.state.step,
            "ema": {k: v.clone() for k, v in t.ema.model.state_dict().items()}}


def _assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for part in ("weights", "moments", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)


@pytest.mark.parametrize("distill", [0.0, 0.5], ids=["ema", "distilled"])
def test_a_skipped_step_changes_nothing_and_the_debug_state_is_from_before_it(distill):
    """bf16/fp32: the step with a non-finite loss leaves weights, moments, the step counter (so the
    learning rate, a function of it) and the EMA as they were (the EMA, updated inside the step, is
    held by the guard's device flag, teacher or not), and BadStep names it at the next check,
    before that step's update."""
    t = setup(tiny_cfg(), ema=True, distill=distill)
    t.step(batch(seed=1))
    t.guard.flush()
    ema0 = {k: v.clone() for k, v in t.ema.model.state_dict().items()}
    assert any(not torch.equal(v, t.model.state_dict()[k]) for k, v in ema0.items())  # an average, not a copy
    before = _snapshot(t)
    t.step(batch(seed=2, bad=True))
    with pytest.raises(BadStep) as bad:
        t.step(batch(seed=3))
    assert bad.value.step == 1 and bad.value.what == "loss"
    _assert_same(before, _snapshot(t))
    assert t.lr() == t.schedule.lrs(1)[0]


@pytest.mark.parametrize("distill", [0.0, 0.5], ids=["ema", "distilled"])
def test_an_fp16_overflow_is_skipped_without_a_host_read_and_training_goes_on(distill):
    """fp16 with a fused optimizer: an overflowing step (non-finite scaled gradients, finite loss)
    is skipped on the device by the loss scaler, the EMA (teacher or not) held by the guard's flag,
    and the guard, reading its flag one step late like any other, lets training continue; the step
    counts (the learning rate follows the step counter, as torch's GradScaler recipes step their
    schedule)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    t = setup(tiny_cfg(), scaler=scaler, ema=True, distill=distill)
    assert t.guard.fp16 and t.guard.deferred
    t.step(batch(seed=1))
    t.guard.flush()
    before = _snapshot(t)
    scaler.update(new_scale=float("inf"))  # the scaled loss and gradients overflow
    t.step(batch(seed=2))
    t.guard.flush()  # no BadStep: an overflow is not fatal
    assert t.guard.skipped == 1
    _assert_same({**before, "step": 2}, _snapshot(t))
    scaler.update(new_scale=1.0)
    t.step(batch(seed=3))
    t.guard.flush()
    assert t.state.step == 3 and t.lr() == t.schedule.lrs(3)[0]
    assert not torch.equal(t.model.state_dict()["hyper.last_weight.weight"], before["weights"]["hyper.last_weight.weight"])
    bad_loss = batch(seed=4, bad=True)
    t.step(bad_loss)
    with pytest.raises(BadStep) as bad:  # a non-finite loss stops an fp16 run too
        t.guard.flush()
    assert bad.value.what == "loss"


def test_flush_reads_the_last_step():
    t = setup(tiny_cfg())
    t.step(batch(bad=True))
    with pytest.raises(BadStep):
        t.guard.flush()


def test_a_bad_step_rewinds_the_trainers_counters_and_checkpoints_keep_their_format():
    """BadStep found at the next step's check: the step counter and the loss window's patch count
    go back to before the bad step. TrainState saves the loss window under the keys checkpoints
    always had (window_loss, window_n), so older checkpoints load and newer ones read back."""
    t = setup(tiny_cfg())
    t.step(batch(seed=1))
    t.step(batch(seed=2, bad=True))
    with pytest.raises(BadStep) as bad:
        t.step(batch(seed=3))
    assert bad.value.step == 1 and t.state.step == 1 and t.state.loss.n == 8
    saved = t.state.state_dict()  # what a debug state holds: the host totals (nothing settled yet)
    assert set(saved) == {"step", "best_srcc", "best_plcc", "best_rmse", "best_step", "bad_evals", "stopped_early",
                          "train_seconds", "world_size", "noise_stream", "window_loss", "window_n"}
    assert saved["window_n"] == 8 and saved["window_loss"] == 0.0
    saved["window_loss"] = 12.5
    again = TrainState()
    again.load_state_dict(saved)
    assert (again.step, again.loss.total, again.loss.n, again.state_dict()) == (1, 12.5, 8, saved)


def test_update_best_selects_and_stops_on_patience():
    state = TrainState()
    history = []
    for step, srcc in [(2, 0.5), (4, 0.5), (6, 0.4)]:  # no gain after the first evaluation
        state.step = step
        history.append(update_best(state, {"srcc": srcc}, patience=2))
    assert history == [True, False, False] and state.best_step == 2 and state.stopped_early
    fresh = TrainState()
    fresh.step = 1
    assert update_best(fresh, {"srcc": math.nan}, patience=0) and fresh.best_step == 1  # the first always exports
    fresh.step = 2
    assert update_best(fresh, {"srcc": 0.1}, patience=0) and not fresh.stopped_early  # NaN never counts as a best


def test_a_tie_in_val_srcc_is_broken_by_plcc_then_rmse():
    """A small validation set saturates SRCC (1.0 at step 100 and at step 400): the tie goes to the
    higher PLCC, then the lower RMSE, not to the earliest step; an equal or worse one is no best."""
    state = TrainState()
    seen = []
    for step, val in [(100, {"srcc": 1.0, "plcc": 0.90, "rmse": 15.1}), (200, {"srcc": 1.0, "plcc": 0.95, "rmse": 20.0}),
                      (300, {"srcc": 1.0, "plcc": 0.95, "rmse": 1.6}), (400, {"srcc": 1.0, "plcc": 0.95, "rmse": 1.6}),
                      (500, {"srcc": 0.99, "plcc": 1.0, "rmse": 0.1})]:
        state.step = step
        seen.append(update_best(state, val, patience=0))
    assert seen == [True, True, True, False, False] and state.best_step == 300
    joint = TrainState()  # a joint run's combination has no RMSE: PLCC alone breaks the tie
    joint.step = 1
    update_best(joint, {"srcc": 0.5, "plcc": 0.5, "rmse": None}, patience=0)
    joint.step = 2
    assert update_best(joint, {"srcc": 0.5, "plcc": 0.6, "rmse": None}, patience=0) and joint.best_step == 2


def test_schedule_warms_up_then_follows_the_cosine():
    """The learning rate is a function of the step: warmup, cosine to the floor, the head at
    lr_ratio and frozen after freeze_hyper_after epochs; written into the groups as numbers, or in
    place into a graphed step's device tensors. The same floats as the LambdaLR it replaced, which
    runs were trained with (so a resumed run continues on the rates it had)."""
    cfg = tiny_cfg("optim.warmup_steps=4", "optim.min_lr_ratio=0.1", "optim.lr=1.0", "optim.lr_ratio=2",
                   "optim.freeze_hyper_after=2")
    schedule = Schedule.of(cfg, total_steps=24, steps_per_epoch=8)
    lrs = [schedule.lrs(step) for step in range(24)]
    assert [b for b, _ in lrs[:4]] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    t = (14 - 4) / 20
    assert lrs[14][0] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert [h for _, h in lrs[:16]] == pytest.approx([2 * b for b, _ in lrs[:16]])  # lr_ratio
    assert [h for _, h in lrs[16:]] == [0.0] * 8  # frozen after 2 epochs of 8 steps

    opt = build_optimizer(build_model(cfg.model), cfg, fused=False)
    o = cfg.optim

    def factor(step):  # the LambdaLR the trainer stepped before (optim.py at e2a7ab0)
        if step < 4:
            return (step + 1) / 4
        t = (step - 4) / max(1, 24 - 4)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    before = torch.optim.lr_scheduler.LambdaLR(opt, [factor, lambda step: 0.0 if step >= 16 else factor(step)])
    for step in range(24):
        assert [g["lr"] for g in opt.param_groups] == lrs[step], step  # bit for bit
        opt.step()
        before.step()
    graphed = [torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)]
    for group, lr in zip(opt.param_groups, graphed):
        group["lr"] = lr
    schedule.apply(opt, 5)
    assert [g["lr"] for g in opt.param_groups] == graphed and [float(x) for x in graphed] == lrs[5]


def test_augmentation_is_batched_with_one_upload_and_equals_torchvision_per_sample():
    """The whole batch from one packed upload: each sample is what torchvision gives for its own
    crop (numpy slicing), flip and ColorJitter (factors and order as drawn) and normalisation,
    and the targets travel in the same upload."""
    import torchvision.transforms.functional as TF

    aug = Augmenter(AugmentConfig(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1), 16, (0.5,) * 3, (0.25,) * 3, 0)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)]
    pixels = torch.from_numpy(np.concatenate([im.ravel() for im in images]))
    n = 12
    which = torch.arange(n) % 2
    offsets, heights, widths = torch.tensor([0, images[0].size])[which], torch.tensor([40, 30])[which], \
        torch.tensor([50, 20])[which]
    params = aug.draw(n, step=5)
    y0, x0 = aug.crop_origin(params, heights, widths)
    packed = aug.upload(offsets, widths, y0, x0, params, torch.arange(n).float(), torch.device("cpu"))
    assert packed.shape == (n, 6 + 3 * 6 + 3) and packed.dtype == torch.float64  # the numbers, the jitter table
    x, scores = aug.apply(pixels, packed)
    assert x.shape == (n, 3, 16, 16) and torch.equal(scores, torch.arange(n).float())
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    factors = [params.brightness, params.contrast, params.saturation, params.hue]
    for i in range(n):
        patch = images[which[i]][y0[i]:y0[i] + 16, x0[i]:x0[i] + 16]
        img = torch.from_numpy(patch.copy()).permute(2, 0, 1).float() / 255
        if params.flip[i]:
            img = img.flip(2)
        for op in params.order[i].tolist():
            img = ops[op](img, float(factors[op][i]))
        torch.testing.assert_close(x[i], (img - 0.5) / 0.25, atol=1e-5, rtol=1e-5)


def test_padded_evaluation_scores_every_image_once():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (70, 80, 3), dtype=np.uint8) for _ in range(5)]
    store = ImageStore.of_images(images)
    origins = torch.from_numpy(rng.integers(0, 6, (5, 3, 2)))
    evalset = EvalSet(store, origins)
    aug = Augmenter.evaluation(64, model.mean, model.std)
    plain = predict_images(model, evalset, aug, batch_patches=6, device=torch.device("cpu"))
    padded = predict_images(model, evalset, aug, batch_patches=6, device=torch.device("cpu"), fixed_shapes=True)
    assert plain.shape == padded.shape == (5,)  # 2 images per batch: the last batch padded, its copy dropped
    torch.testing.assert_close(plain, padded)
