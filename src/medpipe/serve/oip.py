"""The Open Inference Protocol (KServe v2, spoken by Triton, KServe and Seldon clients) on ``medpipe serve``.

Routes, next to the SageMaker ones and under the same limits (body size, images per request, queue,
deadline), the same dynamic batcher and the same metrics::

    GET  /v2/health/live                 {"live": true}
    GET  /v2/health/ready                {"ready": true} once the model is warmed up, else 503
    GET  /v2                             server metadata
    GET  /v2/models/{name}[/versions/{v}]          model metadata (inputs, outputs, class names)
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

An inference request has exactly one input:

- ``image_bytes``, ``BYTES`` ``[N]``: encoded images (JPEG, PNG, BMP, WebP), base64 strings in JSON
  ``data`` or raw bytes with the binary tensor extension; decoded and resized by the package's spec;
- ``image``, ``FP32`` ``[N, 3, S, S]``: already preprocessed (the eval preset's output);

and, for a model that takes patient metadata, optionally a second one:

- ``metadata``, ``BYTES`` ``[N]``: one JSON object per image (``{"age": 60, "sex": "male", "site": "back"}``,
  any field left out, or ``null``) as JSON ``data`` strings; a value outside the model's vocabulary or range
  is 400 naming the element and the field.

Before anything is decoded: shapes are JSON integers (not booleans), a JSON request is counted before it
is parsed (strings <= max_images + 256, values <= max_images x 3 x S x S + 1024; else 413 naming the
input; a header over 256 KB that passes is parsed in a decode process, off the event loop), element counts
are checked against the declared shape (a binary BYTES list is cut off at its first extra element), and FP32 values must be finite and within 100x the eval preset's range (400 naming the
input: 3e38 is finite but overflows in the network). An element that does not decode is 400 (the
protocol's invalid input), 413 when it is too large.

Outputs: ``probabilities`` ``FP32 [N, C]`` (calibrated, class order in the model metadata's
``parameters.classes``) and ``label`` ``BYTES [N]``. Binary outputs are returned when the request
asks for them (``outputs[].parameters.binary_data`` or ``parameters.binary_data_output``), as
``tritonclient`` does by default. Errors are ``{"error": "<message>"}`` (with ``code`` and
``request_id``) and a 4xx/5xx status; no traceback is ever sent.
"""

# No `from __future__ import annotations`: FastAPI must see the real Request class in route signatures.
import base64
import binascii
import json
import re
import struct

import numpy as np

from medpipe.errors import MedpipeError
from medpipe.infer.protocol import HttpError
from medpipe import __version__

HEADER_LENGTH = "inference-header-content-length"
BYTES_INPUT, FP32_INPUT = "image_bytes", "image"
METADATA_INPUT = "metadata"
PROBS_OUTPUT, LABEL_OUTPUT = "probabilities", "label"
_MODEL_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?(/ready|/infer)?$")


def metric_route(path: str) -> str:
    """The route label for metrics (model names and versions folded into a template)."""
    if path in ("/v2", "/v2/health/live", "/v2/health/ready"):
        return path
    m = _MODEL_PATH.match(path)
    if not m:
        return "other"
    return "/v2/models/{name}" + ("/versions/{version}" if m.group(1) else "") + (m.group(2) or "")


def _error(status: int, code: str, message: str, rid: str, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message, "code": code, "request_id": rid}, status_code=status, headers=headers)


def _check_model(predictor, name: str, version: str | None) -> None:
    if name != predictor.name:
        raise HttpError(404, "model_not_found", f"model {name!r} is not served here; this server serves "
                        f"{predictor.name!r}")
    if version not in (None, "", predictor.version):
        raise HttpError(404, "version_not_found", f"model {name!r} has no version {version!r}; the served "
                        f"version is {predictor.version!r}")


