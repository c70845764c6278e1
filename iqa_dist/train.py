"""Training with Accelerate: one process, N GPUs or N nodes, the same recipe.

`train()` is the loop; everything it uses is built by a named helper before it. Steps (optimizer
steps) are the unit of control: the schedule, evaluation and checkpoints count them, the epoch is
derived, and resuming is a single skip to the checkpoint's step. `train_step` is THE step: the
loop runs it and `iqa-dist bench train` times it.

World-size invariance: train.batch_size is GLOBAL. Step s draws its B samples (and their
augmentation) identically on every process; process r takes chunk (micro * world + r) of them.
The loss is per sample; the step sums a micro-batch's losses and divides by B / world: the
micro-batch gradients add up, DDP's mean over processes divides by world, and the result is the
mean over the global batch, even when chunks are uneven. The ranking term pairs every sample with
every other of the GLOBAL batch (predictions gathered across processes with their gradients), so
it too is the same loss on 1 GPU and on 64.

No host round trip per step: the loss window stays on the device, and the non-finite and
preemption flags are read one step late (StepGuard); the optimizer itself skips a non-finite
step on the device, so no update is ever taken from a non-finite loss or gradient.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from rich.console import Console
from safetensors.torch import load_file

from .augment import Augmenter
from .card import ModelCard
from .cache import cache_root, describe, prepare
from .config import Config
from .errors import UserError
from .evaluate import evaluate_split, shard
from .metrics import METRIC_KEYS
from .model import HyperIQA, build_model, parameter_counts
from .output import Display, console_for
from .rundir import RunDir, Target
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

    def _chunk(self, c: int) -> slice:
        parts = self.world * self.accum
        return slice(self.batch_size * c // parts, self.batch_size * (c + 1) // parts)

    def slices(self) -> list[slice]:
        return [self._chunk(m * self.world + self.rank) for m in range(self.accum)]

    def sizes(self) -> list[int]:
        """Every process's share when there is no accumulation (accum == 1), in rank order."""
        return [self._chunk(r).stop - self._chunk(r).start for r in range(self.world)]

    @property
    def per_process(self) -> float:
        """B / world: dividing a process's summed loss by it makes DDP's mean the global mean."""
        return self.batch_size / self.world


@dataclass
class Data:
    view: View
    train: ImageStore  # every training image (or cached patch strip), device-resident when possible
    val: EvalSet  # this process's shard of the validation images, with their test-protocol origins
    plan: BatchPlan


@dataclass
class MicroBatch:
    x: torch.Tensor  # (b, 3, S, S) normalised patches on the device
    target: torch.Tensor  # (b,) training targets on the device
    offset: int  # index of its first sample in the global batch


@dataclass
class Batch:
    """One optimizer step's share of this process."""

    micro: list[MicroBatch]
    targets: torch.Tensor | None = None  # (B,) every target of the global batch (ranking loss only)
    sizes: list[int] | None = None  # every process's share (ranking loss only)


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
    train = view.patch_store() if cached else view.image_store("train")
    train = train.to(resident_device(cfg, train.nbytes, acc.device))
    d = cfg.data
    val = view.eval_set("val", d.test_protocol, d.test_patch_num, cfg.model.img_size,
                        shard(len(view.ids("val")), acc.num_processes, acc.process_index))
    plan = BatchPlan(len(train), d.train_patch_num, cfg.train.batch_size, cfg.train.seed,
                     d.cached_patch_num if cached else 0)
    return Data(view, train, val, plan)


def model_card(cfg: Config, view: View, model: HyperIQA, weights: dict, groups: dict) -> ModelCard:
    """The card every exported model of this run carries (step and val filled at export)."""
    d = cfg.data
    return ModelCard(model={**asdict(cfg.model), "pretrained": "none"}, dataset=d.dataset, data=asdict(d),
                     score_range=list(view.image_meta["score_range"]), score_norm=d.score_norm,
                     resize=view.image_meta["resize"], protocol=d.test_protocol, test_patch_num=d.test_patch_num,
                     mean=list(model.mean), std=list(model.std), weights=weights, groups=groups)


