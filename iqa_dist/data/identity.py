"""Image files identified by their content: the sha256 of each file's bytes.

The cache key and the resume check use it, so data that moves keeps its identity: a `cp -r` to
node-local scratch (new mtimes) resumes and reuses the cache, and a changed byte is still a change.
Hashing reads every file once. After that a file whose (size, mtime) is unchanged is not read
again: the hashes are remembered in the cache root, one small JSON file per dataset folder. The
remembered (size, mtime) only saves a read; it is never taken as the file's identity.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from filelock import FileLock

KNOWN = "file-hashes"  # under the cache root: <sha of the folder's path>.json, path -> [size, mtime_ns, sha256]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(paths: list[Path], root: Path, cache_root: Path, workers: int) -> list[str]:
    """The sha256 of each file in `paths` (all under `root`), in order. Files whose size and
    mtime match what was remembered for `root` are not read; the others are hashed by `workers`
    threads (hashlib releases the GIL), and the memory is updated atomically."""
    memo = cache_root / KNOWN / f"{hashlib.sha256(str(root).encode()).hexdigest()[:16]}.json"
    # under a lock: the first process of a node hashes and remembers, the others wait and read the memory
    with writer_lock(memo):
        return _hashes(paths, memo, workers)


def _hashes(paths: list[Path], memo: Path, workers: int) -> list[str]:
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    stats = [p.stat() for p in paths]
    keys = [str(p) for p in paths]
    out: list[str | None] = [None] * len(paths)
    todo = []
    for i, (key, st) in enumerate(zip(keys, stats)):
        entry = known.get(key)
        if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            out[i] = entry[2]
        else:
            todo.append(i)
    if todo:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for i, digest in zip(todo, pool.map(lambda i: sha256_file(paths[i]), todo)):
                out[i] = digest
        known.update({keys[i]: [stats[i].st_size, stats[i].st_mtime_ns, out[i]] for i in todo})
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, memo)  # several processes may write it: the last complete one wins
        except OSError:
            pass  # only a shortcut: without it the next prepare reads the files again
    return out


@contextlib.contextmanager
def writer_lock(path: Path) -> Iterator[bool]:
    """Holds a file lock beside `path` (`path`.lock, its folder made) and yields True; where the
    folder cannot be written (a cache mounted read-only, as shared cluster caches often are) yields
    False without a lock: a reader needs none, and nothing can be written there anyway."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        yield False
        return
    try:
        yield True
    finally:
        lock.release()
