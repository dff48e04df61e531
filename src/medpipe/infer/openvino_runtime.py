"""OpenVINO running the package's gated INT8 (QDQ) graph on CPU: the ``openvino`` backend.

The graph is the one ``medpipe quantize`` wrote and gated (``model.int8.onnx``); OpenVINO reads the
QDQ form directly and runs the quantized convolutions with its own INT8 kernels (VNNI/AMX) and the
rest of the network in the CPU's inference precision (``bf16`` on CPUs with AVX512-BF16/AMX, else
``f32``). Its outputs differ from ONNX Runtime's running the same graph, so ``medpipe quantize`` runs
the accuracy gate a second time on OpenVINO's outputs (same thresholds, its own temperature) and
records it in ``int8.json`` under ``openvino``; without that record the backend refuses to start.

Static shapes: OpenVINO's CPU plugin ran this graph 3-4x slower with a dynamic batch dimension than
with a fixed one (benchmarks/int8_openvino.py's machine, batch 1 and 8), so the session compiles one
model per batch-size bucket (1, 2, 4, ..., max_batch), on first use or all at once with
:meth:`OpenVinoSession.warm` (the server does that before it answers), and runs a batch as bucket-sized
chunks (5 -> 4 + 1; rows are independent in eval mode) rather than padding it up to the next bucket.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from medpipe.errors import MedpipeError

PRECISIONS = ("bf16", "f32")


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _core():
    try:
        import openvino as ov
    except ImportError:
        raise MedpipeError("the openvino backend needs OpenVINO: pip install 'medpipe-imaging[openvino]'") from None
    return ov.Core()


def version() -> str:
    import openvino as ov

    return str(ov.__version__)


def release(v: str) -> str:
    """The release line of an OpenVINO version string ("2026.4.1-22982-..." -> "2026.4")."""
    return ".".join(v.split("-")[0].split(".")[:2])


def cpu_precision() -> str:
    """The precision OpenVINO runs the non-quantized layers in on this CPU by default (``bf16`` or ``f32``)."""
    hint = str(_core().get_property("CPU", "INFERENCE_PRECISION_HINT")).lower()
    return "bf16" if "bf" in hint else "f32"


def supported(precision: str) -> bool:
    """Whether this CPU runs ``precision`` (bf16 needs the BF16 capability)."""
    return precision == "f32" or "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


# streams when none are asked for (and at least this many threads): 1.13x the served images/s of one, 2 cores
AUTO_STREAMS = 2

# pybind11 initialises the bindings' numpy API once per process, in a call_once that deadlocked when two stream
# threads reached it at once (seen in the test suite). The first bucket compiled in this process makes that first
# use, alone (under _NUMPY_API_LOCK, taken inside the session's lock), before any stream thread can run; once done
# for the process it is never repeated, whatever the session or bucket
_NUMPY_API_LOCK = threading.Lock()
_numpy_api_ready = False


def _first_numpy_use(request) -> None:
    """Initialise the bindings' numpy API on ``request`` if nothing in this process has yet (see above)."""
    global _numpy_api_ready
    with _NUMPY_API_LOCK:
        if not _numpy_api_ready:
            request.get_input_tensor(0).data
            _numpy_api_ready = True


