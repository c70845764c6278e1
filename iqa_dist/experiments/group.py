"""A sweep group on disk: one folder `runs/<YYYYmmdd-HHMMSS>-sweep-<kind>/` holding its members'
run directories and logs (NAME.log) and its files, each written by one step of a sweep: the
members to run (members.jsonl, by `sweep.run_sweep`), what was asked (sweep.json), each member's
exit status (status.json, by `sweep.run_members`), the combined table (results.json, by
`collect.collect`) and, when submitted to SLURM, the job's id (slurm_job).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from ..artifacts.rundir import RunDir
from ..errors import UserError

MEMBERS = "members.jsonl"  # one line per member: {"name", "config", "repeat", "args"}
INFO = "sweep.json"  # the kind, preset, overrides, configs, baseline and repeats
STATUS = "status.json"  # member name -> exit status of its last launch
RESULTS = "results.json"  # the combined table
SLURM_JOB = "slurm_job"  # the id of the SLURM job that runs the group (sweep --slurm)
STOPPED = 124  # a member's exit status when it stopped on request and checkpointed (training's own)
# Signals that ask a process to stop: a member they ended (e.g. the SIGTERM a scheduler sends the
# sweep's whole process group, which reaches a member still starting, before its handler is set)
# is stopped, not failed; `sweep --resume` continues it. Others (SIGKILL, SIGSEGV) are failures.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def new_group(root: str, kind: str) -> Path:
    group = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-sweep-{kind}"
    group.mkdir(parents=True)
    return group


def write_members(group: Path, lines: list[dict]) -> None:
    (group / MEMBERS).write_text("".join(json.dumps(x) + "\n" for x in lines))


def read_members(group: Path) -> list[dict]:
    """The group's members, in order; a folder without members.jsonl is not a group to run."""
    path = group / MEMBERS
    if not path.is_file():
        raise UserError(f"{group}: not a sweep group (no {MEMBERS})")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_info(group: Path) -> dict:
    path = group / INFO
    if not path.is_file():
        raise UserError(f"{group}: not a sweep group (no {INFO})")
    return json.loads(path.read_text())


def read_status(group: Path) -> dict[str, int]:
    path = group / STATUS
    return json.loads(path.read_text()) if path.exists() else {}


def write_status(group: Path, status: dict[str, int]) -> None:
    (group / STATUS).write_text(json.dumps(status, indent=1))


def member_runs(group: Path, name: str) -> list[Path]:
    """The run directories of member `name`, oldest first."""
    return [p for p in RunDir.named(group, name) if RunDir.is_run(p)]


def finished(group: Path, name: str) -> bool:
    return any(RunDir(p).finished for p in member_runs(group, name))


def models_of(paths) -> list:
    """Models for an ensemble: each path as it is, a sweep group (a folder with members.jsonl) as
    the finished run of each of its members, in order; a member without one is refused, named."""
    out = []
    for path in paths:
        group = Path(path)
        if not (isinstance(path, (str, Path)) and (group / MEMBERS).is_file()):
            out.append(path)
            continue
        for member in read_members(group):
            runs = [p for p in member_runs(group, member["name"]) if RunDir(p).finished]
            if not runs:
                raise UserError(f"{group}: member {member['name']} has no finished run (see {member['name']}.log; "
                                "`iqa-dist sweep --resume` finishes it), so the group is not an ensemble yet")
            out.append(runs[-1])
    return out


def exit_state(code: int, log: Path) -> str:
    """What a member's exit status says: finished, stopped (resumable) or failed, and why."""
    if code == 0:
        return "finished"
    if code == STOPPED:
        return "stopped (resumable)"
    if code < 0 and -code in STOP_SIGNALS:  # subprocess's negative status: ended by that signal
        return f"stopped by {signal.Signals(-code).name} (resumable)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"failed (killed by {name}): {last_error(log)}"
    return f"failed (exit {code}): {last_error(log)}"


def last_error(log: Path) -> str:
    """A failed member's one-line error (the last `error:` line of its log), or where to look."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    errors = [line.strip() for line in lines if line.strip().startswith("error:")]
    return errors[-1][len("error:"):].strip()[:200] if errors else f"see {log.name}"
