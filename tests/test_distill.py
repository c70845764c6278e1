"""Self-distillation from the weight EMA (optim.distill_weight): refused without an EMA, the
same training whatever the host reads and on any number of processes and micro-batches, and
resumed exactly from a stop at a step the uninterrupted run never settled."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from iqa_dist.config import load_config
from iqa_dist.errors import UserError
from iqa_dist.training import trainer as trainer_module

from .conftest import assert_same_training, cli, metrics, only_run, run_train, train_here

# 8 steps; the host reads (settles) the step's results at evaluations (6, 8) and at progress lines
DISTILL = ["train.max_steps=8", "train.eval_every=6", "train.checkpoint_every=100", "train.keep_checkpoints=1",
           "train.ema_decay=0.7", "optim.distill_weight=0.5"]


def ema_of(run, step: int) -> dict:
    """The checkpointed EMA (registered objects: state 0, augmenter 1, EMA 2) and the weights."""
    folder = run / "checkpoints" / f"step-{step:08d}"
    ema = torch.load(folder / "custom_checkpoint_2.pkl", weights_only=False)
    from safetensors.torch import load_file

    return {"ema": ema["model"], "weights": load_file(folder / "model.safetensors")}


def assert_same_state(a: dict, b: dict) -> None:
    for part in ("ema", "weights"):
        for key, value in a[part].items():
            assert torch.equal(b[part][key], value), (part, key)


@pytest.fixture(scope="module")
def distilled(tiny_overrides, tmp_path_factory):
    """The uninterrupted 1-process distilled run, progress lines every 50 steps (never, here)."""
    root = tmp_path_factory.mktemp("distilled")
    out = train_here([*tiny_overrides, *DISTILL, "train.log_every=50", f"run.root={root}"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "self-distillation from it, weight 0.5" in out.stdout
    return only_run(root)


def test_distillation_needs_the_ema_teacher():
    with pytest.raises(UserError, match="the teacher is the weight EMA; set train.ema_decay"):
        load_config("demo", ["optim.distill_weight=0.5"])
    code, _, err = cli("train", "--preset", "demo", "--optim.distill_weight=-1", "--train.ema_decay=0.9")
    assert code == 2 and "optim.distill_weight=-1" in err and "Traceback" not in err


def test_the_teacher_is_the_same_whatever_the_host_reads(distilled, tiny_overrides, tmp_path):
    """A progress line every step (the host reads every step's flags, which would update a
    host-timed EMA a step earlier) trains bit for bit what no progress line does."""
    out = train_here([*tiny_overrides, *DISTILL, "train.log_every=1", f"run.root={tmp_path}"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = only_run(tmp_path)
    assert [m["val_srcc"] for m in metrics(run)] == [m["val_srcc"] for m in metrics(distilled)]
    assert [m["ema_val_srcc"] for m in metrics(run)] == [m["ema_val_srcc"] for m in metrics(distilled)]
    assert_same_state(ema_of(distilled, 8), ema_of(run, 8))


def test_a_distilled_run_stopped_anywhere_resumes_exactly(distilled, tiny_overrides, tmp_path, monkeypatch):
    """Stopped (SIGUSR1, as SLURM warns) after step 3, which the uninterrupted run never settled,
    and resumed: the same weights, EMA and metrics as the run that went through."""
    step = trainer_module.Trainer.step

    def warned_after_three(self, batch):
        step(self, batch)
        if self.state.step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(trainer_module.Trainer, "step", warned_after_three)
    cut = train_here([*tiny_overrides, *DISTILL, "train.log_every=50", f"run.root={tmp_path}"])
    assert cut.returncode == 124, cut.stdout[-3000:] + cut.stderr[-3000:]
    monkeypatch.setattr(trainer_module.Trainer, "step", step)
    run = only_run(tmp_path)
    saved = [int(p.name[5:]) for p in (run / "checkpoints").iterdir()]
    assert len(saved) == 1 and 3 <= saved[0] < 6  # not a step the uninterrupted run settled
    again = train_here([*tiny_overrides, *DISTILL, "train.log_every=50", f"run.root={tmp_path}"], resume="auto")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    a, b = metrics(distilled), metrics(run)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert (y["val_srcc"], y["ema_val_srcc"]) == (x["val_srcc"], x["ema_val_srcc"])
        assert y["train_loss"] == pytest.approx(x["train_loss"], abs=1e-6)
    assert_same_state(ema_of(distilled, 8), ema_of(run, 8))


def test_a_distilled_run_on_two_processes_in_micro_batches_equals_one(distilled, tiny_overrides, tmp_path):
    """2 processes x 2 micro-batches: each sample's teacher prediction is the same EMA's of the
    same patch, so the run equals the 1-process one, the EMA's own figures included."""
    out = run_train([*tiny_overrides, *DISTILL, "train.log_every=50", "train.micro_batch_size=4",
                     f"run.root={tmp_path}"], nproc=2)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 process(es) x 2 micro-batch(es)" in out.stdout
    one, two = metrics(distilled), metrics(only_run(tmp_path))
    assert_same_training(one, two)
    for a, b in zip(one, two):
        assert b["ema_val_srcc"] == pytest.approx(a["ema_val_srcc"], abs=1e-4)
