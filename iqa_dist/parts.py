"""Names for stretches of the training step: the audit's per-part counts and, as
record_function ranges, torch.profiler's labels. part("host") marks host-only work.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

HOST = "host"  # the part name of host-only work: the batch plan, random draws, packing
_parts: list[str] = []


@contextmanager
def part(name: str) -> Iterator[None]:
    """Names a stretch of the step, for the audit's per-part counts and, as a record_function
    range, for torch.profiler traces on a GPU. part("host") marks host-only work."""
    _parts.append(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        _parts.pop()


def current_part() -> str:
    return _parts[-1] if _parts else "other"
