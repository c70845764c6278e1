"""Launching: SLURM scripts rendered from a fake SLURM, two simulated nodes, failures, sweeps."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from iqa_dist.config import load_config
from iqa_dist.errors import UserError
from iqa_dist.experiments.grid import members

from .conftest import RUN, assert_same_training, fork_here, free_port, here, metrics, only_run, run_train, train_here
from .test_slurm import local_slurm_conf

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
CONFIGS = Path(__file__).resolve().parent.parent / "accelerate_configs"


@pytest.fixture()
def fake_slurm(tmp_path) -> dict:
    """scontrol and srun stand-ins: srun runs its command once per node with SLURM_NODEID set,
    as SLURM does with one task per node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\n[ \"$1 $2\" = 'show hostnames' ] && printf 'gpu-a01\\ngpu-a02\\n'\n")
    (bin_dir / "srun").write_text("#!/bin/bash\nwhile [[ \"$1\" == --* ]]; do shift; done\n"
                                  "for i in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$i \"$@\"; done\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
            "SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_GPUS_ON_NODE": "8", "IQA_DIST": "echo iqa-dist"}


def test_multinode_script_renders_one_launch_per_node(fake_slurm):
    out = subprocess.run(["bash", str(LAUNCH / "slurm_multinode.sbatch"), "koniq-swin-b-long", "--data.root=/data/k 1"],
                         capture_output=True, text=True, env=fake_slurm)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("iqa-dist launch --restarts 3")]
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        assert re.search(rf"--machine_rank {rank}\b", line), line
        assert "--num_machines 2" in line and "--num_processes 16" in line
        assert "--main_process_ip gpu-a01" in line and "--main_process_port 24242" in line
        assert "--rdzv_backend c10d" in line and "--multi_gpu" in line
        assert " train --preset koniq-swin-b-long --run.name=koniq-swin-b-long-4242 --resume auto" in line
        assert "--data.root=/data/k 1" in line  # arguments with spaces survive the inner bash -c