class OpenVinoSession:
    """ONNX Runtime's ``run(names, {name: x})`` interface over OpenVINO static-shape models per bucket.

    ``streams``: 1 compiles each bucket for latency, one infer request using every thread; N > 1 compiles it for
    throughput with N streams sharing the threads (OpenVINO's THROUGHPUT hint with NUM_STREAMS=N) and one infer
    request per stream, and :meth:`run` splits a batch's rows across the streams, which run at once (OpenVINO
    releases the GIL while it infers). 0 (the default, :data:`AUTO_STREAMS`): 2 where there are at least two
    threads, else 1. Measured on 2 cores (224 px DenseNet121 INT8, benchmarks/serve_load.py --int8-peer
    --streams 1,2; docs/guides/serving.md): 2 streams served 1.13x the images/s of 1 (forward alone at batch 8:
    1.09x), a lone image 3 ms slower.
    A session must not run two batches at once (the Predictor's lock serialises them)."""

    def __init__(self, onnx: bytes, *, threads: int | None = None, precision: str = "f32", max_batch: int = 16,
                 streams: int = 0):
        if precision not in PRECISIONS:
            raise MedpipeError(f"OpenVINO precision must be one of {PRECISIONS}, got {precision!r}")
        if int(streams) < 0:
            raise MedpipeError(f"OpenVINO streams must be >= 0 (0: automatic), got {streams}")
        self.core = _core()
        self.onnx, self.precision = onnx, precision
        self.streams = int(streams) or (AUTO_STREAMS if (threads or os.cpu_count() or 1) >= AUTO_STREAMS else 1)
        self.config = {"PERFORMANCE_HINT": "LATENCY" if self.streams == 1 else "THROUGHPUT",
                       "NUM_STREAMS": self.streams, "INFERENCE_PRECISION_HINT": precision,
                       # decode workers and the event loop share these cores: do not pin OpenVINO's threads
                       "ENABLE_CPU_PINNING": False}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        max_batch = max(1, int(max_batch))
        self.buckets = sorted({min(2 ** k, max_batch) for k in range(max_batch.bit_length() + 1)})
        self._requests: dict[int, list] = {}
        self._lock = threading.Lock()
        self._model, self._shape = None, None
        self._index: dict[str, int] | None = None  # the graph's output names -> their indices, read once
        self._pool = None  # threads that run the streams' shares of a batch at once (streams > 1)

    def _read(self) -> None:
        """Parse the ONNX graph once (under the lock); each bucket reshapes its own copy."""
        if self._model is None:
            self._model = self.core.read_model(self.onnx)
            shape = self._model.inputs[0].get_partial_shape()
            self._shape = [int(d.get_length()) for d in list(shape)[1:]]

    def _request(self, bucket: int, stream: int = 0):
        """The infer request of ``stream`` for batches of ``bucket`` rows (compiled on first use)."""
        with self._lock:
            if bucket not in self._requests:
                self._read()
                model = self._model.clone()
                model.reshape({0: [bucket, *self._shape]})
                compiled = self.core.compile_model(model, "CPU", self.config)
                self._requests[bucket] = [compiled.create_infer_request() for _ in range(self.streams)]
                _first_numpy_use(self._requests[bucket][0])  # once per process, before any stream thread runs
            return self._requests[bucket][stream]

    def get_outputs(self) -> list:
        """The graph's outputs in order, each with its ``name`` and ``shape`` (None for a dynamic dimension), as
        ONNX Runtime's session lists them."""
        from types import SimpleNamespace

        with self._lock:
            self._read()
            return [SimpleNamespace(name=o.get_any_name(), shape=[None if d.is_dynamic else d.get_length()
                                                                  for d in o.get_partial_shape()])
                    for o in self._model.outputs]

    def warm(self, buckets: int | None = None) -> None:
        """Compile the first ``buckets`` buckets (all by default) now, a few seconds each for DenseNet121,
        rather than on first use. OpenVINO's errors (an op it cannot run, memory) become MedpipeError."""
        for b in self.buckets[:buckets]:
            try:
                self._request(b)
            except MedpipeError:
                raise
            except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError and its own types
                raise MedpipeError(f"OpenVINO could not compile the INT8 model for batch {b} "
                                   f"({exc.__class__.__name__}: {exc})") from None

    def chunks(self, n: int) -> list[int]:
        """A batch of ``n`` rows as bucket-sized chunks, largest first, never padded (7 -> 4, 2, 1).

        Padding a batch up to its bucket computes rows that are thrown away: measured on the 2-core machine
        (224 px DenseNet121 INT8, benchmarks/results/serve_profile_int8.md), a bucket's images/s hardly grows
        with its size (batch 1: 18.5, 4: 23, 8: 22), so a batch of 5 padded to 8 ran at 14 images/s where 4 + 1
        comes to about 21 (from the batch-4 and batch-1 rates)."""
        out, left = [], n
        while left:
            size = next(b for b in reversed(self.buckets) if b <= left)
            out.append(size)
            left -= size
        return out

    def shares(self, n: int) -> list[list[tuple[int, int]]]:
        """Per stream, the (start, size) chunks of a batch of ``n`` rows: the rows dealt to the streams in
        contiguous, near-equal parts (8 rows on 2 streams: 4 + 4; 7: 4 | 2 + 1), each part cut by :meth:`chunks`."""
        out, start = [], 0
        for k in range(min(self.streams, n)):
            rows = n // self.streams + (1 if k < n % self.streams else 0)
            part = []
            for size in self.chunks(rows):
                part.append((start, size))
                start += size
            out.append(part)
        return out

    def _output_indices(self, names) -> list[int]:
        """Indices of the graph outputs named in ``names`` (None: all, in the graph's order)."""
        if self._index is None:
            self._index = {o.name: i for i, o in enumerate(self.get_outputs())}
        index = self._index
        if names is None:
            return list(range(len(index)))
        missing = [n for n in names if n not in index]
        if missing:
            raise MedpipeError(f"the OpenVINO model has no output {missing[0]!r} (it has {', '.join(index)})")
        return [index[n] for n in names]

    def run(self, names, feed: dict) -> list[np.ndarray]:
        """The outputs named in ``names`` (None: every output, the logits then the embedding where the graph has
        one) for the batch in ``feed`` (its one input), run in bucket-sized chunks, on every stream at once."""
        x = np.ascontiguousarray(next(iter(feed.values())), dtype=np.float32)
        keep = self._output_indices(names)
        shares = self.shares(len(x))

        def one(stream: int) -> list[tuple[int, list[np.ndarray]]]:
            done = []
            for start, size in shares[stream]:
                result = self._request(size, stream).infer({0: x[start:start + size]})
                done.append((start, [np.array(result[k], dtype=np.float32) for k in keep]))
            return done

        if len(shares) == 1:
            parts = one(0)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="openvino-stream")
            parts = sorted((p for f in [self._pool.submit(one, k) for k in range(len(shares))] for p in f.result()),
                           key=lambda p: p[0])
        outs = [arrays for _, arrays in parts]
        return [np.concatenate(col) if len(col) > 1 else col[0] for col in zip(*outs)]
