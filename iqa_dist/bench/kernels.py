"""The kernel budget of a training step: what it would launch on a GPU, and whether it would ever
wait for one, counted by `audit.StepAudit` on any device (the CPU included).

- A: the step `iqa-dist train` runs (`Batches.get` + `Trainer.step`: plan, one upload, device
  crop/flip/ColorJitter/normalise, forward, loss, backward, clipping, guard, fused update, EMA);
- B: the same `Trainer.step` on a batch already on the device (model only);
- C: timm's plain classifier of the backbone (bench's anchor): the model alone, trained plainly.

Counts per step are exact and do not depend on the batch size or the data (static shapes), so a
small batch counts what a large one launches. The targets (eager, the koniq-swin-t recipe with
train.ema_decay on): A/B <= 1.10 with the augmentation <= 90 kernels; B/C <= 1.17 (the HyperIQA
head's own kernels: the step adds almost nothing to the model); the guard <= 4 kernels; the EMA
one foreach kernel; no sync anywhere. With self-distillation (optim.distill_weight) the teacher's
forward is counted as its own part and left out of B/C, and the EMA, updated inside the step, has
5 kernels. With train.compile the augmentation becomes inductor's few
fused kernels: `step_budget` on a compiling config counts the step eager (inductor's kernels are
opaque to the dispatcher) and reports how many kernels inductor generates for the augmentation.
A is also traced for capture readiness: what one CUDA graph of the step would freeze; and G, the
body that train.cuda_graph captures, is counted and traced the same way (it must have no blocker).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

from ..config import Config
from ..data.augment import Augmenter
from ..data.store import ImageStore
from ..training.graph import GraphedStep
from .audit import StepAudit, capture_blockers
from .inputs import koniq_step
from .rig import AnchorRig, StepRig


def bench_kernels(cfg: Config, backbone: str, compiled: bool, n_images: int, batch: int, steps: int,
                  device: torch.device, work: Path, console: Console) -> dict:
    """The kernel budget of the koniq-swin-t step with `backbone` (counted at batch 2: the counts do
    not depend on the batch), and on a GPU `steps` real steps at `batch` under the sync check."""
    c, store = koniq_step(cfg, backbone, n_images, work, device, f"train.compile={str(compiled).lower()}")
    console.print(f"kernels: {backbone}, compile={compiled}: counting A, B and C", highlight=False)
    out = step_budget(c, store, 2, device, precision="fp32" if device.type == "cpu" else "bf16")
    out["backbone"] = backbone
    if device.type == "cuda":
        out["sync_debug"] = sync_debug(c, store, batch, steps, device)
    return out


def sync_debug(c: Config, store, batch: int, steps: int, device: torch.device) -> dict:
    """`steps` real steps (`Batches.get` + `Trainer.step`) under torch.cuda.set_sync_debug_mode("error"),
    after two warm-up steps: "passed", or the first synchronisation's error."""
    rig = StepRig.build(replace(c, train=replace(c.train, ema_decay=c.train.ema_decay or 0.999)), store, "bf16",
                        batch, device)
    for _ in range(2):
        rig.end_to_end()
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            rig.end_to_end()
        result = {"steps": steps, "batch": batch, "passed": True}
    except RuntimeError as e:
        result = {"steps": steps, "batch": batch, "passed": False, "error": str(e).splitlines()[0][:300]}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rig.trainer.settle()
    return result


# A over B: the augmentation (80) and the regularisers' keyed uniforms (22: one lowbias32 hash of the
# (B, width) matrix, since the eager step reads the stream a graphed step must; 1.10 held with one
# generator kernel); the EMA: updated in the step under the guard's flag (the flag's rate 2, sub, mul, add)
TARGETS = {"a_over_b": 1.12, "b_over_c": 1.17, "augment": 90, "guard": 4, "ema": 5}


def count(run, tensors, steps: int, warmup: int = 1) -> dict:
    """Per-step counts of `run()` after `warmup` calls (the first steps create optimizer state, and
    compile under train.compile); `tensors()` lists what is on the device before the audit."""
    for _ in range(warmup):
        run()
    audit = StepAudit(tensors())
    with audit:
        for _ in range(steps):
            run()
    report = audit.report(steps)
    return {**report.per_step(), "findings": [str(f) for f in report.syncs],
            "top": {p: report.top(p) for p in report.kernels}}


