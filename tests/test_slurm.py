"""The SLURM scripts and `sweep --slurm`, run for real: submitted with sbatch to the one-host
SLURM that `launch/local_slurm.sh start` runs (two simulated nodes that declare 8 GPUs each; the
jobs train on the CPU). Each script runs as the README gives it, with its own #SBATCH lines;
GPUS / GPUS_PER_NODE pick one process per node, as on a GPU node with one GPU.

Only that SLURM is used: every client here (sbatch, squeue, scontrol, scancel, and the jobs' own
srun and scontrol) finds it through SLURM_CONF, set by the `local_slurm` fixture; a machine's own
SLURM (a cluster's login node) is never asked, and where the local one is not running the tests
skip."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import RUN, assert_same_training, cli, metrics, only_run

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
START = "launch/local_slurm.sh start (as root; sudo if you are not)"
# The environment of the shell that started pytest may hold another SLURM's settings (a login
# node's SLURM_CONF, a job's SLURM_JOB_ID, SBATCH_PARTITION...): none of them reaches these clients.
CLIENT_SETTINGS = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SCONTROL_", "SCANCEL_")


def _local_script(command: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLIENT_SETTINGS)}
    return subprocess.run(["bash", str(LAUNCH / "local_slurm.sh"), command], capture_output=True, text=True, env=env)


@functools.cache
def local_slurm_conf() -> Path | None:
    """The config of the project's own SLURM when it is running (`local_slurm.sh status`: its
    slurm.conf, as that script wrote it, and its controller answering through it), else None.
    Whatever else answers `sinfo` on this machine does not count."""
    if not shutil.which("sbatch") or _local_script("status").returncode != 0:
        return None
    return Path(_local_script("conf").stdout.strip())


# decided before any fixture trains: where the local SLURM is not running, nothing here runs
pytestmark = pytest.mark.skipif(local_slurm_conf() is None, reason=f"needs the project's local SLURM: {START}")


@pytest.fixture()
def local_slurm(monkeypatch) -> Path:
    """SLURM_CONF set to the local SLURM's config for this test (and the jobs it submits, which
    inherit it), other SLURM settings removed; a skip, saying how to start it, where it is not running."""
    conf = local_slurm_conf()
    if conf is None:
        pytest.skip(f"needs the project's local SLURM: {START}")
    for key in list(os.environ):
        if key.startswith(CLIENT_SETTINGS):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_CONF", str(conf))
    return conf


@pytest.fixture()
def job_env(cache_root, local_slurm) -> dict:
    """What a job inherits (sbatch exports the environment): this venv's iqa-dist first on PATH,
    the tests' cache, one process per node and one thread each, and the local SLURM's config."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "IQA_DIST_CACHE": str(cache_root),
            "GPUS": "1", "GPUS_PER_NODE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def sbatch(args: list[str], env: dict, cwd: Path) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=env, cwd=cwd, check=True)
    return out.stdout.strip().split(";")[0]


