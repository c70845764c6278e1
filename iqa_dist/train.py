"""Training with Accelerate: one process, N GPUs or N nodes, the same recipe.

`train()` is the loop; everything it uses is built before it by `start()` and named helpers.
Steps (optimizer steps) are the unit of control: the schedule, evaluation and checkpoints count
them, the epoch is derived, and resuming is a single skip to the checkpoint's step. The step
itself (step.py) is the one `iqa-dist bench train` times; what each step trains on is plan.py's.

Joint training (data.datasets): every dataset keeps its own cache, split and score scale; the
training store joins them with each row's normalised target; validation is per dataset, and the
model is selected on their weight-averaged val SRCC (or one named dataset's).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (DDPCommunicationHookType, DistributedDataParallelKwargs, InitProcessGroupKwargs,
                               is_tensorboard_available, is_wandb_available, set_seed)
from rich.console import Console
from safetensors.torch import load_file
from torch import nn

from .augment import Augmenter
from .cache import cache_root, describe, prepare
from .card import WEIGHTS_FILE, ModelCard, Scale, TrainedOn
from .config import Config
from .errors import UserError
from .evaluate import evaluate_split, shard
from .metrics import METRIC_KEYS
from .model import HyperIQA, build_model, parameter_counts
from .optim import WeightEMA, build_optimizer, build_schedule, group_sizes
from .output import Display, console_for
from .plan import BatchPlan, JointPlan, Shares
from .rundir import RunDir, Target
from .step import BadStep, NoiseSource, PreemptionFlag, StepGuard, next_batch, train_step
from .store import EvalSet, ImageStore, View
from .weights import provenance


class NonFiniteLoss(UserError):
    exit_code = 3


class Preempted(Exception):
    """A requeue signal arrived; a checkpoint was saved."""


# ---------------------------------------------------------------- what the loop iterates over


@dataclass
class TrainState:
    """The loop's own state, checkpointed with the model (register_for_checkpointing)."""

    step: int = 0
    best_srcc: float = -math.inf
    best_step: int = 0
    bad_evals: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    window_loss: float = 0.0  # this process's summed loss since the last evaluation (flushed from the device)
    window_n: int = 0  # ... over this many patches
    world_size: int = 0  # processes that wrote the checkpoint (0: a checkpoint from before it was recorded)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def update_best(state: TrainState, srcc: float, patience: int) -> bool:
    """Model selection and early stopping after an evaluation at state.step: True when this is a
    new best (exported). The first evaluation always is; a non-finite SRCC never improves."""
    srcc = srcc if math.isfinite(srcc) else -math.inf
    best = srcc > state.best_srcc or state.best_step == 0
    if best:
        state.best_srcc, state.best_step, state.bad_evals = srcc, state.step, 0
    else:
        state.bad_evals += 1
    state.stopped_early = 0 < patience <= state.bad_evals
    return best


@dataclass
class Data:
    names: list[str]  # the datasets trained on, in data.datasets order (one without joint training)
    weights: list[float]  # their shares of each global batch
    views: dict[str, View]  # each dataset's prepared cache and split
    train: ImageStore  # every training image (or cached patch strip), joined, device-resident when possible
    val: dict[str, EvalSet]  # this process's shard of each dataset's validation images
    scales: dict[str, Scale]  # each dataset's score -> target map, fitted on its training split
    plan: BatchPlan | JointPlan

    def fingerprint(self) -> dict[str, str]:
        """Each dataset's cache folder: image cache / view, both content hashes (recorded in meta.json)."""
        return {name: f"{v.path.parent.parent.name}/{v.path.name}" for name, v in self.views.items()}


# ---------------------------------------------------------------- helpers built before the loop


