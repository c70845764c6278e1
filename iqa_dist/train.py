"""Training with Accelerate: one process, N GPUs or N nodes, the same recipe.

`train()` is the loop; everything it uses is built by a named helper before it. Steps (optimizer
steps) are the unit of control: the schedule, evaluation and checkpoints count them, the epoch is
derived, and resuming is a single skip to the checkpoint's step.

World-size invariance: train.batch_size is GLOBAL. Step s draws its B samples (and their
augmentation) identically on every process; process r takes chunk (micro * world + r) of them.
Each micro-batch's loss is its SUM times world / B: the micro-batch gradients add up, DDP's mean
over processes divides by world, and the result is the mean over the global batch, even when
chunks are uneven (the pairwise ranking term, off in every preset, pairs within a micro-batch).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from rich.console import Console
from safetensors.torch import load_file

from .augment import AugmentParams, Augmenter
from .cache import ImageStore, View, describe, prepare
from .config import Config
from .errors import UserError
from .evaluate import evaluate_split, shard
from .model import HyperIQA, build_model, parameter_counts
from .progress import Display
from .rundir import RunDir


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
    window_loss: float = 0.0  # this process's summed loss since the last evaluation
    window_n: int = 0  # ... over this many patches

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


class BatchPlan:
    """Which images (and stored patch) each global batch holds: a pure function of (seed, step).

    An epoch is every training image x train_patch_num patches in a seeded permutation; the last
    partial batch is dropped (a different remainder each epoch).
    """

    def __init__(self, n_images: int, patch_num: int, batch_size: int, seed: int, cached_k: int = 0) -> None:
        self.n_images, self.patch_num, self.batch_size, self.seed, self.cached_k = (
            n_images, patch_num, batch_size, seed, cached_k)
        self.steps_per_epoch = n_images * patch_num // batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"train.batch_size={batch_size} exceeds an epoch ({n_images} images x {patch_num} patches)")
        self._epoch = (-1, None, None)

    def _permutation(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.n_images * self.patch_num)
            # cached patches: each epoch uses patch_num of the K stored patches of every image
            chosen = rng.random((self.n_images, self.cached_k)).argsort(1)[:, :self.patch_num] if self.cached_k else None
            self._epoch = (epoch, perm, chosen)
        return self._epoch[1], self._epoch[2]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image rows (B,), stored patch index (B,) or None) of global batch `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        perm, chosen = self._permutation(epoch)
        items = perm[i * self.batch_size:(i + 1) * self.batch_size]
        rows, rep = items // self.patch_num, items % self.patch_num
        k = torch.from_numpy(chosen[rows, rep]) if chosen is not None else None
        return torch.from_numpy(rows), k


@dataclass
class Shares:
    """How a global batch splits over processes and micro-batches."""

    world: int
    rank: int
    accum: int  # micro-batches per optimizer step (gradient accumulation)
    batch_size: int

    @classmethod
    def plan(cls, batch_size: int, micro_batch_size: int, world: int, rank: int) -> "Shares":
        if batch_size < world:
            raise UserError(f"train.batch_size={batch_size} is smaller than the {world} processes")
        share = math.ceil(batch_size / world)
        accum = math.ceil(share / micro_batch_size) if micro_batch_size else 1
        # at most batch_size // world micro-batches, so none is empty (a micro-batch may then
        # hold one patch more than micro_batch_size)
        return cls(world, rank, min(accum, batch_size // world), batch_size)

    def slices(self) -> list[slice]:
        parts = self.world * self.accum
        chunks = [m * self.world + self.rank for m in range(self.accum)]
        return [slice(self.batch_size * c // parts, self.batch_size * (c + 1) // parts) for c in chunks]

    @property
    def per_process(self) -> float:
        """B / world: dividing a process's summed loss by it makes DDP's mean the global mean."""
        return self.batch_size / self.world


@dataclass
class Data:
    view: View
    train: ImageStore  # every training image (or cached patch strip), device-resident when possible
    val: ImageStore  # this process's shard of the validation patch strips
    plan: BatchPlan
    score_range: tuple[float, float]


# ---------------------------------------------------------------- helpers built before the loop


def build_accelerator(cfg: Config, run_root: Path) -> Accelerator:
    """Precision from the preset (or from `accelerate launch` with train.mixed_precision=launcher)."""
    precision = None if cfg.train.mixed_precision == "launcher" else cfg.train.mixed_precision
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # without GPUs, several processes need cpu=True to use gloo
        mixed_precision=precision,
        step_scheduler_with_optimizer=False,  # we step the schedule once per optimizer step, not per process
        log_with=cfg.run.log_with or None,
        project_dir=str(run_root),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.timeout_s))],
    )


def resident_device(cfg: Config, nbytes: int, device: torch.device) -> torch.device:
    """Where the training pixels live: the device when they fit in half of its free memory."""
    if cfg.data.resident == "host" or device.type != "cuda":
        return torch.device("cpu") if cfg.data.resident == "host" else device
    if cfg.data.resident == "device":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes < free // 2 else torch.device("cpu")


def load_data(cfg: Config, acc: Accelerator, console: Console) -> Data:
    # every process calls it: a file lock lets one build while the others wait (no collective,
    # whose timeout a first build of a large dataset could exceed)
    view = prepare(cfg, console)
    acc.print(describe(view))
    if not len(view.ids("train")):
        raise UserError("data.split=all keeps every image for evaluation; training needs a train split")
    cached = cfg.data.train_patches == "cached"
    train = view.patch_store("train") if cached else view.image_store("train")
    train = train.to(resident_device(cfg, train.nbytes, acc.device))
    val = view.patch_store("val", shard(len(view.ids("val")), acc.num_processes, acc.process_index))
    plan = BatchPlan(len(train), cfg.data.train_patch_num, cfg.train.batch_size, cfg.train.seed,
                     cfg.data.cached_patch_num if cached else 0)
    return Data(view, train, val, plan, tuple(view.image_meta["score_range"]))


def score_maps(cfg: Config, score_range: tuple[float, float]):
    """(dataset score -> training target, model output -> dataset score)."""
    if cfg.data.score_norm == "none":
        return (lambda s: s), (lambda p: p)
    lo, hi = score_range
    return (lambda s: (s - lo) / (hi - lo)), (lambda p: p * (hi - lo) + lo)


def build_optimizer(model: HyperIQA, cfg: Config) -> torch.optim.Optimizer:
    """AdamW, two groups: backbone at lr, the rest (LDA, hyper network) at lr * lr_ratio.
    Real parameter lists (not iterators) so both groups train for the whole run."""
    backbone = list(model.backbone.parameters())
    ids = {id(p) for p in backbone}
    head = [p for p in model.parameters() if id(p) not in ids]
    o = cfg.optim
    return torch.optim.AdamW([{"params": backbone, "lr": o.lr}, {"params": head, "lr": o.lr * o.lr_ratio}],
                             weight_decay=o.weight_decay)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int):
    """Linear warmup then cosine to min_lr_ratio (or constant), per optimizer step."""
    o = cfg.optim

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        t = (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loss_sum(pred: torch.Tensor, target: torch.Tensor, rank_weight: float) -> torch.Tensor:
    """Summed L1 (+ rank_weight x the mean pairwise ranking hinge, scaled to a sum)."""
    loss = F.l1_loss(pred.float(), target, reduction="sum")
    if rank_weight > 0 and len(pred) > 1:
        dp = pred.float()[:, None] - pred.float()[None, :]
        sign = torch.sign(target[:, None] - target[None, :])
        loss = loss + rank_weight * len(pred) * F.relu(-dp * sign).sum() / max(1, (sign != 0).sum())
    return loss


def micro_batch(store: ImageStore, augmenter: Augmenter, rows: torch.Tensor, k: torch.Tensor | None,
                params: AugmentParams, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised patches (b, 3, S, S) and their scores (b,) for one micro-batch, on the device."""
    pixels, offsets, widths = store.gather(rows, device)
    if k is None:  # fresh random crops inside each image
        y0, x0 = augmenter.crop_origin(params, store.heights[rows], store.widths[rows])
    else:  # patch k of each cached strip
        y0, x0 = k * augmenter.size, torch.zeros_like(k)
    x = augmenter.train(pixels, offsets, widths, y0, x0, params)
    return x, store.scores[rows].to(device, non_blocking=True)


