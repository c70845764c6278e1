"""What each optimizer step trains on: a pure function of (seed, step), the same on 1 GPU and 64.

- BatchPlan: one dataset; an epoch is every training image x train_patch_num patches in a
  seeded permutation, the last partial batch dropped (a different remainder each epoch).
- JointPlan: several datasets (joint training); each global batch draws from them in proportion
  to their weights, each dataset walking its own endless seeded stream of permutations.

Because a plan depends on nothing but the step, resuming mid-epoch is a single skip, and every
process derives the same global batch and takes its share of it (`distributed.shards.Shares`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError

# Streams of random numbers drawn per step, each a pure function of (seed, step, stream).
AUGMENT, NOISE = 1, 2


def step_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for `stream`'s draws at `step` of a run seeded `seed`: every process computes
    the same one, a resumed run the same as an uninterrupted one, with no generator to checkpoint."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class BatchPlan:
    """Which images (and stored patch) each global batch holds, for one dataset."""

    def __init__(self, n_images: int, patch_num: int, batch_size: int, seed: int, cached_k: int = 0) -> None:
        self.n_images, self.patch_num, self.batch_size, self.seed, self.cached_k = (
            n_images, patch_num, batch_size, seed, cached_k)
        self.steps_per_epoch = n_images * patch_num // batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"train.batch_size={batch_size} exceeds an epoch ({n_images} images x {patch_num} patches)")
        self._epoch = (-1, None, None)

    def _permutation(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.n_images * self.patch_num)
            # cached patches: each epoch uses patch_num of the K stored patches of every image
            chosen = rng.random((self.n_images, self.cached_k)).argsort(1)[:, :self.patch_num] if self.cached_k else None
            self._epoch = (epoch, perm, chosen)
        return self._epoch[1], self._epoch[2]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image rows (B,), stored patch index (B,) or None) of global batch `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        perm, chosen = self._permutation(epoch)
        items = perm[i * self.batch_size:(i + 1) * self.batch_size]
        rows, rep = items // self.patch_num, items % self.patch_num
        k = torch.from_numpy(chosen[rows, rep]) if chosen is not None else None
        return torch.from_numpy(rows), k


class JointPlan:
    """Global batches drawn from several datasets in proportion to their weights.

    Dataset d (rows offsets[d] .. offsets[d] + sizes[d] of the joined store) contributes
    cum_d(s+1) - cum_d(s) samples to step s, where cum_d(s) = floor(s * B * w_d / W) for every
    dataset but the heaviest, which takes the rest: over any span of steps each dataset's share
    is its weight's to within one sample per dataset. Its samples are the next ones of its own
    endless stream: pass c over the dataset is a permutation of its images x patch_num seeded by
    (seed, d, c). An epoch is as many steps as one pass over every dataset would take."""

    def __init__(self, sizes: list[int], weights: list[float], patch_num: int, batch_size: int, seed: int) -> None:
        if batch_size < len(sizes) ** 2:
            raise UserError(f"train.batch_size={batch_size}: joint training on {len(sizes)} datasets needs a batch "
                            f"of at least {len(sizes) ** 2}")
        self.sizes, self.patch_num, self.batch_size, self.seed = sizes, patch_num, batch_size, seed
        self.share = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.last = int(np.argmax(self.share))  # the heaviest takes the rounding remainder
        self._passes: dict[tuple[int, int], np.ndarray] = {}  # recent passes (_pass)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.steps_per_epoch = sum(sizes) * patch_num // batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"train.batch_size={batch_size} exceeds an epoch ({sum(sizes)} images x {patch_num} patches)")

    def cumulative(self, step: int) -> np.ndarray:
        """Samples each dataset has contributed before step `step`. (D,)"""
        total = step * self.batch_size
        cum = np.floor(total * self.share + 1e-9).astype(np.int64)
        cum[self.last] = 0
        cum[self.last] = total - cum.sum()
        return cum

    def _pass(self, d: int, c: int) -> np.ndarray:
        """Dataset d's c-th pass over its samples: a permutation, a function of (seed, d, c) alone,
        kept while the batches read it (a batch touches one or two passes per dataset)."""
        if (d, c) not in self._passes:
            if len(self._passes) >= 16:
                self._passes.pop(next(iter(self._passes)))  # the oldest: the plan moves forward
            self._passes[(d, c)] = np.random.default_rng([self.seed, d, c]).permutation(self.sizes[d] * self.patch_num)
        return self._passes[(d, c)]

    def _stream(self, d: int, start: int, stop: int) -> np.ndarray:
        """Rows (in the joined store) of samples start..stop-1 of dataset d's stream."""
        per_pass = self.sizes[d] * self.patch_num
        k = np.arange(start, stop)
        items = np.empty(len(k), dtype=np.int64)
        for c in np.unique(k // per_pass):  # a step spans at most two passes
            at = k // per_pass == c
            items[at] = self._pass(d, int(c))[k[at] % per_pass]
        return self.offsets[d] + items // self.patch_num

    def batch(self, step: int) -> tuple[torch.Tensor, None]:
        """(rows (B,), None): dataset 0's samples first, then dataset 1's, ..."""
        a, b = self.cumulative(step), self.cumulative(step + 1)
        rows = np.concatenate([self._stream(d, int(a[d]), int(b[d])) for d in range(len(self.sizes))])
        return torch.from_numpy(rows), None
