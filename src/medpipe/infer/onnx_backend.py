"""The ONNX Runtime backends (CPU): ``onnx`` runs the package's FP32 graph, ``int8`` its gated INT8
graph (``medpipe quantize``; verified against ``int8.json`` at load, applied with its own temperature)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from medpipe.infer.backends import Backend, LoadContext
from medpipe.infer.onnx_runtime import INPUT_NAME, onnx_bytes, onnx_session
from medpipe.infer.quantize import load_int8

log = logging.getLogger(__name__)


class _SessionBackend(Backend):
    """A runtime session with ONNX Runtime's ``run(None, {input: array})`` interface."""

    runs_on_torch = False

    def __init__(self, session, record: dict | None = None):
        self.session, self.record = session, record

    def run(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(x.numpy())})[0]
        return torch.from_numpy(out)

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