def forward_backward(acc: Accelerator, model, data: Data, augmenter: Augmenter, shares: Shares, step: int,
                     to_target, cfg: Config) -> tuple[torch.Tensor, int]:
    """This process's share of global batch `step`, in micro-batches; gradients are synced on the
    last one only. Returns the summed loss and the number of patches."""
    rows, k = data.plan.batch(step)
    params = augmenter.draw(len(rows))  # drawn for the whole global batch on every process
    total, n = torch.zeros((), device=acc.device), 0
    for m, sl in enumerate(shares.slices()):
        with acc.no_sync(model) if m < shares.accum - 1 else contextlib.nullcontext():
            x, y = micro_batch(data.train, augmenter, rows[sl], None if k is None else k[sl], params[sl], acc.device)
            loss = loss_sum(model(x), to_target(y), cfg.optim.rank_weight)
            acc.backward(loss / shares.per_process)
        total += loss.detach()
        n += len(y)
    return total, n


class PreemptionFlag:
    """A request to checkpoint at the end of the step and exit: SIGUSR1 or SIGTERM to this
    process, or the file named by $IQA_DIST_STOP_FILE appearing (the SLURM scripts touch it
    when the time limit nears: no signal has to get through torchrun's agent)."""

    def __init__(self) -> None:
        self.raised = False
        self.stop_file = os.environ.get("IQA_DIST_STOP_FILE", "")
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.raised = True

    def requested(self) -> bool:
        return self.raised or bool(self.stop_file and os.path.exists(self.stop_file))


