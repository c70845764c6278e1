"""One bounded queue and one worker: the images of concurrent requests scored together.

Requests put their images (jobs) on one queue and wait on a future each. One worker thread owns
the models: it takes the first waiting job, waits up to `max_wait_s` for more (at most
`max_batch` in all), and scores the jobs of the same kind (model, score or map) in one call, so a
device sees batches instead of single images, and never two calls at once. The queue holds at
most `max_queue` images: a request that would go past it is refused whole (`QueueFull`, answered
503) instead of growing memory, and a request is queued whole or not at all.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import numpy as np


class QueueFull(Exception):
    """The queue cannot take a request's images now."""


@dataclass
class Job:
    """One image to score: `key` says how (which model, a score or a map), `future` gets the result."""

    key: Hashable
    image: np.ndarray
    future: Future = field(default_factory=Future)


class Batcher:
    """run(key, images) -> one result per image: what the worker calls for each group of jobs."""

    def __init__(self, run: Callable[[Hashable, list[np.ndarray]], Sequence[Any]], max_batch: int,
                 max_wait_s: float, max_queue: int) -> None:
        self.run, self.max_batch, self.max_wait_s, self.max_queue = run, max_batch, max_wait_s, max_queue
        self.jobs: deque[Job] = deque()
        self.ready = threading.Condition()
        self.stopping = False
        self.batches = 0  # batches run so far (jobs of one kind scored in one call)
        self.worker = threading.Thread(target=self._work, name="iqa-dist-batcher", daemon=True)

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        """Finishes the jobs already queued, then the worker ends."""
        with self.ready:
            self.stopping = True
            self.ready.notify_all()
        self.worker.join()

    @property
    def waiting(self) -> int:
        return len(self.jobs)

    def submit(self, jobs: list[Job]) -> list[Future]:
        """Queues the jobs, all or none (QueueFull when they do not fit); their futures."""
        with self.ready:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.jobs) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self.jobs)} image(s) are waiting to be scored and this request brings "
                                f"{len(jobs)}: the queue holds {self.max_queue} (serve --max-queue); try again shortly")
            self.jobs.extend(jobs)
            self.ready.notify()
        return [job.future for job in jobs]

    def _next_batch(self) -> list[Job] | None:
        """Waits for a first job, then up to max_wait_s for the batch to fill; None when stopping
        with nothing left. Jobs whose request went away (a cancelled future: the client hung up)
        are dropped here, and the others marked running, so they can no longer be cancelled."""
        with self.ready:
            while not self.jobs and not self.stopping:
                self.ready.wait()
            if not self.jobs:
                return None
            deadline = time.monotonic() + self.max_wait_s
            while len(self.jobs) < self.max_batch and not self.stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.ready.wait(left)
            taken = [self.jobs.popleft() for _ in range(min(self.max_batch, len(self.jobs)))]
        return [job for job in taken if job.future.set_running_or_notify_cancel()]

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            groups: dict[Hashable, list[Job]] = {}
            for job in batch:
                groups.setdefault(job.key, []).append(job)
            for key, group in groups.items():
                try:
                    results = self.run(key, [job.image for job in group])
                except Exception as e:  # noqa: BLE001 (handed to the requests that asked; the worker serves on)
                    for job in group:
                        job.future.set_exception(e)
                    continue
                for job, result in zip(group, results):
                    job.future.set_result(result)
            self.batches += bool(batch)
