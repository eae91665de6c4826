"""Dynamic batching by budget, on one inference thread.

The grouping rule (what a request's prediction depends on): the oldest
waiting request opens a batch; later waiting requests with the same budget
join it in arrival order while the batch stays within `max_batch` images
(waiting at most `timeout_s` for more); the batch is routed as the model
routes any batch, in routing groups of its configured size over the
concatenated images. So requests of different budgets never share a
routing group, and a request's images share groups only with requests of
its own budget in the same batch: with a capacity, their tokens compete for
the same expert buffers (as in offline evaluation of that batch); a dropless
budget makes every prediction independent of the batch. Each response names
its batch and offset, so the batch can be replayed offline.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


@dataclass(eq=False)  # jobs are compared by identity (removing one from the queue)
class Job:
    images: torch.Tensor
    key: str                       # the budget, as a hashable text ("" = the model's own routing)
    future: Future = field(default_factory=Future)


class Batcher:
    """`submit(images, key)` -> a Future of (logits rows, batch info);
    `run_batch(key, images)` does the work (one call at a time)."""

    def __init__(self, run_batch: Callable[[str, torch.Tensor], Any], max_batch: int, timeout_s: float) -> None:
        self.run_batch, self.max_batch, self.timeout_s = run_batch, max_batch, timeout_s
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.closing = False
        self.ids = itertools.count()
        self.thread = threading.Thread(target=self._loop, name="vmoe-inference", daemon=True)
        self.thread.start()

    def submit(self, images: torch.Tensor, key: str) -> Future:
        job = Job(images, key)
        with self.cond:
            if self.closing:
                raise RuntimeError("The server is shutting down.")
            self.pending.append(job)
            self.cond.notify_all()
        return job.future

    def close(self) -> None:
        """Stops taking jobs; the thread finishes every waiting one first."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.thread.join()

    def _take(self) -> Optional[list[Job]]:
        with self.cond:
            while not self.pending and not self.closing:
                self.cond.wait()
            if not self.pending:
                return None
            first = self.pending.popleft()
            batch, size = [first], len(first.images)
            deadline = time.monotonic() + self.timeout_s
            while size < self.max_batch:
                fits = [j for j in self.pending if j.key == first.key and size + len(j.images) <= self.max_batch]
                if fits:
                    job = fits[0]
                    self.pending.remove(job)
                    batch.append(job)
                    size += len(job.images)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self.closing:
                    break
                self.cond.wait(left)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            batch_id = next(self.ids)
            try:
                rows, extra = self.run_batch(batch[0].key, torch.cat([j.images for j in batch]))
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                for job in batch:
                    job.future.set_exception(e)
                continue
            offset = 0
            for job in batch:
                n = len(job.images)
                info = {"id": batch_id, "offset": offset, "size": int(rows.shape[0]), **extra}
                job.future.set_result((rows[offset:offset + n], info))
                offset += n
