"""AWS Lambda behind API Gateway -> a SageMaker endpoint serving medpipe (boto3 ``sagemaker-runtime``).

Environment: ``ENDPOINT_NAME`` (the SageMaker endpoint). The request is an API Gateway proxy event (REST
or HTTP API) whose body is either the image itself (a binary media type: ``isBase64Encoded`` true, its
``Content-Type`` header an image type) or JSON ``{"image": "<base64>"}`` (a data URL works too). The answer is
the endpoint's JSON (or CSV with ``Accept: text/csv``), untouched. Errors are JSON ``{"error", "message"}``
with the status the client can act on: 400/413/415 for its own mistakes (what the model server said, from
SageMaker's ``ModelError``), 503 with ``Retry-After`` when the endpoint is busy or not ready, 502/504 when the
endpoint failed or did not answer in time. No traceback, no AWS account detail is ever returned.
"""

import base64
import binascii
import json
import os

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

MAX_BYTES = 6 * 1024 * 1024  # SageMaker real-time payload limit (larger images: Asynchronous Inference)
MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"BM", "image/bmp"))
IMAGE_TYPES = {"image/jpeg", "image/png", "image/bmp", "image/webp"}
# API Gateway gives a Lambda integration 29 s: answer before it does, retry a throttled call once
CONFIG = Config(connect_timeout=2, read_timeout=25, retries={"mode": "standard", "max_attempts": 2})
_client = None


def runtime():
    """One client per Lambda container, created on first use (AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME moves it)."""
    global _client
    if _client is None:
        _client = boto3.client("sagemaker-runtime", config=CONFIG)
    return _client


class Refused(Exception):
    def __init__(self, status, code, message, headers=None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def reply(status, body, content_type="application/json", headers=None):
    return {"statusCode": status, "headers": {"Content-Type": content_type, **(headers or {})}, "body": body}


def header(event, name):
    for key, value in (event.get("headers") or {}).items():  # REST APIs keep the client's case, HTTP APIs lower it
        if key.lower() == name:
            return value
    return None


def b64(text, what):
    if isinstance(text, str) and text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]  # data:image/jpeg;base64,....
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise Refused(400, "bad_base64", f"{what} is not valid base64") from None


def image_from(event):
    """(image bytes, content type) from the event, or Refused naming the field."""
    body = event.get("body")
    if not body:
        raise Refused(400, "empty_body", "the request has no body: send an image or JSON {\"image\": base64}")
    declared = (header(event, "content-type") or "").split(";")[0].strip().lower()
    if event.get("isBase64Encoded"):
        data = b64(body, "the body")
    else:
        try:
            doc = json.loads(body)
        except ValueError:
            raise Refused(400, "bad_json", "the body is neither a base64 image nor JSON {\"image\": base64}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("image"), str):
            raise Refused(400, "missing_image", "JSON body without an \"image\" field holding base64")
        data, declared = b64(doc["image"], "the \"image\" field"), ""
    if not data:
        raise Refused(400, "empty_image", "the image is empty")
    if len(data) > MAX_BYTES:
        raise Refused(413, "image_too_large", f"the image is {len(data)} bytes; a real-time endpoint takes at most "
                      f"{MAX_BYTES} (send larger images through SageMaker Asynchronous Inference)")
    sniffed = next((t for sig, t in MAGIC if data.startswith(sig)), None)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        sniffed = "image/webp"
    ctype = declared if declared in IMAGE_TYPES else sniffed
    if ctype is None:
        raise Refused(415, "unsupported_media_type", "send a JPEG, PNG, BMP or WebP image")
    return data, ctype


def refusal_of(exc):
    """The client-facing status for an error of invoke_endpoint."""
    if isinstance(exc, ReadTimeoutError | ConnectTimeoutError):
        return Refused(504, "endpoint_timeout", "the model endpoint did not answer in time")
    if not isinstance(exc, ClientError):
        return Refused(502, "endpoint_unreachable", "the model endpoint could not be reached")
    code, err = exc.response["Error"].get("Code", ""), exc.response
    if code == "ModelError":  # the model server's own answer: its status and JSON error
        status = int(err.get("OriginalStatusCode") or 500)
        try:
            original = json.loads(err.get("OriginalMessage") or "{}")
        except ValueError:
            original = {}
        message = str(original.get("message") or "the model could not answer this request")
        if status in (503, 504):
            return Refused(status, str(original.get("error") or "endpoint_busy"), message,
                           {"Retry-After": "1"} if status == 503 else None)
        if 400 <= status < 500:
            return Refused(status, str(original.get("error") or "rejected"), message)
        return Refused(502, "model_failed", "the model failed on this request")
    if code in ("ModelNotReadyException", "ServiceUnavailable", "ThrottlingException"):
        return Refused(503, "endpoint_busy", "the model endpoint is busy or starting; retry shortly",
                       {"Retry-After": "1"})
    if err.get("ResponseMetadata", {}).get("HTTPStatusCode") == 413:  # refused before the model saw it
        return Refused(413, "image_too_large", "the image is larger than the endpoint accepts")
    # ValidationError (no such endpoint, ...) is this function's configuration: its message names the account
    return Refused(502, "endpoint_error", "the model endpoint refused the call (see the function's log)")


def handler(event, context):
    try:
        data, ctype = image_from(event)
        accept = header(event, "accept") or "application/json"
        endpoint = os.environ.get("ENDPOINT_NAME")
        if not endpoint:
            raise Refused(500, "misconfigured", "ENDPOINT_NAME is not set on this function")
        try:
            out = runtime().invoke_endpoint(EndpointName=endpoint, Body=data, ContentType=ctype, Accept=accept)
        except (ClientError, BotoCoreError) as exc:
            print(f"invoke_endpoint failed: {type(exc).__name__}: {exc}")  # CloudWatch; never sent back
            raise refusal_of(exc) from None
        return reply(200, out["Body"].read().decode("utf-8"), out.get("ContentType") or "application/json")
    except Refused as r:
        return reply(r.status, json.dumps({"error": r.code, "message": r.message}), headers=r.headers)
