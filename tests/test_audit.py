"""A step that never waits for the device, proven on the CPU: audit.StepAudit finds every kind of
host-device synchronisation at the dispatcher; the real training step (eager and compiled), the
evaluation batch loop and the EMA update have none; the kernel budget of the koniq-swin-t step;
compile that holds (no graph break, no recompile after the first step)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from rich.console import Console

from iqa_dist.bench.audit import StepAudit, capture_blockers
from iqa_dist.bench.kernels import TARGETS, step_budget
from iqa_dist.bench.rig import StepRig, device_tensors
from iqa_dist.config import load_config
from iqa_dist.constants import GRAY
from iqa_dist.data.augment import Augmenter, gray_weights, jitter, jitter_table
from iqa_dist.data.store import EvalSet, ImageStore
from iqa_dist.models.hyperiqa import build_model
from iqa_dist.parts import part
from iqa_dist.scoring.predictions import predict_images
from iqa_dist.training import loop
from iqa_dist.training.compile import compile_model, inductor_cache
from iqa_dist.training.optim import WeightEMA

from .conftest import TINY_SWIN_KWARGS as TINY_SWIN

CPU = torch.device("cpu")


def store(n: int = 6, h: int = 130, w: int = 150, seed: int = 0) -> ImageStore:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    return replace(ImageStore.of_images(list(images)), scores=torch.rand(n) * 100)


def tiny_recipe(*extra: str):
    """koniq-swin-t's recipe (jitter, dropout, drop path, two groups, clipping) on a tiny Swin, EMA on."""
    return load_config("koniq-swin-t", ["model.pretrained=none", f"model.backbone_kwargs={json.dumps(TINY_SWIN)}",
                                        "model.img_size=64", "train.ema_decay=0.9", *extra])


def audited_steps(rig: StepRig, also: list[torch.Tensor] = ()) -> dict:
    """Two steps of `rig` under the audit (its device tensors and `also`), which must never wait
    for the device: no sync, one upload (the packed batch numbers), one download (the guard's flag)
    and no host work outside the host part per step. Returns the per-step report."""
    audit = StepAudit([*rig.device_tensors(), *also])
    with audit:
        for _ in range(2):
            rig.end_to_end()
    report = audit.report(2)
    assert [str(f) for f in report.syncs] == []
    per = report.per_step()
    assert per["uploads"] == 1 and per["downloads"] == 1 and per["host_ops"] == 0
    return per


def findings(fn, device: list[torch.Tensor]) -> list[str]:
    audit = StepAudit(device)
    with audit:
        fn()
    return [f"{f.op}: {f.why}" for f in audit.report(1).syncs]


# ---------------------------------------------------------------- the audit itself


def _in_host_part(fn):
    with part("host"):
        return fn()


