"""Where a launch writes, decided before anything is built: a new run directory, or the run it
resumes (`--resume RUN_DIR`, or `--resume auto`: the newest unfinished run of this name). A
resume must have a checkpoint and the run's config, give or take where things live
(config.ENVIRONMENT) and, with --extend, a longer schedule.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..artifacts import lock
from ..artifacts.rundir import RunDir, Target
from ..config import ENVIRONMENT, Config, flatten
from ..errors import UserError

EXTENSIBLE = ("train.epochs", "train.max_steps", "train.patience")  # what --extend may change


class RunFinished(UserError):
    """--resume on a run that has finished: nothing to do, not an error."""

    exit_code = 0


def find_resumable(root: Path, name: str) -> Path | None:
    """The newest run of this name that did not finish and has a checkpoint to continue from."""
    runs = [p for p in RunDir.named(root, name) if not RunDir(p).finished and RunDir(p).latest_checkpoint() is not None]
    return runs[-1] if runs else None


def choose(cfg: Config, resume: str, extend: bool, accelerator: Accelerator) -> Target:
    """Decides where this launch writes, before anything is built; creates nothing.

    resume: "" (new run), "auto" (the newest unfinished run of this name with a checkpoint,
    else a new one), or a run directory. The main process decides; the others receive it."""
    choice: list = [None]
    if accelerator.is_main_process:
        choice = [_choose(cfg, resume, extend)]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice)
    if isinstance(choice[0], UserError):  # every process stops with the same message
        raise choice[0]
    return choice[0]


def _choose(cfg: Config, resume: str, extend: bool) -> Target | UserError:
    root = Path(cfg.run.root)
    path = find_resumable(root, cfg.run_name()) if resume == "auto" else Path(resume) if resume else None
    unwritable = _unwritable(path if path is not None and RunDir.is_run(path) else root)
    if unwritable:  # before any data is prepared: the run could not save anything
        return UserError(unwritable)
    if path is None:
        if extend:
            return UserError("--extend continues an existing run: give --resume RUN_DIR")
        if resume == "auto":  # say so: a typo in run.name would otherwise silently start afresh
            print(f"--resume auto: no unfinished run named {cfg.run_name()} with a checkpoint in {root}; "
                  "starting a new one", file=sys.stderr)
        return Target("", False, [])
    if not RunDir.is_run(path):
        return UserError(f"--resume {resume}: {path} is not a run directory (no {RunDir.CONFIG})")
    run = RunDir(path)
    diffs = [d for d in _differences(run.config().to_dict(), cfg.to_dict()) if d[0] not in ENVIRONMENT]
    schedule = [d for d in diffs if d[0] in EXTENSIBLE]
    other = [d for d in diffs if d[0] not in EXTENSIBLE]
    lines = [f"{k}: {a!r} -> {b!r}" for k, a, b in diffs]
    if other or (schedule and not extend):
        hint = ("; schedule changes (" + ", ".join(EXTENSIBLE) + ") are allowed with --extend") if not other else ""
        return UserError(f"--resume {path}: the config differs from the run's{hint}:\n  " + "\n  ".join(lines))
    if run.latest_checkpoint() is None:
        return UserError(f"--resume {path}: the run has no checkpoint to continue from")
    if run.finished and not schedule:
        summary = run.summary() or {}
        return RunFinished(f"{path} has finished (step {summary.get('steps_run', '?')}, test SRCC "
                           f"{summary.get('test', {}).get('srcc', float('nan')):.4f}); nothing to resume. "
                           f"To train it longer: --resume {path} --extend {_longer(run.config(), summary)}")
    try:
        lock.take(path)  # held from here until the launch ends: one writer per run
    except UserError as e:
        return e
    return Target(str(path), True, [f"{k}: {a!r} -> {b!r}" for k, a, b in schedule])


def _longer(cfg: Config, summary: dict) -> str:
    """The option that lengthens a finished run: the limit that ended it."""
    if summary.get("stopped_early"):
        return f"--train.patience N (it stopped early: {cfg.train.patience} evaluations without a gain)"
    if cfg.train.max_steps:
        return f"--train.max_steps N (it ended at its train.max_steps={cfg.train.max_steps})"
    return f"--train.epochs N (it ended after its train.epochs={cfg.train.epochs})"


def _unwritable(folder: Path) -> str:
    """Why a run cannot write in `folder`, or "" when it can: a file is created and removed in it
    (or, while it does not exist, in the nearest folder above it, where it will be made), which
    also catches read-only mounts and immutable folders. Creates nothing that stays."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, f"{probe} is a file, not a folder")
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".iqa-dist-write-test-"):
            pass
    except OSError as e:
        return (f"{folder}: cannot write run outputs there ({e.strerror or type(e).__name__}); "
                "choose another folder with --run.root")
    return ""


def _differences(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """(dotted key, a's value, b's value) where two configs differ."""
    fa, fb = flatten(a), flatten(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
