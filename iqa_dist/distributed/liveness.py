"""Which process stopped answering, when a collective failed: each survivor writes a key in the
launch's store (torchrun's, kept by the launcher's agent, so it answers whichever worker is gone)
and, after a short wait, the ranks with no key are the ones that died or hang."""

from __future__ import annotations

import time

import torch.distributed as dist

PREFIX = "iqa-dist/answering/"


def silent_ranks(wait_s: float = 3.0) -> list[int]:
    """The ranks that do not answer within `wait_s` seconds ([] when every rank does, or when
    there is no process group or store to ask: then the failure was not a lost process)."""
    if not dist.is_available() or not dist.is_initialized():
        return []
    try:
        store = dist.distributed_c10d._get_default_store()
        world, rank = dist.get_world_size(), dist.get_rank()
        store.set(f"{PREFIX}{rank}", "1")
        keys = [f"{PREFIX}{r}" for r in range(world)]
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not store.check(keys):
            time.sleep(0.1)
        return [r for r, key in enumerate(keys) if not store.check([key])]
    except (RuntimeError, ValueError):  # the store itself is gone (the agent died too): nothing to name
        return []