def build_optimizer(model: HyperIQA, cfg: Config, fused: bool | None = None) -> torch.optim.Optimizer:
    """Adam (L2 decay in the gradient, as the original HyperIQA) or AdamW (decoupled decay), two
    groups: "backbone" at lr, "head" at lr * lr_ratio (optim.lda_group says where LDA goes).
    Fused kernels where torch has them (CUDA, CPU): one launch for the whole update, and the step
    can skip itself on the device (StepGuard). Real parameter lists, not iterators."""
    o = cfg.optim
    groups = model.parameter_groups(o.lda_group)
    params = [{"params": groups["backbone"], "lr": o.lr, "name": "backbone"},
              {"params": groups["head"], "lr": o.lr * o.lr_ratio, "name": "head"}]
    cls = torch.optim.Adam if o.optimizer == "adam" else torch.optim.AdamW
    device = next(model.parameters()).device
    fused = device.type in ("cuda", "cpu") if fused is None else fused
    return cls(params, weight_decay=o.weight_decay, fused=fused)


def group_sizes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    return {g["name"]: sum(p.numel() for p in g["params"]) for g in optimizer.param_groups}


def build_schedule(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int, steps_per_epoch: int):
    """Linear warmup then cosine to min_lr_ratio (or constant), per optimizer step; the head group
    drops to 0 after optim.freeze_hyper_after epochs (the original code's frozen hyper network)."""
    o = cfg.optim

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        t = (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    def head(step: int) -> float:
        frozen = o.freeze_hyper_after and step >= o.freeze_hyper_after * steps_per_epoch
        return 0.0 if frozen else factor(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor, head])


# ---------------------------------------------------------------- the step


class _GatherGlobal(torch.autograd.Function):
    """Every process's predictions, concatenated in rank order (the global batch order), with the
    gradient flowing back to each process's own slice: all processes' losses use every prediction,
    so the backward sums their gradients (an all-reduce) and keeps this process's part."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        padded = F.pad(local, (0, max(sizes) - len(local)))  # all_gather needs equal sizes
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


def gather_global(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    if len(sizes) == 1:
        return local
    return _GatherGlobal.apply(local, sizes, dist.get_rank())


def sample_losses(pred: torch.Tensor, target: torch.Tensor, rank_weight: float = 0.0,
                  ranked: tuple[torch.Tensor, torch.Tensor] | None = None, offset: int = 0) -> torch.Tensor:
    """Per-sample training losses (b,): L1, plus rank_weight x this sample's share of the pairwise
    ranking hinge over the global batch. Their sum over the global batch divided by B is the
    objective: mean L1 + rank_weight x the mean hinge over ordered pairs with different targets.

    ranked: (all predictions (B,), all targets (B,)) of the global batch, in which this
    micro-batch starts at `offset`; required when rank_weight > 0. The step does the reduction."""
    pred = pred.float()
    losses = (pred - target).abs()
    if rank_weight > 0:
        p_all, t_all = ranked
        sign = torch.sign(target[:, None] - t_all[None, :])  # (b, B)
        hinge = F.relu(-(pred[:, None] - p_all[None, :]) * sign)
        pairs = (torch.sign(t_all[:, None] - t_all[None, :]) != 0).sum().clamp(min=1)
        losses = losses + rank_weight * len(t_all) * hinge.sum(1) / pairs
    return losses


class StepGuard:
    """Every process's [loss non-finite, gradient non-finite, preemption requested] for a step,
    decided together (one small all-reduce, no host sync).

    With a fused optimizer (and not fp16) the step skips itself on the device when a flag is set
    (the optimizer's `found_inf`), and the flags reach the host one step late through a pinned,
    non-blocking copy: `check` at step s reads step s-1's flags before step s's update, so a bad
    step stops the run with the weights from before it. Otherwise the flags are read at once.
    Under fp16 a non-finite gradient is the loss scaler's overflow, which skips the step by
    design: only a non-finite loss stops the run."""

    def __init__(self, acc: Accelerator, optimizer: torch.optim.Optimizer, preempt: "PreemptionFlag") -> None:
        self.acc, self.preempt = acc, preempt
        self.inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer
        self.fp16 = acc.mixed_precision == "fp16"
        self.deferred = bool(self.inner.defaults.get("fused")) and not self.fp16
        self.pending: tuple[int, torch.Tensor, torch.cuda.Event | None] | None = None
        self.preempted = False  # a preemption flag has been read

    def check(self, step: int, loss: torch.Tensor, norm: torch.Tensor) -> None:
        """After step `step`'s backward and clipping, before its update. Raises BadStep for a
        non-finite step (this one, or the previous one when deferred) before the update."""
        dev = loss.device
        flags = torch.stack([(~torch.isfinite(loss)).float(),
                             (~torch.isfinite(norm)).float().to(dev) * (0.0 if self.fp16 else 1.0),
                             torch.full((), float(self.preempt.requested()), device=dev)])
        if self.acc.num_processes > 1:
            flags = self.acc.reduce(flags, "max")
        if not self.deferred:
            self._read(step, flags.cpu())
            return
        self.inner.found_inf = flags[:2].amax()  # the fused kernel skips the whole update when it is 1
        self.flush()
        host = torch.empty(3, pin_memory=dev.type == "cuda")
        host.copy_(flags, non_blocking=True)
        event = None
        if dev.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.pending = (step, host, event)

    def flush(self) -> None:
        """Reads the pending step's flags (waiting for them): at log, eval and checkpoint points."""
        if self.pending is not None:
            step, host, event = self.pending
            self.pending = None
            if event is not None:
                event.synchronize()
            self._read(step, host)

    def _read(self, step: int, flags: torch.Tensor) -> None:
        self.preempted = self.preempted or bool(flags[2])
        if flags[0] or flags[1]:
            raise BadStep(step, "loss" if flags[0] else "gradient")


class BadStep(Exception):
    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"non-finite {what} at step {step}")
        self.step, self.what = step, what


