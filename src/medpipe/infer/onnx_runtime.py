"""ONNX as an inference runtime: a model to ONNX bytes, an ONNX Runtime CPU session, and the
``metadata_props`` that make an ONNX file self-describing.

The Predictor's onnx/int8 backends, the INT8 quantiser and ``medpipe export --format onnx`` all build
their graphs and sessions here. Importing this module loads neither torch nor onnxruntime.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import TYPE_CHECKING

from medpipe import __version__, decision
from medpipe.errors import ExportError

if TYPE_CHECKING:  # annotations only
    import torch

    from medpipe.package import PackageMeta

ONNX_OPSET = 18
INPUT_NAME = "image"
METADATA_INPUT_NAME = "metadata"
METADATA_TEXT = (f"{METADATA_INPUT_NAME}: float32 N x dim, the encoded patient metadata (see metadata): [age given, "
                 "(age - age_mean) / age_std] if age is an input, then one-hot over sex, then over site; zeros for a "
                 "field not given")
OUTPUT_NAME = "logits"


def onnx_bytes(model: torch.nn.Module, image_size: int, example: torch.Tensor | None = None) -> bytes:
    """Serialise ``model`` (eval mode, on CPU) to ONNX with a dynamic batch axis.

    Uses the TorchScript-based exporter (about 1 s for DenseNet121) and falls back to the
    ``torch.export`` one where the former is unavailable.
    """
    import torch

    model = model.eval()
    example = torch.zeros(2, 3, image_size, image_size) if example is None else example
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
        raise ExportError("the ONNX backend needs onnxruntime: pip install 'medpipe-imaging[onnx]'") from None
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    # Idle worker threads spin by default; that steals the cores decoding and torch need.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def export_about(meta: PackageMeta) -> dict:
    """What every export says about itself: identity, classes, the preprocessing contract, calibration."""
    rule, offsets = decision.resolve(meta.decision, None, meta.num_classes)
    return {"name": meta.name, "version": meta.version,
            "architecture": meta.architecture, "classes": list(meta.classes),
            "preprocessing": meta.preprocessing.describe(),
            "temperature": meta.temperature,
            # the package's label rule (medpipe.decision), for consumers that want medpipe's labels
            "decision": {"rule": rule, "offsets": [0.0] * meta.num_classes if offsets is None else
                         [float(v) for v in offsets], "label": "argmax(log(probabilities) + offsets)"},
            "weights_sha256": meta.weights_sha256, "medpipe_version": __version__,
            # the second input of a model that takes patient metadata: its fields, vocabularies, normalisation
            **({"metadata": meta.metadata.to_dict()} if meta.metadata is not None else {})}


def input_text(with_preprocessing: bool) -> str:
    if with_preprocessing:
        return (f"{INPUT_NAME}: uint8 N x S x S x 3 RGB, decoded and resized as preprocessing.decode/resize say; "
                "scaling, colour constancy and normalisation are inside the graph")
    return f"{INPUT_NAME}: float32 N x 3 x S x S, the eval preset's output (see preprocessing)"


def with_onnx_metadata(data: bytes, meta: PackageMeta, with_preprocessing: bool = False) -> bytes:
    """The ONNX model with ``metadata_props`` that make it self-describing (read them with
    ``InferenceSession.get_modelmeta().custom_metadata_map``); strings, JSON where structured."""
    import onnx

    m = onnx.load_from_string(data)
    about = export_about(meta)
    props = {k: v if isinstance(v, str) else json.dumps(v) for k, v in about.items()}
    props["input"] = input_text(with_preprocessing)
    if meta.metadata is not None:
        props["input"] += "; " + METADATA_TEXT
    props["output"] = f"{OUTPUT_NAME}: float32 N x {len(about['classes'])}; probabilities = softmax(logits / temperature)"
    del m.metadata_props[:]
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    m.doc_string = f"{about['name']} v{about['version']} ({about['architecture']}), exported by medpipe " \
                   f"{about['medpipe_version']}"
    return m.SerializeToString()
