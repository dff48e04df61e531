"""The HTTP service: SageMaker's hosting contract, dynamic batching, limits, metrics and a web page.

    medpipe serve --model RUN/model                 # 127.0.0.1:8080
    MEDPIPE_HOST=0.0.0.0 medpipe serve              # container form: model from /opt/ml/model

Routes (exactly these; anything else is a JSON 404/405):

    GET  /                       web page: pick or drop an image, see class, probabilities, Grad-CAM
    GET  /ping                   200, empty body, once the model is loaded and warmed up
    POST /invocations            image bytes, .npy, JSON of base64 images or DICOM -> JSON or CSV
    POST /explain                one image -> prediction + Grad-CAM heatmap (used by the page)
    POST /endpoints/{name}/invocations   /invocations in the SageMaker Runtime API's shape (runtime_api.py)
    GET  /execution-parameters   SageMaker batch transform settings
    GET  /metrics                Prometheus text
    /v2/...                      the Open Inference Protocol (KServe v2), see medpipe.serve.oip

Every error is JSON ``{"error": code, "message": ..., "request_id": ...}``; no stack trace, file
path or image bytes is ever sent or logged. The port is bound first (a busy port is a clear error at
once), then the model is loaded and verified before the port listens, so a bad package stops the
process with a clear line and a non-zero exit; "serving on" is logged only once the port listens
and the model is warmed up.

Size: over 600 lines because the routes, the request envelope that enforces the limits and the server's
start-up and drain share one ServeConfig (medpipe/serve/config.py) and one predictor life cycle; the pieces
that stand alone live beside it (connections, guard, batcher, oip, metrics, render).

Limits, outside in (each a ServeConfig field in medpipe/serve/config.py, so a ``medpipe serve --option``; docs/security.md):
  connections   header_timeout_s, max_connections, max_connections_per_client, eviction of silent
                connections (medpipe/serve/connections.py: a uvicorn protocol subclass); malformed
                HTTP -> 400 JSON; TLS (tls_cert, tls_key) through uvicorn
  request       Content-Length with Transfer-Encoding -> 400 and close; the bearer token
                (auth_token_file, 401); max_body_mb (413 before reading when declared) and the
                memory_ceiling_mb (503) before the body is read; --profile async (medpipe/serve/profiles.py)
                raises them for SageMaker Asynchronous Inference
  body          medpipe/serve/guard.py: max_uploads_per_client and upload_buffer_mb while it
                arrives (503), min_upload_kbps after upload_grace_s (408), body_timeout_s (408);
                a complete body takes one of max_requests processing slots (503); a body over
                spool_mb goes to a temporary file (medpipe/serve/spool.py), an image decoded from there
  decode        in worker processes (medpipe/data/decodepool.py): decode_timeout_s (422, worker
                replaced), decode_memory_mb (413), max_pixels (413), max_jpeg_scans (422)
  inference     max_queue images admitted (503), max_batch, deadline_s (504)
"""

# No `from __future__ import annotations`: FastAPI must see the real Request class in route signatures.
import asyncio
import json
import contextlib
import logging
import os
import socket
import time
import uuid
from importlib import resources

import numpy as np

from medpipe.data import dicom, imageio
from medpipe.errors import MedpipeError, MetadataError, PredictionError, http_status
from medpipe.monitor.capture import open_capture
from medpipe.monitor.embedding import open_embedder, split_rows
from medpipe.monitor.live import open_live
from medpipe.serve.batcher import Batcher
from medpipe.data.decodepool import DecodePool, DecodeSpec
from medpipe.serve.oip import add_routes, metric_route
from medpipe.serve.guard import BearerAuth, Upload, UploadGate, access_policy
from medpipe.serve.config import ServeConfig
from medpipe.serve.profiles import body_too_large
from medpipe.serve.runtime_api import RUNTIME_ROUTE, add_runtime_routes, runtime_metric_route
from medpipe.serve.spool import SpooledBody
from medpipe.infer.protocol import (
    CSV_T,
    DICOM,
    IMAGE_TYPES,
    SUPPORTED_TYPES,
    HttpError,
    finish,
    media_type,
    merge,
    negotiate,
    parse_body,
    to_csv,
    unsupported,
)
from medpipe.serve.acceptor import Acceptor, waiting_room_size
from medpipe.serve.connections import ConnectionLimits, protocol_class
from medpipe.serve.render import heatmap_png, png_data_url