def train_step(acc: Accelerator, model, optimizer, scheduler, batch: Batch, step: int, per_process: float,
               rank_weight: float, grad_clip: float, guard: StepGuard) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of each micro-batch (gradients synced on the last one only), clipping,
    the guard, the update and the schedule. Returns (summed loss, gradient norm), both on the device."""
    total = torch.zeros((), device=acc.device)
    for m, mb in enumerate(batch.micro):
        with acc.no_sync(model) if m < len(batch.micro) - 1 else contextlib.nullcontext():
            pred = model(mb.x).float()
            ranked = (gather_global(pred, batch.sizes), batch.targets) if rank_weight > 0 else None
            losses = sample_losses(pred, mb.target, rank_weight, ranked, mb.offset)
            acc.backward(losses.sum() / per_process)
        total += losses.detach().sum()
    norm = acc.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    guard.check(step, total, norm)
    optimizer.step()
    if not (guard.fp16 and optimizer.step_was_skipped):  # fp16 overflow: the scaler skipped this step
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total, norm


def next_batch(data: Data, augmenter: Augmenter, shares: Shares, step: int, to_target, device: torch.device,
               rank_weight: float = 0.0) -> Batch:
    """This process's share of global batch `step`: augmented on the device, one upload per
    micro-batch. to_target maps dataset scores to training targets (ModelCard.to_target)."""
    rows, k = data.plan.batch(step)
    params = augmenter.draw(len(rows))  # drawn for the whole global batch on every process
    store = data.train
    micro = []
    for sl in shares.slices():
        r = rows[sl]
        pixels, offsets, widths = store.gather(r, device)
        if k is None:  # fresh random crops inside each image
            y0, x0 = augmenter.crop_origin(params[sl], store.heights[r], store.widths[r])
        else:  # patch k of each cached strip
            y0, x0 = k[sl] * augmenter.size, torch.zeros(len(r), dtype=torch.long)
        packed = augmenter.upload(offsets, widths, y0, x0, params[sl], store.scores[r], device)
        x, scores = augmenter.apply(pixels, packed)
        micro.append(MicroBatch(x, to_target(scores), sl.start))
    if rank_weight <= 0:
        return Batch(micro)
    targets = to_target(store.scores[rows]).to(device, non_blocking=True)
    return Batch(micro, targets, shares.sizes())


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


def stop_non_finite(acc: Accelerator, run: RunDir, bad: BadStep) -> None:
    """Every process stops before any update from the bad step; the state is kept for debugging."""
    debug = run.path / f"debug-step-{bad.step:08d}"
    acc.save_state(str(debug))
    raise NonFiniteLoss(f"non-finite {bad.what} at step {bad.step}; no optimizer step was taken from it and "
                        f"training stopped; the weights and optimizer state from before it are kept in {debug}")


def maybe_compile(model, cfg: Config, console: Console, what: str = "training"):
    """torch.compile with the inductor cache next to the data cache (a shared file system on a
    cluster), so a second run or a resumed one reuses the compiled kernels instead of waiting.
    The first call's time (the compilation) is printed."""
    if not cfg.train.compile:
        return model
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root(cfg) / "inductor"))
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


def evaluate_and_select(cfg: Config, acc: Accelerator, run: RunDir, eval_model, data: Data, augmenter: Augmenter,
                        state: TrainState, card: ModelCard, eval_batch: int) -> dict:
    """Validation metrics; a new best (val SRCC) is exported as the run's model."""
    result = evaluate_split(eval_model, data.val, augmenter, eval_batch, acc, card.to_score, cfg.train.compile)
    val = {k: result[k] for k in METRIC_KEYS}
    if update_best(state, val["srcc"], cfg.train.patience):
        view = data.view
        ids = view.ids("train")
        exported = replace(card, step=state.step, val=val)
        run.export_model(acc.unwrap_model(eval_model, keep_torch_compile=False).state_dict(), exported,
                         view.names(ids) if acc.is_main_process else [], view.groups(ids) if acc.is_main_process else [])
    return val


