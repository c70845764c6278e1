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
HELP = "run an iqa-dist command under `accelerate launch`; SIGTERM or Ctrl-C checkpoint and exit 124"
USAGE = "iqa-dist launch [accelerate launch options] COMMAND [its options]"
DESCRIPTION = """\
`accelerate launch` for one or many processes, with the signals a scheduler or a terminal sends
handled: SIGTERM, SIGUSR1 or Ctrl-C make every process checkpoint at the end of its step and exit,
with one line from the main process and exit status 124 (relaunch with --resume to continue); a
second Ctrl-C (a second or more later) stops everything at once (exit 130). Plain `accelerate
launch` passes SIGTERM to the processes too, but torchrun then reports its own SignalException
with a traceback and exit status 1.

The options before COMMAND (train, demo, sweep, evaluate, ...) go to `accelerate launch`, the
rest to the command.

examples:
  iqa-dist launch --multi_gpu --num_processes 8 train --preset koniq-swin-t --data.root /data/koniq10k
  iqa-dist launch --config_file accelerate_configs/multi_gpu.yaml train --preset koniq-swin-t --resume auto"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("rest", nargs=argparse.REMAINDER, help="accelerate launch options, then COMMAND and its options")


def split(rest: list[str], commands: Collection[str]) -> tuple[list[str], list[str]]:
    """(accelerate launch options, the iqa-dist command line): split at the first of `commands`."""
    for i, arg in enumerate(rest):
        if arg in commands and arg != NAME:
            return rest[:i], rest[i:]
    raise UserError("iqa-dist launch: name the command to run (e.g. `iqa-dist launch --num_processes 2 train "
                    "--preset demo`)")


def run(args: argparse.Namespace) -> int:
    """args.rest: everything after `launch`; args.commands: the names of iqa-dist's commands (the CLI's)."""
    accelerate_args, command = split(args.rest, args.commands)
    folder = Path(tempfile.mkdtemp(prefix="iqa-dist-launch-"))
    given = os.environ.get("IQA_DIST_STOP_FILE", "")  # a SLURM script's, which its own trap touches too
    stop, done = Path(given) if given else folder / "stop", folder / "stopped"
    env = {**os.environ, "IQA_DIST_STOP_FILE": str(stop), LAUNCHED: str(done)}
    # its own session: the terminal's Ctrl-C reaches only this process, which decides what it means
    child = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", *accelerate_args, "-m", "iqa_dist",
                              *command], env=env, start_new_session=True)
    first: list[float] = []

    def handle(signum: int, frame) -> None:
        now = time.monotonic()
        if first and signum == signal.SIGINT and now - first[0] > 1.0:  # the user's second Ctrl-C: stop now
            os.killpg(child.pid, signal.SIGKILL)
            raise KeyboardInterrupt
        if not first:
            first.append(now)
            stop.touch()  # every process sees it at the end of its step, checkpoints and exits

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, handle)
    try:
        code = child.wait()  # a signal runs `handle` and the wait goes on (PEP 475)
        return 124 if done.exists() and code == 0 else code
    finally:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for f in ([done] if given else [stop, done]):
            f.unlink(missing_ok=True)
        folder.rmdir()