def test_single_node_script_renders(fake_slurm):
    env = {**fake_slurm, "SLURM_NNODES": "1"}
    out = subprocess.run(["bash", str(LAUNCH / "slurm_single_node.sbatch"), "koniq-swin-t"], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr
    [line] = [x for x in out.stdout.splitlines() if x.startswith("iqa-dist launch --restarts 3")]
    assert "--multi_gpu --num_processes 8" in line and line.endswith("--resume auto")


def test_sweep_script_renders_a_member(fake_slurm, tmp_path):
    members = tmp_path / "members.jsonl"
    members.write_text(json.dumps({"name": "a", "args": ["--preset", "demo", "--run.name=a"]}) + "\n" +
                       json.dumps({"name": "b", "args": ["--preset", "demo", "--data.root=/d/$HOME x", "--run.name=b"]}) + "\n")
    env = {**fake_slurm, "SLURM_NNODES": "1", "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_JOB_ID": "7"}
    out = subprocess.run(["bash", str(LAUNCH / "slurm_sweep.sbatch"), str(members)], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr
    [line] = [x for x in out.stdout.splitlines() if x.startswith("iqa-dist launch --restarts 3")]
    assert line.endswith(" train --preset demo --data.root=/d/$HOME x --run.name=b --resume auto")


# The time-limit logic every training script shares: SLURM's warning (USR1 to the batch script)
# touches the stop file, the training step sees it and ends, the script removes the file and
# requeues itself; a step that ends by itself is not requeued and its exit status is the job's.
STAND_IN = """#!/bin/bash
touch "$MARK.started"
[ -n "${STAND_IN_EXIT:-}" ] && exit "$STAND_IN_EXIT"
for _ in $(seq 1 1200); do
    [ -e "$IQA_DIST_STOP_FILE" ] && { touch "$MARK.saw-stop"; exit 0; }
    sleep 0.05
done
exit 9
"""


@pytest.mark.parametrize("script", ["slurm_single_node.sbatch", "slurm_multinode.sbatch", "slurm_sweep.sbatch"])
@pytest.mark.parametrize("warned", [True, False], ids=["time-limit", "ends-by-itself"])
def test_the_time_limit_warning_stops_the_step_and_requeues(fake_slurm, tmp_path, script, warned):
    (tmp_path / "bin" / "fake-launcher").write_text(STAND_IN)
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/bash\n[ \"$1 $2\" = 'show hostnames' ] && echo n1\n"
                                               f"echo \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    for f in (tmp_path / "bin").iterdir():
        f.chmod(0o755)
    members = tmp_path / "members.jsonl"
    members.write_text(json.dumps({"name": "a", "args": ["--preset", "demo"]}) + "\n")
    stop = tmp_path / "stop"
    env = {**fake_slurm, "SLURM_NNODES": "1", "SLURM_ARRAY_TASK_ID": "0", "IQA_DIST": str(tmp_path / "bin" / "fake-launcher"),
           "MARK": str(tmp_path / "mark"), "IQA_DIST_STOP_FILE": str(stop), **({} if warned else {"STAND_IN_EXIT": "3"})}
    job = subprocess.Popen(["bash", str(LAUNCH / script), str(members) if script == "slurm_sweep.sbatch" else "demo"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "mark.started").exists() and time.time() < deadline:
        time.sleep(0.02)
    assert (tmp_path / "mark.started").exists(), job.communicate()[0]
    if warned:
        job.send_signal(signal.SIGUSR1)  # what SLURM's --signal=B:USR1@... sends the batch script
    out = job.communicate(timeout=60)[0]
    requeues = [line for line in (tmp_path / "scontrol.log").read_text().splitlines()
                if line.startswith("requeue")] if (tmp_path / "scontrol.log").exists() else []
    assert not stop.exists(), out  # the stop file is removed either way: the requeued job must not stop at once
    if warned:
        assert (tmp_path / "mark.saw-stop").exists() and job.returncode == 0, out
        assert requeues == ["requeue 4242"], out
    else:
        assert job.returncode == 3 and requeues == [], out


def test_sweep_node_script_stops_the_sweep_and_requeues(tmp_path):
    """slurm_sweep_node.sbatch: USR1 sends SIGTERM to the sweep (whose members checkpoint), then
    the job requeues itself."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "fake-sweep").write_text("#!/bin/bash\ntrap 'touch \"$MARK.term\"; exit 124' TERM\n"
                                        "touch \"$MARK.started\"\nfor _ in $(seq 1 1200); do sleep 0.05; done\nexit 9\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77",
           "IQA_DIST": str(bin_dir / "fake-sweep"), "MARK": str(tmp_path / "mark")}
    job = subprocess.Popen(["bash", str(LAUNCH / "slurm_sweep_node.sbatch"), str(tmp_path / "group")], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "mark.started").exists() and time.time() < deadline:
        time.sleep(0.02)
    job.send_signal(signal.SIGUSR1)
    out = job.communicate(timeout=60)[0]
    assert (tmp_path / "mark.term").exists() and job.returncode == 124, out
    assert (tmp_path / "scontrol.log").read_text().split("\n")[0] == "requeue 77", out


def test_accelerate_configs_load_as_accelerate_reads_them():
    """Each shipped launch config is one Accelerate itself accepts, and its process count is whole
    machines of equal size (a 2 x 8 config that said 15 would start 15 processes)."""
    from accelerate.commands.config.config_args import load_config_from_file

    for path in sorted(CONFIGS.glob("*.yaml")):
        c = load_config_from_file(str(path))
        assert c.num_processes >= c.num_machines >= 1 and c.num_processes % c.num_machines == 0, path.name
        assert (c.num_processes > 1) == (c.distributed_type != "NO"), path.name


@pytest.mark.skipif(local_slurm_conf() is not None,
                    reason="the project's local SLURM runs: tests/test_slurm.py submits the script to it for real")
def test_two_simulated_nodes_of_two_processes_match_one_process(single_run, tiny_overrides, tmp_path):
    """launch/slurm_multinode.sbatch for 2 nodes x 1 "GPU" (2 gloo processes on 127.0.0.1, each its
    node's launcher; more per node adds interpreters, not paths), with srun and scontrol stand-ins
    that start both nodes at once: the same training as one process. Where no SLURM runs; with
    one, tests/test_slurm.py submits the same script with sbatch."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\n[ \"$1 $2\" = 'show hostnames' ] && echo 127.0.0.1\n")
    (bin_dir / "srun").write_text("#!/bin/bash\nwhile [[ \"$1\" == --* ]]; do shift; done\n"
                                  "pids=; for i in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$i \"$@\" & pids=\"$pids $!\"; done\n"
                                  "status=0; for p in $pids; do wait $p || status=$?; done; exit $status\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    port = free_port()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": str(port - 20000),
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_GPUS_ON_NODE": "1",
           "IQA_DIST": f"{sys.executable} -m iqa_dist", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "IQA_DIST_STOP_FILE": str(tmp_path / "stop")}
    out = subprocess.run(["bash", str(LAUNCH / "slurm_multinode.sbatch"), "demo",
                          *[f"--{o}" for o in [*tiny_overrides, *RUN, f"run.root={tmp_path / 'runs'}"]]],
                         capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = only_run(tmp_path / "runs")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert json.loads((run / "meta.json").read_text())["launches"][0]["num_machines"] == 2
    assert_same_training(metrics(single_run), metrics(run))


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 300) -> str:
    """The output up to the first line holding `text`; fails after `timeout` s even when the
    process prints nothing more (the lines are read on a thread, waited for with a deadline)."""
    lines: queue.Queue = queue.Queue()
    if not hasattr(proc, "_lines"):
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)],
                         daemon=True).start()
        proc._lines = lines
    seen, deadline = "", time.monotonic() + timeout
    while True:
        try:
            line = proc._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no line with {text!r} within {timeout:.0f} s; output so far:\n{seen[-2000:]}")
        if line is None:
            raise AssertionError(f"the process ended before printing {text!r}:\n{seen[-2000:]}")
        seen += line
        if text in line:
            return seen


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    """Waits for the process; the output `_wait_for` has not returned yet."""
    proc.wait(timeout=timeout)
    rest = []
    while (line := proc._lines.get(timeout=timeout)) is not None:
        rest.append(line)
    return "".join(rest)


def _until(condition, timeout: float = 60, what: str = "the condition"):
    """Polls `condition()` until it returns something truthy (an event, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.05)
    return value


@pytest.mark.slow
def _descendant_workers(pid: int) -> dict[int, int]:
    """rank -> pid of the training processes somewhere below `pid` (iqa-dist launch -> torchrun ->
    workers), breadth first: a worker's own children (its decode pool, multiprocessing's resource
    tracker) inherit its RANK, and killing one of those instead would kill no worker."""
    out, todo = {}, [pid]
    while todo:
        children = subprocess.run(["pgrep", "-P", str(todo.pop(0))], capture_output=True, text=True).stdout.split()
        todo += map(int, children)
        for rank, child in _workers_of(map(int, children)).items():
            out.setdefault(rank, child)
    return out


def _workers_of(pids) -> dict[int, int]:
    out = {}
    for pid in pids:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        out.update({int(item[5:]): pid for item in env if item.startswith(b"RANK=")})
    return out


LAUNCH_TWO = [sys.executable, "-m", "iqa_dist", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"]


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_a_killed_worker_restarts_the_group(tiny_overrides, tmp_path):
    """One 2-process `iqa-dist launch`, treated as a scheduler and a cluster treat one, training
    as one uninterrupted run does (losses and val metrics at every evaluation):
    - SIGKILL of rank 1 as training starts, before the first checkpoint (the OOM killer, a bad
      node): the launcher starts the group again from step 0 in a new run folder (the first one,
      with nothing to resume, is gone);
    - SIGKILL of rank 1 again after the step-6 checkpoint: the group starts again and resumes at 6;
    - SIGTERM to the launcher (a preemption): every process finishes its step, they checkpoint
      together, one line from the main process, exit 124. No traceback anywhere, torchrun's
      included. (A relaunch with --resume auto continuing is tested in-process: tests/test_cli.py.)"""
    overrides = [*tiny_overrides, "train.max_steps=100", "train.eval_every=3", "train.checkpoint_every=6",
                 "train.log_every=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    launch = subprocess.Popen([*LAUNCH_TWO, str(free_port()), "train", "--preset", "demo",
                               *[f"--{o}" for o in [*overrides, f"run.root={tmp_path / 'runs'}"]]],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def kill_rank_1() -> None:
        workers = _until(lambda: (w := _descendant_workers(launch.pid)) and set(w) == {0, 1} and w, what="both workers")
        os.kill(workers[1], signal.SIGKILL)

    seen = _wait_for(launch, "parameters:")  # the run folder exists; training starts
    kill_rank_1()
    seen += _wait_for(launch, "starting the group again from step 0, in a new run folder")
    seen += _wait_for(launch, "step 7/")  # the step-6 checkpoint is written
    kill_rank_1()
    seen += _wait_for(launch, "starting the group again from its last checkpoint (restart 2 of 3)")
    seen += _wait_for(launch, "step 10/")
    launch.send_signal(signal.SIGTERM)
    out = seen + _finish(launch, 120)
    assert launch.returncode == 124, out[-3000:]
    run = only_run(tmp_path / "runs")
    assert f"resumed {run} at step 6" in out, out[-3000:]
    assert out.count("preempted at step") == 1 and "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]
    stopped_at = max(int(c.name[5:]) for c in (run / "checkpoints").iterdir())
    assert 10 <= stopped_at < 100
    # the progress line's loss is every process's mean, the one the evaluation line logs
    progress = re.search(r"step 9/100 epoch \S+ loss (\S+)", out).group(1)
    assert re.search(r"step 9  epoch \S+  train loss (\S+)", out).group(1) == progress
    logged = metrics(run)
    reference = train_here([*overrides, f"train.max_steps={logged[-1]['step']}", f"run.root={tmp_path / 'reference'}"])
    assert reference.returncode == 0, reference.stderr[-2000:]
    assert [r["step"] for r in logged][:3] == [3, 6, 9]
    assert_same_training(metrics(only_run(tmp_path / "reference")), logged)


def test_the_launcher_restarts_only_a_lost_process_from_where_it_can(tmp_path, capsys):
    """`iqa-dist launch`'s decisions, given each attempt's exit status: anything but a lost process
    (exit 4) of a training ends the launch at once (an error a process raised, bad input, a
    non-finite loss would happen again); a lost one restarts from the run's last checkpoint, or
    from step 0 when it has none (a leftover folder without one is removed), at most --restarts
    times; a launch stopping on request, or another command, is not restarted. One line each."""
    from iqa_dist.commands.launch import attempts, restarts_option

    assert restarts_option(["--restarts", "5", "--multi_gpu"]) == (5, ["--multi_gpu"])
    assert restarts_option(["--restarts=0"]) == (0, []) and restarts_option([]) == (3, [])
    with pytest.raises(UserError, match="whole number"):
        restarts_option(["--restarts", "x"])
    created, train = tmp_path / "created", ["train", "--preset", "demo"]

    def scripted(*steps):
        """attempt(): each call's exit status, after its side effect (a run folder it made)."""
        calls = []

        def attempt(command):
            calls.append(command)
            code, made = steps[len(calls) - 1]
            if made:
                (made / "checkpoints").mkdir(parents=True, exist_ok=True)
                (made / "config.yaml").write_text("{}")
                created.write_text(str(made))
            return code
        return attempt, calls

    for code in (0, 1, 2, 3, 124, 130):
        attempt, calls = scripted((code, None))
        assert attempts(train, attempt, 3, created, lambda: False) == code and calls == [train]
    assert "exit status 1 (a process raised an error, named above); not restarted" in capsys.readouterr().err
    early, late = tmp_path / "runs" / "early", tmp_path / "runs" / "late"
    attempt, calls = scripted((4, early), (4, late), (4, None))
    late_checkpoint = late / "checkpoints" / "step-00000006"
    real = attempt

    def attempt(command):  # the second attempt gets as far as a checkpoint
        code = real(command)
        if len(calls) == 2:
            late_checkpoint.mkdir(parents=True)
        return code

    assert attempts(train, attempt, 2, created, lambda: False) == 4
    assert calls == [train, train, [*train, "--resume", str(late)]]
    assert not early.exists() and late.exists()  # nothing to resume in the first: removed
    err = capsys.readouterr().err.splitlines()
    assert err == ["iqa-dist launch: a process of the training was lost (exit status 4); starting the group again "
                   "from step 0, in a new run folder: it was lost before its first checkpoint (restart 1 of 2)",
                   "iqa-dist launch: a process of the training was lost (exit status 4); starting the group again "
                   "from its last checkpoint (restart 2 of 2)",
                   "iqa-dist launch: a process of the training was lost 3 times; giving up (exit status 4)"], err
    for command, stopping in ((train, True), (["sweep", "splits"], False)):
        attempt, calls = scripted((4, None))
        assert attempts(command, attempt, 3, created, lambda: stopping) == 4 and len(calls) == 1
    attempt, calls = scripted((4, None), (0, None))  # the user's own --resume is kept as it is
    assert attempts([*train, "--resume", "auto"], attempt, 3, created, lambda: False) == 0
    assert calls == [[*train, "--resume", "auto"]] * 2