def test_selected(cfg: Config, acc: Accelerator, run: RunDir, eval_model, data: Data, augmenter: Augmenter,
                  card: ModelCard, eval_batch: int) -> dict:
    """Loads the selected weights and evaluates the test split once."""
    acc.wait_for_everyone()
    bare = acc.unwrap_model(eval_model, keep_torch_compile=False)
    bare.load_state_dict(load_file(str(run.model_dir / "model.safetensors")))
    d = cfg.data
    test = data.view.eval_set("test", d.test_protocol, d.test_patch_num, cfg.model.img_size,
                              shard(len(data.view.ids("test")), acc.num_processes, acc.process_index))
    result = evaluate_split(eval_model, test, augmenter, eval_batch, acc, card.to_score, cfg.train.compile)
    return {k: result[k] for k in METRIC_KEYS}


# ---------------------------------------------------------------- the loop


@dataclass
class Session:
    """Everything the loop uses, built before it by `start`."""

    cfg: Config
    acc: Accelerator
    run: RunDir
    target: Target
    model: torch.nn.Module  # as prepared by Accelerate (DDP on several processes)
    forward: torch.nn.Module  # the model the step calls (compiled with train.compile)
    eval_model: torch.nn.Module  # the bare model for evaluation (compiled with train.compile)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: Data
    shares: Shares
    augmenter: Augmenter
    card: ModelCard
    state: TrainState
    guard: StepGuard
    display: Display
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
    augmenter = Augmenter(cfg.augment, cfg.model.img_size, model.mean, model.std, cfg.train.seed)
    if cfg.train.compile:  # static shapes (resident buffer, fixed micro-batch): a few fused kernels
        augmenter.apply = torch.compile(augmenter.apply, dynamic=False, backend=cfg.train.compile_backend)
    optimizer = build_optimizer(model.to(acc.device), cfg)
    scheduler = build_schedule(optimizer, cfg, total_steps, steps_per_epoch)
    weights, groups, counts = provenance(cfg.model), group_sizes(optimizer), parameter_counts(model)
    card = model_card(cfg, data.view, model, weights, groups)
    run = RunDir.open(cfg, target, acc, {"weights": weights, "parameter_groups": groups})
    with run.discard_if_unstarted(created=not target.resuming):
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        state = TrainState()
        acc.register_for_checkpointing(state, augmenter)
        set_seed(cfg.train.seed, device_specific=True)  # dropout and drop path differ per process
        if target.resuming:
            restore(acc, run, state, target)
        print_start(acc, cfg, counts, weights, groups, shares, total_steps, steps_per_epoch, run)
        if cfg.run.log_with:
            acc.init_trackers(run.path.name, config={f"{s}.{k}": str(v) for s, d in cfg.to_dict().items()
                                                     if isinstance(d, dict) for k, v in d.items()})
    return Session(
        cfg, acc, run, target, model, maybe_compile(model, cfg, console),
        maybe_compile(acc.unwrap_model(model), cfg, console, "evaluation"), optimizer, scheduler, data, shares,
        augmenter, card, state, StepGuard(acc, optimizer, preempt),
        Display(console, total_steps, steps_per_epoch, cfg.train.log_every), counts, total_steps, eval_every,
        cfg.train.checkpoint_every or eval_every,
        cfg.train.eval_batch_size or 2 * math.ceil(shares.per_process / shares.accum))


def restore(acc: Accelerator, run: RunDir, state: TrainState, target: Target) -> None:
    """Loads the latest checkpoint: weights, optimizer, schedule, every RNG, the loop's state."""
    acc.load_state(str(run.latest_checkpoint()))
    if not acc.is_main_process:  # the checkpoint holds the global window sums (consolidate_window)
        state.window_loss, state.window_n = 0.0, 0
    if target.extended:
        state.stopped_early = False  # a longer schedule (or patience) continues past the old end
    run.truncate_metrics(state.step)
    acc.print(f"resumed {run.path} at step {state.step}" + (f" ({'; '.join(target.extended)})" if target.extended else ""))