def build_accelerator(cfg: Config, run_root: Path) -> Accelerator:
    """Precision from the preset (or from `accelerate launch` with train.mixed_precision=launcher).
    DDP: gradient buckets are views of the gradients (no copy in or out of the buckets), a static
    graph (HyperIQA uses every parameter every step, so DDP can plan its all-reduces once), and
    optionally bf16 all-reduces (half the bytes on the wire; the average is then bf16-rounded)."""
    precision = None if cfg.train.mixed_precision == "launcher" else cfg.train.mixed_precision
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    if cfg.run.log_with and not available[cfg.run.log_with]():  # Accelerate would only warn
        raise UserError(f"run.log_with={cfg.run.log_with}: the {cfg.run.log_with} package is not installed "
                        f"(pip install {cfg.run.log_with}); without it the run would log nothing there")
    hook = DDPCommunicationHookType.BF16 if cfg.train.grad_compression == "bf16" else DDPCommunicationHookType.NO
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # without GPUs, several processes need cpu=True to use gloo
        mixed_precision=precision,
        step_scheduler_with_optimizer=False,  # we step the schedule once per optimizer step, not per process
        log_with=cfg.run.log_with or None,
        project_dir=str(run_root),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.timeout_s)),
                         DistributedDataParallelKwargs(gradient_as_bucket_view=True, static_graph=static_graph(cfg),
                                                       comm_hook=hook)],
    )


def static_graph(cfg: Config) -> bool:
    """DDP's static graph, except with gradient accumulation: static_graph and no_sync() do not
    mix in DDP (a crash, or gradients silently no longer all-reduced: pytorch/pytorch#187732,
    huggingface/accelerate#3679)."""
    return cfg.train.static_graph and cfg.train.micro_batch_size == 0


def resident_device(cfg: Config, nbytes: int, device: torch.device) -> torch.device:
    """Where the training pixels live: the device when they fit in half of its free memory."""
    if cfg.data.resident == "host" or device.type != "cuda":
        return torch.device("cpu") if cfg.data.resident == "host" else device
    if cfg.data.resident == "device":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes < free // 2 else torch.device("cpu")


def load_data(cfg: Config, acc: Accelerator, console: Console) -> Data:
    """Every dataset trained on: prepared (cached, split), its training rows joined into one store
    with their normalised targets, its validation images sharded over the processes."""
    # every process calls prepare: a file lock lets one build while the others wait (no
    # collective, whose timeout a first build of a large dataset could exceed)
    members = cfg.data.members()
    views, stores, targets, val, scales = {}, [], [], {}, {}
    cached = cfg.data.train_patches == "cached"
    for m in members:
        view = prepare(replace(cfg, data=m), console)
        acc.print(describe(view))
        if not len(view.ids("train")):
            raise UserError(f"{m.dataset}: data.split=all keeps every image for evaluation; training needs a train split")
        store = view.patch_store() if cached else view.image_store("train")
        scales[m.dataset] = Scale.fit(cfg.data.score_norm, view.scores()[view.ids("train")])
        stores.append(store)
        targets.append(scales[m.dataset].to_target(store.scores))
        val[m.dataset] = view.eval_set("val", m.test_protocol, m.test_patch_num, cfg.model.img_size,
                                       shard(len(view.ids("val")), acc.num_processes, acc.process_index))
        views[m.dataset] = view
    train = ImageStore.join(stores, targets) if len(stores) > 1 else replace(stores[0], targets=targets[0].float())
    train = train.to(resident_device(cfg, train.nbytes, acc.device))
    d, weights = cfg.data, cfg.data.weights()
    plan = (JointPlan([len(s) for s in stores], weights, d.train_patch_num, cfg.train.batch_size, cfg.train.seed)
            if len(stores) > 1 else
            BatchPlan(len(train), d.train_patch_num, cfg.train.batch_size, cfg.train.seed,
                      d.cached_patch_num if cached else 0))
    return Data([m.dataset for m in members], weights, views, train, val, scales, plan)


