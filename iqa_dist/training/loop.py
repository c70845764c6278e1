"""Training with Accelerate: one process, N GPUs or N nodes, the same recipe.

`train()` is the loop; everything it uses is built before it by `start()` and named helpers.
Steps (optimizer steps) are the unit of control: the schedule, evaluation and checkpoints count
them, the epoch is derived, and resuming is a single skip to the checkpoint's step. The step
itself (trainer.py) is the one `iqa-dist bench train` times; what each step trains on is
data/plan.py's.

Joint training (data.datasets): every dataset keeps its own cache, split and score scale; the
training store joins them with each row's normalised target; validation is per dataset, and the
model is selected on their weight-averaged val SRCC (or one named dataset's).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..artifacts import lock
from ..artifacts.card import ModelCard, TrainedOn
from ..artifacts.rundir import RunDir, Target
from ..config import Config, flatten
from ..data.augment import Augmenter
from ..data.cache import DataChanged
from ..data.load import Data, load_data
from ..distributed.accelerators import build_accelerator
from ..distributed.shards import Shares
from ..errors import UserError, first_line
from ..models.hyperiqa import HyperIQA, build_model, parameter_counts
from ..models.weights import provenance
from ..output import console_for
from ..scoring.metrics import METRIC_KEYS
from . import failures
from .batches import Batches, KeyedNoise, NoiseSource
from .teacher import build_teacher, changed_teachers, find_teachers, inherited, teachers_record
from .display import Display
from .graph import GraphedStep, refusal
from .guard import BadStep
from .initial import StartModel
from .optim import allreduce_bytes, group_sizes
from .preemption import PreemptionFlag
from .resume import choose
from .selection import Selection, Validation, combine
from .trainer import EagerStep, Trainer


SMALL_VAL = 30  # fewer validation images than this rank models coarsely: said at start-up


class Preempted(Exception):
    """A requeue signal arrived; a checkpoint was saved."""


@dataclass(kw_only=True)
class Run:
    """A training run's parts, built by `start`: the step's (trainer, batches) and the loop's."""

    cfg: Config
    acc: Accelerator
    trainer: Trainer  # model, optimizer, schedule, guard, EMA, the loop's counters and loss window
    batches: Batches  # step -> this process's share of the global batch, augmented on the device
    stepper: EagerStep | GraphedStep  # runs the next step (train.cuda_graph: one replayed CUDA graph)
    data: Data
    selection: Selection  # validation, model selection and export; the selected model's test split
    dir: RunDir
    target: Target  # a new run, or the one being resumed
    display: Display
    total_steps: int
    eval_every: int  # optimizer steps between evaluations
    checkpoint_every: int
    counts: dict[str, int]  # parameters: backbone, hyper, total
    window: tuple[float, int] = (0.0, 0)  # (time, step) at which the current evaluation window began


def train(cfg: Config, resume: str = "", extend: bool = False) -> Path:
    """Trains `cfg`; returns the run directory. Call under `accelerate launch` for many processes."""
    try:
        r = start(cfg, resume, extend)
    except Exception as e:  # noqa: BLE001 (named by failures.failed: a lost process, a peer's error, or ours)
        stop = failures.failed(None, cfg, None, e)
        if stop is e:  # this process's own error, before the run folder exists: as it is
            raise
        raise stop from None
    t, state = r.trainer, r.trainer.state
    with r.dir.holding(), r.dir.discard_if_unstarted(created=not r.target.resuming):  # no directory from a failed start
        try:
            begin(r)
            while state.step < r.total_steps and not state.stopped_early:
                r.stepper.step()
                r.display.step(state.step)
                if r.display.wants_line(state.step):
                    progress_line(r)
                if state.step % r.eval_every == 0 or state.step == r.total_steps:
                    evaluate_and_log(r)
                if state.step % r.checkpoint_every == 0 or state.stopped_early or state.step == r.total_steps \
                        or t.guard.preempted:
                    checkpoint(r)
            r.display.close()
            finish(r)
        except BadStep as bad:
            raise failures.non_finite(r.dir, bad) from None
        except Preempted:
            raise
        except Exception as e:  # noqa: BLE001 (named by failures.failed: a lost process, a peer's error, or ours)
            raise failures.failed(r.dir, r.cfg, r.trainer.state.step, e) from None
    return r.dir.path


