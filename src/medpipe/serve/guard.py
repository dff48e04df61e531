"""Who may call the service, and how request bodies are admitted while they arrive.

**Uploads** (:class:`UploadGate`). A request body is admitted in two steps, so that a client which
sends slowly cannot hold what others need:

- while it arrives it holds only an *upload place* of its client address (at most
  ``max_uploads_per_client`` at once, 0: no cap) and the bytes it has actually sent, counted against
  ``upload_buffer_mb`` for all bodies still arriving together (over it: 503 and the connection closed);
- after ``upload_grace_s`` it must have arrived at ``min_upload_kbps`` on average since its headers,
  or it is cut off (408 ``upload_too_slow``); the whole body is still bounded by ``body_timeout_s``;
- only a *complete* body takes one of the ``max_requests`` processing slots (decoding, queued,
  running; full: 503 with Retry-After), held until the answer is sent.

**Authentication** (:class:`BearerAuth`). With a token (``--auth-token-file``) every route needs
``Authorization: Bearer <token>`` except the health checks in :data:`OPEN_PATHS`; anything else is
401 with a fixed JSON body, the same for a missing and a wrong token, before any body is read. The
comparison is constant-time (:func:`hmac.compare_digest`); the token is never logged.

**SageMaker hosting** (:func:`sagemaker_hosting`): the endpoint is guarded by IAM and SageMaker's
front end (which forwards no Authorization header and is every request's peer), so there the token
and the per-client caps are not applied, and the start-up log says so. Recognised by the model folder
alone (``/opt/ml/model``, which any container may use), a token given is still applied.
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import logging
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from medpipe.errors import ConfigError
from medpipe.infer.protocol import HttpError
from medpipe.sagemaker.env import model_server_dir

log = logging.getLogger("medpipe.serve")

CLOSE = {"Connection": "close"}  # the rest of an unread body must not be parsed as the next request
RETRY = {"Retry-After": "1", **CLOSE}
OPEN_PATHS = frozenset({"/ping", "/v2/health/live", "/v2/health/ready"})  # load balancers and orchestrators
MIN_TOKEN_CHARS = 16
SAGEMAKER_VARS = ("SAGEMAKER_BIND_TO_PORT", "SAGEMAKER_SAFE_PORT_RANGE", "SM_MODEL_DIR")


# -- uploads ---------------------------------------------------------------------------------------

@dataclass(eq=False)
class Upload:
    """One request body: its client address, when its headers were complete, bytes so far, and state
    (``uploading``, then ``processing`` once complete, ``closed`` once answered)."""

    peer: str
    started: float
    received: int = 0
    state: str = "uploading"


class UploadGate:
    """Upload places per client address, the byte budget of bodies still arriving, and the processing
    slots of complete bodies (see the module docstring)."""

    def __init__(self, cfg, metrics=None, per_client: bool = True):
        self.cfg, self.metrics = cfg, metrics
        self.per_client = cfg.max_uploads_per_client if per_client else 0
        self.budget = int(cfg.upload_buffer_mb * 2**20)
        self.min_rate = cfg.min_upload_kbps * 1024.0
        self.uploads: collections.Counter = collections.Counter()
        self.buffered = 0
        self.processing = 0

    def _refused(self, reason: str, status: int, code: str, message: str, headers: dict) -> HttpError:
        if self.metrics is not None:
            self.metrics.uploads_refused.labels(reason=reason).inc()
            if status == 503:
                self.metrics.rejected.inc()
        return HttpError(status, code, message, headers)

    def open(self, peer: str, now: float) -> Upload:
        """A body may start to arrive (after the size and memory checks); 503 over the per-client cap."""
        if self.per_client and self.uploads[peer] >= self.per_client:
            raise self._refused("per_client", 503, "too_many_uploads", f"this client already has "
                                f"{self.uploads[peer]} bodies arriving (max_uploads_per_client "
                                f"{self.per_client}). Retry shortly.", RETRY)
        self.uploads[peer] += 1
        self._gauges()
        return Upload(peer, now)

    def received(self, up: Upload, n: int) -> None:
        """Count ``n`` more bytes of ``up``; 503 and close when bodies still arriving hold over the budget."""
        up.received += n
        self.buffered += n
        if self.buffered > self.budget:
            raise self._refused("buffer_full", 503, "overloaded", f"bodies still arriving hold over "
                                f"{self.cfg.upload_buffer_mb:g} MB (upload_buffer_mb). Retry shortly.", RETRY)

    def deadline(self, up: Upload) -> float:
        """The loop time at which ``up`` is cut off unless more arrives: its average rate since its headers
        falls below ``min_upload_kbps`` (after the grace period), or ``body_timeout_s`` is over."""
        need = up.received / self.min_rate if self.min_rate > 0 else float("inf")
        return up.started + min(self.cfg.body_timeout_s, max(self.cfg.upload_grace_s, need))

    def timed_out(self, up: Upload, now: float) -> HttpError:
        """The 408 for an upload whose :meth:`deadline` passed: too slow, or over the body timeout."""
        if now < up.started + self.cfg.body_timeout_s - 1e-3:
            return self._refused("too_slow", 408, "upload_too_slow", f"body arriving slower than "
                                 f"{self.cfg.min_upload_kbps:g} KB/s (min_upload_kbps)", CLOSE)
        return self._refused("body_timeout", 408, "body_timeout",
                             f"body not received within {self.cfg.body_timeout_s:g} s", CLOSE)

    def complete(self, up: Upload) -> None:
        """The body is in: give back the upload place and bytes, take a processing slot (503 when full)."""
        self._end_upload(up)
        if self.processing >= self.cfg.max_requests:
            up.state = "closed"
            raise self._refused("overloaded", 503, "overloaded", f"{self.processing} requests are in progress "
                                f"(max_requests {self.cfg.max_requests}). Retry shortly.", RETRY)
        up.state = "processing"
        self.processing += 1
        self._gauges()

    def close(self, up: Upload) -> None:
        """The request is answered: release whatever ``up`` still holds."""
        if up.state == "uploading":
            self._end_upload(up)
        elif up.state == "processing":
            self.processing -= 1
        up.state = "closed"
        self._gauges()

    def _end_upload(self, up: Upload) -> None:
        self.buffered -= up.received
        self.uploads[up.peer] -= 1
        if self.uploads[up.peer] <= 0:
            del self.uploads[up.peer]
        up.state = "between"

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.uploads.set(sum(self.uploads.values()))
            self.metrics.upload_bytes.set(self.buffered)
            self.metrics.processing.set(self.processing)


# -- authentication --------------------------------------------------------------------------------

class BearerAuth:
    """``Authorization: Bearer <token>`` on every path but :data:`OPEN_PATHS`; constant-time comparison."""

    def __init__(self, token: str):
        self._token = token.encode()

    def __repr__(self) -> str:  # never the token
        return "BearerAuth(<token>)"

    def allows(self, scope) -> bool:
        if scope["path"] in OPEN_PATHS:
            return True
        value = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, given = value.partition(b" ")
        # compare_digest runs in time independent of where the two differ (it depends on the length only)
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._token)


def read_token(path: str) -> str:
    """The token in ``path`` (surrounding whitespace removed); a clear error when unusable, never the token."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--auth-token-file {path}: cannot read it ({exc.__class__.__name__})") from None
    token = text.strip()
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(f"--auth-token-file {path}: the token must be one line of at least {MIN_TOKEN_CHARS} "
                          "printable characters without spaces (e.g. `python -c 'import secrets; "
                          "print(secrets.token_urlsafe(32))'`)")
    if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("--auth-token-file %s can be read by other users (chmod 600 it)", path)
    return token