def model_card(cfg: Config, data: Data, model: HyperIQA, weights: dict, groups: dict) -> ModelCard:
    """The card every exported model of this run carries (step, val and averaging filled at export)."""
    trained_on = {name: TrainedOn(asdict(m), list(data.views[name].image_meta["score_range"]),
                                  data.views[name].image_meta["resize"], data.scales[name], w)
                  for name, m, w in zip(data.names, cfg.data.members(), data.weights)}
    return ModelCard(model={**asdict(cfg.model), "pretrained": "none"}, datasets=trained_on,
                     protocol=cfg.data.test_protocol, test_patch_num=cfg.data.test_patch_num,
                     mean=list(model.mean), std=list(model.std), weights=weights, groups=groups)


def stop_non_finite(s: "Session", bad: BadStep) -> None:
    """Every process stops before any update from the bad step; the state from before it (weights,
    moments, schedule, EMA: the guard applied nothing of it; the loop's counters rolled back) is
    kept for debugging."""
    s.state.window_n -= (s.state.step - bad.step) * sum(sl.stop - sl.start for sl in s.shares.slices())
    s.state.step = bad.step
    debug = s.run.path / f"debug-step-{bad.step:08d}"
    s.acc.save_state(str(debug))
    raise NonFiniteLoss(f"non-finite {bad.what} at step {bad.step}; no optimizer step was taken from it and "
                        f"training stopped; the weights and optimizer state from before it are kept in {debug}")


def inductor_cache(cfg: Config) -> Path:
    """Where compiled kernels are cached: $TORCHINDUCTOR_CACHE_DIR when the user set it, else beside
    the data cache (a shared file system on a cluster), so a second run or a resumed one reuses them
    instead of compiling again. Set before every torch.compile call: inductor reads it when it
    compiles. Importing torch's compiler already sets the variable to torch's own default (a
    per-user temp folder), so that value counts as unset."""
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        torch_default = default_cache_dir()
    except ImportError:  # another torch layout: take the variable as given
        torch_default = None
    if not given or given == torch_default:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root(cfg) / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compile_step(model, augmenter: Augmenter, cfg: Config, console: Console):
    """What train.compile compiles for a training step, in `train` and `bench train` alike: the
    training augmentation (a few fused kernels) and the model. Returns the model to call."""
    if cfg.train.compile:
        inductor_cache(cfg)
        augmenter.compile(cfg.train.compile_backend)
    return maybe_compile(model, cfg, console)


def maybe_compile(model, cfg: Config, console: Console, what: str = "training"):
    """torch.compile of a model (train.compile), the kernels cached by `inductor_cache`. The first
    call's time (the compilation) is printed."""
    if not cfg.train.compile:
        return model
    inductor_cache(cfg)
    mode = None if cfg.train.compile_mode == "default" else cfg.train.compile_mode
    compiled = torch.compile(model, mode=mode, backend=cfg.train.compile_backend)
    started: list[float] = []

    def before(module, args) -> None:
        started.append(time.perf_counter())

    def after(module, args, output) -> None:
        console.print(f"torch.compile ({what}): the first forward took {time.perf_counter() - started[0]:.1f} s "
                      f"(compiling; kernels cached in {os.environ['TORCHINDUCTOR_CACHE_DIR']})", highlight=False)
        hooks[0].remove()
        hooks[1].remove()

    hooks = [compiled.register_forward_pre_hook(before), compiled.register_forward_hook(after)]
    return compiled


class OwnForward(nn.Module):
    """A model's own forward, without the mixed-precision wrapper Accelerate puts on the prepared
    instance: training-time evaluation then scores in the model card's `eval_precision` (fp32), as
    `evaluate` and `predict` do, whatever the training precision."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return type(self.model).forward(self.model, x)


def evaluate_all(model, images: dict[str, EvalSet], card: ModelCard, s: "Session") -> dict[str, dict]:
    """Metrics per dataset, each on its own score scale."""
    return {name: {k: r[k] for k in METRIC_KEYS} for name, r in (
        (name, evaluate_split(model, evalset, s.augmenter, s.eval_batch, s.acc, card.scale(name).to_score,
                              s.cfg.train.compile)) for name, evalset in images.items())}


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


@dataclass
class Validation:
    """One evaluation of the weights (and of their EMA) on every dataset's val split."""

    val: dict  # the weights' selection metrics (the only dataset's, or the combination)
    per_dataset: dict[str, dict]  # the weights', per dataset
    ema_val: dict | None = None  # the EMA's selection metrics (train.ema_decay)
    ema_per_dataset: dict[str, dict] | None = None  # the EMA's, per dataset
    chosen: str = "raw"  # which of the two was better on val: raw | ema


