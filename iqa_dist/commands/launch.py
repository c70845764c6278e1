"""`iqa-dist launch`: `accelerate launch` for iqa-dist commands, with signals handled as a
scheduler or a terminal needs them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Collection

from ..errors import UserError
from .options import LAUNCHED

NAME = "launch"
HELP = ("run an iqa-dist command under `accelerate launch`; SIGTERM or Ctrl-C checkpoint and exit 124; a training "
        "whose process died is restarted from its last checkpoint")
USAGE = "iqa-dist launch [--restarts N] [accelerate launch options] COMMAND [its options]"
DESCRIPTION = """\
`accelerate launch` for one or many processes, with the signals a scheduler or a terminal sends
handled: SIGTERM, SIGUSR1 or Ctrl-C make every process checkpoint at the end of its step and exit,
with one line from the main process and exit status 124 (relaunch with --resume to continue); a
second Ctrl-C (a second or more later) stops everything at once (exit 130). Plain `accelerate
launch` passes SIGTERM to the processes too, but torchrun then reports its own SignalException
with a traceback and exit status 1.

When a process of a training is lost (killed by the OOM killer, a bad node, hung: the others
name it and exit with status 4), the whole group is started again and continues the same run
from its last checkpoint, or from step 0 when it had none yet, at most --restarts times (default
3); then the launch ends with the last exit status. Nothing that would happen again is
retried: an error a process raised (exit 1, e.g. out of memory), a bad option or bad data
(exit 2), a non-finite loss (exit 3). One line per attempt says what happened; the processes'
own lines say why, without torchrun's traceback.

The options before COMMAND (train, demo, sweep, evaluate, ...) go to `accelerate launch`, the
rest to the command.