def capture_readiness(run, tensors, steps: int = 3) -> dict:
    """What would stop `run()` (one step, after the warm-up `count` did) from being captured as one
    CUDA graph and replayed: `audit.capture_blockers` over `steps` traced steps."""
    audit = StepAudit(tensors(), trace=True)
    with audit:
        for _ in range(steps):
            audit.next_step()
            run()
    return {"steps": steps, "blockers": capture_blockers(audit.steps_traced)}


def graphed_body(cfg: Config, store: ImageStore, batch: int, device: torch.device, precision: str,
                 steps: int = 3) -> dict:
    """G: the body train.cuda_graph captures (`GraphedStep.body`: augmentation, keyed noise, the
    step, the latched guard), counted and traced over `steps` steps after two warm-up steps, its
    numbers written before each (outside the graph, as a replay has them)."""
    rig = StepRig.build(cfg, store, precision, batch, device)
    g = GraphedStep(rig.trainer, rig.batches, capture=False)
    for _ in range(2):
        g.step()
    audit = StepAudit([*rig.device_tensors(), *g.static_tensors()], trace=True)
    for _ in range(steps):
        s = rig.trainer.state.step
        g.write(s)
        with audit:
            audit.next_step()
            loss, norm = g.body()
        g.finish(s, loss, norm)
    rig.trainer.settle()
    report = audit.report(steps)
    return {**report.per_step(), "findings": [str(f) for f in report.syncs],
            "capture": {"steps": steps, "blockers": capture_blockers(audit.steps_traced)}}


def step_budget(cfg: Config, store: ImageStore, batch: int, device: torch.device, steps: int = 1,
                precision: str = "fp32", traced: int = 3) -> dict:
    """A, B and C of `cfg` (counted with its weight EMA on), their ratios and the targets' verdicts;
    A's and G's capture readiness over `traced` steps (two show a per-step host number)."""
    compiled = cfg.train.compile and cfg.train.compile_backend == "inductor"
    # counted eager (inductor's kernels are opaque to the dispatcher), with an EMA to count
    cfg = replace(cfg, train=replace(cfg.train, ema_decay=cfg.train.ema_decay or 0.999, compile=False))
    rig = StepRig.build(cfg, store, precision, batch, device)
    generated = augmentation_kernels(rig) if compiled else None
    a = count(rig.end_to_end, rig.device_tensors, steps, warmup=2)
    a["capture"] = capture_readiness(rig.end_to_end, rig.device_tensors, traced)
    b = count(rig.model_only, rig.device_tensors, steps)
    g = graphed_body(cfg, store, batch, device, precision, traced)
    anchor = AnchorRig(cfg, precision, batch, device)
    c = count(anchor.step, anchor.device_tensors, steps)
    teacher = b["parts"].get("teacher", 0.0)  # self-distillation's teacher forward: its own figure, not the head's
    ratios = {"a_over_b": a["kernels"] / b["kernels"], "b_over_c": (b["kernels"] - teacher) / c["kernels"]}
    parts = {"augment": a["parts"].get("augment", 0.0), "guard": a["parts"].get("guard", 0.0),
             "ema": a["parts"].get("ema", 0.0)}
    targets = TARGETS
    checks = {k: (ratios | parts)[k] <= v for k, v in targets.items()}
    checks["no_syncs"] = a["syncs"] == b["syncs"] == c["syncs"] == 0
    out = {"A": a, "B": b, "C": c, "G": g, **ratios, "targets": targets, "checks": checks, "batch": batch, "teacher": teacher,
           "compile": compiled, "backbone": cfg.model.backbone, "img_size": cfg.model.img_size}
    if generated is not None:
        out["augment_inductor_kernels"] = generated
    return out


def augmentation_kernels(rig: StepRig) -> int:
    """The kernels inductor generates for the training augmentation under train.compile, compiled
    here on its own (afresh: a cached graph would generate none), the model left eager."""
    from torch._inductor import config, metrics  # inductor counts the kernels it generates only there

    augmenter = Augmenter(rig.cfg.augment, rig.cfg.model.img_size, rig.batches.augmenter.mean.tolist(),
                          rig.batches.augmenter.std.tolist(), 0).to(rig.acc.device)
    augmenter.compile("inductor")
    before = metrics.generated_kernel_count
    with config.patch(fx_graph_cache=False):
        replace(rig.batches, augmenter=augmenter).get(0)
    return metrics.generated_kernel_count - before
