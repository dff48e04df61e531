"""The HTTP service: SageMaker's hosting contract, dynamic batching, limits, metrics and a web page.

    medpipe serve --model RUN/model                 # 127.0.0.1:8080
    MEDPIPE_HOST=0.0.0.0 medpipe serve              # container form: model from /opt/ml/model

Routes (exactly these; anything else is a JSON 404/405):

    GET  /                       web page: pick or drop an image, see class, probabilities, Grad-CAM
    GET  /ping                   200, empty body, once the model is loaded and warmed up
    POST /invocations            image bytes, .npy, JSON of base64 images or DICOM -> JSON or CSV
    POST /explain                one image -> prediction + Grad-CAM heatmap (used by the page)
    GET  /execution-parameters   SageMaker batch transform settings
    GET  /metrics                Prometheus text
    /v2/...                      the Open Inference Protocol (KServe v2), see medpipe.serve.oip

Every error is JSON ``{"error": code, "message": ..., "request_id": ...}``; no stack trace, file
path or image bytes is ever sent or logged. The model is loaded (and verified) before the port is
bound, so a bad package stops the process with a clear line and a non-zero exit.
"""

# No `from __future__ import annotations`: FastAPI must see the real Request class in route signatures.
import asyncio
import concurrent.futures
import logging
import os
import time
import uuid
from dataclasses import dataclass, fields
from importlib import resources

import numpy as np

from medpipe.data import dicom, imageio
from medpipe.serve.batcher import Batcher
from medpipe.serve.oip import metric_route
from medpipe.infer.protocol import (
    CSV_T,
    DICOM,
    IMAGE_TYPES,
    SUPPORTED_TYPES,
    HttpError,
    decode_item,
    finish,
    media_type,
    merge,
    negotiate,
    parse_body,
    to_csv,
    unsupported,
)

log = logging.getLogger("medpipe.serve")

ROUTES = {("GET", "/"), ("GET", "/ping"), ("POST", "/invocations"), ("POST", "/explain"),
          ("GET", "/execution-parameters"), ("GET", "/metrics")}
CLOSE = {"Connection": "close"}  # the rest of an unread body must not be parsed as the next request
# Test hook (documented): make each forward pass sleep, to exercise deadlines and the queue.
FAULT_SLEEP_ENV = "MEDPIPE_FAULT_INFER_SLEEP"


