"""Untrusted bytes are decoded in worker processes with a hard time and memory budget.

A thread cannot be stopped: an image whose decode is pathologically slow under the pixel cap (a
progressive JPEG with thousands of scans, a codec bug) would hold a decode thread for minutes, past
every deadline and past SIGTERM. Here each decode runs in a process of a ``pebble.ProcessPool``:

- a decode that runs longer than ``timeout_s`` is abandoned, its worker process is killed and
  replaced, and the item is answered 422 ``decode_budget_exceeded``;
- a request whose deadline passes, or a client that goes away, cancels its decodes the same way;
- each worker's address space is capped (``RLIMIT_AS`` = ``memory_mb``), so a decode that would
  allocate more fails with MemoryError (413) instead of growing the service;
- a worker that dies (killed by the kernel, a crash in a codec) is replaced; the item gets 422.

The workers import only numpy, Pillow and pydicom (no torch): a few tens of MB each. They are
started with ``spawn`` (never ``fork`` of a process that holds torch threads).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import sys
from dataclasses import dataclass

import numpy as np

from medpipe.data import dicom, imageio

log = logging.getLogger("medpipe.serve")


@dataclass(frozen=True)
class DecodeSpec:
    """The decode half of the package's PreprocessSpec (what PreprocessSpec.decode/prepare_array
    use), plus the decode limits; torch-free so the workers stay small."""

    size: tuple[int, int]            # (height, width) of the model input
    interpolation: str
    max_pixels: int = imageio.DEFAULT_MAX_PIXELS
    max_jpeg_scans: int = imageio.DEFAULT_MAX_JPEG_SCANS


def decode_item(spec: DecodeSpec, kind: str, payload) -> np.ndarray | imageio.ImageError:
    """One parsed item (bytes, file, dicom or array) -> model-size RGB uint8, or the ImageError that says why not."""
    try:
        if kind in ("bytes", "file"):  # file: the path of a body spooled to disk, streamed from there
            return imageio.decode_image(payload, max_pixels=spec.max_pixels, size=spec.size,
                                        interpolation=spec.interpolation, max_jpeg_scans=spec.max_jpeg_scans)
        if kind == "dicom":
            return imageio.prepare_array(dicom.decode_dicom(payload, spec.max_pixels), spec.size,
                                         spec.interpolation, spec.max_pixels)
        return imageio.prepare_array(payload, spec.size, spec.interpolation, spec.max_pixels)
    except imageio.ImageError as exc:
        # Drop the chained exception and its frames (they hold the half-decoded image) before the
        # worker waits for its next task; give freed memory back when it ran out half-way.
        exc.__context__ = exc.__cause__ = exc.__traceback__ = None
        if isinstance(exc, imageio.ImageTooLargeError):
            _release_memory()
        return exc
    except MemoryError:
        _release_memory()  # the worker lives on: give back what the failed decode left mapped
        return imageio.ImageTooLargeError("not enough memory to decode within the decode memory limit")


def _release_memory() -> None:
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _init_worker(memory_mb: int) -> None:
    import resource
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and SIGTERM are the parent's to handle
    # A worker that dies (out of memory between tasks, a codec crash) would print a traceback into the
    # server's log; the parent logs one line for it instead ("decode worker died", "decode pool restarted").
    sys.stderr = open(os.devnull, "w")

    if dicom.available():  # import pydicom now, not inside the first DICOM's decode budget
        import pydicom.pixels  # noqa: F401
    if memory_mb > 0:
        limit = int(memory_mb) << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


class DecodePool:
    """``await pool.decode(kind, payload)`` -> array or ImageError; never blocks the event loop."""

    def __init__(self, spec: DecodeSpec, workers: int = 2, timeout_s: float = 10.0, memory_mb: int = 1024):
        import pebble

        self.spec, self.timeout_s = spec, float(timeout_s)
        # One thread per native library in the worker: a decode is one image, and fewer threads
        # keep the address space (RLIMIT_AS) small.
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")
        self.workers, self.memory_mb = max(1, int(workers)), int(memory_mb)
        self._closing = False
        self._pool = self._new_pool()
        self.restarts = 0

    def _new_pool(self):
        import pebble

        return pebble.ProcessPool(max_workers=self.workers, initializer=_init_worker, initargs=(self.memory_mb,),
                                  context=multiprocessing.get_context("spawn"))

    def _restart(self, why: str) -> None:
        """pebble gives up on a pool whose worker dies between tasks (e.g. out of memory right after
        a refused decode): replace the whole pool rather than fail every later request."""
        if self._closing:
            return
        log.warning("decode pool restarted (%s)", why)
        old, self._pool = self._pool, self._new_pool()
        self.restarts += 1
        old.stop()

    def _schedule(self, kind: str, payload):
        try:
            return self._pool.schedule(decode_item, args=(self.spec, kind, payload), timeout=self.timeout_s)
        except RuntimeError as exc:  # "Unexpected error within the Pool" / "not active"
            if self._closing:
                raise asyncio.CancelledError from None
            self._restart(str(exc))
            return self._pool.schedule(decode_item, args=(self.spec, kind, payload), timeout=self.timeout_s)

    def warm_up(self) -> None:
        """Start every worker now (spawn takes a moment), before the service says it is ready."""
        blank = np.zeros((1, 1, 3), np.uint8)
        futures = [self._pool.schedule(decode_item, args=(self.spec, "array", blank))
                   for _ in range(self.workers)]
        for f in futures:
            f.result(timeout=120)

    async def decode(self, kind: str, payload, retry: bool = True) -> np.ndarray | imageio.ImageError:
        import pebble

        fut = self._schedule(kind, payload)
        try:
            return await asyncio.wrap_future(fut)
        except (TimeoutError, concurrent.futures.TimeoutError):
            return imageio.DecodeBudgetError(f"decoding took longer than its {self.timeout_s:g} s budget and "
                                             "was abandoned")
        except pebble.ProcessExpired as exc:
            log.warning("decode worker died (exit code %s); replaced", exc.exitcode)
            return imageio.DecodeBudgetError("the decoder process died on this image")
        except concurrent.futures.BrokenExecutor as exc:
            # A worker died outside a task and pebble aborted every pending task, this one perhaps
            # innocent: restart the pool and try it once more.
            self._restart(exc.__class__.__name__)
            if retry:
                return await self.decode(kind, payload, retry=False)
            return imageio.DecodeBudgetError("the decoder process died on this image")
        except concurrent.futures.CancelledError:
            # The pool was stopped (shutdown) while this item waited; the request answers 503.
            raise asyncio.CancelledError from None

    async def call(self, fn, *args):
        """``fn(*args)`` in a decode process, under the same time budget: parsing a large request body
        there keeps it off the event loop. ``fn`` is a module-level function that loads no torch and
        returns (never raises) its answer. Raises TimeoutError when it ran out of time or its process died."""
        import pebble

        try:
            fut = self._pool.schedule(fn, args=args, timeout=self.timeout_s)
        except RuntimeError as exc:
            if self._closing:
                raise asyncio.CancelledError from None
            self._restart(str(exc))
            fut = self._pool.schedule(fn, args=args, timeout=self.timeout_s)
        try:
            return await asyncio.wrap_future(fut)
        except (TimeoutError, concurrent.futures.TimeoutError, pebble.ProcessExpired,
                concurrent.futures.BrokenExecutor) as exc:
            if isinstance(exc, concurrent.futures.BrokenExecutor):
                self._restart(exc.__class__.__name__)
            raise TimeoutError(f"not done within its {self.timeout_s:g} s budget in a decode process") from None
        except concurrent.futures.CancelledError:
            raise asyncio.CancelledError from None

    def close(self) -> None:
        self._closing = True
        self._pool.stop()
        self._pool.join(timeout=10)
