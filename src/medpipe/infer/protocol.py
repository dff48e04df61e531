"""The request/response protocol shared by the HTTP service and the SageMaker toolkit handlers.

Pure functions, no web framework: content types in, items out; predictions in, JSON or CSV out.

Request bodies (``Content-Type``):
  image/jpeg, image/png, image/bmp, image/webp, application/x-image  one image's bytes
  application/x-npy    one array (HW, HWC or CHW) or a stack (NHWC/NCHW); uint8, or float in [0,1]/[0,255];
                       read with ``allow_pickle=False``
  application/json     {"images": ["<base64>", ...]} (also {"instances": [...]}, items may be {"b64": ...});
                       patient metadata beside each image: {"images": [...], "metadata": [{"age": 60, "sex":
                       "male", "site": "back"}, null, ...]} or items {"b64": ..., "metadata": {...}}
  application/dicom    one DICOM Part 10 object (the ``dicom`` extra)
Responses (``Accept``): application/json (also for none or */*) or text/csv; anything else is 406.
"""

from __future__ import annotations

import base64
import binascii
import io
import json

import numpy as np

from medpipe.errors import HttpError, http_status
from medpipe.data import dicom
from medpipe.data.decodepool import DecodeSpec, decode_item as decode_with
from medpipe.utils import csv_text

IMAGE_TYPES = ("image/jpeg", "image/png", "application/x-image", "image/bmp", "image/webp")
NPY = "application/x-npy"
JSON_T = "application/json"
CSV_T = "text/csv"
DICOM = "application/dicom"
SUPPORTED_TYPES = (*IMAGE_TYPES, NPY, JSON_T, DICOM)
DEFAULT_MAX_IMAGES = 16  # images in one request (medpipe serve and the SageMaker handlers)


def media_type(header: str | None, default: str = "application/x-image") -> str:
    return (header or default).split(";")[0].strip().lower()


def unsupported(ctype: str) -> HttpError:
    return HttpError(415, "unsupported_media_type", f"Content-Type {ctype or '(none)'!r} is not supported; send "
                     + ", ".join([*IMAGE_TYPES, NPY, JSON_T] + ([DICOM] if dicom.available() else [])))


def negotiate(accept: str | None) -> str | None:
    """The response type for an Accept header: JSON for none or */*, CSV when preferred, None if neither."""
    if not accept or not accept.strip():
        return JSON_T
    best, best_q = None, 0.0
    for part in accept.split(","):
        bits = [b.strip() for b in part.split(";")]
        mt, q = bits[0].lower(), 1.0
        for b in bits[1:]:
            if b.startswith("q="):
                try:
                    q = float(b[2:])
                except ValueError:
                    q = 0.0
        chosen = {JSON_T: JSON_T, "application/*": JSON_T, "*/*": JSON_T, CSV_T: CSV_T, "text/*": CSV_T}.get(mt)
        if chosen and q > best_q:
            best, best_q = chosen, q
    return best


def check_count(n: int, max_images: int) -> None:
    if n == 0:
        raise HttpError(400, "no_images", "the request holds no image")
    if n > max_images:
        raise HttpError(413, "too_many_images", f"{n} images in one request; the limit is {max_images}")


