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

import threading

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


class OpenVinoSession:
    """ONNX Runtime's ``run(None, {name: x})`` interface over OpenVINO static-shape models per bucket.
    One infer request per bucket: a session must not run two batches at once (the Predictor's lock
    serialises them)."""

    def __init__(self, onnx: bytes, *, threads: int | None = None, precision: str = "f32", max_batch: int = 16):
        if precision not in PRECISIONS:
            raise MedpipeError(f"OpenVINO precision must be one of {PRECISIONS}, got {precision!r}")
        self.core = _core()
        self.onnx, self.precision = onnx, precision
        self.config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": precision,
                       # decode workers and the event loop share these cores: do not pin OpenVINO's threads
                       "ENABLE_CPU_PINNING": False}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        max_batch = max(1, int(max_batch))
        self.buckets = sorted({min(2 ** k, max_batch) for k in range(max_batch.bit_length() + 1)})
        self._requests: dict[int, object] = {}
        self._lock = threading.Lock()
        self._model, self._shape, self._names = None, None, []

    def _read(self) -> None:
        """Parse the ONNX graph once (under the lock); each bucket reshapes its own copy."""
        if self._model is None:
            self._model = self.core.read_model(self.onnx)
            shape = self._model.inputs[0].get_partial_shape()
            self._shape = [int(d.get_length()) for d in list(shape)[1:]]
            self._names = [o.get_any_name() for o in self._model.outputs]

    def _request(self, bucket: int):
        with self._lock:
            if bucket not in self._requests:
                self._read()
                model = self._model.clone()
                model.reshape({0: [bucket, *self._shape]})
                self._requests[bucket] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
            return self._requests[bucket]

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

    def run(self, output_names: list[str] | None, feed: dict) -> list[np.ndarray]:
        """The outputs named in ``output_names`` (None: every output, in the graph's order: the logits, then the
        embedding where the graph has one) for the batch in ``feed`` (its one input), run in bucket-sized
        chunks; only those outputs are copied out of OpenVINO's buffers, as ONNX Runtime fetches only those."""
        at = self._output_indices(output_names)
        x = np.ascontiguousarray(next(iter(feed.values())), dtype=np.float32)
        outs: list[list[np.ndarray]] = []
        start = 0
        for size in self.chunks(len(x)):
            result = self._request(size).infer({0: x[start:start + size]})
            outs.append([np.array(result[k], dtype=np.float32) for k in at])
            start += size
        return [np.concatenate(parts) if len(parts) > 1 else parts[0] for parts in zip(*outs)]

    def _output_indices(self, output_names: list[str] | None) -> list[int]:
        """The graph's output positions of ``output_names`` (None: all); an unknown name is a MedpipeError."""
        if self._model is None:
            with self._lock:
                self._read()
        names = self._names
        if output_names is None:
            return list(range(len(names)))
        unknown = [n for n in output_names if n not in names]
        if unknown:
            raise MedpipeError(f"OpenVINO model has no output {', '.join(map(repr, unknown))} (it has {names})")
        return [names.index(n) for n in output_names]