log = logging.getLogger("medpipe.serve")

ROUTES = {("GET", "/"), ("GET", "/ping"), ("POST", "/invocations"), ("POST", "/explain"),
          ("GET", "/execution-parameters"), ("GET", "/metrics"), ("POST", RUNTIME_ROUTE)}
CLOSE = {"Connection": "close"}  # the rest of an unread body must not be parsed as the next request


class Service:
    """State shared by the routes: the predictor, the batcher, limits and metrics."""

    def __init__(self, predictor, cfg: ServeConfig, auth: BearerAuth | None = None, per_client_caps: bool = True):
        from medpipe.serve.metrics import Metrics  # deferred: prometheus_client (serve extra), not for --help

        self.predictor = predictor
        self.cfg = cfg
        self.metrics = Metrics()
        self.admitted = 0
        self.gate = UploadGate(cfg, self.metrics, per_client=per_client_caps)
        self.auth = auth
        self.ready = False
        self.batcher: Batcher | None = None
        self.decode_pool: DecodePool | None = None
        self.memory = MemoryWatch()
        self.draining = False
        self._body_timers: set = set()
        self.metrics.rss.set_function(self.memory.rss_mb)
        self.embedder = open_embedder(cfg, predictor)  # None without --capture or --monitor-baseline
        self.capture = open_capture(cfg, predictor, self.metrics.registry, self.embedder)  # None without --capture
        self.live = open_live(cfg, predictor, self.embedder and self.embedder.id, self.metrics.registry)

    # -- lifecycle -------------------------------------------------------------------------------
    def infer(self, pixels: list) -> np.ndarray:
        """Probabilities of a batch: pixel arrays, or (pixels, metadata vector) pairs for a metadata model."""
        if pixels and isinstance(pixels[0], tuple):
            images, vectors = [p for p, _ in pixels], np.stack([m for _, m in pixels])
            probs = self.predictor.probabilities(images, metadata=vectors)
            if self.embedder is None:
                return probs
            rows = self.embedder.rows(images)  # the embedding is the image's; the probabilities use the metadata
            rows[:, :probs.shape[1]] = probs
            return rows
        if self.embedder is not None:  # rows: probabilities, then the compressed embedding (medpipe.monitor)
            return self.embedder.rows(pixels)
        return self.predictor.probabilities(pixels)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        spec = DecodeSpec(self.predictor.size, self.predictor.spec.interpolation, self.cfg.max_pixels,
                          self.cfg.max_jpeg_scans)
        self.decode_pool = DecodePool(spec, self.cfg.decode_workers, self.cfg.decode_timeout_s,
                                      self.cfg.decode_memory_mb)
        await loop.run_in_executor(None, self.decode_pool.warm_up)
        self.batcher = Batcher(self.infer, self.cfg.max_batch, self.cfg.max_wait_ms / 1000.0,
                               on_batch=self.metrics.batch_size.observe)
        self.batcher.start()
        # Warm-up: the first forward at each batch size the batcher will meet is slower.
        size = self.predictor.size
        blank = np.zeros((size[0], size[1], 3), np.uint8)

        try:
            await loop.run_in_executor(None, self.predictor.probabilities, [blank])
            await loop.run_in_executor(None, self.predictor.probabilities, [blank] * min(4, self.cfg.max_batch))
        except PredictionError as exc:  # answered per request as 500 prediction_failed
            log.warning("warm-up: %s on a blank image", exc)
        self.memory.set_ceiling(self.cfg.memory_ceiling_mb)
        self.metrics.ceiling.set(self.memory.ceiling_mb)
        self.ready = True
        log.info("memory: %.0f MB after warm-up; bodies are refused above %.0f MB (memory_ceiling_mb)",
                 self.memory.rss_mb(), self.memory.ceiling_mb)
        log.info("model %s v%s ready (%s backend, %d classes, %dx%d input)", self.predictor.name,
                 self.predictor.version, self.predictor.backend, len(self.predictor.classes), size[1], size[0])

    async def stop(self) -> None:
        self.ready = False
        if self.batcher is not None:
            await self.batcher.close()
        if self.decode_pool is not None:
            self.decode_pool.close()
        if self.capture is not None:
            self.capture.close()
        if self.live is not None:
            self.live.close()

    # -- request steps (each a small function, testable alone) ----------------------------------
    async def read_body(self, request) -> bytes:
        """The body admitted by :meth:`admit_body`, as bytes (see :meth:`receive`)."""
        with await self.receive(request) as body:
            return body.read()

    async def receive(self, request) -> SpooledBody:
        """The body admitted by :meth:`admit_body`; over spool_mb it is in a temporary file, which the caller
        removes (``with`` or ``close()``); a refused body leaves none behind."""
        body = SpooledBody(int(self.cfg.spool_mb * 1024 * 1024))
        try:
            return await self._read_into(request, body)
        except BaseException:
            body.close()
            raise

    async def _read_into(self, request, buf: SpooledBody) -> SpooledBody:
        """Cut off when it arrives too slowly (408), then given a processing slot (503 when none is free)
        before it is returned."""
        from starlette.requests import ClientDisconnect

        loop = asyncio.get_running_loop()
        tracked = request.scope.get("medpipe.upload")  # None: the app driven without RequestEnvelope (tests)
        up = tracked or Upload("-", loop.time())
        cap = int(self.cfg.max_body_mb * 1024 * 1024)
        try:
            async with asyncio.timeout_at(loop.time() if self.draining else self.gate.deadline(up)) as timer:
                self._body_timers.add(timer)
                try:
                    async for chunk in request.stream():
                        buf.write(chunk)
                        if buf.size > cap:
                            raise HttpError(413, "body_too_large", body_too_large(
                                cap, self.cfg.max_body_mb, self.cfg.profile), CLOSE)
                        if tracked is not None:
                            self.gate.received(up, len(chunk))
                        if not self.draining:
                            timer.reschedule(self.gate.deadline(up))
                finally:
                    self._body_timers.discard(timer)
        except TimeoutError:
            if self.draining:
                raise HttpError(503, "shutting_down", "the server is shutting down; send the request again "
                                "(to another instance)", CLOSE) from None
            raise self.gate.timed_out(up, loop.time()) from None
        except ClientDisconnect:
            raise HttpError(400, "client_disconnected", "client closed the connection mid-body") from None
        if tracked is not None:
            self.gate.complete(up)
        return buf.finish()

    async def decode(self, kind: str, payload):
        """One item -> model-size RGB uint8 or the ImageError saying why not, in a decode process."""
        result = await self.decode_pool.decode(kind, payload)
        if isinstance(result, imageio.DecodeBudgetError):
            self.metrics.decode_abandoned.inc()
        return result

    def admit_body(self, headers: dict, peer: str) -> Upload:
        """Before a single body byte is read: the declared size (413) and the memory ceiling (503), then an
        upload place of the client's address (503 over max_uploads_per_client)."""
        cap = int(self.cfg.max_body_mb * 1024 * 1024)
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise HttpError(400, "bad_content_length", "Content-Length is not a number", CLOSE) from None
            if n > cap:
                raise HttpError(413, "body_too_large", body_too_large(cap, self.cfg.max_body_mb, self.cfg.profile, n),
                                CLOSE)
        if self.memory.over_ceiling():
            self.metrics.rejected.inc()
            raise HttpError(503, "memory_pressure", f"the server is above its memory ceiling of "
                            f"{self.memory.ceiling_mb:.0f} MB. Retry shortly.", {"Retry-After": "1", **CLOSE})
        if self.draining:
            raise HttpError(503, "shutting_down", "the server is shutting down", CLOSE)
        return self.gate.open(peer, asyncio.get_running_loop().time())

    def begin_drain(self) -> None:
        """SIGTERM: bodies still arriving are answered 503 now (not after body_timeout_s), so the drain
        waits only for work that is really in progress."""
        self.draining = True
        loop = asyncio.get_running_loop()
        for timer in list(self._body_timers):
            timer.reschedule(loop.time())

    def admit(self, n: int) -> None:
        if self.admitted + n > self.cfg.max_queue:
            self.metrics.rejected.inc()
            raise HttpError(503, "overloaded", f"{self.admitted} images are in progress; the queue holds "
                            f"{self.cfg.max_queue}. Retry shortly.", headers={"Retry-After": "1"})
        self.admitted += n
        self.metrics.queue.set(self.admitted)

    def release(self, n: int) -> None:
        self.admitted -= n
        self.metrics.queue.set(self.admitted)

    @contextlib.asynccontextmanager
    async def guarded(self, n: int):
        """What every inference route shares: admission of ``n`` images, the per-request deadline (504)
        and a failed prediction (500), and the release of the slots whatever happens."""

        self.admit(n)
        try:
            async with asyncio.timeout(self.cfg.deadline_s):
                yield
        except TimeoutError:
            raise HttpError(504, "deadline_exceeded", f"no answer within {self.cfg.deadline_s:g} s") from None
        except PredictionError as exc:
            raise HttpError(500, "prediction_failed", str(exc)) from None
        finally:
            self.release(n)

    async def predict(self, items: list[tuple[str, object]], embeddings: list | None = None,
                      metadata: list | None = None) -> list[dict]:
        """Decode off the event loop, batch, and return one dict per item (prediction or error); with capture on,
        ``embeddings`` (a list) receives each item's encoded embedding (None where there is none). ``metadata``:
        one dict (or None) per item; checked before any decoding (400 naming the image and the field)."""
        try:
            vectors = self.predictor.encode_metadata(metadata, len(items), [f"images[{i}]" for i in range(len(items))])
        except MetadataError as exc:
            raise HttpError(400, exc.code, str(exc)) from None
        async with self.guarded(len(items)):
            self.batcher.decoding_started()
            try:
                decoded = await asyncio.gather(*(self.decode(k, p) for k, p in items))
            finally:
                self.batcher.decoding_finished()
            good = [d if vectors is None else (d, vectors[i].numpy()) for i, d in enumerate(decoded)
                    if isinstance(d, np.ndarray)]
            probs = await self.batcher.submit(good) if good else np.zeros((0, len(self.predictor.classes)))
        if self.embedder is not None:
            probs, embedded = split_rows(probs, len(self.predictor.classes), decoded)
            if embeddings is not None:
                embeddings += embedded
            if self.live is not None:
                self.live.observe(probs, [e for d, e in zip(decoded, embedded) if isinstance(d, np.ndarray)])
        return merge(decoded, self.predictor.to_predictions(probs))