def job(job_id: str) -> dict:
    """scontrol's record of a job: {"JobState": ..., "Restarts": ..., "ExitCode": ...}."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)
    return value


def done(job_id: str, timeout: float = 400) -> dict:
    return wait(lambda: (j := job(job_id)).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                                 "NODE_FAIL", "OUT_OF_MEMORY") and j,
                timeout, f"job {job_id} to end")


def gone(job_id: str, timeout: float = 400) -> None:
    """Every task of a job (an array's too) has left the queue."""
    wait(lambda: not subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip(),
         timeout, f"job {job_id} to leave the queue")


def train_args(tiny_overrides, root: Path) -> list[str]:
    return [f"--{o}" for o in [*tiny_overrides, *RUN, f"run.root={root}"]]


def test_single_node_script_trains_through_its_time_limit(single_run, tiny_overrides, job_env, tmp_path):
    """`sbatch launch/slurm_single_node.sbatch demo ...` with a one-minute limit and its warning
    due 55 s before it: the script is warned (USR1), the run checkpoints, the job requeues itself
    and its rerun (SLURM_RESTART_COUNT 1, the limit lifted meanwhile) continues the same run to
    the end: the same training as one uninterrupted process.

    slurmctld checks time limits only every 30 s, so its own warning may come after this short
    run has ended; once training has begun, the test has SLURM deliver the same signal the same
    way (`scancel --batch --signal=USR1`, what --signal=B:USR1@T does at T) unless it came."""
    root = tmp_path / "runs"
    job_id = sbatch(["--time=1", "--signal=B:USR1@55", str(LAUNCH / "slurm_single_node.sbatch"), "demo",
                     *train_args(tiny_overrides, root)], job_env, tmp_path)
    wait(lambda: list(root.glob("*/config.yaml")), 120, "the run to start")  # the script's trap is set by now
    if int(job(job_id).get("Restarts", "0")) == 0 and job(job_id).get("JobState") == "RUNNING":
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    wait(lambda: int(job(job_id).get("Restarts", "0")) >= 1, 240, "the job to requeue itself")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"], check=True)
    final = done(job_id)
    log = (tmp_path / f"iqa-dist-{job_id}.out").read_text()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", log[-3000:]
    run = only_run(root)
    assert run.name.endswith(f"-demo-{job_id}") and "resumed" in log and "at step" in log, log[-3000:]
    assert json.loads((run / "meta.json").read_text())["launches"][0]["resumed"] is False
    assert len(json.loads((run / "meta.json").read_text())["launches"]) >= 2
    assert_same_training(metrics(single_run), metrics(run))


def test_multinode_script_on_two_nodes_equals_one_process(single_run, tiny_overrides, job_env, tmp_path):
    """`sbatch --nodes=2 launch/slurm_multinode.sbatch demo ...`: one launcher per node (srun), c10d
    rendezvous at the first node's address, gloo between the two: the one-process training."""
    root = tmp_path / "runs"
    job_id = sbatch(["--nodes=2", str(LAUNCH / "slurm_multinode.sbatch"), "demo", *train_args(tiny_overrides, root)],
                    job_env, tmp_path)
    final = done(job_id)
    log = (tmp_path / f"iqa-dist-{job_id}.out").read_text()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", log[-3000:]
    run = only_run(root)
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    assert json.loads((run / "meta.json").read_text())["launches"][0]["num_machines"] == 2
    assert_same_training(metrics(single_run), metrics(run))


def test_sweeps_submitted_as_an_array_and_as_a_node_job_collect_their_tables(tiny_overrides, job_env, tmp_path,
                                                                             monkeypatch):
    """`iqa-dist sweep grid ... --slurm` (a job array, a member a task) and `--slurm node` (one job
    running the members side by side): a 2x1 grid each, then `sweep collect` makes the table."""
    for key, value in job_env.items():
        monkeypatch.setenv(key, value)  # sweep calls sbatch from this process: its jobs inherit this
    monkeypatch.chdir(tmp_path)
    base = ["sweep", "grid", "--set", "train.seed=0,1", "--preset", "demo",
            *[f"--{o}" for o in [*tiny_overrides, "train.max_steps=2", "train.eval_every=2"]]]
    groups = {}
    for how in ("array", "node"):
        code, _, err = cli(*base, f"--run.root={tmp_path / how}", "--slurm", how)
        assert code == 0 and "submitted job" in err, err
        groups[how] = next((tmp_path / how).iterdir())
    for how, group in groups.items():
        gone((group / "slurm_job").read_text().strip())
        code, out, err = cli("sweep", "collect", str(group))
        table = json.loads((group / "results.json").read_text())
        logs = "".join(p.read_text()[-1500:] for p in tmp_path.glob("iqa-sweep*.out"))
        assert code == 0 and [m["finished"] for m in table["members"]] == [True, True], (how, err, logs)
        assert {m["config"] for m in table["members"]} == {"seed=0", "seed=1"} and "seed=1" in out
