"""What a run says and does when a process fails: its own error named by itself, a lost process
named by the survivors, restarts that work from any point, the declared minimum accelerate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from iqa_dist.training import trainer as trainer_module

from .conftest import RUN, free_port, launch_here, only_run


def test_one_ranks_out_of_memory_is_named_by_it_and_nobody_is_blamed(tiny_overrides, tmp_path, monkeypatch):
    """Rank 1 of 2 runs out of memory in its 5th step (what one GPU's OOM does): rank 1 says so in
    one line (type, first line, rank, step, the last checkpoint, what to change, the traceback's
    file), rank 0 stops without a word (no "stopped answering"), exit status 1 (not a lost
    process: `iqa-dist launch` would not restart it); meta.json says how it ended."""
    step = trainer_module.Trainer.step

    def oom_on_rank_1(self, batch):
        if self.acc.process_index == 1 and self.state.step == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 1; 79.11 GiB total)")
        step(self, batch)

    monkeypatch.setattr(trainer_module.Trainer, "step", oom_on_rank_1)
    out = launch_here("train", "--preset", "demo", *[f"--{o}" for o in [*tiny_overrides, *RUN, f"run.root={tmp_path}"]])
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    [line] = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    run = only_run(tmp_path)
    trace = run / "failure-rank1.txt"
    assert line.startswith("error: rank 1 of 2 failed at step 5: OutOfMemoryError: CUDA out of memory. Tried to "
                           "allocate 2.00 GiB"), line
    assert "lower train.micro_batch_size" in line and "the last checkpoint is step-00000003" in line
    assert line.endswith(f"traceback in {trace}") and "oom_on_rank_1" in trace.read_text()
    assert "stopped answering" not in out.stdout + out.stderr and "Traceback" not in out.stderr
    ended = json.loads((run / "meta.json").read_text())["launches"][-1]["ended"]
    assert ended.startswith("failed: rank 1 of 2 failed at step 5: OutOfMemoryError"), ended


def test_a_hung_rank_is_named_within_the_timeout_as_a_lost_process(tiny_overrides, tmp_path, monkeypatch):
    """Rank 1 stops answering in its 5th step (a hung process: it never reaches the collective):
    rank 0's collective times out after train.timeout_s and it names rank 1 in one line; exit status
    4, which `iqa-dist launch` answers with a restart."""
    step = trainer_module.Trainer.step

    def hang_on_rank_1(self, batch):
        if self.acc.process_index == 1 and self.state.step == 4:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun's agent may end it at once afterwards
            time.sleep(600)
        step(self, batch)

    monkeypatch.setattr(trainer_module.Trainer, "step", hang_on_rank_1)
    t0 = time.monotonic()
    out = launch_here("train", "--preset", "demo", *[f"--{o}" for o in [*tiny_overrides, *RUN, "train.timeout_s=6",
                                                                          f"run.root={tmp_path}"]])
    assert out.returncode == 4, out.stdout[-3000:] + out.stderr[-3000:]
    [line] = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert line == ("error: rank 1 of 2 stopped answering at step 5 (killed, stopped, or its node is gone; a "
                    "collective waits at most train.timeout_s=6 s); the last checkpoint is step-00000003"), line
    assert time.monotonic() - t0 < 60
    ended = json.loads((only_run(tmp_path) / "meta.json").read_text())["launches"][-1]["ended"]
    assert ended == "stopped: rank 1 of 2 stopped answering at step 5", ended


NAN_ON_RANK_1 = '''\
import os

if os.environ.get("RANK") == "1":  # a training worker of rank 1: its 4th step's loss is NaN
    import iqa_dist.training.trainer as trainer

    step = trainer.Trainer.step

    def nan_on_rank_1(self, batch):
        if self.state.step != 3:
            return step(self, batch)
        forward = self.forward  # its predictions NaN: so is its loss, and through DDP every rank's gradient
        self.forward = lambda x, noise: forward(x, noise) * float("nan")
        try:
            step(self, batch)
        finally:
            self.forward = forward

    trainer.Trainer.step = nan_on_rank_1
'''


def declared_minimum(package: str) -> str:
    """The lower bound pyproject declares for `package` (as installed: the distribution's metadata)."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    [req] = [Requirement(r) for r in requires("iqa-dist") if Requirement(r).name == package and not Requirement(r).marker]
    [bound] = [s.version for s in req.specifier if s.operator == ">="]
    return bound


def registry_wheel(package: str, version: str) -> Path:
    """`package==version`'s wheel from the package registry, downloaded once into a cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "iqa-dist-tests" / "wheels"
    found = sorted(cache.glob(f"{package}-{version}*-py3-none-any.whl"))
    if not found:
        got = subprocess.run([sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps",
                              "--only-binary=:all:", "-d", str(cache)], capture_output=True, text=True, timeout=300)
        found = sorted(cache.glob(f"{package}-{version}*-py3-none-any.whl"))
        if got.returncode or not found:
            pytest.skip(f"the {package}=={version} wheel cannot be downloaded here: {got.stderr.strip()[-300:]}")
    return found[-1]


def test_a_nan_on_one_rank_under_the_declared_minimum_accelerate_keeps_finite_weights(tiny_overrides, tmp_path):
    """The guard's flag reaches the fused optimizer as exactly 1 whatever the accelerate version:
    under the lowest accelerate pyproject allows (its wheel from the registry, first on the path), a
    2-process run whose rank 1 alone gets a NaN loss (DDP then makes both ranks' gradients NaN)
    stops naming the step, and the state it keeps from before the step is finite."""
    from packaging.version import Version
    from safetensors.torch import load_file

    bound = declared_minimum("accelerate")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NAN_ON_RANK_1)
    path = [str(registry_wheel("accelerate", bound)), str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    overrides = [*tiny_overrides, "train.max_steps=6", "train.eval_every=100", f"run.root={tmp_path / 'runs'}"]
    out = subprocess.run([sys.executable, "-m", "iqa_dist.distributed.launcher", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", str(free_port()), "-m", "iqa_dist", "train", "--preset", "demo",
                          *[f"--{o}" for o in overrides]], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
    run = only_run(tmp_path / "runs")
    assert Version(json.loads((run / "meta.json").read_text())["launches"][-1]["accelerate"]) == Version(bound)
    assert "error: non-finite loss at step 4;" in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    weights = load_file(run / "debug-step-00000003" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