def test_ctrl_c_checkpoints_and_a_second_one_a_second_later_quits(monkeypatch):
    """Once training runs, Ctrl-C asks for a checkpoint at the end of the step (a second signal at
    the same moment, the launcher forwarding the terminal's, changes nothing); another Ctrl-C more
    than a second later quits at once."""
    from iqa_dist.training.preemption import PreemptionFlag

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    try:
        flag = PreemptionFlag()
        flag.interrupts(announce=False)
        handler = signal.getsignal(signal.SIGINT)
        assert not flag.requested()
        handler(signal.SIGINT, None)
        handler(signal.SIGINT, None)  # the forwarded copy
        assert flag.requested()
        clock[0] += 1.5
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
    finally:
        for sig, h in zip((signal.SIGINT, signal.SIGTERM, signal.SIGUSR1), before):
            signal.signal(sig, h)


def test_stop_file_checkpoints_and_exits(tiny_overrides, tmp_path, monkeypatch):
    """The SLURM scripts' time-limit path: the stop file appears (here: after step 2), the run
    checkpoints at the end of the next step (the request travels with the guard's flags, read one
    step late) and exits 124."""
    from iqa_dist.training import trainer as trainer_module

    stop = tmp_path / "stop"
    monkeypatch.setenv("IQA_DIST_STOP_FILE", str(stop))
    step = trainer_module.Trainer.step

    def stop_after_two(self, batch):
        step(self, batch)
        if self.state.step == 2:
            stop.touch()

    monkeypatch.setattr(trainer_module.Trainer, "step", stop_after_two)
    out = train_here([*tiny_overrides, "train.max_steps=1000", "train.eval_every=1000", f"run.root={tmp_path / 'runs'}"])
    assert out.returncode == 124, out.stdout[-2000:] + out.stderr[-2000:]
    assert "preempted at step 3" in out.stderr
    [checkpoint] = list((only_run(tmp_path / "runs") / "checkpoints").iterdir())
    assert checkpoint.name == "step-00000003"


