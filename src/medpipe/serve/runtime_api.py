"""The SageMaker Runtime API's route shape on ``medpipe serve``: ``POST /endpoints/{name}/invocations``.

A client written for the real service (boto3's ``sagemaker-runtime`` ``invoke_endpoint``, the AWS Lambda
example ``docs/examples/lambda_handler.py``) runs unchanged against a local server by pointing its
endpoint at it (``endpoint_url=`` or ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``). Any endpoint name that SageMaker
would accept reaches the one loaded model. The request is ``/invocations``' own (same body, ``Content-Type``,
``Accept``, limits, batching and capture) and a success is the same answer, plus the
``x-Amzn-Invoked-Production-Variant`` header the SDK reads.

Errors take the service's shape, so the SDK raises what it raises in production: a refusal by the
model server becomes ``ModelError`` (HTTP 424, ``x-amzn-ErrorType: ModelError``) carrying the server's
status as ``OriginalStatusCode`` and its JSON error body as ``OriginalMessage``, as SageMaker does for a
container's 4xx/5xx; a malformed endpoint name is ``ValidationError`` (400). Refusals made before any
route runs (the declared body size, memory pressure, a missing bearer token: SigV4 is not checked, so a
server started with ``--auth-token-file`` refuses these requests) keep medpipe's JSON error and status.

``InvokeEndpointAsync`` is not served: its answer is written to S3 by SageMaker's own front end, which
queues the request, reads the input from S3 and posts it to the container's ``/invocations``; that
part is ``medpipe serve --profile async`` (medpipe.serve.profiles).
"""

# No `from __future__ import annotations`: FastAPI must see the real Request class in the route signature.
import json
import logging
import re

from medpipe.errors import HttpError

log = logging.getLogger("medpipe.serve")

# SageMaker's EndpointName: ^[a-zA-Z0-9](-*[a-zA-Z0-9])*, at most 63 characters
ENDPOINT_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
VARIANT = "AllTraffic"  # the variant name the SDK gives a single-variant endpoint
RUNTIME_ROUTE = "/endpoints/{name}/invocations"
_RUNTIME_PATH = re.compile(r"/endpoints/[^/]+/invocations")


def runtime_metric_route(path: str) -> str | None:
    """The metrics label of a runtime-shaped path (endpoint names folded into the template), else None."""
    return RUNTIME_ROUTE if _RUNTIME_PATH.fullmatch(path) else None


def runtime_error(status: int, error_type: str, fields: dict, headers: dict | None = None):
    """An error in the SageMaker Runtime (rest-json) shape: the type in ``x-amzn-ErrorType``, members in the body."""
    from starlette.responses import JSONResponse

    return JSONResponse(fields, status_code=status,
                        headers={**(headers or {}), "x-amzn-ErrorType": error_type})


def model_error(exc: HttpError, rid: str):
    """A model server refusal as SageMaker reports a container's 4xx/5xx: ModelError, 424."""
    original = json.dumps({"error": exc.code, "message": str(exc), "request_id": rid})
    kind = "client" if exc.status < 500 else "server"
    fields = {"Message": f"Received {kind} error ({exc.status}) from primary with message \"{original}\".",
              "OriginalStatusCode": exc.status, "OriginalMessage": original}
    keep = {k: v for k, v in exc.headers.items() if k.lower() == "connection"}  # an unread body: close
    return runtime_error(424, "ModelError", fields, keep)


def add_runtime_routes(app, invocations) -> None:
    """Register ``POST /endpoints/{name}/invocations`` on the app, answering through ``invocations``
    (the ``/invocations`` route's handler)."""
    from fastapi import Request

    @app.post(RUNTIME_ROUTE)
    async def invoke_endpoint(request: Request, name: str):
        rid = request.scope.get("medpipe.rid", "-")
        if not ENDPOINT_NAME.fullmatch(name):
            return runtime_error(400, "ValidationError", {
                "Message": f"endpoint name {name[:80]!r} is not a SageMaker endpoint name (letters, digits and "
                           "single or repeated hyphens between them, at most 63 characters)"}, {"Connection": "close"})
        try:
            answer = await invocations(request)
        except HttpError as exc:
            return model_error(exc, rid)
        except Exception as exc:  # noqa: BLE001 - /invocations' own last resort, in the runtime's shape
            log.error("request %s failed: %s", rid, exc.__class__.__name__)
            return model_error(HttpError(500, "internal_error", "internal error"), rid)
        answer.headers["x-Amzn-Invoked-Production-Variant"] = VARIANT
        return answer
