"""`accelerate launch` in this process: how `iqa-dist launch` runs each attempt
(`python -m iqa_dist.distributed.launcher [accelerate launch options] -m iqa_dist COMMAND ...`).

Plain `accelerate launch` ends every failed group with torchrun's ChildFailedError: a traceback
and exit status 1, whatever the workers said. Here the launch ends with the workers' own status
(`exit_status`), which is what `iqa-dist launch` decides on (restart a lost process, never an
error that would repeat), and without that traceback or the elastic agent's log lines: each
worker has said what happened in one line.
"""

from __future__ import annotations

import logging
import subprocess
import sys

LOST = 4  # a worker's exit status when another process stopped answering (training.failures.LostProcess)


def exit_status(codes: list[int]) -> int:
    """One status for the launch from the failed workers' ones (rank order): an answer a worker gave
    (1 its own error, 2 bad input, 3 a non-finite loss, ...) over a lost process (4, or a worker
    killed by a signal, which torchrun reports as a negative status): when a process raised, the
    others' collectives failed after it, and torchrun may have stopped them with a signal."""
    answers = [c for c in codes if c > 0 and c != LOST]
    return answers[0] if answers else LOST if codes else 0


def main(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the workers say what happened
    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as e:  # several processes (torchrun)
        return exit_status([failure.exitcode for _, failure in sorted(e.failures.items())])
    except subprocess.CalledProcessError as e:  # one process (accelerate's simple launcher)
        return exit_status([e.returncode])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