@pytest.mark.slow
def test_ablation_members_switch_exactly_one_regulariser_on():
    """Phase one's ablation from the koniq-swin-t preset: none, each regulariser alone, all."""
    def on(cfg):
        jitter = (cfg.augment.brightness, cfg.augment.contrast, cfg.augment.saturation, cfg.augment.hue)
        return {name for name, value in (("dropout", cfg.model.dropout), ("drop_path", cfg.model.drop_path),
                                         ("weight_decay", cfg.optim.weight_decay), ("jitter", max(jitter))) if value}

    configs = {m["name"]: load_config("koniq-swin-t", m["overrides"])
               for m in members("ablation", ["model.pretrained=none"], 0)}
    assert {name: on(c) for name, c in configs.items()} == {
        "none": set(), "dropout-only": {"dropout"}, "drop_path-only": {"drop_path"},
        "weight_decay-only": {"weight_decay"}, "jitter-only": {"jitter"},
        "all": {"dropout", "drop_path", "weight_decay", "jitter"}}
    assert configs["dropout-only"].model.dropout == configs["all"].model.dropout == 0.3  # the preset's value
    assert configs["all"] == load_config("koniq-swin-t", ["model.pretrained=none"])


def test_parallel_sweep_reports_a_failure_and_resumes_only_what_is_missing(tiny_overrides, tmp_path):
    """A 2-config x 2-split grid; two CPU slots stand in for two GPUs: members run two at once; one
    member's launcher fails (it is reported, the others finish); --resume then runs only that one,
    and the table pairs the configs by split."""
    failing = tmp_path / "launcher.sh"
    failing.write_text(f"#!/bin/sh\ncase \"$*\" in *run.name=lr=3e-4,split01*) exit 7;; esac\n"
                       f"exec {sys.executable} \"$@\"\n")
    failing.chmod(0o755)
    overrides = [f"--{o}" for o in [*tiny_overrides, *RUN, "train.max_steps=2", "train.eval_every=2",
                                    f"run.root={tmp_path / 'runs'}"]]
    out = here("sweep", "grid", "--set", "optim.lr=1e-3,3e-4", "--splits", "2", "--preset", "demo", "--parallel", "2",
               "--launcher", str(failing), *overrides)
    assert out.returncode == 1, out.stderr[-3000:]  # a member failed: scripts must notice
    assert "1 of 4 member(s) did not finish: lr=3e-4,split01" in out.stderr
    assert f"sweep --resume {tmp_path}" in out.stderr
    events = [" ".join(line.split()[:2]) for line in out.stderr.splitlines() if line.startswith(("started", "lr="))]
    assert events[:2] == ["started lr=1e-3,split00", "started lr=1e-3,split01"]  # two at once
    [group] = list((tmp_path / "runs").iterdir())
    results = json.loads((group / "results.json").read_text())
    state = {m["member"]: m["state"] for m in results["members"]}
    assert state["lr=1e-3,split00"] == "finished" and state["lr=3e-4,split01"].startswith("failed (exit 7): ")
    assert results["configs"]["lr=3e-4"]["vs_baseline"]["pairs"] == 1  # only split00 has both
    assert (group / "lr=1e-3,split00.log").is_file()
    done = {p.name: (p / "summary.json").stat().st_mtime_ns for p in group.iterdir() if (p / "summary.json").exists()}
    again = here("sweep", "--resume", str(group))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 of 4 member(s) finished; running 1" in again.stderr
    results = json.loads((group / "results.json").read_text())
    assert [m["member"] for m in results["members"]] == ["lr=1e-3,split00", "lr=1e-3,split01", "lr=3e-4,split00",
                                                        "lr=3e-4,split01"]
    assert all(m["finished"] for m in results["members"])
    vs = results["configs"]["lr=3e-4"]["vs_baseline"]
    assert vs["pairs"] == 2 and vs["verdict"].startswith("too few repeats (2 pairs")
    assert results["configs"]["lr=1e-3"]["test_srcc"]["n"] == 2
    assert "configs against lr=1e-3" in again.stdout and "too few repeats" in again.stdout
    for name, stamp in done.items():
        assert (group / name / "summary.json").stat().st_mtime_ns == stamp  # finished members kept as they were
    collected = here("sweep", "collect", str(group))
    assert collected.returncode == 0 and "lr=3e-4,split01" in collected.stdout