def test_the_audit_finds_every_kind_of_wait():
    w, idx = torch.randn(4, 4), torch.arange(4)
    cases = {  # what the code does: a word of the finding that names it
        "item": (lambda: w.sum().item(), "_local_scalar_dense"),
        "float": (lambda: float(w[0, 0]), "_local_scalar_dense"),
        "bool": (lambda: bool(w[0, 0] > 0), "_local_scalar_dense"),
        "nonzero": (lambda: w.nonzero(), "nonzero"),
        "mask": (lambda: w[w > 0], "boolean-mask"),
        "masked_select": (lambda: w.masked_select(w > 0), "masked_select"),
        "unique": (lambda: w.unique(), "unique"),
        "repeat_interleave": (lambda: w[0].long().abs().repeat_interleave(w[1].long().abs() + 1), "output_size"),
        "tensor": (lambda: w * torch.tensor([1.0, 2.0, 3.0, 4.0], device=w.device), "Python data"),
        "new_tensor": (lambda: w * w.new_tensor([1.0, 2.0, 3.0, 4.0]), "Python data"),
        "as_tensor": (lambda: w * torch.as_tensor([1.0, 2.0, 3.0, 4.0], device=w.device), "Python data"),
        "host index": (lambda: w[idx], "implicit, blocking host-to-device"),
        "blocking upload": (lambda: w + idx.float().to(w.device), "blocking host-to-device"),
        "tolist": (lambda: w.tolist(), "Tensor.tolist"),
        "numpy": (lambda: w.numpy(), "Tensor.numpy"),
        "cpu": (lambda: w.cpu(), "Tensor.cpu"),
        "equal": (lambda: torch.equal(w, w), "Python bool"),
        "host part": (lambda: _in_host_part(lambda: w + 1), "host part"),
    }
    for name, (fn, word) in cases.items():
        found = findings(fn, [w])
        assert found and word in found[0], f"{name}: {found}"
    # what a step may do: device factories, non-blocking uploads, fixed-shape math, host work in a host part
    def fine():
        with part("host"):
            rows = torch.arange(4)
            staged = torch.stack([rows.double(), torch.ones(4, dtype=torch.float64)], 1)
            n = int(staged[0, 1])
        up = staged.to(w.device, non_blocking=True)
        ar = torch.arange(n * 4, device=w.device)
        return torch.where(up[:, 0] > 1, w[0], 0.0) + ar + torch.nan_to_num(w.sum() * 0.0, nan=1.0)

    assert findings(fine, [w]) == []


def test_the_audit_would_fail_the_augmentation_as_it_landed_before():
    """021370f's jitter made its constants per call (augment.py:93 and :134 there): the audit names
    both; and grey weights made per call (`gray_weights` inside the step) would be found the same
    way, which is why the step passes the Augmenter's constants, made once at set-up."""
    x = torch.rand(4, 3, 8, 8)

    def landed():
        gray = (x * x.new_tensor(GRAY).view(1, 3, 1, 1)).sum(1, keepdim=True)  # augment.py:134 at 021370f
        k = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + gray  # augment.py:93 at 021370f
        return k

    found = findings(landed, [x])
    assert len(found) == 2 and all("Python data" in f for f in found)
    order = torch.stack([torch.randperm(4) for _ in range(4)])
    factors = [torch.rand(4) + 0.5 for _ in range(3)]
    table = jitter_table(torch.stack(factors, 1), None, order).float()
    assert any("Python data" in f for f in findings(lambda: jitter(x, table, False, gray_weights(x.device)), [x]))


# ---------------------------------------------------------------- the real step, evaluation, the EMA


