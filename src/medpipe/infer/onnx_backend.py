"""The ONNX Runtime backends (CPU): ``onnx`` runs the package's FP32 graph, ``int8`` its gated INT8
graph (``medpipe quantize``; verified against ``int8.json`` at load, applied with its own temperature)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from medpipe.infer.backends import Backend, LoadContext
from medpipe.infer.onnx_runtime import EMBEDDING_NAME, INPUT_NAME, onnx_bytes, onnx_session, output_names
from medpipe.infer.quantize import load_int8

log = logging.getLogger(__name__)


class _SessionBackend(Backend):
    """A runtime session with ONNX Runtime's ``run(None, {input: array})`` interface. The logits are the
    graph's first output; a graph exported with the ``embedding`` output (every graph medpipe has made since
    it had one; an INT8 model quantized before then has none) also gives the penultimate-layer features."""

    runs_on_torch = False

    def __init__(self, session, record: dict | None = None):
        self.session, self.record = session, record
        names = output_names(session)
        self._logits_only = names[:1]  # what to fetch while nobody takes the embedding
        self._embedding_at = names.index(EMBEDDING_NAME) if EMBEDDING_NAME in names[1:] else None
        self.feature_sinks: list = []

    def embedding_size(self) -> int | None:
        if self._embedding_at is None:
            return None
        shape = getattr(self.session.get_outputs()[self._embedding_at], "shape", None)
        return shape[-1] if shape and isinstance(shape[-1], int) else -1  # -1: the graph does not say

    def run(self, x: torch.Tensor) -> torch.Tensor:
        wanted = None if self.feature_sinks else self._logits_only
        outs = self.session.run(wanted, {INPUT_NAME: np.ascontiguousarray(x.numpy())})
        if self._embedding_at is not None and self.feature_sinks:
            features = torch.from_numpy(outs[self._embedding_at])
            for sink in self.feature_sinks:
                sink(features)
        return torch.from_numpy(outs[0])

    def warm(self) -> None:
        if hasattr(self.session, "warm"):
            self.session.warm()


class OnnxBackend(_SessionBackend):
    """ONNX Runtime on the package's FP32 graph (exported from the eager model at load)."""

    name = "onnx"

    @classmethod
    def load(cls, ctx: LoadContext) -> "OnnxBackend":
        data = ctx.fp32_onnx() if ctx.fp32_onnx else onnx_bytes(ctx.model, ctx.meta.preprocessing.image_size)
        return cls(onnx_session(data, threads=ctx.threads))

    def describe(self) -> dict:
        import onnxruntime

        return {"backend": self.name, "runtime": f"onnxruntime {onnxruntime.__version__}", "precision": "fp32"}


class Int8Backend(_SessionBackend):
    """ONNX Runtime on the gated INT8 graph. A model whose gate failed (written with --force) still runs
    when asked for, with a warning; ``auto`` never picks it."""

    name = "int8"

    @classmethod
    def load(cls, ctx: LoadContext) -> "Int8Backend":
        data, info = load_int8(ctx.meta)
        if not info["gate"].get("passed"):
            log.warning("the INT8 model FAILED its accuracy gate (written with --force): %s",
                        "; ".join(info["gate"].get("failures", [])))
        return cls(onnx_session(data, threads=ctx.threads), info)

    def describe(self) -> dict:
        import onnxruntime

        return {"backend": self.name, "runtime": f"onnxruntime {onnxruntime.__version__}", "precision": "int8",
                "gate_passed": bool(self.record["gate"].get("passed"))}
