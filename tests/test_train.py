"""Training and evaluation: metrics, world-size invariance, resume, early stopping, guards, run dirs.

Every run here is real: the tiny demo model through `iqa-dist train`, one process or two CPU
processes under `accelerate launch --multi_gpu` (gloo).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess

import numpy as np
import pytest
import scipy.stats
import torch
import yaml
from safetensors.torch import load_file

from iqa_dist.data.plan import BatchPlan
from iqa_dist.distributed.shards import Shares, shard
from iqa_dist.scoring.metrics import correlation_metrics

from .conftest import (RUN, TINY_SWIN_KWARGS, assert_same_training, cli, launch_function, metrics, only_run,
                       run_train, train_here)

# ---------------------------------------------------------------- units


def test_metrics_against_scipy_and_known_values():
    m = correlation_metrics(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 45]))
    assert m["srcc"] == pytest.approx(1.0) and m["krcc"] == pytest.approx(1.0) and m["n"] == 4
    assert m["rmse"] == pytest.approx(math.sqrt(np.mean((np.array([1, 2, 3, 4]) - [10, 20, 30, 45]) ** 2)))
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=200), rng.normal(size=200)
    b = a + b
    m = correlation_metrics(a, b)
    assert m["srcc"] == pytest.approx(scipy.stats.spearmanr(a, b)[0])
    assert m["plcc"] == pytest.approx(scipy.stats.pearsonr(a, b)[0])
    assert m["krcc"] == pytest.approx(scipy.stats.kendalltau(a, b)[0])
    assert m["srcc"] == pytest.approx(-correlation_metrics(-a, b)["srcc"])
    assert math.isnan(correlation_metrics(np.ones(5), np.arange(5.0))["srcc"])  # constant: undefined, not 0


def test_shards_cover_every_image_once():
    for n in (0, 1, 7, 31):
        for world in (1, 2, 3, 8):
            parts = [list(shard(n, world, r)) for r in range(world)]
            assert sum(parts, []) == list(range(n))


def test_batch_plan_and_shares_are_world_size_invariant():
    plan = BatchPlan(n_images=10, patch_num=4, batch_size=6, seed=0)
    assert plan.steps_per_epoch == 6
    epoch = np.concatenate([plan.batch(s)[0].numpy() for s in range(6)])
    assert np.bincount(epoch, minlength=10).max() <= 4  # each image at most patch_num times an epoch
    assert not np.array_equal(plan.batch(0)[0], plan.batch(6)[0])  # a new permutation each epoch
    cached = BatchPlan(n_images=10, patch_num=3, batch_size=5, seed=0, cached_k=8)
    rows, k = cached.batch(0)
    assert k is not None and (k >= 0).all() and (k < 8).all()
    for world, micro in [(1, 0), (2, 0), (3, 0), (2, 2), (5, 0)]:
        covered = []
        for rank in range(world):
            shares = Shares.split(16, micro, world, rank)
            covered += [i for sl in shares.slices() for i in range(16)[sl]]
        assert sorted(covered) == list(range(16)), (world, micro)  # every sample exactly once
    s = Shares.split(96, 32, 1, 0)
    assert s.accum == 3 and s.per_process == 96
    assert Shares.split(10, 1, 4, 0).accum == 2  # capped so that no micro-batch is empty
    assert all(sl.stop > sl.start for r in range(4) for sl in Shares.split(10, 1, 4, r).slices())


@pytest.mark.parametrize("world, micro", [(1, 0), (1, 32), (2, 16), (5, 0), (3, 7), (4, 1)])
def test_shares_give_the_global_mean_gradient(world, micro):
    """Summed micro-batch gradients, averaged over processes as DDP does, equal the gradient of
    the mean loss over the global batch: with accumulation and with uneven shares."""
    import torch

    from iqa_dist.training.losses import sample_losses

    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    x, y = torch.randn(96, 5), torch.randn(96)
    (reference,) = torch.autograd.grad(torch.nn.functional.l1_loss(x @ w, y), w)
    total = torch.zeros(5)
    for rank in range(world):
        shares = Shares.split(96, micro, world, rank)
        for sl in shares.slices():
            total += torch.autograd.grad(sample_losses(x[sl] @ w, y[sl]).sum() / shares.per_process, w)[0]
    torch.testing.assert_close(total / world, reference)


# ---------------------------------------------------------------- real runs


def test_run_directory_holds_everything(single_run):
    run = single_run
    assert (run / "config.yaml").is_file() and yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 6
    meta = json.loads((run / "meta.json").read_text())
    assert meta["git_sha"] and meta["launches"][0]["world_size"] == 1
    lines = metrics(run)
    assert [r["step"] for r in lines] == [3, 6]
    for key in ("step", "epoch", "train_loss", "lr", "val_srcc", "val_plcc", "val_n", "patches_per_s", "elapsed_s"):
        assert all(key in r for r in lines), key
    summary = json.loads((run / "summary.json").read_text())
    for key in ("val", "test", "best_epoch", "epochs_run", "stopped_early"):
        assert key in summary
    assert {"srcc", "plcc", "krcc", "rmse", "n"} <= set(summary["test"]) and summary["test"]["n"] == summary["images"]["test"]
    assert summary["val"]["srcc"] == max(r["val_srcc"] for r in lines)
    model = load_file(run / "model" / "model.safetensors")
    config = json.loads((run / "model" / "config.json").read_text())
    assert any(k.startswith("backbone.") for k in model) and config["model"]["img_size"] == 64
    assert config["step"] == summary["best_step"] and config["datasets"]["synthetic"]["score_range"] == [0.0, 100.0]
    # the weights are as readable as the files beside them (safetensors writes 0600 of its own)
    assert (run / "model" / "model.safetensors").stat().st_mode & 0o777 == (run / "model" / "config.json").stat().st_mode & 0o777
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step-00000003", "step-00000006"]
    assert {"model.safetensors", "optimizer.bin"} <= {p.name for p in (run / "checkpoints" / checkpoints[-1]).iterdir()}


def test_one_process_equals_three(single_run, tiny_overrides, tmp_path):
    """The same preset on 1 or 3 processes (uneven shares: 6 + 5 + 5 of a batch of 16) trains the
    same recipe, dropout, drop path and ColorJitter on (keyed by sample, not by process), and
    evaluates the same images, each once (no padding duplicates)."""
    out = run_train([*tiny_overrides, *RUN, f"run.root={tmp_path}"], nproc=3)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("parameters:") == 1  # one process prints
    one, three = metrics(single_run), metrics(only_run(tmp_path))
    assert one[-1]["val_n"] % 3 != 0  # 3 ranks cannot split it evenly
    assert_same_training(one, three)
    s1 = json.loads((single_run / "summary.json").read_text())
    s3 = json.loads((only_run(tmp_path) / "summary.json").read_text())
    assert s3["world_size"] == 3 and s3["test"]["n"] == s1["test"]["n"]
    assert s3["test"]["srcc"] == pytest.approx(s1["test"]["srcc"], abs=1e-4)


def test_accumulation_on_two_processes_still_syncs_gradients(single_run, tiny_overrides, tmp_path):
    """2 processes x 2 micro-batches each (DDP no_sync on the first): the same training as one
    process without accumulation. Guards against gradients that silently stop being all-reduced
    (DDP's static graph with no_sync does that, so it is off with accumulation)."""
    out = run_train([*tiny_overrides, *RUN, "train.micro_batch_size=4", f"run.root={tmp_path}"], nproc=2)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 process(es) x 2 micro-batch(es)" in out.stdout
    assert_same_training(metrics(single_run), metrics(only_run(tmp_path)))


def test_accumulation_all_reduces_once_per_step_compiled_with_an_ema(tmp_path):
    """2 processes, 2 micro-batches each, train.compile (aot_eager) and a weight EMA: DDP all-reduces
    the gradients once per optimizer step (no_sync holds on the compiled DDP module: nothing
    unwraps it per step), counted by a comm hook (tests/ddp_rounds.py)."""
    from .ddp_rounds import count_rounds

    overrides = ["model.pretrained=none", f"model.backbone_kwargs={json.dumps(TINY_SWIN_KWARGS)}", "model.img_size=64",
                 "train.ema_decay=0.9", "train.micro_batch_size=4", "train.compile=true",
                 "train.compile_backend=aot_eager"]
    result = tmp_path / "rounds.json"
    assert launch_function(count_rounds, overrides, str(result)) == 0
    result = json.loads(result.read_text())
    assert result["micro"] == 2 and result["rounds"] == result["steps"] == 3


def test_preempted_then_resumed_equals_uninterrupted(tiny_overrides, tmp_path, monkeypatch):
    """SIGUSR1 (SLURM's warning) after step 2 -> checkpoint after step 3, exit 124; relaunching continues
    mid-epoch and ends exactly where an uninterrupted run ends (dropout, drop path and jitter on:
    every RNG)."""
    from iqa_dist.training import trainer as trainer_module

    overrides = [*tiny_overrides, *RUN, "train.max_steps=8", "train.checkpoint_every=100", "model.dropout=0.2",
                 "model.drop_path=0.1", "augment.brightness=0.2", "augment.hue=0.05"]
    ref_root, cut_root = tmp_path / "ref", tmp_path / "cut"
    ref = train_here([*overrides, f"run.root={ref_root}"])
    assert ref.returncode == 0, ref.stderr
    step = trainer_module.Trainer.step

    def warned_after_two(self, batch):
        step(self, batch)
        if self.state.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(trainer_module.Trainer, "step", warned_after_two)
    cut = train_here([*overrides, f"run.root={cut_root}"])
    assert cut.returncode == 124, cut.stdout[-2000:] + cut.stderr[-2000:]
    assert "preempted at step 3" in cut.stderr  # the request is read with the next step's flags
    monkeypatch.setattr(trainer_module.Trainer, "step", step)
    run = only_run(cut_root)
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(saved) == 1 and int(saved[0][5:]) < 8 and not (run / "summary.json").exists()
    again = train_here([*overrides, f"run.root={cut_root}"], resume="auto")
    assert again.returncode == 0, again.stderr
    assert "resumed" in again.stdout
    a, b = metrics(only_run(ref_root)), metrics(run)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert y["val_srcc"] == pytest.approx(x["val_srcc"], abs=1e-6)
        assert y["train_loss"] == pytest.approx(x["train_loss"], abs=1e-6)
    sa = json.loads((only_run(ref_root) / "summary.json").read_text())
    sb = json.loads((run / "summary.json").read_text())
    assert sb["test"]["srcc"] == pytest.approx(sa["test"]["srcc"], abs=1e-6)
    code, _, err = cli("train", "--preset", "demo", *[f"--{o}" for o in overrides], "--optim.lr=0.5",
                       f"--run.root={cut_root}", "--resume", str(run))
    assert code == 2 and "the config differs" in err and "Traceback" not in err


@pytest.mark.parametrize("before,after", [(1, 2), (2, 1)])
def test_resuming_on_another_number_of_processes_continues_exactly(before, after, single_run, tiny_overrides,
                                                                    tmp_path, monkeypatch):
    """A run stopped (the stop file: checkpoint, exit) on `before` processes and resumed on `after`
    ends with the same losses and metrics as the uninterrupted 1-process run, regularisers on:
    the plan, the augmentation and the regularisers' draws are functions of (seed, step, sample),
    and the checkpoint holds no per-process state the run needs. The start-up line says so."""
    stop = tmp_path / "stop"
    stop.touch()
    monkeypatch.setenv("IQA_DIST_STOP_FILE", str(stop))
    overrides = [*tiny_overrides, *RUN, f"run.root={tmp_path / 'runs'}"]

    def train(nproc: int, resume: str = ""):
        return train_here(overrides, resume=resume) if nproc == 1 else run_train(overrides, nproc=nproc, resume=resume)

    first = train(before)
    assert first.returncode != 0 and "preempted at step" in first.stdout + first.stderr
    run = only_run(tmp_path / "runs")
    [checkpoint] = list((run / "checkpoints").iterdir())
    assert int(checkpoint.name[5:]) < 6 and not (run / "summary.json").exists()
    monkeypatch.delenv("IQA_DIST_STOP_FILE")
    again = train(after, resume=str(run))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"on {after} process(es) instead of {before}" in again.stdout
    assert_same_training(metrics(single_run), metrics(run))
    summary = json.loads((run / "summary.json").read_text())
    reference = json.loads((single_run / "summary.json").read_text())
    assert summary["world_size"] == after and summary["test"]["srcc"] == pytest.approx(reference["test"]["srcc"],
                                                                                          abs=1e-4)


def test_track_test_never_changes_the_selected_step(single_run, tiny_overrides, tmp_path):
    """train.track_test scores the test split at every evaluation and the summary adds the best of
    them, labelled optimistic; the selection (step, val figures, exported model, its test
    figures) is the run's without it."""
    out = train_here([*tiny_overrides, *RUN, "train.track_test=true", f"run.root={tmp_path}"])
    assert out.returncode == 0, out.stderr[-3000:]
    tracked = json.loads((only_run(tmp_path) / "summary.json").read_text())
    plain = json.loads((single_run / "summary.json").read_text())
    assert tracked["best_step"] == plain["best_step"]
    for split in ("val", "test"):
        for k in ("srcc", "plcc"):
            assert tracked[split][k] == pytest.approx(plain[split][k], abs=1e-6)
    lines = metrics(only_run(tmp_path))
    assert all("test_srcc" in r for r in lines)
    optimistic = tracked["test_selected_on_test"]
    assert optimistic["srcc"] == max(r["test_srcc"] for r in lines) and "optimistic" in optimistic["note"]
    assert "test_selected_on_test" not in plain


def test_accumulation_and_stored_patches_train_end_to_end(tiny_overrides, tmp_path):
    """train.micro_batch_size (gradient accumulation) and data.train_patches=cached run the real
    loop; selection and early stopping are unit-tested on update_best (test_step.py)."""
    out = train_here([*tiny_overrides, *RUN, "train.max_steps=4", "train.eval_every=2", "train.micro_batch_size=6",
                      "data.train_patches=cached", "data.cached_patch_num=3", f"run.root={tmp_path}"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "1 process(es) x 3 micro-batch(es)" in out.stdout
    summary = json.loads((only_run(tmp_path) / "summary.json").read_text())
    assert summary["steps_run"] == 4 and math.isfinite(summary["test"]["srcc"])


def test_non_finite_loss_stops_before_the_step(tiny_overrides, tmp_path):
    """Steps are counted from 1 in every line, as the progress lines count them: the bad step is
    step bad+1, the state kept is after step bad (debug-step-<bad>), and no progress line of
    the bad step's number came before (its number once named the step before it)."""
    out = train_here([*tiny_overrides, "optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0",
                      "train.max_steps=20", "train.log_every=1", f"run.root={tmp_path}"])
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    assert "non-finite" in out.stderr and "at step" in out.stderr and "Traceback" not in out.stderr
    run = only_run(tmp_path)
    [debug] = list(run.glob("debug-step-*"))
    bad = int(debug.name.rsplit("-", 1)[1])
    assert f"at step {bad + 1}; " in out.stderr and f"(after step {bad})" in out.stderr, out.stderr
    assert f"step {bad + 1}/20" not in out.stderr and (bad == 0 or f"step {bad}/20" in out.stderr), out.stderr
    # the state from before the bad step: the loop's step counter rolled back (the learning rate is
    # a function of it), the optimizer's step count that of the applied steps
    state = torch.load(debug / "custom_checkpoint_0.pkl", weights_only=False)
    optimizer = torch.load(debug / "optimizer.bin", weights_only=False)
    assert state["step"] == bad and int(optimizer["state"][0]["step"]) == bad
    # report finds it (no metrics line was ever written) and says what happened to it
    report = cli("report", str(tmp_path), "--wide")  # its state on one line (a narrow table wraps it)
    assert report[0] == 0 and f"failed: non-finite loss at step {bad + 1}" in " ".join(report[1].split()), report


def test_leftover_partial_checkpoint_is_ignored(single_run, tmp_path):
    from accelerate import Accelerator

    from iqa_dist.artifacts.rundir import RunDir

    run = RunDir(single_run, Accelerator(cpu=True))
    (single_run / "checkpoints" / ".tmp-step-00000099").mkdir()
    assert run.latest_checkpoint().name == "step-00000006"


def test_a_full_disk_at_a_checkpoint_is_one_line_and_a_resume_after_freeing_space_continues(single_run, tiny_overrides,
                                                                                           tmp_path):
    """--run.root on a 32 MB file system: the step-3 checkpoint and model fit, the step-6 one does
    not. One line names the file system, what the checkpoint needs and the last complete one;
    its partial files are gone (they would keep the disk full); with more space the same run
    resumes from step 3 and ends as the uninterrupted run."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        code, _, err = cli("train", "--preset", "demo", *[f"--{o}" for o in [*tiny_overrides, *RUN, f"run.root={disk}"]])
        lines = err.strip().splitlines()
        assert code == 2 and lines[-1].startswith(f"error: no space left on {disk} for the checkpoint step-00000006 "
                                                  "(needs ~"), err
        assert "the last complete checkpoint is step-00000003" in lines[-1] and "Traceback" not in err
        run = only_run(disk)
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000003"]  # no partial left behind
        subprocess.run(["mount", "-o", "remount,size=96m", str(disk)], check=True)
        code, out, err = cli("train", "--resume", str(run))
        assert code == 0 and f"resumed {run} at step 3" in out, err
        assert_same_training(metrics(single_run), metrics(run))
    finally:
        subprocess.run(["umount", str(disk)])


def test_deterministic_runs_on_torchs_deterministic_algorithms(tiny_overrides, tmp_path, monkeypatch):
    """train.deterministic does what it says: the run trains with torch.use_deterministic_algorithms
    on (an op without a deterministic implementation would fail naming itself), and cuBLAS gets the
    workspace setting its deterministic mode needs."""
    from iqa_dist.training import trainer as trainer_module

    seen, step = [], trainer_module.Trainer.step

    def recording(self, batch):
        seen.append(torch.are_deterministic_algorithms_enabled())
        step(self, batch)

    monkeypatch.setattr(trainer_module.Trainer, "step", recording)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        out = train_here([*tiny_overrides, "train.max_steps=2", "train.deterministic=true", f"run.root={tmp_path}"])
    finally:
        torch.use_deterministic_algorithms(False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert seen == [True, True] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