@dataclass
class ServeConfig:
    """Every limit has a name, a default and a test (tests/test_serve.py)."""

    model: str = "/opt/ml/model"
    host: str = "127.0.0.1"
    port: int = 8080
    backend: str = "auto"          # auto | eager | onnx | int8 | cudagraph
    device: str = "auto"           # auto | cpu | cuda (auto: CUDA when available)
    threads: int = 0               # inference threads; 0 = all cores
    max_body_mb: float = 6.0       # SageMaker's real-time payload limit
    max_pixels: int = imageio.DEFAULT_MAX_PIXELS
    max_images: int = 16           # images in one request
    max_batch: int = 16            # images in one forward pass
    max_wait_ms: float = 5.0       # wait for more images, only while other requests are decoding
    max_queue: int = 64            # images admitted at once (decoding, queued or running); more -> 503
    deadline_s: float = 55.0       # per request, from admission to answer; -> 504
    body_timeout_s: float = 20.0   # whole body must arrive within this; -> 408 and the connection closes
    decode_workers: int = 2
    max_concurrent_transforms: int = 4  # advertised to SageMaker batch transform
    graceful_s: float = 25.0       # SIGTERM: finish in-flight requests for at most this long

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class Service:
    """State shared by the routes: the predictor, the batcher, limits and metrics."""

    def __init__(self, predictor, cfg: ServeConfig):
        from medpipe.serve.metrics import Metrics

        self.predictor = predictor
        self.cfg = cfg
        self.metrics = Metrics()
        self.admitted = 0
        self.ready = False
        self.batcher: Batcher | None = None
        self.decode_pool = concurrent.futures.ThreadPoolExecutor(max(1, cfg.decode_workers),
                                                                 thread_name_prefix="medpipe-decode")
        self.fault_sleep = float(os.environ.get(FAULT_SLEEP_ENV, "0") or 0)

    # -- lifecycle -------------------------------------------------------------------------------
    def infer(self, pixels: list[np.ndarray]) -> np.ndarray:
        if self.fault_sleep:
            time.sleep(self.fault_sleep)
        return self.predictor.probabilities(pixels)

    async def start(self) -> None:
        self.batcher = Batcher(self.infer, self.cfg.max_batch, self.cfg.max_wait_ms / 1000.0,
                               on_batch=self.metrics.batch_size.observe)
        self.batcher.start()
        # Warm-up: the first forward at each batch size the batcher will meet is slower.
        size = self.predictor.size
        blank = np.zeros((size[0], size[1], 3), np.uint8)
        from medpipe.infer.predictor import PredictionError

        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self.predictor.probabilities, [blank])
            await loop.run_in_executor(None, self.predictor.probabilities, [blank] * min(4, self.cfg.max_batch))
        except PredictionError as exc:  # answered per request as 500 prediction_failed
            log.warning("warm-up: %s on a blank image", exc)
        self.ready = True
        log.info("model %s v%s ready (%s backend, %d classes, %dx%d input)", self.predictor.name,
                 self.predictor.version, self.predictor.backend, len(self.predictor.classes), size[1], size[0])

    async def stop(self) -> None:
        self.ready = False
        if self.batcher is not None:
            await self.batcher.close()
        self.decode_pool.shutdown(wait=True)

    # -- request steps (each a small function, testable alone) ----------------------------------
    async def read_body(self, request) -> bytes:
        from starlette.requests import ClientDisconnect

        cap = int(self.cfg.max_body_mb * 1024 * 1024)
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise HttpError(400, "bad_content_length", "Content-Length is not a number") from None
            if n > cap:
                raise HttpError(413, "body_too_large", f"body of {n} bytes is over the {cap}-byte limit", CLOSE)
        buf = bytearray()
        try:
            async with asyncio.timeout(self.cfg.body_timeout_s):
                async for chunk in request.stream():
                    buf += chunk
                    if len(buf) > cap:
                        raise HttpError(413, "body_too_large", f"body is over the {cap}-byte limit", CLOSE)
        except TimeoutError:
            raise HttpError(408, "body_timeout", f"body not received within {self.cfg.body_timeout_s:g} s",
                            CLOSE) from None
        except ClientDisconnect:
            raise HttpError(400, "client_disconnected", "client closed the connection mid-body") from None
        return bytes(buf)

    def decode(self, kind: str, payload):
        return decode_item(self.predictor, kind, payload, self.cfg.max_pixels)

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

    async def predict(self, items: list[tuple[str, object]]) -> list[dict]:
        """Decode off the event loop, batch, and return one dict per item (prediction or error)."""
        from medpipe.infer.predictor import PredictionError

        loop = asyncio.get_running_loop()
        self.admit(len(items))
        try:
            async with asyncio.timeout(self.cfg.deadline_s):
                self.batcher.decoding += 1
                try:
                    decoded = await asyncio.gather(*(loop.run_in_executor(self.decode_pool, self.decode, k, p)
                                                     for k, p in items))
                finally:
                    self.batcher.decoding -= 1
                good = [d for d in decoded if isinstance(d, np.ndarray)]
                probs = await self.batcher.submit(good) if good else np.zeros((0, len(self.predictor.classes)))
        except TimeoutError:
            raise HttpError(504, "deadline_exceeded", f"no answer within {self.cfg.deadline_s:g} s") from None
        except PredictionError as exc:
            raise HttpError(500, "prediction_failed", str(exc)) from None
        finally:
            self.release(len(items))
        return merge(decoded, self.predictor.to_predictions(probs))


def error_response(status: int, code: str, message: str, rid: str, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": code, "message": message, "request_id": rid}, status_code=status,
                        headers=headers)