def model_metadata(predictor) -> dict:
    s = predictor.spec.image_size
    spec = getattr(predictor, "metadata_spec", None)
    extra = ({"metadata": json.dumps(spec.to_dict())} if spec is not None else {})
    return {
        "name": predictor.name, "versions": [predictor.version], "platform": "medpipe_monai",
        "inputs": [{"name": BYTES_INPUT, "datatype": "BYTES", "shape": [-1]},
                   {"name": FP32_INPUT, "datatype": "FP32", "shape": [-1, 3, s, s]},
                   *([{"name": METADATA_INPUT, "datatype": "BYTES", "shape": [-1]}] if spec is not None else [])],
        "outputs": [{"name": PROBS_OUTPUT, "datatype": "FP32", "shape": [-1, len(predictor.classes)]},
                    {"name": LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1]}],
        "parameters": {"classes": json.dumps(predictor.classes),
                       "temperature": predictor.temperature_for(predictor.tta),
                       "tta": predictor.tta,
                       "preprocessing": json.dumps(predictor.spec.describe()),
                       "inputs": "exactly one of image_bytes (encoded images; base64 strings in JSON) or image "
                                 "(preprocessed float32 N x 3 x S x S)" + (
                                     "; optionally metadata (one JSON object string per image: age, sex, site)"
                                     if spec is not None else ""), **extra},
    }


# -- request decoding ---------------------------------------------------------------------------
EXTRA_JSON_STRINGS = 256   # strings a request may hold besides image_bytes' elements (keys, ids, parameters)
EXTRA_JSON_VALUES = 1024   # values a request may hold besides its tensor's elements
OFFLOAD_BYTES = 256 << 10  # a JSON header longer than this is parsed in a decode process, off the event loop
FP32_RANGE_FACTOR = 100.0  # |FP32 input| may be this many times the largest value the eval preset produces


def max_elements(spec_size: int, max_images: int) -> int:
    """The most tensor elements one request can carry: ``max_images`` images of 3 x S x S (FP32)."""
    return max_images * 3 * spec_size * spec_size


def fp32_limit(mean, std) -> float:
    """The largest |value| accepted in an FP32 input: the eval preset maps pixels in [0, 1] to
    ``(x - mean) / std``; anything far outside that range is not a preprocessed image and can overflow
    the network (3e38 is finite but not after a convolution)."""
    return FP32_RANGE_FACTOR * max(max(abs(0.0 - m), abs(1.0 - m)) / s for m, s in zip(mean, std))


def check_json_size(head: bytes, max_images: int, max_values: int | None, end: int | None = None) -> None:
    """Refuse, before it is parsed, a JSON request (``head[:end]``) holding more strings or values than a
    valid one can (counted at memchr speed: a 6 MB header of 1.5 million empty strings costs a few ms, not
    a parse)."""
    strings = head.count(b'"', 0, end) // 2
    if strings > max_images + EXTRA_JSON_STRINGS:
        raise HttpError(413, "too_many_elements", f"input {BYTES_INPUT!r}: the request holds {strings} JSON "
                        f"strings; {BYTES_INPUT!r} takes at most {max_images} elements (max_images) and the rest "
                        f"of a request at most {EXTRA_JSON_STRINGS} strings")
    values = head.count(b",", 0, end) + 1
    if max_values is not None and values > max_values + EXTRA_JSON_VALUES:
        raise HttpError(413, "too_many_elements", f"input {FP32_INPUT!r}: the request holds about {values} JSON "
                        f"values; {FP32_INPUT!r} takes at most {max_values} elements (max_images x 3 x S x S) "
                        f"and {BYTES_INPUT!r} at most {max_images}")


def split_body(body: bytes, header_length: str | None, max_images: int = 16,
               max_values: int | None = None) -> tuple[dict, bytes]:
    """(JSON request, binary tail) of an inference request, with or without the binary extension. The
    JSON header is size-checked (:func:`check_json_size`) before it is parsed."""
    n = len(body)
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise HttpError(400, "bad_header", "Inference-Header-Content-Length is not a number") from None
        if not 0 < n <= len(body):
            raise HttpError(400, "bad_header", f"Inference-Header-Content-Length {n} does not fit the "
                            f"{len(body)}-byte body")
    head = body[:n]
    check_json_size(head, max_images, max_values)
    try:
        req = json.loads(head)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise HttpError(400, "bad_json", "the inference request is not valid JSON") from None
    if not isinstance(req, dict):
        raise HttpError(400, "bad_json", "the inference request must be a JSON object")
    return req, body[n:]