def test_compile_holds_for_training_and_evaluation(monkeypatch, tmp_path):
    # (first of the compiled tests: it compiles afresh; the others reuse what dynamo keeps)
    """One compile path for `train` and bench (`compile_step`): the model and the training
    augmentation; no graph break; after the first training step and the first evaluation,
    further steps and evaluations compile nothing (no recompile); the compiled steps train the
    eager ones' weights (aot_eager: the graph capture and autograd inductor builds on); every
    torch.compile call happens with the inductor cache where the README says (beside the data
    cache)."""
    from torch._dynamo.utils import counters

    # what importing timm (torch's compiler) leaves in the environment: torch's default, not the user's choice
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torchinductor_someone"))
    seen = []
    real = torch.compile

    def recording(*args, **kwargs):
        seen.append(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording)
    torch._dynamo.reset()
    cfg = tiny_recipe("train.compile=true", "train.compile_backend=aot_eager", f"data.cache_dir={tmp_path}")
    r = StepRig.build(cfg, store(), "fp32", 8, CPU)
    evaluator = compile_model(r.trainer.bare, cfg, Console(quiet=True), "evaluation")
    images = EvalSet(store(5), torch.from_numpy(np.random.default_rng(1).integers(0, 18, (5, 3, 2))))
    counters.clear()

    def evaluate():
        predict_images(evaluator, images, r.batches.augmenter, batch_patches=6, device=CPU, fixed_shapes=True)

    r.end_to_end()
    evaluate()
    first = dict(counters["stats"])
    for _ in range(2):
        r.end_to_end()
        r.end_to_end()
        evaluate()
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == first["unique_graphs"]  # nothing compiled after the first ones
    audited_steps(r)  # and the compiled step never waits for the device
    assert r.batches.augmenter._compiled is not None and len(seen) == 3  # augmentation, training model, evaluation model
    assert set(seen) == {str(tmp_path / "inductor")}
    eager = StepRig.build(tiny_recipe(f"data.cache_dir={tmp_path}"), store(), "fp32", 8, CPU)
    for _ in range(7):
        eager.end_to_end()
    for rig in (r, eager):
        rig.trainer.settle()
    # AdamW moves a weight by about its lr per step whatever its gradient's size, so where a gradient
    # is ~0 the last-bit differences of two op orders (compiled vs eager; CPU kernels' threads) can
    # flip an update's sign: a few weights may differ by up to 2 x lr a step, the rest must agree
    bound = 2 * 7 * cfg.optim.lr * max(1.0, cfg.optim.lr_ratio) + 1e-5  # the head's peak lr
    for (name, a), b in zip(r.trainer.bare.state_dict().items(), eager.trainer.bare.state_dict().values()):
        if not a.is_floating_point():
            assert torch.equal(a, b), name
            continue
        off = (a - b).abs() > 1e-4 * b.abs() + 1e-5
        assert off.float().mean() < 1e-3 and (a - b).abs().max() <= bound, \
            f"{name}: {int(off.sum())} of {a.numel()} differ, by up to {(a - b).abs().max():.3g} (bound {bound:.3g})"


@pytest.mark.parametrize("compiled,distilled", [(False, False), (False, True), (True, True)],
                         ids=["eager", "distilled", "distilled-compiled"])
def test_the_training_step_never_waits_for_the_device(compiled, distilled):
    """`Batches.get` + `Trainer.step` of the koniq-swin-t recipe (jitter, dropout, drop path, EMA,
    clipping, the guard), and with self-distillation (the EMA teacher's forward, its update inside
    the step): no sync, one upload (the packed batch numbers) and one download (the guard's flag,
    non-blocking) per step, no host work outside the host part. Compiled with aot_eager:
    inductor's graph capture and autograd, without its C++ build on 2 cores. (The compiled step
    without distillation is audited by test_compile_holds_for_training_and_evaluation, which
    compiles it anyway.)"""
    cfg = tiny_recipe(*(["train.compile=true", "train.compile_backend=aot_eager"] if compiled else []),
                      *(["optim.distill_weight=0.5"] if distilled else []))
    r = StepRig.build(cfg, store(), "fp32", 8, CPU)
    for _ in range(2):  # the optimizer state, the first compilation
        r.end_to_end()
    per = audited_steps(r)
    if not compiled:
        assert set(per["parts"]) == {"noise", "augment", "forward", "loss", "backward", "clip", "guard", "optimizer",
                                     "ema", *(["teacher"] if distilled else [])}


def test_evaluation_batches_never_wait_for_the_device():
    cfg = tiny_recipe()
    model = build_model(cfg.model).eval()
    images = EvalSet(store(5), torch.from_numpy(np.random.default_rng(1).integers(0, 18, (5, 3, 2))))
    aug = Augmenter.evaluation(64, model.mean, model.std).to(CPU)
    predict_images(model, images, aug, batch_patches=6, device=CPU, fixed_shapes=True)
    device = device_tensors(model, torch.optim.SGD(model.parameters()), None,
                            [images.store.pixels, aug.mean, aug.std, aug.gray])
    found = findings(lambda: predict_images(model, images, aug, batch_patches=6, device=CPU, fixed_shapes=True), device)
    assert found == []