def train(cfg: Config, resume: str = "", extend: bool = False) -> Path:
    """Trains `cfg`; returns the run directory. Call under `accelerate launch` for many processes."""
    s = start(cfg, resume, extend)
    state, o = s.state, cfg.optim
    window = {"t0": time.time(), "step0": state.step, "loss": torch.zeros((), device=s.acc.device)}
    with s.run.discard_if_unstarted(created=not s.target.resuming):  # a failed start leaves no directory
        s.model.train()
        while state.step < s.total_steps and not state.stopped_early:
            batch = next_batch(s.data, s.augmenter, s.shares, state.step, s.card.to_target, s.acc.device, o.rank_weight)
            try:
                loss, norm = train_step(s.acc, s.forward, s.optimizer, s.scheduler, batch, state.step,
                                        s.shares.per_process, o.rank_weight, o.grad_clip, s.guard)
            except BadStep as bad:
                stop_non_finite(s.acc, s.run, bad)
            state.step += 1
            window["loss"] += loss
            state.window_n += sum(len(mb.target) for mb in batch.micro)
            s.display.step(state.step)
            evaluate_now = state.step % s.eval_every == 0 or state.step == s.total_steps
            if s.display.wants_line(state.step) or evaluate_now or state.step % s.checkpoint_every == 0:
                sync_point(s, window)  # the only host reads of the step's results
            if evaluate_now:
                evaluate_and_log(s, window, norm)
            if state.step % s.checkpoint_every == 0 or state.stopped_early or state.step == s.total_steps \
                    or s.guard.preempted:
                checkpoint(s, window)
        s.display.close()
        finish(s)
    return s.run.path


def evaluate_and_log(s: Session, window: dict, norm: torch.Tensor) -> None:
    """Validation, model selection, a metrics.jsonl line (and the tracker's), the table."""
    val = evaluate_and_select(s.cfg, s.acc, s.run, s.eval_model, s.data, s.augmenter, s.state, s.card, s.eval_batch)
    record = log_record(s.acc, s.state, s.data, window, val, s.scheduler, norm)
    s.run.log(record)
    if s.cfg.run.log_with:
        s.acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=s.state.step)
    s.display.evaluation(record, s.state)
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
    """The selected model on the test split, once; the summary."""
    test = test_selected(s.cfg, s.acc, s.run, s.eval_model, s.data, s.augmenter, s.card, s.eval_batch)
    summary = summarize(s.run, s.state, s.data, test, s.acc, s.counts)
    s.run.write_summary(summary)
    s.display.summary(summary, s.run.path)
    s.acc.end_training()


def sync_point(s: Session, window: dict) -> None:
    """Reads what the device holds for the host: the pending step flags (stopping on a bad step)
    and the loss window, which moves into the state (checkpointed) as a float; prints the line."""
    try:
        s.guard.flush()
    except BadStep as bad:
        stop_non_finite(s.acc, s.run, bad)
    s.state.window_loss += float(window["loss"])
    window["loss"].zero_()
    s.display.line(s.state.step, s.state.window_loss / max(1, s.state.window_n), s.scheduler.get_last_lr()[0])


def print_start(acc: Accelerator, cfg: Config, counts: dict, weights: dict, groups: dict, shares: Shares,
                total_steps: int, steps_per_epoch: int, run: RunDir) -> None:
    """The start-up lines: what is trained, from which weights, on what, with which batch."""
    sha = f", sha256 {weights['sha256'][:12]}" if weights.get("sha256") else ""
    lrs = {"backbone": cfg.optim.lr, "head": cfg.optim.lr * cfg.optim.lr_ratio}
    acc.print(f"parameters: backbone {counts['backbone'] / 1e6:.2f}M + head {counts['hyper'] / 1e6:.2f}M = "
              f"{counts['total'] / 1e6:.2f}M; model {cfg.model.backbone}, weights: {weights['source']} "
              f"{weights['tag']}{sha}")
    acc.print(f"optimizer: {cfg.optim.optimizer}; groups: " + ", ".join(
        f"{name} {n / 1e6:.2f}M at lr {lrs[name]:.2e}" for name, n in groups.items())
        + f" (LDA with the {cfg.optim.lda_group})")
    procs = f"{acc.num_processes} process{'es' if acc.num_processes > 1 else ''}"
    per = shares.per_process / shares.accum
    acc.print(f"{procs}, precision {acc.mixed_precision if acc.mixed_precision != 'no' else 'fp32'}; batch "
              f"{cfg.train.batch_size} patches per step = {acc.num_processes} process(es) x {shares.accum} "
              f"micro-batch(es) x {per:.3g} patches; {total_steps} steps ({steps_per_epoch} per epoch); run {run.path}")


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
