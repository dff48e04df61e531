"""SageMaker PyTorch inference toolkit handlers (``code/inference.py`` of model.tar.gz re-exports them).

The toolkit (``sagemaker_inference.transformer.Transformer``) calls ``model_fn(model_dir, context)`` once
per worker and ``transform_fn(model, body, content_type, accept, context)`` per request; it passes the
TorchServe context to any handler that takes one more argument than the toolkit's own.

Errors: the toolkit turns every exception a handler raises into a response whose body is the message
followed by the Python traceback (500 unless the exception is its ``BaseInferenceToolkitError``, whose
status it honours but still appends the traceback). So client errors are never raised:
``transform_fn`` answers them itself, setting the status on the context
(``context.set_response_status``, what the toolkit's own error path uses) and returning medpipe's JSON
error body ``{"error": code, "message": ...}``, as ``medpipe serve`` does: 400 (unreadable image, bad
body), 413 (too many images, too many pixels), 415 (unsupported Content-Type, GIF), 406 (Accept neither
JSON nor CSV). Anything unexpected is a 500 with a generic body; its traceback goes to the log only.

The request protocol is medpipe serve's (medpipe.infer.protocol): image bytes, ``.npy``
(``allow_pickle=False``; the toolkit's default decoder allows pickle, this one never does), base64
JSON or DICOM in; labelled, calibrated JSON or CSV out. A package that takes patient metadata gets it as in
``medpipe serve``: JSON ``metadata`` beside each image; a value outside its vocabulary or range is a 400
naming the image and the field.

The model loads on the GPU TorchServe gives the worker (``gpu_id`` in the context; each worker of a
multi-GPU instance gets its own) or on the CPU, with the backend ``medpipe serve --backend auto``
picks (CUDA graphs on a GPU, ONNX Runtime on CPU when installed, else eager; set
``MEDPIPE_BACKEND=eager|onnx|int8|openvino|cudagraph`` in the model's environment to pin one).
"""

from __future__ import annotations

import json
import logging
import os
import uuid

from medpipe.data.imageio import DEFAULT_MAX_PIXELS
from medpipe.errors import MetadataError
from medpipe.infer.predictor import Predictor
from medpipe.infer.protocol import (
    CSV_T,
    DEFAULT_MAX_IMAGES,
    JSON_T,
    HttpError,
    decode_item,
    finish,
    media_type,
    merge,
    negotiate,
    parse_body,
    to_csv,
)

log = logging.getLogger(__name__)


def device_for(context) -> str:
    """``cuda:<gpu_id>`` from the TorchServe context when CUDA is usable, else ``cpu``."""
    import torch

    props = getattr(context, "system_properties", None) or {}
    gpu = props.get("gpu_id")
    if gpu is not None and torch.cuda.is_available():
        return f"cuda:{int(gpu)}"
    return "cpu"


def model_fn(model_dir, context=None):
    # the endpoint's environment (Model(env=...)) chooses the runtime and flip TTA, as for medpipe serve
    return Predictor(model_dir, device=device_for(context), backend=os.environ.get("MEDPIPE_BACKEND", "auto"),
                     tta=os.environ.get("MEDPIPE_TTA", "").strip().lower() in ("1", "true", "yes"))


def predict(model, body, content_type: str | None, accept: str | None) -> tuple[str, str]:
    """One request -> (response body, content type); raises HttpError for anything the client can fix."""
    kind = negotiate(accept)
    if kind is None:
        raise HttpError(406, "not_acceptable", f"unsupported Accept type {accept!r}; use application/json or text/csv")
    body = body.encode() if isinstance(body, str) else bytes(body or b"")
    items = parse_body(media_type(content_type), body, DEFAULT_MAX_IMAGES)
    try:
        vectors = model.encode_metadata(getattr(items, "metadata", None), len(items),
                                        [f"images[{i}]" for i in range(len(items))])
    except MetadataError as exc:
        raise HttpError(400, exc.code, str(exc)) from None
    decoded = [decode_item(model, k, payload, DEFAULT_MAX_PIXELS) for k, payload in items]
    ok = [i for i, d in enumerate(decoded) if not isinstance(d, Exception)]
    md = None if vectors is None else vectors[ok]
    probs = model.probabilities([decoded[i] for i in ok], metadata=md) if ok else None
    preds = finish(merge(decoded, model.to_predictions(probs) if ok else []))
    if kind == CSV_T:
        return to_csv(model.classes, preds), CSV_T
    return json.dumps({"model": model.name, "version": model.version, "predictions": preds}), JSON_T


def error_response(context, status: int, code: str, message: str) -> tuple[str, str]:
    """medpipe's JSON error body, with the status set where the toolkit reads it (the request context)."""
    if context is not None:
        context.set_response_status(code=status, phrase=code)
    return json.dumps({"error": code, "message": message, "request_id": uuid.uuid4().hex[:16]}), JSON_T


def transform_fn(model, body, content_type, accept, context=None):
    try:
        return predict(model, body, content_type, accept)
    except HttpError as exc:
        return error_response(context, exc.status, exc.code, exc.message)
    except Exception:  # noqa: BLE001 - raised, the toolkit would put the traceback in the body
        log.exception("internal error while answering a request")
        return error_response(context, 500, "internal_error", "internal error; see the endpoint log")