def evaluate_and_select(s: "Session") -> Validation:
    """Validation of the weights (and of their EMA); the better of the two, when it is a new best
    (val SRCC), is exported as the run's model."""
    cfg, acc = s.cfg, s.acc
    per_dataset = evaluate_all(s.eval_model, s.data.val, s.card, s)
    v = Validation(combine(per_dataset, s.data.weights, cfg.train.select_on), per_dataset)
    chosen_val, chosen_model = v.val, s.bare
    if s.ema is not None:  # never prepared: its forward is its own, as the weights' evaluation is
        v.ema_per_dataset = evaluate_all(s.ema.model, s.data.val, s.card, s)
        v.ema_val = combine(v.ema_per_dataset, s.data.weights, cfg.train.select_on)
        if _score(v.ema_val) > _score(v.val):
            v.chosen, chosen_val, chosen_model = "ema", v.ema_val, s.ema.model
    if update_best(s.state, chosen_val["srcc"], cfg.train.patience):
        exported = replace(s.card, step=s.state.step, val=chosen_val, averaged=v.chosen)
        train_images = {name: {"names": view.names(view.ids("train")), "groups": view.groups(view.ids("train"))}
                        for name, view in s.data.views.items()} if acc.is_main_process else {}
        s.run.export_model(chosen_model.state_dict(), exported, train_images)
    return v


def _score(metrics: dict) -> float:
    return metrics["srcc"] if math.isfinite(metrics["srcc"]) else -math.inf


def test_images(s: "Session") -> dict[str, EvalSet]:
    """Each dataset's test split, this process's shard (built once: train.track_test reuses it)."""
    if s.test is None:
        s.test = {name: view.eval_set("test", m.test_protocol, m.test_patch_num, s.cfg.model.img_size,
                                      shard(len(view.ids("test")), s.acc.num_processes, s.acc.process_index))
                  for (name, view), m in zip(s.data.views.items(), s.cfg.data.members())}
    return s.test


def test_selected(s: "Session") -> tuple[dict, dict[str, dict]]:
    """Loads the selected weights and evaluates each dataset's test split once."""
    s.acc.wait_for_everyone()
    s.bare.load_state_dict(load_file(str(s.run.model_dir / WEIGHTS_FILE)))
    per_dataset = evaluate_all(s.eval_model, test_images(s), s.card, s)
    return combine(per_dataset, s.data.weights, s.cfg.train.select_on), per_dataset


def track_test(s: "Session", v: Validation) -> dict[str, dict] | None:
    """train.track_test: the test split scored with the weights this evaluation found better on
    val, logged but never read by selection (the summary's optimistic column)."""
    if not s.cfg.train.track_test:
        return None
    model = s.ema.model if v.chosen == "ema" else s.eval_model
    return evaluate_all(model, test_images(s), s.card, s)


# ---------------------------------------------------------------- the loop


@dataclass(kw_only=True)
class Session:
    """Everything the loop uses, built before it by `start`."""

    cfg: Config
    acc: Accelerator
    run: RunDir
    target: Target
    model: torch.nn.Module  # as prepared by Accelerate (DDP on several processes)
    forward: torch.nn.Module  # the model the step calls (compiled with train.compile)
    bare: HyperIQA  # the model itself: what the optimizer updates, evaluation reads and export writes
    eval_model: torch.nn.Module  # the bare model's own forward (fp32), compiled with train.compile
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: Data
    shares: Shares
    augmenter: Augmenter
    card: ModelCard
    state: TrainState
    guard: StepGuard
    display: Display
    ema: WeightEMA | None  # the weights' moving average (train.ema_decay > 0)
    noise: NoiseSource  # the regularisers' uniforms, keyed by (seed, step, sample)
    test: dict[str, EvalSet] | None = None  # each dataset's test shard, once built (test_images)
    counts: dict
    total_steps: int
    eval_every: int
    checkpoint_every: int
    eval_batch: int