def create_app(predictor, cfg: ServeConfig):
    """The ASGI app for a loaded predictor (tests may drive it in-process)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

    svc = Service(predictor, cfg)

    @asynccontextmanager
    async def lifespan(_app):
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()

    app = FastAPI(title="medpipe", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service = svc

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

    @app.get("/ping")
    async def ping():
        return Response(status_code=200 if svc.ready else 503)

    @app.get("/execution-parameters")
    async def execution_parameters():
        return JSONResponse({"MaxConcurrentTransforms": cfg.max_concurrent_transforms,
                             "BatchStrategy": "SINGLE_RECORD",
                             "MaxPayloadInMB": max(1, int(cfg.max_body_mb))})

    @app.get("/metrics")
    async def metrics():
        body, ctype = svc.metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/")
    async def page():
        html = resources.files("medpipe.serve").joinpath("static/index.html").read_text()
        return HTMLResponse(html, headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                       "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'",
            "X-Content-Type-Options": "nosniff"})

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
        items = parse_body(ctype, await svc.read_body(request), cfg.max_images)
        preds = finish(await svc.predict(items))
        if accept == CSV_T:
            return PlainTextResponse(to_csv(predictor.classes, preds), media_type="text/csv")
        return JSONResponse({"model": predictor.name, "version": predictor.version, "predictions": preds})

    @app.post("/explain")
    async def explain(request: Request):
        ctype = media_type(request.headers.get("content-type"))
        if ctype not in IMAGE_TYPES:
            raise HttpError(415, "unsupported_media_type", "send one image (JPEG, PNG, BMP or WebP)")
        body = await svc.read_body(request)
        loop = asyncio.get_running_loop()
        svc.admit(1)
        try:
            pixels = await loop.run_in_executor(svc.decode_pool, svc.decode, "bytes", body)
            if isinstance(pixels, imageio.ImageError):
                raise HttpError(pixels.http_status, pixels.code, pixels.reason)
            try:
                async with asyncio.timeout(cfg.deadline_s):
                    pred, cam = await svc.batcher.run_exclusive(predictor.explain, pixels)
            except TimeoutError:
                raise HttpError(504, "deadline_exceeded", f"no answer within {cfg.deadline_s:g} s") from None
        finally:
            svc.release(1)
        from medpipe.serve.render import heatmap_png, png_data_url

        return JSONResponse({"model": predictor.name, "version": predictor.version, **pred.as_dict(),
                             "image": png_data_url(pixels), "heatmap": heatmap_png(cam)})

    from medpipe.serve.oip import add_routes

    add_routes(app, svc)  # the Open Inference Protocol (KServe v2) routes, under the same limits
    return RequestEnvelope(app, svc)


class RequestEnvelope:
    """Outermost ASGI layer: request id, metrics, and a last-resort JSON 500 without a traceback."""

    def __init__(self, app, svc: Service):
        self.app, self.svc = app, svc

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:16]
        scope["medpipe.rid"] = rid
        route = scope["path"] if (scope["method"], scope["path"]) in ROUTES else metric_route(scope["path"])
        started, status, t0 = False, 500, time.perf_counter()

        async def send_wrapped(msg):
            nonlocal started, status
            if msg["type"] == "http.response.start":
                started, status = True, msg["status"]
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapped)
        except Exception as exc:  # noqa: BLE001 - already answered by the handler; log one line, no traceback
            if not started:
                await error_response(500, "internal_error", "internal error", rid)(scope, receive, send_wrapped)
            log.error("request %s: %s", rid, exc.__class__.__name__)
        finally:
            self.svc.metrics.observe(route, status, time.perf_counter() - t0)


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

    return DrainingServer


def serve(cfg: ServeConfig) -> int:
    """Load and verify the model, then run uvicorn until SIGTERM/SIGINT. Returns the exit code."""
    import torch
    import uvicorn

    from medpipe.infer.predictor import Predictor

    threads = cfg.threads or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    predictor = Predictor(cfg.model, device=cfg.device, max_pixels=cfg.max_pixels, backend=cfg.backend,
                          threads=threads, max_batch=cfg.max_batch)
    if predictor.backend in ("onnx", "int8"):
        torch.set_num_threads(1)  # torch only runs the eval preset and Grad-CAM: leave the cores to ORT
    app = create_app(predictor, cfg)
    config = uvicorn.Config(app, host=cfg.host, port=int(cfg.port), log_level="info", access_log=False,
                            timeout_graceful_shutdown=cfg.graceful_s, timeout_keep_alive=5, lifespan="on",
                            server_header=False, h11_max_incomplete_event_size=64 * 1024)
    server = _draining_server_class()(config)
    log.info("serving on http://%s:%d", cfg.host, cfg.port)
    server.run()
    return 0 if server.started else 1
