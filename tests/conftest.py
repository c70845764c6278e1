"""Shared test set-up: a private cache root, tiny models, the synthetic dataset built once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from iqa_dist.config import load_config

# The demo's tiny Swin (1.4M parameters) at the demo's 64-px patches, as config overrides; its one
# home is the demo preset. (A wider hyper network than the demo's: two 1x1 convs, as the presets have.)
TINY_SWIN_KWARGS = load_config("demo").model.backbone_kwargs
TINY_SIZE = load_config("demo").model.img_size
TINY_SWIN = ["model.pretrained=none", f"model.backbone_kwargs={json.dumps(TINY_SWIN_KWARGS)}",
             f"model.img_size={TINY_SIZE}", "model.hyper_hidden=[64, 32]"]


@pytest.fixture(scope="session", autouse=True)
def autograd_before_any_compile() -> None:
    """An eager backward before anything else: torch's autograd engine sets up its device threads at
    a process's first backward, and when that one is torch.compile'd it also registers a fork
    handler after which every forked child refuses autograd ("Autograd and Fork"); `launch_here`
    forks training workers from this process, whichever test compiled first."""
    import torch

    torch.ones(1, requires_grad=True).sum().backward()


REGULARISERS = ["model.dropout=0.3", "model.drop_path=0.2", "augment.brightness=0.1", "augment.contrast=0.1",
                "augment.saturation=0.1", "augment.hue=0.05"]


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    os.environ["IQA_DIST_CACHE"] = str(root)
    return root


@pytest.fixture(scope="session")
def tiny_overrides(cache_root) -> list[str]:
    """The demo preset shrunk for tests (fewer contents and patches), with the koniq-swin-t
    recipe's regularisers on (dropout 0.3, drop path 0.2, ColorJitter), so that every check of
    world-size invariance, resuming and compile covers them."""
    return [f"data.cache_dir={cache_root}", "data.synthetic_size=1", "data.train_patch_num=2",
            "data.test_patch_num=2", "data.workers=2", "train.batch_size=16", "train.epochs=1",
            "train.log_every=1000", *TINY_SWIN, *REGULARISERS]


def cli(*args: str) -> tuple[int, str, str]:
    """`iqa-dist ARGS` in this process: (exit status, stdout, stderr). See `here`."""
    out = here(*args)
    return out.returncode, out.stdout, out.stderr


def here(*args: str) -> subprocess.CompletedProcess:
    """`run_cli` in this process, where a fresh interpreter adds nothing to the check (~5 s of
    imports less). Output is redirected, not captured by a fixture, so module-scoped fixtures can
    train too. Accelerate's process-wide state and the signal handlers a training run installs are
    reset around the call."""
    import contextlib
    import io
    import signal

    from iqa_dist.cli import main
    from iqa_dist.distributed.accelerators import reset_accelerate_state

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    reset_accelerate_state()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
            main(list(args))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(list(args), exit_.value.code, out.getvalue(), err.getvalue())


def train_here(overrides: list[str], resume: str = "") -> subprocess.CompletedProcess:
    """`run_train` for one process, in this process."""
    return here(*train_cmd(overrides, resume=resume)[3:])


def fork_here(*args: str, out: Path):
    """`iqa-dist ARGS` in a child forked from this process, started (`.join()`, `.exitcode`, `.pid`):
    for a command that must be a process of its own (to be killed, or to run beside another) but
    need not pay a fresh interpreter's imports. One thread (OpenMP's pool does not survive a
    fork); stdout and stderr in out.stdout and out.stderr."""
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=_forked_cli, args=(list(args), str(out)))
    child.start()
    return child


def _forked_cli(args: list[str], out: str) -> None:
    import torch

    from iqa_dist.cli import main
    from iqa_dist.distributed.accelerators import reset_accelerate_state

    torch.set_num_threads(1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # the CLI's own, not pytest's
        signal.signal(sig, signal.SIG_DFL)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = open(f"{out}.{name}", "w", buffering=1)
        os.dup2(f.fileno(), fd)
        setattr(sys, name, f)
    reset_accelerate_state()
    main(args)


def launch_function(function, *args, nproc: int = 2, timeout: float = 300) -> int:
    """`function(*args)` on `nproc` processes forked from this one by accelerate's `notebook_launcher`
    (see `launch_here`), each on one thread; the launch's exit status (0, or the workers')."""
    from accelerate import notebook_launcher
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from iqa_dist.distributed.accelerators import reset_accelerate_state
    from iqa_dist.distributed.launcher import exit_status

    reset_accelerate_state()  # notebook_launcher refuses to fork a process that holds an Accelerator's state
    done = threading.Event()
    threading.Thread(target=_kill_children_after, args=(timeout, done), daemon=True).start()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        notebook_launcher(_one_thread, (function, *args), num_processes=nproc, use_port=str(free_port()))
        return 0
    except ChildFailedError as e:
        return exit_status([f.exitcode for _, f in sorted(e.failures.items())])
    finally:
        done.set()
        for sig, handler in handlers.items():  # torchrun's agent installs its own
            signal.signal(sig, handler)


def _one_thread(function, *args) -> None:
    import torch

    torch.set_num_threads(1)  # OpenMP's pool does not survive a fork: more threads would hang
    function(*args)


def launch_here(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N -m iqa_dist ARGS` with its workers forked
    from this process: accelerate's `notebook_launcher` runs torchrun's agent here (its rendezvous,
    store and monitoring, as under `accelerate launch`) and forks the N workers, which start with
    torch, timm and iqa_dist imported (a 2-process test in ~3 s instead of ~15 s of interpreters
    starting) and with whatever the test patched (a fault to inject). Each worker runs the CLI on one
    thread (OpenMP's pool does not survive a fork), its output in files: stdout and stderr come back
    in rank order; returncode is the launch's, as `iqa-dist launch` takes it from the workers'
    (distributed.launcher.exit_status). A worker still running after `timeout` s is killed."""
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="launch-here-"))
    code = launch_function(_worker, list(args), str(out), nproc=nproc, timeout=timeout)
    read = lambda name: "".join((out / f"{name}-{r}").read_text() for r in range(nproc)  # noqa: E731
                                if (out / f"{name}-{r}").exists())
    return subprocess.CompletedProcess(list(args), code, read("stdout"), read("stderr"))