def error_response(status: int, code: str, message: str, rid: str, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": code, "message": message, "request_id": rid}, status_code=status,
                        headers=headers)


def create_app(predictor, cfg: ServeConfig, auth: BearerAuth | None = None, per_client_caps: bool = True):
    """The ASGI app for a loaded predictor (tests may drive it in-process); ``auth``: the bearer token
    check (None: open); ``per_client_caps``: False under SageMaker (every request comes from its front end)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    svc = Service(predictor, cfg, auth, per_client_caps)

    @asynccontextmanager
    async def lifespan(_app):
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()

    # redirect_slashes=False: Starlette would answer `/ping/` with a redirect built from the Host header.
    app = FastAPI(title="medpipe", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan,
                  redirect_slashes=False)
    app.state.service = svc
    _add_error_handlers(app)
    _add_info_routes(app, svc, cfg)
    add_runtime_routes(app, _add_prediction_routes(app, svc, cfg, predictor))

    add_routes(app, svc)  # the Open Inference Protocol (KServe v2) routes, under the same limits
    return RequestEnvelope(app, svc)


def _add_error_handlers(app) -> None:
    """Every error leaves as the JSON error body with the request id; never a traceback."""
    from fastapi import Request
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def rid_of(request: Request) -> str:
        return request.scope.get("medpipe.rid", "-")

    @app.exception_handler(HttpError)
    async def _http_error(request: Request, exc: HttpError):
        return error_response(exc.status, exc.code, exc.message, rid_of(request), exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        msg = {404: "no such route", 405: "method not allowed on this route"}.get(exc.status_code, "request refused")
        return error_response(exc.status_code, code, msg, rid_of(request))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.error("request %s failed: %s", rid_of(request), exc.__class__.__name__)
        return error_response(500, "internal_error", "internal error", rid_of(request))


def _add_info_routes(app, svc, cfg: ServeConfig) -> None:
    """/ping, /execution-parameters (the SageMaker contract), /metrics and the web page at /."""
    from starlette.responses import HTMLResponse, JSONResponse, Response

    @app.get("/ping")
    async def ping():
        return Response(status_code=200 if svc.ready else 503)

    @app.get("/execution-parameters")
    async def execution_parameters():
        return JSONResponse({"MaxConcurrentTransforms": cfg.max_concurrent_transforms,
                             "BatchStrategy": "SINGLE_RECORD",
                             "MaxPayloadInMB": max(1, min(100, int(cfg.max_body_mb)))})  # batch transform: <= 100

    @app.get("/metrics")
    async def metrics():
        body, ctype = svc.metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/")
    async def page():
        html = resources.files("medpipe.serve").joinpath("static/index.html").read_text()
        spec = getattr(svc.predictor, "metadata_spec", None)  # the page's age/sex/site fields, where the model has them
        html = html.replace("/*METADATA*/null", json.dumps(spec.to_dict() if spec else None).replace("<", "\\u003c"))
        return HTMLResponse(html, headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                       "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'",
            "X-Content-Type-Options": "nosniff"})


def _add_prediction_routes(app, svc, cfg: ServeConfig, predictor):
    """/invocations (SageMaker) and /explain (the web page's heat map); returns the /invocations handler."""
    from fastapi import Request
    from starlette.responses import JSONResponse, PlainTextResponse

    @app.post("/invocations")
    async def invocations(request: Request):
        accept = negotiate(request.headers.get("accept"))
        if accept is None:
            raise HttpError(406, "not_acceptable", "Accept must allow application/json or text/csv")
        ctype = media_type(request.headers.get("content-type"))
        if ctype == DICOM and not dicom.available():
            raise HttpError(415, "unsupported_media_type", "application/dicom needs the dicom extra")
        if ctype not in SUPPORTED_TYPES:
            raise unsupported(ctype)
        with await svc.receive(request) as body:
            # a spooled image is decoded from its file by the decode process, never read in here
            items = ([("file", body.path)] if body.spooled and ctype in IMAGE_TYPES
                     else parse_body(ctype, body.read(), cfg.max_images))
            embeddings: list = []
            preds = finish(await svc.predict(items, embeddings, getattr(items, "metadata", None)))
            if accept == CSV_T:
                answer = PlainTextResponse(to_csv(predictor.classes, preds), media_type="text/csv")
            else:
                answer = JSONResponse({"model": predictor.name, "version": predictor.version, "predictions": preds})
            if svc.capture is not None:  # sampled, queued for the capture thread; the eventId header goes back
                svc.capture.attach(answer, ctype, body, items, accept, embeddings)
        return answer

    @app.post("/explain")
    async def explain(request: Request):
        ctype = media_type(request.headers.get("content-type"))
        if ctype not in IMAGE_TYPES:
            raise HttpError(415, "unsupported_media_type", "send one image (JPEG, PNG, BMP or WebP)")
        body = await svc.read_body(request)
        svc.admit(1)
        try:
            pixels = await svc.decode("bytes", body)
            if isinstance(pixels, imageio.ImageError):
                raise HttpError(http_status(pixels), pixels.code, pixels.reason)
            values = {k: v for k, v in request.query_params.items()} or None  # the page's age, sex, site
            try:
                predictor.encode_metadata([values] if values else None, 1, ["query"])
            except MetadataError as exc:
                raise HttpError(400, exc.code, str(exc)) from None
            try:
                async with asyncio.timeout(cfg.deadline_s):
                    pred, cam = await svc.batcher.run_exclusive(predictor.explain, pixels, values)
            except TimeoutError:
                raise HttpError(504, "deadline_exceeded", f"no answer within {cfg.deadline_s:g} s") from None
        finally:
            svc.release(1)

        return JSONResponse({"model": predictor.name, "version": predictor.version, **pred.as_dict(),
                             "image": png_data_url(pixels), "heatmap": heatmap_png(cam)})

    return invocations


class RequestEnvelope:
    """Outermost ASGI layer: request id, metrics, request-level limits, and a last-resort JSON error.

    Before the app runs (so every route, including ones added later, gets it): Content-Length
    together with Transfer-Encoding is refused (400, connection closed: the two framings disagree,
    the classic request-smuggling shape); with a token, a request without it is 401 (the same JSON
    for a missing and a wrong one, before any body is read); a request that may carry a body gets an
    upload place or is refused (413/503) before any of it is read (:meth:`Service.admit_body`); its
    processing slot, taken once the body is complete, is held until it is answered.
    """

    BODY_METHODS = {"POST", "PUT", "PATCH"}

    def __init__(self, app, svc: Service):
        self.app, self.svc = app, svc

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:16]
        scope["medpipe.rid"] = rid
        route = (scope["path"] if (scope["method"], scope["path"]) in ROUTES
                 else runtime_metric_route(scope["path"]) or metric_route(scope["path"]))
        started, status, t0 = False, 500, time.perf_counter()

        async def send_wrapped(msg):
            nonlocal started, status
            if msg["type"] == "http.response.start":
                started, status = True, msg["status"]
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(msg)

        async def refuse(exc: HttpError):
            await error_response(exc.status, exc.code, exc.message, rid, exc.headers)(scope, receive, send_wrapped)

        upload = None
        try:
            headers = dict(scope["headers"])  # uvicorn lower-cases header names
            if b"transfer-encoding" in headers and b"content-length" in headers:
                return await refuse(HttpError(400, "ambiguous_framing", "Content-Length and Transfer-Encoding "
                                              "together are refused", CLOSE))
            if self.svc.auth is not None and not self.svc.auth.allows(scope):
                self.svc.metrics.unauthorized.inc()
                body_follows = scope["method"] in self.BODY_METHODS
                return await refuse(HttpError(401, "unauthorized", "authentication required",
                                              {"WWW-Authenticate": "Bearer", **(CLOSE if body_follows else {})}))
            if scope["method"] in self.BODY_METHODS:
                try:
                    upload = self.svc.admit_body(headers, (scope.get("client") or ("-",))[0])
                except HttpError as exc:
                    return await refuse(exc)
                scope["medpipe.upload"] = upload
            await self.app(scope, receive, send_wrapped)
        except asyncio.CancelledError:
            # Only at shutdown past graceful_s: answer in JSON and end quietly (uvicorn would log a
            # traceback and answer plain text).
            if not started:
                await error_response(503, "shutting_down", "the server is shutting down", rid, CLOSE)(
                    scope, receive, send_wrapped)
            log.warning("request %s cancelled at shutdown", rid)
        except Exception as exc:  # noqa: BLE001 - already answered by the handler; log one line, no traceback
            if not started:
                await error_response(500, "internal_error", "internal error", rid)(scope, receive, send_wrapped)
            log.error("request %s: %s", rid, exc.__class__.__name__)
        finally:
            if upload is not None:
                self.svc.gate.close(upload)
            self.svc.metrics.observe(route, status, time.perf_counter() - t0)


