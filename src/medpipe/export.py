"""Exports of a model package: ONNX (dynamic batch axis), TorchScript, a MONAI bundle, a SageMaker tarball.

Every export takes normalised NCHW float32 input — the output of the package's eval preset — and
returns logits, exactly like the eager model; the preprocessing spec and class names travel with it
(``model.json`` next to an ONNX/TorchScript file, ``metadata.json`` in a bundle).

    medpipe export --model RUN/model --format onnx --out model.onnx
"""

from __future__ import annotations

import io
import logging
import warnings

import torch

from medpipe.errors import MedpipeError

log = logging.getLogger(__name__)

ONNX_OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


class ExportError(MedpipeError):
    pass


def onnx_bytes(model: torch.nn.Module, image_size: int) -> bytes:
    """Serialise ``model`` (eval mode, on CPU) to ONNX with a dynamic batch axis.

    Uses the TorchScript-based exporter (about 1 s for DenseNet121) and falls back to the
    ``torch.export`` one where the former is unavailable.
    """
    model = model.eval()
    example = torch.zeros(2, 3, image_size, image_size)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=ONNX_OPSET, dynamo=False)
        except Exception as first:  # noqa: BLE001 - try the other exporter, then report both
            buf = io.BytesIO()
            try:
                torch.onnx.export(model, (example,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), dynamo=True)
            except Exception as second:  # noqa: BLE001
                raise ExportError(f"ONNX export failed ({first.__class__.__name__}: {str(first)[:120]}; "
                                  f"{second.__class__.__name__}: {str(second)[:120]})") from None
    return buf.getvalue()


def onnx_session(data: bytes | str, threads: int | None = None):
    """An ONNX Runtime CPU session that does not spin its threads against torch's."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("the ONNX backend needs onnxruntime: pip install 'medpipe[onnx]'") from None
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    # Idle worker threads spin by default; that steals the cores decoding and torch need.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
