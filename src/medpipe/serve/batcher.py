"""Dynamic batching: concurrent requests share one forward pass.

Requests put their decoded images on a queue; one worker coroutine takes whole requests, up to
``max_batch`` images, runs the model once in a single inference thread (so the event loop stays free
for ``/ping``) and hands each request its rows. The worker never waits when nothing else is coming:
a lone request runs at once. It waits up to ``max_wait_s`` for more only while other requests are
still decoding (they are known to arrive soon), so batching adds no latency when idle and fills
batches under load. Requests whose caller gave up (deadline) are dropped before they cost a forward.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class _Job:
    pixels: list[np.ndarray]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, infer: Callable[[list[np.ndarray]], np.ndarray], max_batch: int = 16,
                 max_wait_s: float = 0.005, on_batch: Callable[[int], None] | None = None):
        self.infer = infer
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.on_batch = on_batch
        self.decoding = 0  # requests accepted and decoding now: more images are about to arrive
        self._queue: collections.deque[_Job] = collections.deque()
        self._wake = asyncio.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="medpipe-infer")
        self._task: asyncio.Task | None = None
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="medpipe-batcher")

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._pool.shutdown(wait=True)

    def queued_images(self) -> int:
        return sum(len(j.pixels) for j in self._queue)

    async def run_exclusive(self, fn: Callable, *args):
        """Run ``fn`` on the inference thread, between batches (e.g. a Grad-CAM pass)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def submit(self, pixels: list[np.ndarray]) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(pixels, fut))
        self._wake.set()
        return await fut

    def decoding_started(self) -> None:
        self.decoding += 1

    def decoding_finished(self) -> None:
        """A request finished decoding: its images are queued now, or it had none. Wakes a gathering batch."""
        self.decoding -= 1
        self._wake.set()

    async def _gather(self, deadline: float) -> None:
        """Hold the batch open while requests are still decoding, until it is full or ``deadline`` passes;
        woken by each submit and each finished decode (no polling)."""
        while self.decoding and self.queued_images() < self.max_batch:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                return

    def _take(self) -> list[_Job]:
        jobs, n = [], 0
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # cancelled by its deadline: costs nothing
                self._queue.popleft()
                continue
            if jobs and n + len(job.pixels) > self.max_batch:
                break
            jobs.append(self._queue.popleft())
            n += len(job.pixels)
        return jobs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.max_wait_s and self.decoding and self.queued_images() < self.max_batch:
                await self._gather(self._queue[0].enqueued + self.max_wait_s)
            jobs = self._take()
            if not jobs:
                continue
            pixels = [p for j in jobs for p in j.pixels]
            if self.on_batch:
                self.on_batch(len(pixels))
            try:
                probs = await loop.run_in_executor(self._pool, self._infer_chunked, pixels)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            i = 0
            for j in jobs:
                if not j.future.done():
                    j.future.set_result(probs[i:i + len(j.pixels)])
                i += len(j.pixels)

    def _infer_chunked(self, pixels: list[np.ndarray]) -> np.ndarray:
        # A single request may carry more images than max_batch: run it in max_batch chunks.
        parts = [self.infer(pixels[i:i + self.max_batch]) for i in range(0, len(pixels), self.max_batch)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]
