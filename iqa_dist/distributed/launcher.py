"""`accelerate launch` in this process: how `iqa-dist launch` runs each attempt
(`python -m iqa_dist.distributed.launcher [accelerate launch options] -m iqa_dist COMMAND ...`).

Plain `accelerate launch` ends every failed group with torchrun's ChildFailedError: a traceback
and exit status 1, whatever the workers said. Here the launch ends with the workers' own status
(`exit_status`), which is what `iqa-dist launch` decides on (restart a lost process, never an
error that would repeat), and without that traceback or the elastic agent's log lines: each
worker has said what happened in one line. A launch that was itself sent SIGTERM (a sweep
stopping its members, a scheduler signalling the process group) ends with 124, as one process
does, when its workers checkpointed on the way out: torchrun's agent stops them and reports only
its own signal (128 + 15), so the workers leave a marker (LAUNCHED) that says they did.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LOST = 4  # a worker's exit status when another process stopped answering (training.failures.LostProcess)
STOPPED = 124  # checkpointed on request; relaunch to resume (a one-process training's own exit status)
# The file a launched training writes when it stops on request (it then exits 0, a clean end for
# torchrun); set by `iqa-dist launch` for its attempts, else by this launcher for its own workers.
LAUNCHED = "IQA_DIST_LAUNCHED"


def exit_status(codes: list[int]) -> int:
    """One status for the launch from the failed workers' ones (rank order): an answer a worker gave
    (1 its own error, 2 bad input, 3 a non-finite loss, ...) over a lost process (4, or a worker
    killed by a signal, which torchrun reports as a negative status): when a process raised, the
    others' collectives failed after it, and torchrun may have stopped them with a signal."""
    answers = [c for c in codes if c > 0 and c != LOST]
    return answers[0] if answers else LOST if codes else 0


def main(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the workers say what happened
    args = launch_command_parser().parse_args(argv)
    marker = None
    if not os.environ.get(LAUNCHED):  # under `iqa-dist launch` the marker is its own, and it reads it
        marker = Path(tempfile.mkdtemp(prefix="iqa-dist-launcher-")) / "stopped"
        os.environ[LAUNCHED] = str(marker)  # the workers inherit this process's environment
    try:
        launch_command(args)
        code = 0
    except ChildFailedError as e:  # several processes (torchrun)
        code = exit_status([failure.exitcode for _, failure in sorted(e.failures.items())])
    except subprocess.CalledProcessError as e:  # one process (accelerate's simple launcher)
        code = exit_status([e.returncode])
    except SignalException as e:  # this process was signalled (older accelerate lets torchrun's exception out)
        code = 128 + e.sigval
    except SystemExit as e:  # the same, from accelerate's own handler (128 + the signal)
        code = e.code if isinstance(e.code, int) else 1
    finally:
        if marker is not None:
            os.environ.pop(LAUNCHED, None)
    if marker is not None:
        stopped = marker.exists()
        marker.unlink(missing_ok=True)
        marker.parent.rmdir()
        if stopped and (code == 0 or code > 128):  # the workers checkpointed; the signal was only how they heard
            return STOPPED
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