def start(cfg: Config, resume: str = "", extend: bool = False) -> Run:
    """Builds everything for a run, in the order that fails fastest: the resume target, the model
    and its weights, the data, then the run directory."""
    acc = build_accelerator(cfg, Path(cfg.run.root))
    preempt = PreemptionFlag()  # first: a requeue warning may come during data preparation
    # CPU math on denormal floats is ~30% slower and trained weights produce many: flush them to
    # zero (a CPU setting; GPUs flush in their own kernels)
    torch.set_flush_denormal(True)
    console = console_for(acc.is_main_process)
    target = choose(cfg, resume, extend, acc)  # a bad --resume fails before anything is built
    try:
        return build(cfg, acc, target, preempt, console)
    except BaseException:
        if target.resuming:  # the run's writer lock, taken when this run was chosen, goes back
            lock.release(Path(target.path))
        raise


def build(cfg: Config, acc: Accelerator, target: Target, preempt: PreemptionFlag, console) -> Run:
    """start's second half: the model and its weights, the data, the trainer, the run directory."""
    if cfg.train.cuda_graph and (why := refusal(processes=acc.num_processes, device=acc.device)):
        raise UserError(why)  # before anything is built
    if cfg.train.deterministic:  # cuBLAS reads it when it makes its handle: before the first matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # identical initial weights on every process; train.deterministic: torch.use_deterministic_algorithms
    set_seed(cfg.train.seed, deterministic=cfg.train.deterministic)
    start = StartModel.find(cfg.model.init_from) if cfg.model.init_from else None
    if start is not None:  # every weight comes from the start model: no pretrained download
        start.check(cfg.model)
        model = build_model(replace(cfg.model, pretrained="none"))
        if not target.resuming:  # a resumed run's checkpoint holds its weights
            start.load_into(model)
    else:
        model = build_model(cfg.model)  # before the data: a missing weight file fails in seconds
    teachers = find_teachers(cfg, cfg.data.members()[0].dataset)  # from their cards: before the data too
    taught_by = teachers_record(teachers)  # each teacher's weights hashed once
    if target.resuming and (why := changed_teachers(RunDir(target.path).meta().get("teachers", []), taught_by)):
        raise UserError(f"--resume {target.path}: {why}")
    try:  # a resumed run's data must be the ones it began on: refused before a new cache is built
        data = load_data(cfg, acc, console, RunDir(target.path).meta().get("data") if target.resuming else None)
    except DataChanged as e:
        raise UserError(f"--resume {target.path}: {e}") from None
    shares = Shares.split(cfg.train.batch_size, cfg.train.micro_batch_size, acc.num_processes, acc.process_index)
    if cfg.optim.rank_weight > 0 and shares.accum > 1:
        raise UserError("optim.rank_weight > 0 pairs predictions across the whole global batch, which needs each "
                        "process's share in one forward: set train.micro_batch_size=0 (or raise it)")
    steps_per_epoch = data.plan.steps_per_epoch
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    eval_every = cfg.train.eval_every or steps_per_epoch
    augmenter = Augmenter(cfg.augment, cfg.model.img_size, model.mean, model.std, cfg.train.seed).to(acc.device)
    name = data.names[0]
    teacher = build_teacher(teachers, name, data.views[name].image_meta["score_range"], data.scales[name], model.mean,
                            model.std, acc.device)
    trainer = Trainer.build(cfg, model, acc, shares=shares, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                            augmenter=augmenter, preempt=preempt, console=console, teacher=teacher)
    batches = Batches(store=data.train, plan=data.plan, augmenter=augmenter, shares=shares, device=acc.device,
                      rank_weight=cfg.optim.rank_weight,
                      noise=KeyedNoise(cfg.train.seed, model.noise_width, shares.batch_size, acc.device))
    # before the run directory, as every refusal that can be decided now (GraphedStep refuses a
    # training set that is not resident on the GPU)
    stepper = (GraphedStep(trainer, batches, capture=True) if cfg.train.cuda_graph
               else EagerStep(trainer, batches))
    weights, groups = (start.provenance() if start else provenance(cfg.model)), group_sizes(trainer.optimizer)
    card = model_card(cfg, data, model, weights, groups)
    images, unknown = inherited(teachers, start)  # what a start model or a teacher trained on is the student's too
    if unknown:
        card = replace(card, unknown_training=unknown)
    run = RunDir.open(cfg, target, acc, {"weights": weights, "parameter_groups": groups, "data": data.fingerprint(),
                                         "effective_lr": {**cfg.group_lrs(), "warmup_steps": cfg.effective_warmup()},
                                         **({"teachers": taught_by} if teachers else {})},
                      legacy_data=data.legacy_fingerprint())
    selection = Selection(cfg=cfg, acc=acc, trainer=trainer, data=data, card=card, augmenter=augmenter, run=run,
                          batch=cfg.train.eval_batch_size or 2 * math.ceil(shares.per_process / shares.accum),
                          console=console, inherited_images=images)
    return Run(cfg=cfg, acc=acc, trainer=trainer, batches=batches, stepper=stepper, data=data, selection=selection,
               dir=run, target=target, display=Display(console, total_steps, steps_per_epoch, cfg.train.log_every),
               total_steps=total_steps, eval_every=eval_every,
               checkpoint_every=cfg.train.checkpoint_every or eval_every, counts=parameter_counts(model))