def step_flags(acc: Accelerator, loss: torch.Tensor, norm: torch.Tensor, preempt: PreemptionFlag) -> torch.Tensor:
    """[any loss non-finite, gradient non-finite, any process preempted]: one small all-reduce a
    step, so every process takes the same decision. Under fp16 an infinite gradient is the loss
    scaler's overflow, which skips the step by design: only a non-finite loss stops the run."""
    bad_grad = (~torch.isfinite(norm)).float() * (acc.mixed_precision != "fp16")
    flags = torch.stack([(~torch.isfinite(loss)).float(), bad_grad,
                         torch.tensor(float(preempt.requested()), device=loss.device)]).to(acc.device)
    return (acc.reduce(flags, "max") if acc.num_processes > 1 else flags).cpu()


def stop_non_finite(acc: Accelerator, run: RunDir, step: int, flags: torch.Tensor, loss: torch.Tensor,
                    norm: torch.Tensor) -> None:
    """Stops every process before the optimizer step; the state is kept for debugging."""
    debug = run.path / f"debug-step-{step:08d}"
    acc.save_state(str(debug))
    raise NonFiniteLoss(f"non-finite {'loss' if flags[0] else 'gradient'} at step {step} "
                        f"(this process: loss {loss.item():.4g}, grad norm {float(norm):.4g}); "
                        f"stopped before the optimizer step; state kept in {debug}")


def evaluate_and_select(cfg: Config, acc: Accelerator, run: RunDir, model, data: Data, augmenter: Augmenter,
                        state: TrainState, to_score, eval_batch: int) -> dict:
    """Validation metrics; a new best (val SRCC) is exported as the run's model."""
    # unwrapped (Accelerate keeps its autocast): a DDP forward could wait on a rank without images
    result = evaluate_split(acc.unwrap_model(model), data.val, augmenter, cfg.data.test_patch_num, eval_batch, acc,
                            to_score)
    val = {k: result[k] for k in ("srcc", "plcc", "krcc", "rmse", "n")}
    srcc = val["srcc"] if math.isfinite(val["srcc"]) else -math.inf  # constant predictions: undefined
    if srcc > state.best_srcc or state.best_step == 0:  # the first evaluation always exports a model
        state.best_srcc, state.best_step, state.bad_evals = srcc, state.step, 0
        extra = {"score_norm": cfg.data.score_norm, "score_range": list(data.score_range),
                 "resize": data.view.image_meta["resize"],
                 "dataset": cfg.data.dataset, "test_patch_num": cfg.data.test_patch_num, "step": state.step,
                 "val": val, "mean": list(augmenter.mean.tolist()), "std": list(augmenter.std.tolist())}
        run.export_model(acc.unwrap_model(model, keep_torch_compile=False).state_dict(), cfg, extra)
    else:
        state.bad_evals += 1
    state.stopped_early = 0 < cfg.train.patience <= state.bad_evals
    return val