def start(cfg: Config, resume: str = "", extend: bool = False) -> Session:
    """Builds (or restores) everything for a run, in the order that fails fastest: the resume
    target, the model and its weights, the data, then the run directory."""
    acc = build_accelerator(cfg, Path(cfg.run.root))
    preempt = PreemptionFlag()  # first: a requeue warning may come during data preparation
    # CPU math on denormal floats is ~30% slower and trained weights produce many: flush them to
    # zero (a CPU setting; GPUs flush in their own kernels)
    torch.set_flush_denormal(True)
    console = console_for(acc.is_main_process)
    target = RunDir.choose(cfg, resume, extend, acc)  # a bad --resume fails before anything is built
    set_seed(cfg.train.seed)  # identical initial weights on every process
    model = build_model(cfg.model)  # before the data: a missing weight file fails in seconds
    data = load_data(cfg, acc, console)
    shares = Shares.plan(cfg.train.batch_size, cfg.train.micro_batch_size, acc.num_processes, acc.process_index)
    if cfg.optim.rank_weight > 0 and shares.accum > 1:
        raise UserError("optim.rank_weight > 0 pairs predictions across the whole global batch, which needs each "
                        "process's share in one forward: set train.micro_batch_size=0 (or raise it)")
    steps_per_epoch = data.plan.steps_per_epoch
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    eval_every = cfg.train.eval_every or steps_per_epoch
    augmenter = Augmenter(cfg.augment, cfg.model.img_size, model.mean, model.std, cfg.train.seed).to(acc.device)
    noise = NoiseSource(cfg.train.seed, model.noise_width, acc.device)
    optimizer = build_optimizer(model.to(acc.device), cfg)
    scheduler = build_schedule(optimizer, cfg, total_steps, steps_per_epoch)
    weights, groups, counts = provenance(cfg.model), group_sizes(optimizer), parameter_counts(model)
    card = model_card(cfg, data, model, weights, groups)
    run = RunDir.open(cfg, target, acc, {"weights": weights, "parameter_groups": groups, "data": data.fingerprint(),
                                         "effective_lr": {"backbone": cfg.effective_lr(),
                                                          "head": cfg.effective_lr() * cfg.optim.lr_ratio,
                                                          "warmup_steps": cfg.effective_warmup()}})
    bare = model
    with run.discard_if_unstarted(created=not target.resuming):
        ema = WeightEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        state = TrainState()
        acc.register_for_checkpointing(state, augmenter, *([ema] if ema else []))
        # dropout and drop path draw from NoiseSource, keyed by sample; only a layer it does not
        # reach (none in the presets) would draw from torch's generator, seeded per process
        set_seed(cfg.train.seed, device_specific=True)
        if target.resuming:
            restore(acc, run, state, target)
        state.world_size = acc.num_processes
        print_start(acc, cfg, data, counts, weights, groups, shares, total_steps, steps_per_epoch, run)
        if cfg.run.log_with:
            acc.init_trackers(run.path.name, config={f"{s}.{k}": str(v) for s, d in cfg.to_dict().items()
                                                     if isinstance(d, dict) for k, v in d.items()})
    return Session(
        cfg=cfg, acc=acc, run=run, target=target, model=model, forward=compile_step(model, augmenter, cfg, console),
        bare=bare, eval_model=maybe_compile(OwnForward(bare), cfg, console, "evaluation"), optimizer=optimizer,
        scheduler=scheduler, data=data, shares=shares, augmenter=augmenter, card=card, state=state,
        guard=StepGuard(acc, optimizer, preempt, scheduler=scheduler, ema=ema),
        display=Display(console, total_steps, steps_per_epoch, cfg.train.log_every), ema=ema, noise=noise,
        counts=counts, total_steps=total_steps, eval_every=eval_every,
        checkpoint_every=cfg.train.checkpoint_every or eval_every,
        eval_batch=cfg.train.eval_batch_size or 2 * math.ceil(shares.per_process / shares.accum))


