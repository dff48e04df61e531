"""SageMaker PyTorch inference toolkit handlers (shipped as ``code/inference.py`` in model.tar.gz).

The toolkit calls ``model_fn(model_dir)`` once, then per request ``input_fn(body, content_type)``,
``predict_fn(data, model)`` and ``output_fn(prediction, accept)``. They speak the same protocol as
``medpipe serve`` (medpipe.infer.protocol: image bytes, .npy, base64 JSON or DICOM in; labelled,
calibrated JSON or CSV out), so clients never preprocess. ``application/x-npy`` is read with
``allow_pickle=False`` (the toolkit's default decoder allows pickle; this one never does). Errors are
raised as ValueError subclasses whose message names the problem.
"""

from __future__ import annotations

import json

from medpipe.data.imageio import DEFAULT_MAX_PIXELS
from medpipe.infer.protocol import (
    CSV_T,
    HttpError,
    decode_item,
    finish,
    media_type,
    merge,
    negotiate,
    parse_body,
    to_csv,
)

MAX_IMAGES = 64


class BadRequest(ValueError):
    def __init__(self, err: HttpError):
        super().__init__(f"{err.code}: {err.message}")
        self.status, self.code = err.status, err.code


def model_fn(model_dir):
    """The fastest backend the container allows (``auto``: CUDA graphs on a GPU, ONNX Runtime on CPU
    when installed, else eager; a backend that cannot start falls back to eager). The endpoint's
    environment can pin one: MEDPIPE_BACKEND=eager|onnx|cudagraph."""
    import os

    from medpipe.infer.predictor import Predictor

    return Predictor(model_dir, backend=os.environ.get("MEDPIPE_BACKEND", "auto"))


def input_fn(request_body, content_type="application/x-image"):
    body = request_body.encode() if isinstance(request_body, str) else bytes(request_body)
    try:
        return parse_body(media_type(content_type), body, MAX_IMAGES)
    except HttpError as exc:
        raise BadRequest(exc) from None


def predict_fn(input_object, model):
    decoded = [decode_item(model, kind, payload, DEFAULT_MAX_PIXELS) for kind, payload in input_object]
    good = [d for d in decoded if not isinstance(d, Exception)]
    try:
        preds = finish(merge(decoded, model.to_predictions(model.probabilities(good))))
    except HttpError as exc:
        raise BadRequest(exc) from None
    return {"model": model.name, "version": model.version, "classes": model.classes, "predictions": preds}


def output_fn(prediction, accept="application/json"):
    kind = negotiate(accept)
    if kind is None:
        raise BadRequest(HttpError(406, "not_acceptable", f"unsupported accept type {accept!r}; "
                                   "use application/json or text/csv"))
    if kind == CSV_T:
        return to_csv(prediction["classes"], prediction["predictions"]), CSV_T
    return json.dumps({k: v for k, v in prediction.items() if k != "classes"}), kind