def test_selected(cfg: Config, acc: Accelerator, run: RunDir, model, data: Data, augmenter: Augmenter,
                  to_score, eval_batch: int) -> dict:
    """Loads the selected weights and evaluates the test split once."""
    acc.wait_for_everyone()
    acc.unwrap_model(model, keep_torch_compile=False).load_state_dict(load_file(str(run.model_dir / "model.safetensors")))
    test = data.view.patch_store("test", shard(len(data.view.ids("test")), acc.num_processes, acc.process_index))
    result = evaluate_split(acc.unwrap_model(model), test, augmenter, cfg.data.test_patch_num, eval_batch, acc,
                            to_score)
    return {k: result[k] for k in ("srcc", "plcc", "krcc", "rmse", "n")}


# ---------------------------------------------------------------- the loop


def train(cfg: Config, resume: str = "") -> Path:
    """Trains `cfg`; returns the run directory. Call under `accelerate launch` for many processes."""
    acc = build_accelerator(cfg, Path(cfg.run.root))
    preempt = PreemptionFlag()  # first: a requeue warning may come during data preparation
    console = Console(quiet=not acc.is_main_process)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    run, resuming = RunDir.open(cfg, resume, acc)
    data = load_data(cfg, acc, console)
    shares = Shares.plan(cfg.train.batch_size, cfg.train.micro_batch_size, acc.num_processes, acc.process_index)
    total_steps = cfg.train.max_steps or cfg.train.epochs * data.plan.steps_per_epoch
    eval_every = cfg.train.eval_every or data.plan.steps_per_epoch
    checkpoint_every = cfg.train.checkpoint_every or eval_every
    eval_batch = cfg.train.eval_batch_size or 2 * math.ceil(shares.per_process / shares.accum)
    to_target, to_score = score_maps(cfg, data.score_range)

    set_seed(cfg.train.seed)  # identical initial weights on every process
    model = build_model(cfg.model)
    counts = parameter_counts(model)
    augmenter = Augmenter(cfg.augment, cfg.model.img_size, model.mean, model.std, cfg.train.seed)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_schedule(optimizer, cfg, total_steps)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    if cfg.train.compile:
        model = torch.compile(model)
    state = TrainState()
    acc.register_for_checkpointing(state, augmenter)
    set_seed(cfg.train.seed, device_specific=True)  # dropout and drop path differ per process
    if resuming and run.latest_checkpoint():
        acc.load_state(str(run.latest_checkpoint()))  # weights, optimizer, schedule, every RNG, state
        if not acc.is_main_process:  # the checkpoint holds the global window sums (consolidate_window)
            state.window_loss, state.window_n = 0.0, 0
        run.truncate_metrics(state.step)
        acc.print(f"resumed {run.path} at step {state.step}")
    acc.print(f"parameters: backbone {counts['backbone'] / 1e6:.2f}M, hyper network {counts['hyper'] / 1e6:.2f}M, "
              f"total {counts['total'] / 1e6:.2f}M | {acc.num_processes} process(es), {acc.mixed_precision} | "
              f"batch {cfg.train.batch_size} = {acc.num_processes} x {shares.accum} x ~{shares.per_process / shares.accum:.1f} | "
              f"{total_steps} steps ({data.plan.steps_per_epoch}/epoch) | run {run.path}")
    if cfg.run.log_with:
        acc.init_trackers(run.path.name, config={f"{s}.{k}": str(v) for s, d in cfg.to_dict().items()
                                                 if isinstance(d, dict) for k, v in d.items()})
    display = Display(console, total_steps, data.plan.steps_per_epoch, cfg.train.log_every)
    window = {"t0": time.time(), "step0": state.step}  # for patches/s; the loss window is in `state`

    model.train()
    while state.step < total_steps and not state.stopped_early:
        local_loss, n_local = forward_backward(acc, model, data, augmenter, shares, state.step, to_target, cfg)
        norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
        flags = step_flags(acc, local_loss, norm, preempt)
        if flags[:2].any():
            stop_non_finite(acc, run, state.step, flags, local_loss, norm)
        optimizer.step()
        if not optimizer.step_was_skipped:  # fp16 overflow: the scaler skipped this step
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.window_loss += local_loss.item()
        state.window_n += n_local
        display.step(state.step, state.window_loss / max(1, state.window_n), scheduler.get_last_lr()[0])

        if state.step % eval_every == 0 or state.step == total_steps:
            val = evaluate_and_select(cfg, acc, run, model, data, augmenter, state, to_score, eval_batch)
            record = log_record(acc, state, data, window, val, scheduler, norm)
            run.log(record)
            if cfg.run.log_with:
                acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=state.step)
            display.evaluation(record, state)
            state.window_loss, state.window_n = 0.0, 0
            window.update(t0=time.time(), step0=state.step)
        if state.step % checkpoint_every == 0 or state.stopped_early or state.step == total_steps or flags[2]:
            consolidate_window(acc, state)
            run.save_checkpoint(state.step, cfg.train.keep_checkpoints)
        if flags[2] and state.step < total_steps and not state.stopped_early:
            display.close()
            raise Preempted(f"preempted at step {state.step}: checkpoint saved in {run.path}; relaunch to resume")
    display.close()

    test = test_selected(cfg, acc, run, model, data, augmenter, to_score, eval_batch)
    summary = summarize(run, state, data, test, acc, counts)
    run.write_summary(summary)
    display.summary(summary, run.path)
    acc.end_training()
    return run.path


