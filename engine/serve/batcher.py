"""A replica's queue of requests: the model takes its next batch when it is free, from every
request waiting then (up to the batch size). Ray Serve's ``@serve.batch`` formed the next batch
while the current one ran, from what arrived within its wait, so a batch behind a long one
rarely filled. Plain asyncio, no Ray."""
from __future__ import annotations

import asyncio
import time
from collections import deque

_DONE = object()


class Batcher:
    """``submit(job)`` streams one job's items. ``run(jobs)`` is an async generator that yields,
    per round, one item per job: a value for that job, an exception to raise in it, or
    StopIteration once it has nothing more. Batches run one at a time; a batch is every job
    waiting when the model is free (at most ``max_batch_size``), and while fewer wait it waits
    for more until the oldest has waited ``wait_s``."""

    def __init__(self, run, max_batch_size: int, wait_s: float):
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self.waiting: deque = deque()  # (job, its output queue, arrival time)
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, job):
        if self._arrived is None:
            self._arrived = asyncio.Event()
        out: asyncio.Queue = asyncio.Queue()
        self.waiting.append((job, out, time.monotonic()))
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._serve())
        while (item := await out.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def _serve(self) -> None:
        while self.waiting:
            await self._fill()
            batch = [self.waiting.popleft() for _ in range(min(self.max_batch_size, len(self.waiting)))]
            await self._run([job for job, _, _ in batch], [out for _, out, _ in batch])

    async def _fill(self) -> None:
        """Wait for more jobs while fewer than a batch wait and the oldest may wait longer."""
        while len(self.waiting) < self.max_batch_size:
            left = self.waiting[0][2] + self.wait_s - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _run(self, jobs: list, outs: list) -> None:
        done = [False] * len(jobs)
        try:
            async for items in self.run(jobs):
                for i, item in enumerate(items):
                    if not done[i]:
                        done[i] = item is StopIteration or isinstance(item, BaseException)
                        outs[i].put_nowait(_DONE if item is StopIteration else item)
        except Exception as exc:  # the batch failed: every job still open gets the error
            for i, out in enumerate(outs):
                if not done[i]:
                    done[i] = True
                    out.put_nowait(exc)
        finally:
            for i, out in enumerate(outs):
                if not done[i]:
                    out.put_nowait(_DONE)