def begin(r: Run) -> None:
    """The checkpointed state registered (and restored when resuming), the start-up lines, the
    trackers; from here on Ctrl-C checkpoints."""
    t, acc, cfg = r.trainer, r.acc, r.cfg
    # Accelerate saves custom objects by position (custom_checkpoint_0, _1, _2): the Augmenter has no
    # state any more (its draws are functions of the step) but keeps its slot, so the EMA stays
    # custom_checkpoint_2 and the checkpoints of earlier runs still load
    acc.register_for_checkpointing(t.state, r.batches.augmenter, *([t.ema] if t.ema else []))
    # dropout and drop path draw from KeyedNoise, keyed by sample; only a layer it does not
    # reach (none in the presets) would draw from torch's generator, seeded per process
    set_seed(cfg.train.seed, device_specific=True)
    if r.target.resuming:
        restore(r)
    t.state.world_size = acc.num_processes
    t.model.train()  # evaluation sets eval mode on its own forward and restores the mode after
    print_start(r)
    if cfg.run.log_with:
        acc.init_trackers(r.dir.path.name, config={k: str(v) for k, v in flatten(cfg.to_dict()).items()})
    t.guard.preempt.interrupts(announce=acc.is_main_process)
    r.window = (time.time(), t.state.step)


def model_card(cfg: Config, data: Data, model: HyperIQA, weights: dict, groups: dict) -> ModelCard:
    """The card every exported model of this run carries (step, val and averaging filled at export)."""
    trained_on = {name: TrainedOn(asdict(m), list(data.views[name].image_meta["score_range"]),
                                  data.views[name].image_meta["resize"], data.scales[name], w)
                  for name, m, w in zip(data.names, cfg.data.members(), data.weights)}
    return ModelCard(model={**asdict(cfg.model), "pretrained": "none", "init_from": ""}, datasets=trained_on,
                     protocol=cfg.data.test_protocol, test_patch_num=cfg.data.test_patch_num,
                     mean=list(model.mean), std=list(model.std), weights=weights, groups=groups)