def consolidate_window(acc: Accelerator, state: TrainState) -> None:
    """Before a checkpoint: the main process holds the global loss-window sums, the others zero.
    Accelerate saves registered objects from the main process only, so this is what a resumed
    run restores on every process (and log_record's sum over processes stays right)."""
    if acc.num_processes > 1:
        totals = acc.reduce(torch.tensor([state.window_loss, state.window_n], device=acc.device,
                                         dtype=torch.float64), "sum").tolist()
        state.window_loss, state.window_n = (totals[0], int(totals[1])) if acc.is_main_process else (0.0, 0)


def log_record(acc: Accelerator, state: TrainState, data: Data, window: dict, val: dict, scheduler, norm) -> dict:
    """One metrics.jsonl line; the train loss is the mean over every process's patches."""
    totals = torch.tensor([state.window_loss, state.window_n], device=acc.device, dtype=torch.float64)
    totals = acc.reduce(totals, "sum") if acc.num_processes > 1 else totals
    seconds = time.time() - window["t0"]
    state.train_seconds += seconds
    steps = state.step - window["step0"]
    return {
        "step": state.step,
        "epoch": round(state.step / data.plan.steps_per_epoch, 4),
        "train_loss": float(totals[0] / max(1.0, float(totals[1]))),
        "lr": scheduler.get_last_lr()[0],
        "grad_norm": float(norm),
        **{f"val_{k}": v for k, v in val.items()},
        "patches_per_s": round(steps * data.plan.batch_size / max(seconds, 1e-9), 1),
        "elapsed_s": round(state.train_seconds, 1),
    }


def summarize(run: RunDir, state: TrainState, data: Data, test: dict, acc: Accelerator, counts: dict) -> dict:
    lines = run.metrics() if acc.is_main_process else []
    best = next((r for r in lines if r["step"] == state.best_step), {})
    val = {k[4:]: v for k, v in best.items() if k.startswith("val_")}
    rate = [r["patches_per_s"] for r in lines]
    return {
        "val": val,
        "test": test,
        "best_step": state.best_step,
        "best_epoch": round(state.best_step / data.plan.steps_per_epoch, 2),
        "epochs_run": round(state.step / data.plan.steps_per_epoch, 2),
        "steps_run": state.step,
        "stopped_early": state.stopped_early,
        "train_seconds": round(state.train_seconds, 1),
        "patches_per_s": round(float(np.median(rate)), 1) if rate else None,
        "world_size": acc.num_processes,
        "images": data.view.meta["counts"],
        "parameters": counts,
    }