def _worker(args: list[str], out: str) -> None:
    from iqa_dist.cli import main
    from iqa_dist.distributed.accelerators import reset_accelerate_state

    rank = os.environ["RANK"]
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = open(Path(out) / f"{name}-{rank}", "w", buffering=1)
        os.dup2(f.fileno(), fd)
        setattr(sys, name, f)
    reset_accelerate_state()
    main(args)


def _kill_children_after(timeout: float, done) -> None:
    if done.wait(timeout):
        return
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            os.kill(int(pid), signal.SIGKILL)


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m iqa_dist ARGS` in a subprocess; output captured as text."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "iqa_dist", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


RUN = ["train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=3", "train.keep_checkpoints=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(overrides: list[str], nproc: int = 1, resume: str = "") -> list[str]:
    args = ["-m", "iqa_dist", "train", "--preset", "demo", *[f"--{o}" for o in overrides]]
    if resume:
        args += ["--resume", resume]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *args]


def run_train(overrides: list[str], nproc: int = 1, resume: str = "") -> subprocess.CompletedProcess:
    """`iqa-dist train --preset demo` on `nproc` processes: `train_here` for one, `launch_here` for more."""
    if nproc == 1:
        return train_here(overrides, resume=resume)
    return launch_here(*train_cmd(overrides, resume=resume)[3:], nproc=nproc)


def only_run(root: Path) -> Path:
    runs = [p for p in root.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def cut_at_first_step(overrides: list[str], root: Path, monkeypatch) -> Path:
    """A 1-process run stopped by the stop file (a checkpoint after its first step, then exit), as
    a preemption stops one; its run directory, to --resume."""
    stop = root.parent / f"{root.name}.stop"
    stop.touch()
    monkeypatch.setenv("IQA_DIST_STOP_FILE", str(stop))
    try:
        first = train_here([*overrides, f"run.root={root}"])
    finally:
        monkeypatch.delenv("IQA_DIST_STOP_FILE")
    assert first.returncode != 0 and "preempted at step" in first.stdout + first.stderr, first.stderr[-2000:]
    return only_run(root)


def assert_same_training(one: list[dict], two: list[dict]) -> None:
    """Two world sizes train the same recipe: the same images evaluated at every step and the same
    validation metrics to 1e-4 (the training issue's bound). RMSE is in score units, so its 1e-4
    is of the 0-100 range: a 2-process all-reduce and 1-thread matmuls add in another order than
    one 2-thread process, and after 6 steps the RMSE differs by 0.003 (33.956 vs 33.959) while
    SRCC is identical and PLCC differs by 1e-5."""
    assert len(one) == len(two) > 0
    for a, b in zip(one, two):
        assert a["step"] == b["step"] and a["val_n"] == b["val_n"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-4)
        assert b["val_srcc"] == pytest.approx(a["val_srcc"], abs=1e-4)
        assert b["val_plcc"] == pytest.approx(a["val_plcc"], abs=1e-4)
        assert b["val_rmse"] == pytest.approx(a["val_rmse"], abs=1e-4 * 100)


@pytest.fixture(scope="session")
def single_run(tiny_overrides, tmp_path_factory) -> Path:
    """One uninterrupted 1-process tiny run, shared by the checks that only read it."""
    root = tmp_path_factory.mktemp("runs1")
    out = train_here([*tiny_overrides, *RUN, f"run.root={root}"])
    assert out.returncode == 0, out.stdout + out.stderr
    return only_run(root)