def _params(obj: dict, where: str) -> dict:
    p = obj.get("parameters", {})
    if not isinstance(p, dict):
        raise HttpError(400, "bad_request", f"{where}.parameters must be an object")
    return p


def deserialize_bytes(raw: bytes, where: str, limit: int | None = None) -> list[bytes]:
    """Triton's binary BYTES layout: each element is a little-endian uint32 length, then the bytes.
    With ``limit`` (the declared element count) a longer list is refused as soon as it passes it."""
    out, i = [], 0
    while i < len(raw):
        if limit is not None and len(out) >= limit:
            raise HttpError(400, "bad_shape", f"{where}: more than the {limit} elements its shape declares")
        if i + 4 > len(raw):
            raise HttpError(400, "bad_binary", f"{where}: truncated element length")
        (k,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + k > len(raw):
            raise HttpError(400, "bad_binary", f"{where}: element of {k} bytes runs past the data")
        out.append(raw[i:i + k])
        i += k
    return out


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _the_input(req: dict) -> tuple[dict, str]:
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise HttpError(400, "bad_request", f"send exactly one input, {BYTES_INPUT!r} (BYTES) or "
                        f"{FP32_INPUT!r} (FP32)")
    inp = inputs[0]
    name, dtype = inp.get("name"), inp.get("datatype")
    if name not in (BYTES_INPUT, FP32_INPUT):
        raise HttpError(400, "unknown_input", f"unknown input {str(name)[:100]!r}; use {BYTES_INPUT!r} (BYTES) or "
                        f"{FP32_INPUT!r} (FP32)")
    want = "BYTES" if name == BYTES_INPUT else "FP32"
    if dtype != want:
        raise HttpError(400, "bad_datatype", f"input {name!r} must be {want}, got {str(dtype)[:100]!r}")
    return inp, name


def _shape(inp: dict, name: str, spec_size: int, max_images: int) -> list[int]:
    """The declared shape, checked: JSON integers (``true`` is not one, though Python's bool is an int)."""
    shape = inp.get("shape")
    if not isinstance(shape, list) or len(shape) > 8 or not all(type(d) is int and d >= 0 for d in shape):
        raise HttpError(400, "bad_shape", f"input {name!r}: shape must be a list of non-negative integers")
    expected = "[N]" if name == BYTES_INPUT else f"[N, 3, {spec_size}, {spec_size}]"
    if (name == BYTES_INPUT and len(shape) != 1) or (name == FP32_INPUT and shape[1:] != [3, spec_size, spec_size]):
        raise HttpError(400, "bad_shape", f"input {name!r} must have shape {expected}, got {shape}")
    n = shape[0]
    if n == 0:
        raise HttpError(400, "no_images", f"input {name!r} holds no image")
    if n > max_images:
        raise HttpError(413, "too_many_images", f"input {name!r}: {n} images in one request; the limit is "
                        f"{max_images}")
    return shape


def _checked_fp32(arr: np.ndarray, name: str, max_abs: float) -> np.ndarray:
    """Finite and within +-max_abs, else 400 naming the input (the binary and the JSON form alike)."""
    if not np.isfinite(arr).all():
        raise HttpError(400, "bad_values", f"input {name!r} holds NaN or Inf")
    peak = float(np.abs(arr).max())
    if peak > max_abs:
        raise HttpError(400, "bad_values", f"input {name!r} holds a value of magnitude {peak:.3g}; a preprocessed "
                        f"image lies within +-{max_abs:.4g} (the eval preset's range x {FP32_RANGE_FACTOR:g})")
    return arr


def _fp32_json(data: list, shape: list[int], name: str) -> np.ndarray:
    want = int(np.prod(shape))
    if data and not isinstance(data[0], list) and len(data) != want:  # flat (tritonclient): count before converting
        raise HttpError(400, "bad_shape", f"input {name!r}: {len(data)} values for shape {shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            arr = np.asarray(data, dtype=np.float32)
        except (TypeError, ValueError, OverflowError):
            raise HttpError(400, "bad_request", f"input {name!r}: data must be numbers") from None
    if arr.size != want:
        raise HttpError(400, "bad_shape", f"input {name!r}: {arr.size} values for shape {shape}")
    return arr.reshape(shape)


def _bytes_json(data: list, n: int, name: str) -> list[bytes]:
    if len(data) != n:  # before decoding a single element
        raise HttpError(400, "bad_shape", f"input {name!r}: {len(data)} elements for shape [{n}]")
    items = []
    for i, s in enumerate(data):
        if not isinstance(s, str):
            raise HttpError(400, "bad_request", f"input {name!r} element {i} must be a base64 string")
        try:
            items.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise HttpError(400, "bad_base64", f"input {name!r} element {i} is not valid base64") from None
    return items


def parse_input(req: dict, binary: bytes, spec_size: int, max_images: int, max_abs: float = float("inf")):
    """The one input of an inference request -> ("bytes", [encoded images]) or ("tensor", N x 3 x S x S).

    Every count is checked against the declared shape before anything is decoded."""
    inp, name = _the_input(req)
    shape = _shape(inp, name, spec_size, max_images)
    n = shape[0]
    size = _params(inp, f"input {name!r}").get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0 or size > len(binary):
            raise HttpError(400, "bad_binary", f"input {name!r}: binary_data_size {str(size)[:40]!r} does not fit "
                            f"the {len(binary)} bytes after the JSON header")
        raw = binary[:size]
        if name == BYTES_INPUT:
            items = deserialize_bytes(raw, f"input {name!r}", limit=n)
        elif size != n * 3 * spec_size * spec_size * 4:
            raise HttpError(400, "bad_shape", f"input {name!r}: {size} bytes of FP32 data for shape {shape}")
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                arr = np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
            return "tensor", _checked_fp32(arr, name, max_abs)
    else:
        data = inp.get("data")
        if not isinstance(data, list):
            raise HttpError(400, "bad_request", f"input {name!r} has neither data nor binary_data_size")
        if name == FP32_INPUT:
            return "tensor", _checked_fp32(_fp32_json(data, shape, name), name, max_abs)
        items = _bytes_json(data, n, name)
    if len(items) != n:
        raise HttpError(400, "bad_shape", f"input {name!r}: {len(items)} elements for shape {shape}")
    return "bytes", items


def metadata_input(req: dict) -> list | None:
    """Take the ``metadata`` input out of ``req["inputs"]``: one dict (or None) per image, or None when the
    request has none. 400 naming the element when one is not a JSON object string."""
    inputs = req.get("inputs")
    found = [i for i in inputs if isinstance(i, dict) and i.get("name") == METADATA_INPUT] if isinstance(
        inputs, list) else []
    if not found:
        return None
    inp = found[0]
    req["inputs"] = [i for i in inputs if i is not inp]
    if inp.get("datatype") != "BYTES":
        raise HttpError(400, "bad_datatype", f"input {METADATA_INPUT!r} must be BYTES, got {str(inp.get('datatype'))[:40]!r}")
    data = inp.get("data")
    if not isinstance(data, list):
        raise HttpError(400, "bad_request", f"input {METADATA_INPUT!r}: send its elements as JSON data strings")
    out = []
    for i, text in enumerate(data):
        try:
            value = json.loads(text) if isinstance(text, str) else None
        except (ValueError, RecursionError):
            value = None
        if not isinstance(value, (dict, type(None))) or not isinstance(text, str):
            raise HttpError(400, "bad_request", f"input {METADATA_INPUT!r} element {i} must be a JSON object string "
                            'such as {"age": 60, "sex": "male", "site": "back"}')
        out.append(value)
    return out


def parse_request(body: bytes, header_length: str | None, spec_size: int, max_images: int, max_abs: float):
    """The whole request -> ("ok", request without its input data, kind, payload) or ("error", status, code,
    message); never raises, so a decode process can run it (:data:`OFFLOAD_BYTES`). The metadata input, if
    any, is returned in the request as ``metadata_values``."""
    try:
        req, binary = split_body(body, header_length, max_images, max_elements(spec_size, max_images))
        values = metadata_input(req)
        kind, payload = parse_input(req, binary, spec_size, max_images, max_abs)
        if values is not None and len(values) != len(payload):
            raise HttpError(400, "bad_shape", f"input {METADATA_INPUT!r}: {len(values)} elements for "
                            f"{len(payload)} images")
    except HttpError as exc:
        return "error", exc.status, exc.code, exc.message
    inputs = req.get("inputs")
    req["inputs"] = [{k: v for k, v in inputs[0].items() if k != "data"}]  # nothing big travels back
    req["metadata_values"] = values
    return "ok", req, kind, payload


async def parse_off_loop(pool, body: bytes, header_length: str | None, spec_size: int, max_images: int,
                         max_abs: float) -> tuple[dict, str, object]:
    """(request without its input data, kind, payload): :func:`parse_request` on the event loop, or, for a
    JSON header over :data:`OFFLOAD_BYTES` that passes the element count, in a decode process of ``pool``."""
    args = (body, header_length, spec_size, max_images, max_abs)
    try:
        head_length = int(header_length) if header_length is not None else len(body)
    except ValueError:
        head_length = 0  # parse_request names the bad header
    if OFFLOAD_BYTES < head_length <= len(body) and pool is not None:
        # counted here first, so a flood of oversized lists never reaches the decode processes
        check_json_size(body, max_images, max_elements(spec_size, max_images), head_length)
        try:  # FP32 data as JSON numbers: up to ~0.2 s of parsing for 6 MB
            parsed = await pool.call(parse_request, *args)
        except TimeoutError as exc:
            raise HttpError(413, "request_too_costly", f"the inference request was {exc}") from None
    else:
        parsed = parse_request(*args)
    if parsed[0] == "error":
        raise HttpError(*parsed[1:])
    return parsed[1], parsed[2], parsed[3]


def requested_outputs(req: dict) -> list[tuple[str, bool]]:
    """[(output name, binary?)] in the order asked for; both outputs when none are named."""
    default_binary = bool(_params(req, "request").get("binary_data_output", False))
    outs = req.get("outputs")
    if outs is None:
        return [(PROBS_OUTPUT, default_binary), (LABEL_OUTPUT, default_binary)]
    if not isinstance(outs, list) or not all(isinstance(o, dict) for o in outs):
        raise HttpError(400, "bad_request", "outputs must be a list of objects")
    result = []
    for o in outs:
        if o.get("name") not in (PROBS_OUTPUT, LABEL_OUTPUT):
            raise HttpError(400, "unknown_output", f"unknown output {o.get('name')!r}; use {PROBS_OUTPUT!r} "
                            f"or {LABEL_OUTPUT!r}")
        result.append((o["name"], bool(_params(o, f"output {o['name']!r}").get("binary_data", default_binary))))
    return result


def encode_response(req: dict, predictor, probs: np.ndarray, outputs: list[tuple[str, bool]]):
    """(JSON bytes, binary tail) of the inference response."""
    labels = [predictor.classes[int(k)] for k in predictor.labels(probs)] if len(probs) else []  # decision rule
    body = {"model_name": predictor.name, "model_version": predictor.version, "outputs": [],
            "parameters": {"decision_rule": predictor.decision_rule, "tta": predictor.tta}}
    if isinstance(req.get("id"), str):
        body["id"] = req["id"]
    tail = b""
    for name, binary in outputs:
        if name == PROBS_OUTPUT:
            out = {"name": name, "datatype": "FP32", "shape": list(probs.shape)}
            raw = probs.astype("<f4").tobytes()
            values = [float(v) for v in probs.astype(np.float32).ravel()]
        else:
            out = {"name": name, "datatype": "BYTES", "shape": [len(labels)]}
            raw = serialize_bytes([lb.encode() for lb in labels])
            values = labels
        if binary:
            out["parameters"] = {"binary_data_size": len(raw)}
            tail += raw
        else:
            out["data"] = values
        body["outputs"].append(out)
    return json.dumps(body).encode(), tail


# -- routes -------------------------------------------------------------------------------------
def add_routes(app, svc) -> None:
    """Register the /v2 routes on the service's FastAPI app."""
    from fastapi import Request
    from starlette.responses import JSONResponse, Response

    predictor, cfg = svc.predictor, svc.cfg
    max_abs = fp32_limit(predictor.spec.mean, predictor.spec.std)

    def rid_of(request: Request) -> str:
        return request.scope.get("medpipe.rid", "-")

    def guarded(fn):
        async def route(request: Request, name: str | None = None, version: str | None = None):
            try:
                if name is not None:
                    _check_model(predictor, name, version)
                return await fn(request)
            except HttpError as exc:
                return _error(exc.status, exc.code, exc.message, rid_of(request), exc.headers)
        route.__name__ = fn.__name__
        return route

    async def live(request):
        return JSONResponse({"live": True})

    async def ready(request):
        return JSONResponse({"ready": svc.ready}, status_code=200 if svc.ready else 503)

    async def server_metadata(request):
        return JSONResponse({"name": "medpipe", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def metadata(request):
        return JSONResponse(model_metadata(predictor))

    async def model_ready(request):
        return JSONResponse({"name": predictor.name, "ready": svc.ready}, status_code=200 if svc.ready else 503)

    async def infer(request):
        req, kind, payload = await parse_off_loop(svc.decode_pool, await svc.read_body(request),
                                                  request.headers.get(HEADER_LENGTH), predictor.spec.image_size,
                                                  cfg.max_images, max_abs)
        outputs = requested_outputs(req)
        values = req.pop("metadata_values", None)
        if kind == "bytes":
            preds = await svc.predict([("bytes", b) for b in payload], metadata=values)
            for i, p in enumerate(preds):
                if "error" in p:  # the protocol's invalid-input status (KServe InvalidInput, Triton): 400, bar 413
                    status = p["status"] if p["status"] == 413 or p["status"] >= 500 else 400
                    raise HttpError(status, p["error"], f"input {BYTES_INPUT!r} element {i}: {p['message']}")
            probs = np.array([[p["probabilities"][c] for c in predictor.classes] for p in preds], np.float32)
        else:
            try:
                vectors = predictor.encode_metadata(values, len(payload), [f"element {i}" for i in range(len(payload))])
            except MedpipeError as exc:
                raise HttpError(400, exc.code, f"input {METADATA_INPUT!r} {exc}") from None
            async with svc.guarded(len(payload)):
                probs = await svc.batcher.run_exclusive(predictor.probabilities_preprocessed, payload, vectors)
        head, tail = encode_response(req, predictor, probs, outputs)
        if not tail:
            return Response(head, media_type="application/json")
        return Response(head + tail, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(head))})

    for path, fn, methods in _route_table(live, ready, server_metadata, metadata, model_ready, infer):
        app.add_api_route(path, guarded(fn), methods=methods)


def _route_table(live, ready, server_metadata, metadata, model_ready, infer):
    return (
        ("/v2/health/live", live, ["GET"]), ("/v2/health/ready", ready, ["GET"]), ("/v2", server_metadata, ["GET"]),
        ("/v2/models/{name}", metadata, ["GET"]), ("/v2/models/{name}/versions/{version}", metadata, ["GET"]),
        ("/v2/models/{name}/ready", model_ready, ["GET"]),
        ("/v2/models/{name}/versions/{version}/ready", model_ready, ["GET"]),
        ("/v2/models/{name}/infer", infer, ["POST"]), ("/v2/models/{name}/versions/{version}/infer", infer, ["POST"]),
    )


OIP_ROUTES = {(m, path) for path, _, methods in _route_table(*[None] * 6) for m in methods}