def restore(acc: Accelerator, run: RunDir, state: TrainState, target: Target) -> None:
    """Loads the latest checkpoint: weights, optimizer, schedule, EMA, the loop's state (the draws are
    functions of the step: no generator state is needed, so another process count may resume it)."""
    checkpoint = run.latest_checkpoint()
    try:
        acc.load_state(str(checkpoint))
    except Exception as e:  # a damaged file (a full disk, a copy cut short): say which, and the way out
        raise UserError(f"--resume: checkpoint {checkpoint} cannot be read ({type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0][:200]}); move that folder away to resume from "
                        "the checkpoint before it") from None
    if not acc.is_main_process:  # the checkpoint holds the global window sums (consolidate_window)
        state.window_loss, state.window_n = 0.0, 0
    if target.extended:
        state.stopped_early = False  # a longer schedule (or patience) continues past the old end
    run.truncate_metrics(state.step)
    notes = list(target.extended)
    if state.world_size and state.world_size != acc.num_processes:  # nothing the run needs is per process
        notes.append(f"on {acc.num_processes} process(es) instead of {state.world_size}: the same global batches, "
                     "augmentations and regularisers, so the run continues as it would have")
    acc.print(f"resumed {run.path} at step {state.step}" + (f" ({'; '.join(notes)})" if notes else ""))


def train(cfg: Config, resume: str = "", extend: bool = False) -> Path:
    """Trains `cfg`; returns the run directory. Call under `accelerate launch` for many processes."""
    s = start(cfg, resume, extend)
    state, o = s.state, cfg.optim
    window = {"t0": time.time(), "step0": state.step, "loss": torch.zeros((), device=s.acc.device)}
    with s.run.discard_if_unstarted(created=not s.target.resuming):  # a failed start leaves no directory
        s.guard.preempt.interrupts(announce=s.acc.is_main_process)
        s.model.train()
        while state.step < s.total_steps and not state.stopped_early:
            batch = next_batch(s.data.train, s.data.plan, s.augmenter, s.shares, state.step, s.acc.device,
                               o.rank_weight, s.noise)
            try:
                loss, norm = train_step(s.acc, s.forward, s.optimizer, batch, state.step, s.shares.per_process,
                                        o.rank_weight, o.grad_clip, s.guard)
            except BadStep as bad:
                stop_non_finite(s, bad)
            state.step += 1
            window["loss"] += loss
            state.window_n += sum(len(mb.target) for mb in batch.micro)
            s.display.step(state.step)
            evaluate_now = state.step % s.eval_every == 0 or state.step == s.total_steps
            if s.display.wants_line(state.step) or evaluate_now or state.step % s.checkpoint_every == 0:
                sync_point(s, window)  # the only host reads of the step's results
            if evaluate_now:
                s.display.evaluating(sum(v.meta["counts"]["val"] for v in s.data.views.values()))
                evaluate_and_log(s, window, norm)
            if state.step % s.checkpoint_every == 0 or state.stopped_early or state.step == s.total_steps \
                    or s.guard.preempted:
                checkpoint(s, window)
        s.display.close()
        finish(s)
    return s.run.path