HOLD = ("import sys, time\nfrom iqa_dist.artifacts import lock\nlock.take(sys.argv[1])\nprint('held', flush=True)\n"
        "time.sleep(300)")  # a stand-in for a process that trains the run


def test_a_sweep_never_starts_a_member_that_is_still_running(tmp_path, capsys):
    """A member whose run another process still trains (an orphan of a killed sweep, or a second
    sweep on the group) is left alone, said so; the other members start."""
    from iqa_dist.experiments.sweep import run_members

    busy = tmp_path / "20261203-000000-a"
    busy.mkdir()
    (busy / "config.yaml").write_text("{}\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(busy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        members = [{"name": "a", "args": []}, {"name": "b", "args": []}]
        status = run_members(tmp_path, members, "true", 0, 1)
        err = " ".join(capsys.readouterr().err.split())
        assert f"a is still running (host {socket.gethostname()} pid {holder.pid}" in err, err
        assert status == {"b": 0}  # only b was started (and `true` finished it)
    finally:
        holder.kill()
        holder.wait()


def test_a_member_stopped_as_it_starts_is_stopped_not_failed(tmp_path, capsys):
    """SIGTERM to a sweep's whole process group (a scheduler's preemption, `kill -TERM -PGID`) just
    after a member started: the member dies of the signal before it could set its handler (exit
    -15, an empty log), the sweep stops. The member is "stopped by SIGTERM (resumable)" in the
    sweep's lines, its status and the group's table, not "failed (exit -15)"; the member not yet
    started is not started. Any other signal (the OOM killer's SIGKILL) is a failure, named."""
    from iqa_dist.experiments.collect import member_result
    from iqa_dist.experiments.group import read_status
    from iqa_dist.experiments.sweep import Stopped, run_members

    group_term = tmp_path / "group-term.sh"  # the same signal to the sweep (this process) and to the member
    group_term.write_text("#!/bin/sh\nkill -TERM $PPID\nkill -TERM $$\nsleep 30\n")
    group_term.chmod(0o755)
    members = [{"name": "a", "args": []}, {"name": "b", "args": []}]
    with pytest.raises(Stopped):
        run_members(tmp_path, members, str(group_term), 0, 1)
    err = " ".join(capsys.readouterr().err.split())
    assert "a stopped by SIGTERM (resumable); log" in err and "failed" not in err and "started b" not in err, err
    assert read_status(tmp_path) == {"a": -15} and (tmp_path / "a.log").read_text() == ""
    assert member_result(tmp_path, members[0], read_status(tmp_path))["state"] == "stopped by SIGTERM (resumable)"
    assert member_result(tmp_path, members[1], read_status(tmp_path))["state"] == "not finished"
    from iqa_dist.experiments.group import exit_state

    (tmp_path / "c.log").write_text("error: out of memory\n")
    assert exit_state(-9, tmp_path / "c.log") == "failed (killed by SIGKILL): out of memory"
    assert exit_state(124, tmp_path / "c.log") == "stopped (resumable)"


def test_a_multi_gpu_member_starts_under_the_launcher_that_keeps_the_workers_exit_status():
    """A member on several GPUs runs `accelerate launch` through distributed.launcher, whose exit
    status is the workers' (124 when they stopped on request), not torchrun's 1 and traceback."""
    from iqa_dist.experiments.sweep import member_command

    member = {"name": "a", "args": ["--preset", "demo"]}
    command = member_command(member, "", 4, 29610)
    assert command[:3] == [sys.executable, "-m", "iqa_dist.distributed.launcher"]
    assert command[3:9] == ["--multi_gpu", "--num_processes", "4", "--num_machines", "1", "--main_process_port"]
    assert command[-7:] == ["-m", "iqa_dist", "train", "--preset", "demo", "--resume", "auto"]
    assert member_command(member, "", 1, 29610)[:4] == [sys.executable, "-m", "iqa_dist", "train"]


def test_a_launch_sent_sigterm_ends_124_when_its_workers_checkpointed(monkeypatch):
    """distributed.launcher itself signalled (a sweep stopping a multi-GPU member, a scheduler's
    group SIGTERM): torchrun's agent stops the workers and reports only its signal (accelerate
    exits 128 + 15; older versions let torchrun's SignalException out). When the workers stopped
    on request (they leave the LAUNCHED marker), the launch ends 124, as one process does; when
    they did not, the signal's status stays. Under `iqa-dist launch` (LAUNCHED already set) the
    marker is that launcher's to read."""
    import accelerate.commands.launch as accelerate_launch
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from iqa_dist.distributed.launcher import LAUNCHED, main

    def signalled(checkpointed: bool, how: str):
        def launch_command(args):
            if checkpointed:
                Path(os.environ[LAUNCHED]).write_text("preempted at step 3")  # what the main worker writes
            if how == "exit":
                sys.exit(128 + signal.SIGTERM)
            raise SignalException("got signal: 15", sigval=signal.SIGTERM)
        return launch_command

    argv = ["--num_processes", "1", "-m", "iqa_dist", "train"]
    monkeypatch.delenv(LAUNCHED, raising=False)
    for how in ("exit", "exception"):
        monkeypatch.setattr(accelerate_launch, "launch_command", signalled(True, how))
        assert main(argv) == 124, how
        monkeypatch.setattr(accelerate_launch, "launch_command", signalled(False, how))
        assert main(argv) == 143, how
    assert LAUNCHED not in os.environ
    monkeypatch.setenv(LAUNCHED, str(Path(os.devnull)))  # iqa-dist launch's own marker: not this launcher's
    monkeypatch.setattr(accelerate_launch, "launch_command", signalled(False, "exit"))
    assert main(argv) == 143


@pytest.mark.slow
def test_a_killed_sweep_takes_its_running_member_with_it(tiny_overrides, tmp_path):
    """SIGKILL of a running sweep (nothing it can catch): its member gets SIGTERM from the kernel
    (the parent-death signal set when it started), checkpoints and exits, and leaves the run's
    writer lock free, instead of training on, orphaned, beside a later `sweep --resume`."""
    from iqa_dist.artifacts import lock

    overrides = [f"--{o}" for o in [*tiny_overrides, "train.max_steps=400", "train.eval_every=400",
                                    "train.checkpoint_every=2", f"run.root={tmp_path / 'runs'}"]]
    sweep = fork_here("sweep", "grid", "--set", "train.seed=0,1", "--preset", "demo", *overrides, out=tmp_path / "sweep")
    run = _until(lambda: next(iter((tmp_path / "runs").glob("*/*-seed=0/checkpoints/step-*")), None), timeout=300,
                 what="the first member's first checkpoint").parent.parent
    assert lock.holder(run), "the member holds its run's lock while it trains"
    sweep.kill()
    sweep.join()
    _until(lambda: lock.holder(run) is None, timeout=90, what="the member to exit")
    # the lock goes back when the run directory is closed; the exit's message is printed after that
    log_file = run.parent / "seed=0.log"
    try:
        _until(lambda: "preempted at step" in log_file.read_text(), timeout=30, what="the member's exit message")
    except AssertionError:
        raise AssertionError(log_file.read_text()[-2000:]) from None  # it checkpointed on the way out
    assert not list(run.parent.glob("*-seed=1"))  # and nothing else was started after the sweep died


def test_bf16_gradient_compression_agrees_with_fp32(single_run, tiny_overrides, tmp_path):
    """2 processes all-reducing bf16 gradients vs 1 process in fp32 (world-size invariance is
    checked on its own). bf16 keeps 8 significant bits, so each averaged gradient is off by at most
    2^-9 relative; Adam divides by the gradient's running magnitude, so each update moves by
    ~0.2% of lr more or less, and after 6 steps at lr <= 5e-4 the weights differ by < 1e-5: the
    validation correlations agree to 1e-3 and the RMSE (0-100 scale) to 0.05."""
    out = run_train([*tiny_overrides, *RUN, "train.grad_compression=bf16", f"run.root={tmp_path}"], nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "all-reduce: " in out.stdout and "(bf16)" in out.stdout
    for a, b in zip(metrics(single_run), metrics(only_run(tmp_path))):
        assert a["step"] == b["step"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-3)
        for key in ("val_srcc", "val_plcc"):
            assert b[key] == pytest.approx(a[key], abs=1e-3), key
        assert b["val_rmse"] == pytest.approx(a["val_rmse"], abs=0.05)


@pytest.mark.parametrize("rule, batch, lr, warmup", [
    ("none", 96, 1e-5, 2940), ("none", 192, 1e-5, 2940), ("none", 768, 1e-5, 2940),
    ("linear", 96, 1e-5, 2940), ("linear", 192, 2e-5, 1470), ("linear", 768, 8e-5, 368),
    ("sqrt", 96, 1e-5, 2940), ("sqrt", 192, 1e-5 * 2 ** 0.5, 1470), ("sqrt", 768, 1e-5 * 8 ** 0.5, 368),
])
def test_lr_scaling_rules(rule, batch, lr, warmup):
    """koniq-swin-b-long: lr 1e-5 and 2940 warmup steps at batch 96."""
    cfg = load_config("koniq-swin-b-long", [f"optim.lr_scaling={rule}", f"train.batch_size={batch}"])
    assert cfg.effective_lr() == pytest.approx(lr) and cfg.effective_warmup() == warmup


def test_scaling_projection_arithmetic():
    from iqa_dist.bench.scaling import project, rate_at

    rates = {12: 600.0, 24: 1000.0, 48: 1500.0, 96: 2000.0}
    assert rate_at(96, rates) == 2000.0 and rate_at(200, rates) == 2000.0 and rate_at(6, rates) == 600.0
    assert rate_at(12 * 2 ** 0.5, rates) == pytest.approx(800.0)  # halfway in log2 between 12 and 24
    # 8 GPUs at global batch 96: 12 each; 100 MB of gradients over NVLink at 100 GB/s
    row = project(rates, 100e6, 96, 8, intra_gbps=100, inter_gbps=10, patches=140920)
    compute, comm = 12 / 600.0, 2 * 7 / 8 * 100e6 / 100e9
    assert row["compute_ms"] == pytest.approx(1e3 * compute) and row["comm_ms"] == pytest.approx(1e3 * comm)
    assert row["epoch_s"] == pytest.approx(140920 / 96 * (compute + comm))
    across = project(rates, 100e6, None, 16, intra_gbps=100, inter_gbps=10, patches=140920)  # 96 per GPU, 2 nodes
    assert across["per_gpu_batch"] == 96 and across["comm_ms"] == pytest.approx(1e3 * 2 * 15 / 16 * 100e6 / 10e9)
    assert project(rates, 100e6, 96, 1)["comm_ms"] == 0.0