class MemoryWatch:
    """Resident memory of this process and its children (the decode workers), read from /proc at most
    every ``every_s``, against the ceiling."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self._t, self._mb = every_s, 0.0, 0.0
        self.ceiling_mb = float("inf")

    def rss_mb(self) -> float:
        from medpipe.serve.metrics import process_tree_rss_mb  # deferred: prometheus_client (serve extra)

        now = time.monotonic()
        if now - self._t >= self.every_s:
            self._mb, self._t = process_tree_rss_mb(), now
        return self._mb

    def set_ceiling(self, ceiling_mb: float) -> None:
        self._t = 0.0
        self.ceiling_mb = float(ceiling_mb) if ceiling_mb and ceiling_mb > 0 else self.rss_mb() + 1024.0

    def over_ceiling(self) -> bool:
        if self.rss_mb() <= self.ceiling_mb:
            return False
        _trim_heap()  # freed buffers may still be counted: give them back and look again
        self._t = 0.0
        return self.rss_mb() > self.ceiling_mb


def _trim_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _draining_server_class():
    import signal

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """SIGTERM (SageMaker scale-in) is a planned stop: drain, then exit 0 instead of re-raising it."""

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                log.info("SIGTERM: not accepting new connections; finishing in-flight requests")
                self._captured_signals.remove(sig)
            svc = getattr(self.config.app, "svc", None)
            if svc is not None and self.started:
                asyncio.get_event_loop().call_soon_threadsafe(svc.begin_drain)

        async def startup(self, sockets=None):
            # Connections are accepted on a thread with a waiting room (serve/acceptor.py), not by asyncio's
            # accept loop. A TLS connection reaches medpipe's protocol (header timeout, connection caps) only
            # once its handshake is done, and uvicorn passes no handshake timeout (60 s by default): bound it
            loop = asyncio.get_running_loop()

            async def create_server(protocol_factory, sock=None, ssl=None, backlog=100, **_):
                return Acceptor(sock, loop, protocol_factory, ssl=ssl, ssl_handshake_timeout=self.handshake_timeout_s,
                                wait_s=self.handshake_timeout_s, max_waiting=self.max_waiting,
                                on_close=self.on_close).start(backlog)

            loop.create_server = create_server
            try:
                await super().startup(sockets)
            finally:
                loop.__dict__.pop("create_server", None)
            if self.started:  # the socket is listening and the model is warmed up
                log.info("serving on %s", self.listen_url)

    return DrainingServer


def bind_socket(host: str, port: int, defer_accept_s: float = 0.0) -> socket.socket:
    """Bind the listening socket ourselves, so a busy port is a clear error before anything starts.

    ``defer_accept_s`` > 0 (Linux): the kernel hands a connection over only once its first bytes arrive
    (``TCP_DEFER_ACCEPT``, nginx's ``listen ... deferred``), waiting up to that long; connections that send
    nothing then never take a connection slot or displace anyone."""

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise MedpipeError(f"cannot serve on host {host!r}: {exc.strerror}") from None
    family, _, proto, _, addr = infos[0]
    # proto IPPROTO_TCP (what getaddrinfo gives), not 0: asyncio sets TCP_NODELAY only on accepted sockets whose
    # proto says TCP. Without it Nagle held each response's body until the client acknowledged its headers, and
    # the client's delayed ACK added ~40 ms to every request after the first on a keep-alive connection.
    sock = socket.socket(family, socket.SOCK_STREAM, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        import errno

        if exc.errno == errno.EADDRINUSE:
            raise MedpipeError(f"port {port} on {host} is already in use (another server?); stop it or choose "
                               "another with --port") from None
        raise MedpipeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    if defer_accept_s > 0 and hasattr(socket, "TCP_DEFER_ACCEPT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, max(1, int(defer_accept_s)))
    sock.set_inheritable(True)
    return sock


def serve(cfg: ServeConfig) -> int:
    """Load and verify the model, bind the port, then run uvicorn until SIGTERM/SIGINT. Returns the exit code."""
    import torch
    import uvicorn

    from medpipe.infer.predictor import Predictor  # deferred: torch, only when the server starts

    auth, per_client, tls = access_policy(cfg)
    # reserved first: a busy port fails before the model loads; silent connections wait in the kernel
    sock = bind_socket(cfg.host, int(cfg.port), defer_accept_s=cfg.header_timeout_s)
    threads = cfg.threads or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    predictor = Predictor(cfg.model, device=cfg.device, max_pixels=cfg.max_pixels, backend=cfg.backend,
                          threads=threads, max_batch=cfg.max_batch, decision_rule=cfg.decision_rule,
                          tta=cfg.tta, streams=cfg.streams)
    predictor.warm()  # every batch size the batcher will form, before the port answers (OpenVINO compiles per size)
    if not getattr(predictor.runtime, "runs_on_torch", True):
        torch.set_num_threads(1)  # torch only runs the eval preset and Grad-CAM: leave the cores to ORT
    app = create_app(predictor, cfg, auth, per_client)
    svc = app.svc
    limits = ConnectionLimits(cfg.header_timeout_s, cfg.max_connections,
                              cfg.max_connections_per_client if per_client else 0)
    http = protocol_class(limits, on_close=lambda reason: svc.metrics.connections_closed.labels(reason=reason).inc())
    # h11 with medpipe's protocol subclass (connections.py): header timeout, connection caps, JSON 400s.
    # limit_concurrency is not used: it answers plain-text 503 only after reading the headers.
    # backlog stays small: under a flood faster than the server accepts, a long accept queue holds an honest
    # connection behind thousands of the flood's (measured: 3-10 s with 2048), a short one drops its SYN
    # (retransmitted after 1 s).
    config = uvicorn.Config(app, host=cfg.host, port=int(cfg.port), log_level="info", access_log=False,
                            http=http, timeout_graceful_shutdown=cfg.graceful_s, timeout_keep_alive=5,
                            lifespan="on", server_header=False, h11_max_incomplete_event_size=64 * 1024,
                            backlog=max(128, cfg.max_connections), **tls)
    server = _draining_server_class()(config)
    server.listen_url = f"{'https' if tls else 'http'}://{cfg.host}:{cfg.port}"
    server.handshake_timeout_s = cfg.header_timeout_s
    server.max_waiting = waiting_room_size(cfg.max_connections)
    server.on_close = lambda reason: svc.metrics.connections_closed.labels(reason=reason).inc()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    code = 0 if server.started else 1
    # Everything is answered and the server writes no files: skip the interpreter's teardown, which
    # spends seconds garbage-collecting the model and would eat into SIGTERM's 30 s.
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