def access_policy(cfg) -> tuple[BearerAuth | None, bool, dict]:
    """Who may call a server with ServeConfig ``cfg``: the bearer token (or None), whether per-client caps apply, uvicorn's TLS options.
    Checked before the port is bound, so a bad token file or certificate is a clear error at once; logs
    what is exposed (never the token)."""
    tls = {}
    if cfg.tls_cert:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cfg.tls_cert, cfg.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--tls-cert {cfg.tls_cert} / --tls-key {cfg.tls_key}: cannot load them as a PEM "
                              f"certificate and its private key ({exc.__class__.__name__}: "
                              f"{getattr(exc, 'strerror', None) or getattr(exc, 'reason', None) or exc})") from None
        tls = {"ssl_certfile": cfg.tls_cert, "ssl_keyfile": cfg.tls_key}
    # A token given is applied unless a SageMaker variable says this is SageMaker: the model folder alone
    # (/opt/ml/model, also any container of one's own) must not turn authentication off (fail closed).
    by_variable = any(os.environ.get(name) for name in SAGEMAKER_VARS)
    if by_variable or (not cfg.auth_token_file and sagemaker_hosting(cfg.model)):
        if cfg.auth_token_file:
            log.warning("SageMaker hosting: --auth-token-file is not applied (IAM guards the endpoint and its "
                        "front end forwards no Authorization header)")
        log.info("SageMaker hosting: routes open to SageMaker's front end (IAM guards the endpoint); "
                 "per-client caps off (every request comes from the front end)")
        return None, False, tls
    auth = BearerAuth(read_token(cfg.auth_token_file)) if cfg.auth_token_file else None
    if auth is not None:
        log.info("bearer token required on every route except %s", ", ".join(sorted(OPEN_PATHS)))
    elif not is_loopback(cfg.host):
        log.warning(exposure_warning(cfg.host, cfg.port, bool(tls)))
    return auth, True, tls


def sagemaker_hosting(model: str, environ=None) -> bool:
    """Is this SageMaker's hosting container? One of the variables SageMaker sets for serving, or the
    model loaded from where SageMaker extracts model.tar.gz (``medpipe serve`` without ``--model``)."""
    env = os.environ if environ is None else environ
    if any(env.get(name) for name in SAGEMAKER_VARS):
        return True
    home = model_server_dir(env)
    return home.is_dir() and Path(model).resolve() == home.resolve()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, port: int, tls: bool) -> str:
    """What a server bound beyond loopback without a token lets anyone who reaches it do."""
    return (f"serving on {host}:{port} without --auth-token-file: anyone who can reach this address can run "
            "predictions (/invocations, /v2/models/*/infer), get Grad-CAM heat maps of their images (/explain), "
            "read /metrics (request counts, memory) and the model's name, version and classes (/v2/models/*)"
            + ("" if tls else "; traffic is plain HTTP (--tls-cert/--tls-key for TLS)"))