def evaluate_and_log(s: Session, window: dict, norm: torch.Tensor) -> None:
    """Validation, model selection, a metrics.jsonl line (and the tracker's), the table."""
    v = evaluate_and_select(s)
    record = log_record(s, window, v, norm, track_test(s, v))
    s.run.log(record)
    if s.cfg.run.log_with:
        s.acc.log({k: x for k, x in record.items() if isinstance(x, (int, float))}, step=s.state.step)
    joint = len(v.per_dataset) > 1
    s.display.evaluation(record, s.state, v.per_dataset if joint else None, v.ema_per_dataset if joint else None)
    s.state.window_loss, s.state.window_n = 0.0, 0
    window.update(t0=time.time(), step0=s.state.step)


def checkpoint(s: Session, window: dict) -> None:
    """Every process saves together; a requested stop (preemption) then ends the launch."""
    sync_point(s, window)
    consolidate_window(s.acc, s.state)
    s.run.save_checkpoint(s.state.step, s.cfg.train.keep_checkpoints)
    if s.guard.preempted and s.state.step < s.total_steps and not s.state.stopped_early:
        s.display.close()
        raise Preempted(f"preempted at step {s.state.step}: checkpoint saved in {s.run.path}; relaunch to resume")


def finish(s: Session) -> None:
    """The selected model on each test split, once; the summary."""
    test, per_dataset = test_selected(s)
    summary = summarize(s, test, per_dataset)
    s.run.write_summary(summary)
    s.display.summary(summary, s.run.path)
    s.acc.end_training()


def sync_point(s: Session, window: dict) -> None:
    """Reads what the device holds for the host: the pending step flags (stopping on a bad step)
    and the loss window, which moves into the state (checkpointed) as a float; prints the line."""
    try:
        s.guard.flush()
    except BadStep as bad:
        stop_non_finite(s, bad)
    s.state.window_loss += float(window["loss"])
    window["loss"].zero_()
    s.display.line(s.state.step, s.state.window_loss / max(1, s.state.window_n), s.scheduler.get_last_lr()[0])


def print_start(acc: Accelerator, cfg: Config, data: Data, counts: dict, weights: dict, groups: dict, shares: Shares,
                total_steps: int, steps_per_epoch: int, run: RunDir) -> None:
    """The start-up lines: what is trained, from which weights, on what, with which batch."""
    sha = f", sha256 {weights['sha256'][:12]}" if weights.get("sha256") else ""
    lrs = {"backbone": cfg.effective_lr(), "head": cfg.effective_lr() * cfg.optim.lr_ratio}
    acc.print(f"parameters: backbone {counts['backbone'] / 1e6:.2f}M + head {counts['hyper'] / 1e6:.2f}M = "
              f"{counts['total'] / 1e6:.2f}M; model {cfg.model.backbone}, weights: {weights['source']} "
              f"{weights['tag']}{sha}")
    acc.print(f"optimizer: {cfg.optim.optimizer}; groups: " + ", ".join(
        f"{name} {n / 1e6:.2f}M at lr {lrs[name]:.2e}" for name, n in groups.items())
        + f" (LDA with the {cfg.optim.lda_group})" + (f"; weight EMA {cfg.train.ema_decay}" if cfg.train.ema_decay else ""))
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
              f"micro-batch(es) x {per:.3g} patches{scaled}; {total_steps} steps ({steps_per_epoch} per epoch); "
              f"run {run.path}")
    if acc.num_processes > 1:
        acc.print(f"all-reduce: {allreduce_bytes(counts['total'], cfg) / 1e6:.1f} MB of gradients per optimizer step "
                  f"({'bf16' if cfg.train.grad_compression == 'bf16' else 'fp32'}), once per step whatever the "
                  f"accumulation")


def allreduce_bytes(parameters: int, cfg: Config) -> int:
    """Bytes of gradients each process all-reduces per optimizer step (every parameter trains)."""
    return parameters * (2 if cfg.train.grad_compression == "bf16" else 4)


