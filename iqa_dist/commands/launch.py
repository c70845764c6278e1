"""`iqa-dist launch`: `accelerate launch` for iqa-dist commands, with signals handled as a
scheduler or a terminal needs them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Collection

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

When a process of a training dies (the OOM killer, a bad node: the launch ends with exit status 1
or a signal), the whole group is started again and continues the same run from its last
checkpoint, at most --restarts times (default 3); then the launch ends with the last exit
status. A bad option or bad data (exit 2) or a non-finite loss (exit 3) is never retried.

The options before COMMAND (train, demo, sweep, evaluate, ...) go to `accelerate launch`, the
rest to the command.

examples:
  iqa-dist launch --multi_gpu --num_processes 8 train --preset koniq-swin-t --data.root /data/koniq10k
  iqa-dist launch --config_file accelerate_configs/multi_gpu.yaml train --preset koniq-swin-t --resume auto"""
RESTARTS = 3  # how often a training whose process died is started again
FINAL = (0, 2, 3, 124, 130)  # exit statuses that are answers, not a lost process (4, or torchrun's 1): kept


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
    try:
        for attempt in range(restarts + 1):
            # its own session: the terminal's Ctrl-C reaches only this process, which decides what it means
            children.append(subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", *accelerate_args,
                                              "-m", "iqa_dist", *again(command, created, attempt)], env=env,
                                             start_new_session=True))
            code = children[-1].wait()  # a signal runs `handle` and the wait goes on (PEP 475)
            if done.exists() and code == 0:
                return 124
            if code in FINAL or first or command[0] != "train":
                return code
            if attempt < restarts:
                print(f"iqa-dist launch: the training ended with exit status {code} (a process died); starting "
                      f"the group again from its last checkpoint (restart {attempt + 1} of {restarts})",
                      file=sys.stderr, flush=True)
        times = "once" if restarts == 0 else f"{restarts + 1} times"
        print(f"iqa-dist launch: the training died {times}; giving up (last exit status {code}; its error is above)",
              file=sys.stderr, flush=True)
        return code
    finally:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for f in ([done, created] if given else [stop, done, created]):
            f.unlink(missing_ok=True)
        folder.rmdir()


def again(command: list[str], created: Path, attempt: int) -> list[str]:
    """The command for this attempt: after a death, a training that was not resuming already
    continues the run the first attempt created (when it got as far as creating one)."""
    if attempt == 0 or any(a == "--resume" or a.startswith("--resume=") for a in command) or not created.is_file():
        return command
    return [*command, "--resume", created.read_text().strip()]