def test_the_ema_is_updated_in_the_step_and_held_by_the_guards_flag():
    """The one EMA update, inside the step with the guard's device flag: with 0 the average moves
    by (1 - decay) and the running statistics are copied, with 1 nothing moves; constant buffers
    are never copied; no sync, 7 kernels (the rate from the flag: 2, the difference, its scaling,
    the add; for the statistics the flag's complement and one lerp)."""
    torch.manual_seed(0)
    live = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    live.register_buffer("constant", torch.arange(3))  # a buffer like Swin's position index
    ema = WeightEMA(live, 0.75)
    start = ema.model[0].weight.clone()
    live(torch.randn(8, 3))  # moves the running statistics
    with torch.no_grad():
        live[0].weight.add_(1.0)
        live.constant.add_(5)  # never copied: constants are constant
    held = {k: v.clone() for k, v in ema.model.state_dict().items()}
    ema.update(torch.ones(()))
    for k, v in ema.model.state_dict().items():
        assert torch.equal(v, held[k]), k  # a skipped step: the average as it was
    applied = torch.zeros(())  # the guard's flag of an applied step
    audit = StepAudit(device_tensors(live, torch.optim.SGD(live.parameters()), ema.model, [applied]))
    with audit, part("ema"):
        ema.update(applied)
    report = audit.report(1)
    assert report.syncs == [] and report.kernels["ema"] == 7
    torch.testing.assert_close(ema.model[0].weight, 0.75 * start + 0.25 * live[0].weight.detach(), rtol=0, atol=1e-6)
    assert torch.equal(ema.model[1].running_mean, live[1].running_mean)
    assert torch.equal(ema.model.constant, torch.arange(3))


# ---------------------------------------------------------------- the kernel budget


def test_the_kernel_budget_of_the_koniq_swin_t_step():
    """Swin-T HyperIQA at 224 px (the counts do not depend on the batch from 2 on: batch 2 counts what 96
    launches): the step adds almost nothing to the model, and the augmentation, guard and EMA
    stay in their budgets."""
    cfg = load_config("koniq-swin-t", ["model.pretrained=none"])
    out = step_budget(cfg, store(4, 240, 320), batch=2, device=CPU, traced=2)
    assert out["checks"] == {**{k: True for k in TARGETS}, "no_syncs": True}, out["checks"]
    assert out["A"]["parts"]["guard"] == 4 and out["A"]["parts"]["ema"] == 5 and out["A"]["parts"]["noise"] == 22
    assert out["A"]["uploads"] == 1 and out["B"]["uploads"] == 0
    # what a CUDA graph of the eager step would freeze (train.cuda_graph removes each): the learning
    # rate of the fused update, the noise's per-step host key (the eager step mixes the step on the
    # host), the upload's new tensor
    blockers = "\n".join(out["A"]["capture"]["blockers"])
    assert len(out["A"]["capture"]["blockers"]) == 3, blockers
    assert "[optimizer]" in blockers and "_fused_adamw_: takes a host number that changes every step" in blockers
    assert "[noise]" in blockers and "bitwise_xor: takes a host number that changes every step" in blockers
    assert "Tensor.to: each upload makes a new device tensor" in blockers
    # ... and the body train.cuda_graph captures has none of them, and no sync
    assert out["G"]["capture"]["blockers"] == [] and out["G"]["syncs"] == 0, out["G"]["capture"]
    assert out["G"]["parts"]["augment"] == out["A"]["parts"]["augment"]


# ---------------------------------------------------------------- capture readiness (for CUDA graphs)


def blockers_of(step, device: list[torch.Tensor], steps: int = 3) -> list[str]:
    audit = StepAudit(device, trace=True)
    with audit:
        for i in range(steps):
            audit.next_step()
            step(i)
    return capture_blockers(audit.steps_traced)