def restore(r: Run) -> None:
    """Loads the latest checkpoint: weights, optimizer, schedule, EMA, the loop's state (the draws are
    functions of the step: no generator state is needed, so another process count may resume it)."""
    acc, run, state, target = r.acc, r.dir, r.trainer.state, r.target
    checkpoint = run.latest_checkpoint()
    try:
        acc.load_state(str(checkpoint))
    except Exception as e:  # a damaged file (a full disk, a copy cut short): say which, and the way out
        raise UserError(f"--resume: checkpoint {checkpoint} cannot be read ({type(e).__name__}: "
                        f"{first_line(e)}); move that folder away to resume from "
                        "the checkpoint before it") from None
    inner = getattr(r.trainer.optimizer, "optimizer", r.trainer.optimizer)
    for group in inner.param_groups:  # a train.cuda_graph checkpoint holds device-tensor rates: numbers again
        group["lr"] = float(group["lr"])  # (a graphed step makes its own device tensors at its first step)
    if not acc.is_main_process:  # the checkpoint holds the global window sums (LossMeter.consolidate)
        state.loss.reset()
    if target.extended:
        state.stopped_early = False  # a longer schedule (or patience) continues past the old end
    notes = list(target.extended)
    if state.noise_stream == "generator":  # begun before the keyed stream: it keeps its own numbers
        if r.cfg.train.cuda_graph:
            raise UserError(f"--resume {run.path}: this run began before dropout and drop path were keyed for "
                            "train.cuda_graph (it draws them from a generator): continue it without "
                            "train.cuda_graph")
        r.batches.noise = NoiseSource(r.cfg.train.seed, r.trainer.bare.noise_width, r.batches.shares.batch_size,
                                      acc.device)
        notes.append("dropout and drop path from the generator stream it began with")
    run.truncate_metrics(state.step)
    if state.world_size and state.world_size != acc.num_processes:  # nothing the run needs is per process
        notes.append(f"on {acc.num_processes} process(es) instead of {state.world_size}: the same global batches, "
                     "augmentations and regularisers, so the run continues as it would have")
    acc.print(f"resumed {run.path} at step {state.step}" + (f" ({'; '.join(notes)})" if notes else ""))


