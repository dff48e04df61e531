"""The ``openvino`` backend (CPU): OpenVINO (:mod:`medpipe.infer.openvino_runtime`) on the package's
gated INT8 graph, in the precision its own gate was run in, with that gate's temperature."""

from __future__ import annotations

import logging

from medpipe.errors import MedpipeError
from medpipe.infer.auto import Host, openvino_usable, openvino_verdict
from medpipe.infer.onnx_backend import _SessionBackend
from medpipe.infer.openvino_runtime import OpenVinoSession, version
from medpipe.infer.quantize import load_int8

log = logging.getLogger(__name__)


class OpenVinoBackend(_SessionBackend):
    """Asked for explicitly, a model whose OpenVINO gate failed still runs (with a warning), as a forced
    INT8 model does; anything else that makes the record unusable here is refused. The record the report
    and responses cite is OpenVINO's own gate and temperature."""

    name = "openvino"

    @classmethod
    def load(cls, ctx) -> "OpenVinoBackend":
        data, info = load_int8(ctx.meta)
        host = Host.probe("cpu", openvino=True)
        rec, why = openvino_usable(info, host)
        if rec is None:
            raise MedpipeError(f"the openvino backend cannot run this model: {why}")
        ok, why = openvino_verdict(info, host)
        if not ok:
            log.warning("the OpenVINO run of the INT8 model FAILED its accuracy gate: %s", why)
        session = OpenVinoSession(data, threads=ctx.threads, precision=rec["precision"], max_batch=ctx.max_batch,
                                  streams=ctx.streams)
        session.warm(buckets=1)  # compile now: a model OpenVINO cannot compile fails here, not mid-request
        return cls(session, {**info, "gate": rec["gate"], "temperature": rec["temperature"], "runtime": "openvino"})

    def describe(self) -> dict:
        return {"backend": self.name, "runtime": f"openvino {version()}", "precision": self.session.precision,
                "streams": self.session.streams,
                "gate_passed": bool(self.record["gate"].get("passed"))}
