"""How work is divided over processes: a global batch over processes and micro-batches
(`Shares`), and a list of images into contiguous shares (`shard`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError


@dataclass
class Shares:
    """How a global batch splits over processes and micro-batches."""

    world: int
    rank: int
    accum: int  # micro-batches per optimizer step (gradient accumulation)
    batch_size: int

    @classmethod
    def split(cls, batch_size: int, micro_batch_size: int, world: int, rank: int) -> "Shares":
        if batch_size < world:
            raise UserError(f"train.batch_size={batch_size} is smaller than the {world} processes")
        share = math.ceil(batch_size / world)
        accum = math.ceil(share / micro_batch_size) if micro_batch_size else 1
        # at most batch_size // world micro-batches, so none is empty (a micro-batch may then
        # hold one patch more than micro_batch_size)
        return cls(world, rank, min(accum, batch_size // world), batch_size)

    def _chunk(self, c: int) -> slice:
        parts = self.world * self.accum
        return slice(self.batch_size * c // parts, self.batch_size * (c + 1) // parts)

    def slices(self) -> list[slice]:
        return [self._chunk(m * self.world + self.rank) for m in range(self.accum)]

    def sizes(self) -> list[int]:
        """Every process's share when there is no accumulation (accum == 1), in rank order."""
        return [self._chunk(r).stop - self._chunk(r).start for r in range(self.world)]

    @property
    def per_process(self) -> float:
        """B / world: dividing a process's summed loss by it makes DDP's mean the global mean."""
        return self.batch_size / self.world


def shard(n: int, world: int, rank: int) -> range:
    """This process's contiguous share of n items (sizes differ by at most one)."""
    return range(n * rank // world, n * (rank + 1) // world)
