"""When a collective fails: was it a process that raised (it says so itself), or one that died or
hangs (the survivors name it)?

The launch's store (torchrun's, kept by its agent, so it answers whichever worker is gone) holds
two kinds of keys, per attempt of the launch: a rank that raised writes `failed/<rank>` (its
one-line error) before it exits, so when its peers' collective then fails they stop without
blaming anyone; a survivor of a lost process writes `answering/<rank>` and, after a short wait,
the ranks with no key are the ones that died or hang.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch.distributed as dist

# the messages of gloo's transport when a peer's connection drops or a collective times out: gloo
# raises them as a plain RuntimeError (NCCL's watchdog raises torch.distributed's DistBackendError)
GLOO = ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "Timed out waiting")


def collective_failed(error: BaseException) -> bool:
    """Whether `error` is a failed collective or store (a lost connection, a timeout): what a lost
    or hung process does to the others. Any other error is the raising process's own."""
    if isinstance(error, dist.DistError):  # DistBackendError, DistNetworkError, DistStoreError
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in GLOO)


def _store() -> dist.Store | None:
    """A client of the launch's store (torchrun's agent hosts it at MASTER_ADDR:MASTER_PORT; a
    restarted group gets its own keys), or None where there is none to reach."""
    if not (dist.is_available() and dist.is_initialized()) or "MASTER_ADDR" not in os.environ:
        return None
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=5), wait_for_workers=False)
    except (RuntimeError, ValueError):  # the store itself is gone (the agent died too): nothing to ask
        return None
    return dist.PrefixStore(f"iqa-dist/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def note_failure(rank: int, line: str) -> None:
    """This rank raised: its peers, whose collectives fail once it exits, read this and stay quiet."""
    store = _store()
    if store is not None:
        try:
            store.set(f"failed/{rank}", line)
        except (RuntimeError, ValueError):
            pass


def failed_ranks() -> dict[int, str]:
    """rank -> its one-line error, for the ranks that said they raised."""
    store = _store()
    if store is None:
        return {}
    try:
        world = dist.get_world_size()
        return {r: store.get(f"failed/{r}").decode() for r in range(world) if store.check([f"failed/{r}"])}
    except (RuntimeError, ValueError):
        return {}


def silent_ranks(wait_s: float = 3.0) -> list[int]:
    """The ranks that do not answer within `wait_s` seconds ([] when every rank does, or when
    there is no store to ask: then nobody is named)."""
    store = _store()
    if store is None:
        return []
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        store.set(f"answering/{rank}", "1")
        keys = [f"answering/{r}" for r in range(world)]
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not store.check(keys):
            time.sleep(0.1)
        return [r for r, key in enumerate(keys) if not store.check([key])]
    except (RuntimeError, ValueError):  # the store went away while asking
        return []