def print_start(r: Run) -> None:
    """The start-up lines: what is trained, from which weights, on what, with which batch."""
    acc, cfg, data, counts, shares = r.acc, r.cfg, r.data, r.counts, r.batches.shares
    weights, groups = r.selection.card.weights, r.selection.card.groups
    sha = f", sha256 {weights['sha256'][:12]}" if weights.get("sha256") else ""
    lrs = cfg.group_lrs()
    acc.print(f"parameters: backbone {counts['backbone'] / 1e6:.2f}M + head {counts['hyper'] / 1e6:.2f}M = "
              f"{counts['total'] / 1e6:.2f}M; model {cfg.model.backbone}, weights: {weights['source']} "
              f"{weights['tag']}{sha}")
    acc.print(f"optimizer: {cfg.optim.optimizer}; groups: " + ", ".join(
        f"{name} {n / 1e6:.2f}M at lr {lrs[name]:.2e}" for name, n in groups.items())
        + f" (LDA with the {cfg.optim.lda_group})" + (f"; weight EMA {cfg.train.ema_decay}" if cfg.train.ema_decay else "")
        + (f"; self-distillation from it, weight {cfg.optim.distill_weight}" if cfg.optim.distill_weight else "")
        + (f"; taught by {', '.join(map(str, cfg.optim.teachers))}, weight {cfg.optim.teacher_weight}"
           if cfg.optim.teachers else ""))
    if len(data.names) > 1:
        share = [w / sum(data.weights) for w in data.weights]
        acc.print("joint training: " + ", ".join(
            f"{name} {p:.0%} of each batch (targets {data.scales[name].kind}: shift {data.scales[name].shift:.4g}, "
            f"scale {data.scales[name].scale:.4g})" for name, p in zip(data.names, share))
            + f"; selection on {cfg.train.select_on or 'the weighted mean'} val SRCC")
    procs = f"{acc.num_processes} process{'es' if acc.num_processes > 1 else ''}"
    per = shares.per_process / shares.accum
    scaled = (f" (optim.lr_scaling {cfg.optim.lr_scaling}: lr x {cfg.lr_factor():.3g} for batch {cfg.train.batch_size} vs "
              f"{cfg.optim.base_batch}, warmup {cfg.effective_warmup()} steps)" if cfg.optim.lr_scaling != "none" else "")
    acc.print(f"{procs}, precision {acc.mixed_precision if acc.mixed_precision != 'no' else 'fp32'}; batch "
              f"{cfg.train.batch_size} patches per step = {acc.num_processes} process(es) x {shares.accum} "
              f"micro-batch(es) x {per:.3g} patches{scaled}; {r.total_steps} steps ({data.plan.steps_per_epoch} per epoch); "
              f"run {r.dir.path}")
    n_val = sum(v.meta["counts"]["val"] for v in data.views.values())
    if n_val < SMALL_VAL:
        acc.print(f"warning: {n_val} validation images: SRCC over so few takes few values and ties often (selection "
                  f"then takes the higher val PLCC, then the lower RMSE); data.val_fraction (now "
                  f"{cfg.data.val_fraction}) holds out more")
    if acc.num_processes > 1:
        acc.print(f"all-reduce: {allreduce_bytes(counts['total'], cfg) / 1e6:.1f} MB of gradients per optimizer step "
                  f"({'bf16' if cfg.train.grad_compression == 'bf16' else 'fp32'}), once per step whatever the "
                  f"accumulation")


def progress_line(r: Run) -> None:
    """The host reads of the step's results (stopping on a bad step) and the progress line, whose
    loss is the window's mean over every process's patches (the one the evaluation line logs)."""
    r.trainer.settle()
    total, n = r.trainer.state.loss.reduce(r.acc)
    r.display.line(r.trainer.state.step, total / max(1, n), r.trainer.lr())


def evaluate_and_log(r: Run) -> None:
    """Validation, model selection, a metrics.jsonl line (and the tracker's), the table."""
    progress_line(r)
    r.display.evaluating(sum(v.meta["counts"]["val"] for v in r.data.views.values()))
    v = r.selection.validate()
    record = log_record(r, v, r.selection.track_test(v))
    r.dir.log(record)
    if r.cfg.run.log_with:
        r.acc.log({k: x for k, x in record.items() if isinstance(x, (int, float))}, step=record["step"])
    joint = len(v.per_dataset) > 1
    r.display.evaluation(record, r.trainer.state, v.per_dataset if joint else None,
                         v.ema_per_dataset if joint else None)
    r.trainer.state.loss.reset()
    r.window = (time.time(), r.trainer.state.step)


def checkpoint(r: Run) -> None:
    """Every process saves together; a requested stop (preemption) then ends the launch."""
    progress_line(r)
    state = r.trainer.state
    state.loss.consolidate(r.acc)
    r.dir.save_checkpoint(state.step, r.cfg.train.keep_checkpoints)
    if r.trainer.guard.preempted and state.step < r.total_steps and not state.stopped_early:
        r.display.close()
        r.dir.record_end(f"stopped: preempted at step {state.step}")
        raise Preempted(f"preempted at step {state.step}: checkpoint saved in {r.dir.path}; relaunch to resume")


def finish(r: Run) -> None:
    """The selected model on each test split, once; the summary."""
    test, per_dataset = r.selection.test_selected()
    summary = summarize(r, test, per_dataset)
    r.dir.write_summary(summary)
    r.display.summary(summary, r.dir.path)
    r.acc.end_training()


