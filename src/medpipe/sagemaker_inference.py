"""SageMaker PyTorch inference toolkit handlers (shipped as ``code/inference.py`` in model.tar.gz).

The toolkit calls ``model_fn(model_dir)`` once, then per request ``input_fn(body, content_type)``,
``predict_fn(data, model)`` and ``output_fn(prediction, accept)``. Image bytes in, labelled JSON out:
clients never preprocess. ``application/x-npy`` is read with ``allow_pickle=False`` (the toolkit's
default decoder allows pickle; this one never does).
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np

IMAGE_TYPES = ("image/jpeg", "image/png", "application/x-image", "image/bmp", "image/webp")


class _BadRequest(ValueError):
    pass


def model_fn(model_dir):
    from medpipe.predictor import Predictor

    return Predictor(model_dir)


def input_fn(request_body, content_type="application/x-image"):
    ctype = (content_type or "application/x-image").split(";")[0].strip().lower()
    body = request_body.encode() if isinstance(request_body, str) else bytes(request_body)
    if ctype in IMAGE_TYPES:
        return {"kind": "bytes", "items": [body]}
    if ctype == "application/x-npy":
        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except Exception as exc:
            raise _BadRequest(f"body is not a valid .npy array ({exc.__class__.__name__})") from None
        arrays = list(arr) if arr.ndim == 4 else [arr]
        return {"kind": "arrays", "items": arrays}
    if ctype == "application/json":
        try:
            obj = json.loads(body)
            images = obj["instances"] if isinstance(obj, dict) and "instances" in obj else obj.get("images")
            items = [base64.b64decode(x if isinstance(x, str) else x["b64"], validate=True) for x in images]
        except Exception:
            raise _BadRequest("JSON body must be {\"images\": [<base64>, ...]}") from None
        return {"kind": "bytes", "items": items}
    raise _BadRequest(f"unsupported content type {ctype!r}")


def predict_fn(input_object, model):
    if input_object["kind"] == "arrays":
        pixels = [model.prepare_array(a) for a in input_object["items"]]
    else:
        pixels = [model.decode(b) for b in input_object["items"]]
    preds = model.to_predictions(model.probabilities(pixels))
    return {"model": model.name, "version": model.version, "predictions": [p.as_dict() for p in preds]}


def output_fn(prediction, accept="application/json"):
    acc = (accept or "application/json").split(",")[0].split(";")[0].strip().lower()
    if acc in ("application/json", "*/*", ""):
        return json.dumps(prediction), "application/json"
    if acc == "text/csv":
        preds = prediction["predictions"]
        classes = list(preds[0]["probabilities"]) if preds else []
        lines = [",".join(["label", "class_index", *classes])]
        lines += [",".join([p["label"], str(p["class_index"]), *(f"{p['probabilities'][c]:.6f}" for c in classes)])
                  for p in preds]
        return "\n".join(lines) + "\n", "text/csv"
    raise _BadRequest(f"unsupported accept type {acc!r}; use application/json or text/csv")