examples:
  iqa-dist launch --multi_gpu --num_processes 8 train --preset koniq-swin-t --data.root /data/koniq10k
  iqa-dist launch --config_file accelerate_configs/multi_gpu.yaml train --preset koniq-swin-t --resume auto"""
RESTARTS = 3  # how often a training whose process was lost is started again
ENDINGS = {1: "a process raised an error, named above", 2: "bad options or data, named above",
           3: "a non-finite loss, named above", 130: "interrupted"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("rest", nargs=argparse.REMAINDER, help="[--restarts N] accelerate launch options, then COMMAND "
                   "and its options")


def split(rest: list[str], commands: Collection[str]) -> tuple[list[str], list[str]]:
    """(accelerate launch options, the iqa-dist command line): split at the first of `commands`."""
    for i, arg in enumerate(rest):
        if arg in commands and arg != NAME:
            return rest[:i], rest[i:]
    raise UserError("iqa-dist launch: name the command to run (e.g. `iqa-dist launch --num_processes 2 train "
                    "--preset demo`)")


def restarts_option(options: list[str]) -> tuple[int, list[str]]:
    """(--restarts N, the other options): ours, taken out before the rest goes to accelerate."""
    rest, n = [], RESTARTS
    items = list(options)
    while items:
        item = items.pop(0)
        if item == "--restarts" or item.startswith("--restarts="):
            value = item.partition("=")[2] if "=" in item else (items.pop(0) if items else "")
            if not value.isdigit():
                raise UserError(f"iqa-dist launch --restarts {value!r}: give a whole number (0: never restart)")
            n = int(value)
        else:
            rest.append(item)
    return n, rest


def run(args: argparse.Namespace) -> int:
    """args.rest: everything after `launch`; args.commands: the names of iqa-dist's commands (the CLI's)."""
    from ..artifacts.rundir import RUN_FILE  # here: the CLI reports bad options before torch loads

    accelerate_args, command = split(args.rest, args.commands)
    restarts, accelerate_args = restarts_option(accelerate_args)
    folder = Path(tempfile.mkdtemp(prefix="iqa-dist-launch-"))
    given = os.environ.get("IQA_DIST_STOP_FILE", "")  # a SLURM script's, which its own trap touches too
    stop, done, created = Path(given) if given else folder / "stop", folder / "stopped", folder / "run"
    env = {**os.environ, "IQA_DIST_STOP_FILE": str(stop), LAUNCHED: str(done), RUN_FILE: str(created)}
    first: list[float] = []
    children: list[subprocess.Popen] = []

    def handle(signum: int, frame) -> None:
        now = time.monotonic()
        if first and signum == signal.SIGINT and now - first[0] > 1.0:  # the user's second Ctrl-C: stop now
            os.killpg(children[-1].pid, signal.SIGKILL)
            raise KeyboardInterrupt
        if not first:
            first.append(now)
            stop.touch()  # every process sees it at the end of its step, checkpoints and exits

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, handle)
    def attempt(attempt_command: list[str]) -> int:
        # its own session: the terminal's Ctrl-C reaches only this process, which decides what it means;
        # the launcher module ends with the workers' own exit status, without torchrun's traceback
        children.append(subprocess.Popen([sys.executable, "-m", "iqa_dist.distributed.launcher", *accelerate_args,
                                          "-m", "iqa_dist", *attempt_command], env=env, start_new_session=True))
        code = children[-1].wait()  # a signal runs `handle` and the wait goes on (PEP 475)
        return 124 if done.exists() and code == 0 else code

    try:
        return attempts(command, attempt, restarts, created, stopping=lambda: bool(first))
    finally:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for f in ([done, created] if given else [stop, done, created]):
            f.unlink(missing_ok=True)
        folder.rmdir()


def attempts(command: list[str], attempt: Callable[[list[str]], int], restarts: int, created: Path,
             stopping: Callable[[], bool]) -> int:
    """Runs `attempt` (one `accelerate launch` of the command; its exit status) until it ends with
    anything but a lost process (exit 4) of a training, at most `restarts` times more, one line per
    attempt that did not simply succeed; a lost process while stopping on request is not restarted.
    Returns the last exit status."""
    from ..distributed.launcher import LOST

    attempt_command = command
    for n in range(restarts + 1):
        code = attempt(attempt_command)
        if code != LOST or stopping() or command[0] != "train":
            if code in ENDINGS:
                say(f"the {command[0]} ended with exit status {code} ({ENDINGS[code]}); not restarted: it "
                    "would end the same way")
            return code
        if n == restarts:
            break
        attempt_command, resumed = again(command, created)
        say(f"a process of the training was lost (exit status {LOST}); starting the group again "
            + (f"from its last checkpoint (restart {n + 1} of {restarts})" if resumed else
               f"from step 0, in a new run folder: it was lost before its first checkpoint (restart {n + 1} of "
               f"{restarts})"))
    times = "once" if restarts == 0 else f"{restarts + 1} times"
    say(f"a process of the training was lost {times}; giving up (exit status {LOST})")
    return LOST


def say(line: str) -> None:
    print(f"iqa-dist launch: {line}", file=sys.stderr, flush=True)


def again(command: list[str], created: Path) -> tuple[list[str], bool]:
    """(the command for the next attempt after a lost process, whether it resumes): a training that
    was not resuming already continues the run an attempt created, when that run has a checkpoint
    to continue from; else it starts afresh from step 0 (a run folder without a checkpoint, left
    when the main process itself was lost, is removed first: nothing in it can be resumed)."""
    from ..artifacts.rundir import RunDir

    if any(a == "--resume" or a.startswith("--resume=") for a in command):
        return command, True
    path = Path(created.read_text().strip()) if created.is_file() else None
    if path is not None and RunDir.is_run(path) and RunDir(path).latest_checkpoint() is not None:
        return [*command, "--resume", str(path)], True
    if path is not None and RunDir.is_run(path) and not RunDir(path).has_results():
        shutil.rmtree(path, ignore_errors=True)
    created.unlink(missing_ok=True)
    return command, False