def log_record(r: Run, v: Validation, test: dict[str, dict] | None = None) -> dict:
    """One metrics.jsonl line; the train loss is the mean over every process's patches. val_* is
    the weights' selection metric set (the only dataset's, or the combination); joint runs add
    val_<dataset>_*; with an EMA, ema_val_* (and ema_val_<dataset>_*) and which of the two was better
    (`val_from`)."""
    state = r.trainer.state
    total, n = state.loss.reduce(r.acc)
    t0, step0 = r.window
    seconds = time.time() - t0
    state.train_seconds += seconds
    record = {
        "step": state.step,
        "epoch": round(state.step / r.data.plan.steps_per_epoch, 4),
        "train_loss": total / max(1, n),
        "lr": r.trainer.lr(),
        "grad_norm": float(r.trainer.norm),
        **{f"val_{k}": x for k, x in v.val.items()},
    }
    joint = len(v.per_dataset) > 1
    if joint:
        record.update({f"val_{name}_{k}": x for name, m in v.per_dataset.items() for k, x in m.items()})
    if v.ema_val is not None:
        record.update({f"ema_val_{k}": x for k, x in v.ema_val.items()})
        if joint:
            record.update({f"ema_val_{name}_{k}": x for name, m in v.ema_per_dataset.items() for k, x in m.items()})
        record["val_from"] = v.chosen
    if test is not None:  # train.track_test: never read by selection
        record.update({f"test_{k}": x for k, x in combine(test, r.data.weights, r.cfg.train.select_on).items()})
        if joint:
            record.update({f"test_{name}_{k}": x for name, m in test.items() for k, x in m.items()})
    record["patches_per_s"] = round((state.step - step0) * r.data.plan.batch_size / max(seconds, 1e-9), 1)
    record["elapsed_s"] = round(state.train_seconds, 1)
    return record


def summarize(r: Run, test: dict, per_dataset: dict[str, dict]) -> dict:
    """summary.json: the selected step's val figures, the test figures, the run's extent and speed."""
    state = r.trainer.state
    lines = r.dir.metrics() if r.acc.is_main_process else []
    best = next((row for row in lines if row["step"] == state.best_step), {})
    prefix = "ema_val_" if best.get("val_from") == "ema" else "val_"  # the exported weights' own figures
    val = {k: best.get(f"{prefix}{k}") for k in METRIC_KEYS} if best else {}
    rate = [row["patches_per_s"] for row in lines]
    steps_per_epoch = r.data.plan.steps_per_epoch
    summary = {
        "val": val,
        "test": test,
        "best_step": state.best_step,
        "best_epoch": round(state.best_step / steps_per_epoch, 2),
        "epochs_run": round(state.step / steps_per_epoch, 2),
        "steps_run": state.step,
        "stopped_early": state.stopped_early,
        "train_seconds": round(state.train_seconds, 1),
        "patches_per_s": round(float(np.median(rate)), 1) if rate else None,
        "world_size": r.acc.num_processes,
        "images": {name: view.meta["counts"] for name, view in r.data.views.items()}
        if len(r.data.views) > 1 else next(iter(r.data.views.values())).meta["counts"],
        "parameters": r.counts,
    }
    if best.get("val_from"):
        summary["weights_from"] = best["val_from"]
    tracked = [row for row in lines if row.get("test_srcc") is not None]
    if tracked:  # train.track_test: the best test figure over evaluations, which selection never saw
        top = max(tracked, key=lambda row: row["test_srcc"])
        summary["test_selected_on_test"] = {
            "srcc": top["test_srcc"], "plcc": top["test_plcc"], "step": top["step"], "epoch": top["epoch"],
            "note": "selected on test (optimistic, as the HyperIQA code and phase one reported); quote 'test'"}
    if len(per_dataset) > 1:  # the exported weights' own figures, as for the combined val above
        summary["datasets"] = {name: {"val": {k: best.get(f"{prefix}{name}_{k}") for k in METRIC_KEYS}, "test": m}
                               for name, m in per_dataset.items()}
    return summary