def parse_body(ctype: str, body: bytes, max_images: int = DEFAULT_MAX_IMAGES) -> list[tuple[str, object]]:
    """Body -> [(kind, payload)], kind in bytes | array | dicom. Raises HttpError naming the problem."""
    if ctype in IMAGE_TYPES:
        return [("bytes", body)]
    if ctype == DICOM:
        return [("dicom", body)]
    if ctype == NPY:
        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - numpy raises several types for bad files
            raise HttpError(400, "bad_npy", f"body is not a valid .npy array ({exc.__class__.__name__})") from None
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "uif" or arr.ndim not in (2, 3, 4):
            raise HttpError(400, "bad_npy", "the .npy array must be numeric HW, HWC, CHW or NHWC/NCHW")
        if arr.size == 0:
            raise HttpError(400, "bad_npy", f"the .npy array of shape {arr.shape} holds no pixels")
        items = list(arr) if arr.ndim == 4 else [arr]
        check_count(len(items), max_images)
        return [("array", a) for a in items]
    if ctype == JSON_T:
        # Bounded before parsing (a memchr-speed count): no valid body holds more than ~2 strings and
        # values per image, so a body of a million empty strings is refused without being parsed.
        tokens = max(body.count(b'"') // 2, body.count(b","))
        if tokens > 2 * max_images + 256:
            raise HttpError(413, "too_many_images", f"the JSON body holds {tokens} strings or values; it may "
                            f"carry at most {max_images} images (max_images)")
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise HttpError(400, "bad_json", "body is not valid JSON") from None
        except RecursionError:
            raise HttpError(400, "bad_json", "JSON body is nested too deeply") from None
        images = obj.get("images", obj.get("instances")) if isinstance(obj, dict) else None
        if not isinstance(images, list):
            raise HttpError(400, "bad_json", "JSON body must be {\"images\": [<base64 image>, ...]}")
        check_count(len(images), max_images)
        out = Items()
        out.metadata = json_metadata(obj, images)
        for i, x in enumerate(images):
            s = x.get("b64") if isinstance(x, dict) else x
            if not isinstance(s, str):
                raise HttpError(400, "bad_json", f"images[{i}] must be a base64 string")
            try:
                out.append(("bytes", base64.b64decode(s, validate=True)))
            except (binascii.Error, ValueError):
                raise HttpError(400, "bad_base64", f"images[{i}] is not valid base64") from None
        return out
    raise unsupported(ctype)


class Items(list):
    """Parsed items, and the patient metadata sent beside them (``metadata``: one dict or None per item, or
    None when the request sent none)."""

    metadata: list | None = None


def json_metadata(obj: dict, images: list) -> list | None:
    """The metadata of a JSON request: a top-level ``metadata`` list (one object or null per image) or a
    ``metadata`` object inside each ``{"b64": ...}`` item; None when there is none. 400 naming the element when
    it is not an object; the values are checked against the model's vocabulary later."""
    top = obj.get("metadata")
    inner = [x.get("metadata") if isinstance(x, dict) else None for x in images]
    if top is not None and any(v is not None for v in inner):
        raise HttpError(400, "bad_json", "send metadata either as a top-level list or inside each image, not both")
    if top is not None:
        if not isinstance(top, list) or len(top) != len(images):
            raise HttpError(400, "bad_json", f"metadata must be a list of {len(images)} objects (or nulls), one per image")
        inner = top
    for i, v in enumerate(inner):
        if v is not None and not isinstance(v, dict):
            raise HttpError(400, "bad_json", f"metadata[{i}] must be an object such as "
                            '{"age": 60, "sex": "male", "site": "back"}, or null')
    return inner if any(v is not None for v in inner) else None


def decode_item(predictor, kind: str, payload, max_pixels: int):
    """One parsed item -> model-size RGB uint8, or the ImageError that says why not (returned, not raised).

    In this process; the service runs the same function in its decode processes (medpipe/data/decodepool.py).
    """

    return decode_with(DecodeSpec(predictor.size, predictor.spec.interpolation, max_pixels), kind, payload)


def merge(decoded: list, predictions: list) -> list[dict]:
    """Per item, its prediction dict or {"error", "message", "status"} in request order."""
    out, it = [], iter(predictions)
    for d in decoded:
        if isinstance(d, np.ndarray):
            out.append(next(it).as_dict())
        else:
            out.append({"error": d.code, "message": d.reason, "status": http_status(d)})
    return out


def finish(preds: list[dict]) -> list[dict]:
    """Raise the error when no item succeeded; else drop the internal status from error entries."""
    failed = [p for p in preds if "error" in p]
    if failed and len(failed) == len(preds):
        f = failed[0]
        raise HttpError(f["status"], f["error"], f["message"] if len(preds) == 1
                        else f"images[0]: {f['message']} (and {len(preds) - 1} more failed)")
    for p in failed:
        p.pop("status", None)
    return preds


def to_csv(classes: list[str], preds: list[dict]) -> str:
    """``Accept: text/csv``: one row per image, through the one CSV writer (quoting, formula neutralisation)."""

    rows = [[i, "", "", *([""] * len(classes)), p["error"]] if "error" in p else
            [i, p["label"], p["class_index"], *(f"{p['probabilities'][c]:.6f}" for c in classes), ""]
            for i, p in enumerate(preds)]
    return csv_text(["index", "label", "class_index", *classes, "error"], rows)
