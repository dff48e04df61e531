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
# The second output (after the logits, so clients that read output 0 or "logits" are unaffected): the classifier
# head's input, the pooled penultimate-layer features, which medpipe.monitor projects into the capture's embedding
EMBEDDING_NAME = "embedding"


def classifier_head(model: torch.nn.Module):
    """The model's last ``nn.Linear`` (its classifier head), or None for a model without one."""
    import torch

    return next((m for m in reversed(list(model.modules())) if isinstance(m, torch.nn.Linear)), None)


def with_embedding(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` returning ``(logits, features)``: ``features`` (N x F) is what its classifier head receives,
    read by a forward pre-hook during the same pass (so a traced graph computes it once, shared with the head)."""
    import torch

    head = classifier_head(model)
    if head is None:
        raise ExportError("the model has no linear classifier head to read an embedding from")

    class WithEmbedding(torch.nn.Module):  # built here so that importing this module needs no torch

        def __init__(self, model: torch.nn.Module, head: torch.nn.Module):
            super().__init__()
            self.model, self._head = model, [head]  # a list: the head is already a submodule of model

        def forward(self, *args):
            seen: list = []
            hook = self._head[0].register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
            try:
                out = self.model(*args)
            finally:
                hook.remove()
            features = seen[-1]
            return out, features if features.ndim == 2 else features.reshape(features.shape[0], -1)

    return WithEmbedding(model, head).eval()


def onnx_bytes(model: torch.nn.Module, image_size: int, example: torch.Tensor | None = None,
               embedding: bool = True) -> bytes:
    """Serialise ``model`` (eval mode, on CPU) to ONNX with a dynamic batch axis: output ``logits`` and, with
    ``embedding`` (and a model with a linear classifier head), a second output ``embedding`` (see
    :data:`EMBEDDING_NAME`, :func:`with_embedding`).

    Uses the TorchScript-based exporter (about 1 s for DenseNet121) and falls back to the
    ``torch.export`` one where the former is unavailable.
    """
    import torch

    model = model.eval()
    names = [OUTPUT_NAME]
    if embedding and classifier_head(model) is not None:
        model, names = with_embedding(model), [OUTPUT_NAME, EMBEDDING_NAME]
    example = torch.zeros(2, 3, image_size, image_size) if example is None else example
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), buf, input_names=[INPUT_NAME], output_names=names,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in names}},
                              opset_version=ONNX_OPSET, dynamo=False)
        except Exception as first:  # noqa: BLE001 - try the other exporter, then report both
            buf = io.BytesIO()
            try:
                torch.onnx.export(model, (example,), buf, input_names=[INPUT_NAME], output_names=names,
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), dynamo=True)
            except Exception as second:  # noqa: BLE001
                raise ExportError(f"ONNX export failed ({first.__class__.__name__}: {str(first)[:120]}; "
                                  f"{second.__class__.__name__}: {str(second)[:120]})") from None
    return buf.getvalue()


def output_names(session) -> list[str]:
    """The output names of an ONNX Runtime session or an :class:`~medpipe.infer.openvino_runtime.OpenVinoSession`."""
    return [o.name for o in session.get_outputs()]


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


def _embedding_features(m) -> int | None:
    """The feature count of an ONNX model's ``embedding`` output (None when it has none)."""
    out = next((o for o in m.graph.output if o.name == EMBEDDING_NAME), None)
    dims = out.type.tensor_type.shape.dim if out is not None else []
    return int(dims[-1].dim_value) if len(dims) == 2 and dims[-1].dim_value > 0 else None


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
    features = _embedding_features(m)
    if features:
        props["output"] += (f"; {EMBEDDING_NAME} (second output): float32 N x {features}, the pooled penultimate-layer "
                            "features (the classifier head's input), for drift monitoring")
        props["embedding"] = json.dumps({"output": EMBEDDING_NAME, "index": 1, "features": features,
                                         "layer": "input of the classifier head (pooled penultimate features)"})
    del m.metadata_props[:]
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    m.doc_string = f"{about['name']} v{about['version']} ({about['architecture']}), exported by medpipe " \
                   f"{about['medpipe_version']}"
    return m.SerializeToString()
