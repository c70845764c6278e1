"""How a run stops when something goes wrong: said once, by the process that knows, as what it is.

- A non-finite loss or gradient (the guard's BadStep, decided by every process together): exit 3,
  one line from the main process, the state from before the bad step kept for debugging.
- An error a process raised itself (an out-of-memory error on one GPU, a bug, a full disk on one
  node): that process prints it in one line (its type and first line, its rank, the step, the last
  checkpoint, and for an out-of-memory error what to change), writes the traceback to a file in
  the run folder that the line names, and notes it in the launch's store before it exits; its
  peers, whose collectives fail once it has gone, find the note and stop without a word. Exit 1:
  it would happen again, so `iqa-dist launch` does not restart it.
- A process that died or hangs (killed, stopped, a dead node): only a failed collective or store
  counts (distributed.liveness), and only when no process noted an error; the lowest surviving rank
  names the ranks that do not answer. Exit 4: `iqa-dist launch` restarts the group from the last
  checkpoint.
"""

from __future__ import annotations

import traceback

import torch
from accelerate import PartialState

from ..artifacts.rundir import RunDir
from ..config import Config
from ..distributed.liveness import collective_failed, failed_ranks, note_failure, silent_ranks
from ..errors import UserError, first_line
from .guard import BadStep


class NonFiniteLoss(UserError):
    exit_code = 3


class LostProcess(UserError):
    """Another process of the run stopped answering; exit status 4, which `iqa-dist launch` answers by
    starting the group again from the last checkpoint."""

    exit_code = 4


class RankFailed(UserError):
    """A process raised an error of its own (or, with no text, a peer did and says so): exit status 1,
    never restarted."""

    exit_code = 1


def non_finite(run: RunDir, bad: BadStep) -> NonFiniteLoss:
    """Every process stops before any update from the bad step; the state from before it (weights,
    moments, EMA: the guard applied nothing of it; the trainer rolled its counters back) is kept
    for debugging. Steps are counted from 1, as the progress lines count them."""
    debug = run.save_debug(bad.step)
    run.record_end(f"failed: non-finite {bad.what} at step {bad.step + 1}")
    return NonFiniteLoss("" if not PartialState().is_main_process else
                         f"non-finite {bad.what} at step {bad.step + 1}; no optimizer step was taken from it and "
                         f"training stopped; the weights and optimizer state from before it (after step {bad.step}) "
                         f"are kept in {debug}")


def failed(run: RunDir | None, cfg: Config, step: int | None, error: Exception) -> Exception:
    """What ends this process after `error` at step `step` (0-based: the step being run; None while
    the run is starting, `run` None before its folder exists): a lost process named (LostProcess),
    a peer's error left to it (RankFailed, no text), or this process's own error in one line (a
    UserError as it is, anything else as RankFailed with its traceback in the run folder; before the
    folder exists, the error itself)."""
    state = PartialState()
    world, rank = state.num_processes, state.process_index
    if world > 1 and collective_failed(error):
        noted = failed_ranks()
        if noted:  # a peer raised and says so itself: nobody is to blame
            if run is not None:
                run.record_end(f"failed: {min(noted.items())[1]}")
            return RankFailed("")
        return lost(run, cfg, step)
    who = f"rank {rank} of {world}" if world > 1 else "the run"
    at = f"at step {step + 1}" if step is not None else "while starting"
    if isinstance(error, UserError):  # already one line that names the file or field at fault
        line, own = (f"{who}: " if world > 1 else "") + first_line(error), error
    elif run is None:  # no folder to hold a traceback: the error as it is
        line, own = f"{who} failed {at}: {type(error).__name__}: {first_line(error)}", error
    else:
        trace = run.failure_file(rank)
        trace.write_text("".join(traceback.format_exception(error)))
        checkpoint = run.latest_checkpoint()
        last = f"the last checkpoint is {checkpoint.name}" if checkpoint else "no checkpoint yet"
        line = (f"{who} failed {at}: {type(error).__name__}: {first_line(error)}{out_of_memory_hint(error, cfg)}; "
                f"{last}; traceback in {trace}")
        own = RankFailed(line)
    if world > 1:
        note_failure(rank, line)
    if run is not None:
        run.record_end(f"failed: {line}")  # (the main process's meta.json: a peer's is recorded by the main one)
    return own


def lost(run: RunDir | None, cfg: Config, step: int | None) -> LostProcess:
    """One line naming the processes that stopped answering (killed, stopped, or on a dead node),
    printed by the lowest surviving rank; the others exit quietly. When every rank answers, the
    connection between them failed: said by rank 0. Either way exit 4: the group restarts."""
    state = PartialState()
    silent = silent_ranks()
    checkpoint = run.latest_checkpoint() if run is not None else None
    last = f"the last checkpoint is {checkpoint.name if checkpoint else 'none'}"
    at = f"at step {step + 1}" if step is not None else "while the run was starting"
    if not silent:
        speaker, what = 0, (f"a collective failed {at} while every process of {state.num_processes} still answers "
                            f"(the connection between them?); {last}")
    else:
        ranks = ", ".join(map(str, silent))
        speaker = min(k for k in range(state.num_processes) if k not in silent)
        what = (f"rank {ranks} of {state.num_processes} stopped answering {at} (killed, stopped, or its node is "
                f"gone; a collective waits at most train.timeout_s={cfg.train.timeout_s} s); {last}")
    if state.process_index != speaker:
        return LostProcess("")
    if run is not None:
        run.record_end(f"stopped: {what.split(' (')[0].split(';')[0]}")
    return LostProcess(what)


def out_of_memory_hint(error: Exception, cfg: Config) -> str:
    """What to change after an out-of-memory error, else ""."""
    if not (isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()):
        return ""
    micro = cfg.train.micro_batch_size
    now = f"now {micro}" if micro else "now 0: the whole share in one forward"
    return (f" (out of memory: lower train.micro_batch_size ({now}) to run each process's share of the batch in "
            f"smaller forwards, the same training; or train.eval_batch_size if it happened in an evaluation)")