def consolidate_window(acc: Accelerator, state: TrainState) -> None:
    """Before a checkpoint: the main process holds the global loss-window sums, the others zero.
    Accelerate saves registered objects from the main process only, so this is what a resumed
    run restores on every process (and log_record's sum over processes stays right)."""
    if acc.num_processes > 1:
        totals = acc.reduce(torch.tensor([state.window_loss, state.window_n], device=acc.device,
                                         dtype=torch.float64), "sum").tolist()
        state.window_loss, state.window_n = (totals[0], int(totals[1])) if acc.is_main_process else (0.0, 0)


def log_record(s: Session, window: dict, v: Validation, norm: torch.Tensor,
               test: dict[str, dict] | None = None) -> dict:
    """One metrics.jsonl line; the train loss is the mean over every process's patches. val_* is
    the weights' selection metric set (the only dataset's, or the combination); joint runs add
    val_<dataset>_*; with an EMA, ema_val_* (and ema_val_<dataset>_*) and which of the two was better
    (`val_from`)."""
    acc, state = s.acc, s.state
    totals = torch.tensor([state.window_loss, state.window_n], device=acc.device, dtype=torch.float64)
    totals = acc.reduce(totals, "sum") if acc.num_processes > 1 else totals
    seconds = time.time() - window["t0"]
    state.train_seconds += seconds
    steps = state.step - window["step0"]
    record = {
        "step": state.step,
        "epoch": round(state.step / s.data.plan.steps_per_epoch, 4),
        "train_loss": float(totals[0] / max(1.0, float(totals[1]))),
        "lr": s.scheduler.get_last_lr()[0],
        "grad_norm": float(norm),
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
        record.update({f"test_{k}": x for k, x in combine(test, s.data.weights, s.cfg.train.select_on).items()})
        if joint:
            record.update({f"test_{name}_{k}": x for name, m in test.items() for k, x in m.items()})
    record["patches_per_s"] = round(steps * s.data.plan.batch_size / max(seconds, 1e-9), 1)
    record["elapsed_s"] = round(state.train_seconds, 1)
    return record


def summarize(s: Session, test: dict, per_dataset: dict[str, dict]) -> dict:
    lines = s.run.metrics() if s.acc.is_main_process else []
    best = next((r for r in lines if r["step"] == s.state.best_step), {})
    prefix = "ema_val_" if best.get("val_from") == "ema" else "val_"  # the exported weights' own figures
    val = {k: best.get(f"{prefix}{k}") for k in METRIC_KEYS} if best else {}
    rate = [r["patches_per_s"] for r in lines]
    steps_per_epoch = s.data.plan.steps_per_epoch
    summary = {
        "val": val,
        "test": test,
        "best_step": s.state.best_step,
        "best_epoch": round(s.state.best_step / steps_per_epoch, 2),
        "epochs_run": round(s.state.step / steps_per_epoch, 2),
        "steps_run": s.state.step,
        "stopped_early": s.state.stopped_early,
        "train_seconds": round(s.state.train_seconds, 1),
        "patches_per_s": round(float(np.median(rate)), 1) if rate else None,
        "world_size": s.acc.num_processes,
        "images": {name: view.meta["counts"] for name, view in s.data.views.items()}
        if len(s.data.views) > 1 else next(iter(s.data.views.values())).meta["counts"],
        "parameters": s.counts,
    }
    if best.get("val_from"):
        summary["weights_from"] = best["val_from"]
    tracked = [r for r in lines if r.get("test_srcc") is not None]
    if tracked:  # train.track_test: the best test figure over evaluations, which selection never saw
        top = max(tracked, key=lambda r: r["test_srcc"])
        summary["test_selected_on_test"] = {
            "srcc": top["test_srcc"], "plcc": top["test_plcc"], "step": top["step"], "epoch": top["epoch"],
            "note": "selected on test (optimistic, as the HyperIQA code and phase one reported); quote 'test'"}
    if len(per_dataset) > 1:  # the exported weights' own figures, as for the combined val above
        summary["datasets"] = {name: {"val": {k: best.get(f"{prefix}{name}_{k}") for k in METRIC_KEYS}, "test": m}
                               for name, m in per_dataset.items()}
    return summary