def test_capture_readiness_names_what_a_graph_would_freeze():
    """Each way a replayed graph would go wrong, found on the CPU, and its capturable form found
    ready: a Python number that changes per step in a kernel vs a device tensor written in place;
    a generator seeded per step vs one seeded once; an upload by .to() or from a new host buffer
    each step vs copy_ from one host buffer into one device buffer; a step whose kernels change."""
    w, lr = torch.ones(4), torch.zeros(())
    device = [w, lr]

    def host_lr(i):
        w.mul_(1.0 - 0.1 * i)

    def device_lr(i):
        lr.fill_(0.0)  # a constant: the schedule would write lr in place from a device step counter
        w.mul_(lr.add(1.0))

    [found] = blockers_of(host_lr, device)
    assert "test_audit.py" in found and "mul_: takes a host number that changes every step" in found
    assert "1.0 -> 0.9 -> 0.8" in found
    assert blockers_of(device_lr, device) == []

    g = torch.Generator()

    def reseeded(i):
        g.manual_seed(100 + i)
        w.add_(torch.rand(4, generator=g))

    def seeded_once(i):
        w.add_(torch.rand(4, generator=g))

    [found] = blockers_of(reseeded, device)
    assert "rand: draws from a generator seeded on the host every step" in found and "seed 101" in found
    g.manual_seed(7)
    assert blockers_of(seeded_once, device) == []

    host, static = torch.zeros(4), torch.zeros(4)
    device.append(static)
    kept = []  # alive, so each step's host tensor has its own address

    def moved(i):
        with part("host"):
            host.fill_(i)
        w.add_(host.to(CPU, non_blocking=True))

    def fresh_buffer(i):
        with part("host"):
            kept.append(torch.full((4,), float(i)))
        static.copy_(kept[-1], non_blocking=True)

    def static_buffers(i):
        with part("host"):
            host.fill_(i)
        static.copy_(host, non_blocking=True)
        w.add_(static)

    [found] = blockers_of(moved, device)
    assert "Tensor.to: each upload makes a new device tensor" in found
    [found] = blockers_of(fresh_buffer, device)
    assert "copy_: uploads from another host buffer every step" in found
    assert blockers_of(static_buffers, device) == []

    def branching(i):
        (w.add_ if i % 2 else w.sub_)(1.0)

    assert blockers_of(branching, device) == ["the step launches other kernels from one step to the next: a graph "
                                              "replays one sequence"]


# ---------------------------------------------------------------- compile that holds


def test_bench_compiles_what_train_compiles(tiny_overrides, tmp_path):
    """`train`'s session and bench's rig, both with train.compile: the model's forward and the
    training augmentation are compiled, evaluation's model too in train; nothing else."""
    from torch._dynamo.eval_frame import OptimizedModule

    cfg = load_config("demo", [*tiny_overrides, "train.compile=true", "train.compile_backend=aot_eager",
                               f"run.root={tmp_path}"])
    s = loop.start(cfg)
    r = StepRig.build(cfg, store(), "fp32", 8, CPU)
    for trainer, batches in ((s.trainer, s.batches), (r.trainer, r.batches)):
        assert isinstance(trainer.forward, OptimizedModule) and batches.augmenter._compiled is not None
    assert isinstance(s.selection.model, OptimizedModule)


def test_a_users_inductor_cache_is_honoured(monkeypatch, tmp_path):
    """The variable as the user set it before iqa_dist was imported (read then: importing timm sets
    torch's default), else beside the data cache, whatever the variable holds by now."""
    from iqa_dist.training import compile as compile_module

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torchinductor_someone"))
    monkeypatch.setattr(compile_module, "USER_INDUCTOR_CACHE", str(tmp_path / "mine"))
    assert inductor_cache(tiny_recipe(f"data.cache_dir={tmp_path}")) == tmp_path / "mine"
    monkeypatch.setattr(compile_module, "USER_INDUCTOR_CACHE", "")
    assert inductor_cache(tiny_recipe(f"data.cache_dir={tmp_path}")) == tmp_path / "inductor"
