"""One writer per run directory: the process that trains a run holds an exclusive lock on
RUN/.lock (fcntl.flock) for as long as it lives, with its host, pid and start time written in it.
The kernel releases the lock when the process dies, however it dies, so a killed run never leaves
it held; a second launch of the same run is refused, naming the holder. Where the file system
does not honour flock, the file's host and pid stand in: alive on this host means held, another
host's lock is taken as held (delete the file when no process trains the run)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import UserError

# Not filelock (which the data cache uses): it truncates the lock file as it opens it, so the
# holder's line could not live in it, and on a file system without flock it raises where this
# falls back to the recorded host and pid.
LOCK_FILE = ".lock"
_held: dict[str, int] = {}  # run directory -> the open, locked file of this process


def take(run: Path) -> None:
    """Takes the run's lock for this process (a no-op when it holds it already); refuses in one line
    when another live process holds it."""
    key = str(Path(run).resolve())
    if key in _held:
        return
    fd = os.open(Path(run) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) or _alive(_read(fd)):
            holder = _describe(_read(fd))
            os.close(fd)
            raise UserError(f"{run}: this run is being trained by {holder}; a run has one writer: let it finish, "
                            "or stop it (it checkpoints) and resume then") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    _held[key] = fd


def release(run: Path) -> None:
    """Gives the lock back (the file stays, naming the last holder)."""
    fd = _held.pop(str(Path(run).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the file releases the flock


def holder(run: Path) -> str | None:
    """Who trains `run` now ("host gpu-a01 pid 4242 since ..."), or None when nobody does."""
    path = Path(run) / LOCK_FILE
    if not path.is_file() or str(Path(run).resolve()) in _held:
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except OSError as e:
        busy = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) or _alive(_read(fd))
        return _describe(_read(fd)) if busy else None
    finally:
        os.close(fd)  # also releases a lock taken just to look


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def _alive(info: dict) -> bool:
    """Without flock: a holder on this host whose pid lives, or any holder on another host."""
    if not info:
        return False
    if info.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(info.get("pid", 0)), 0)
    except (OSError, ValueError):
        return False
    return int(info["pid"]) != os.getpid()


def _describe(info: dict) -> str:
    return (f"host {info.get('host', '?')} pid {info.get('pid', '?')} since {info.get('since', '?')}" if info
            else "another process")
