"""The server's settings: ServeConfig, one field per ``medpipe serve --option``, each with its default and
its check (a bad value is a ConfigError naming the option). The limits are documented in medpipe.serve.app
and docs/security.md; medpipe.serve.profiles fills in the async profile's values under the ones given."""

from dataclasses import dataclass, fields

from medpipe.data import imageio
from medpipe.errors import ConfigError
from medpipe.infer.protocol import DEFAULT_MAX_IMAGES
from medpipe.serve.profiles import PROFILES


@dataclass
class ServeConfig:
    """Every limit has a name, a default and a test (tests/test_serve.py, tests/test_attack.py)."""

    model: str = "/opt/ml/model"
    host: str = "127.0.0.1"
    port: int = 8080
    backend: str = "auto"          # auto | eager | onnx | int8 | cudagraph
    decision_rule: str | None = None  # label rule (medpipe.decision); None: the package's default
    tta: bool = False              # average each image's logits over its four flips (4 forward passes)
    device: str = "auto"           # auto | cpu | cuda (auto: CUDA when available)
    threads: int = 0               # inference threads; 0 = all cores
    streams: int = 0               # openvino backend: parallel infer streams a batch is split across; 0 = automatic
    profile: str = "realtime"      # realtime | async: the limits of medpipe/serve/profiles.py under the options given
    max_body_mb: float = 6.0       # SageMaker's real-time payload limit
    spool_mb: float = 8.0          # a body larger than this goes to a temporary file, not memory
    max_pixels: int = imageio.DEFAULT_MAX_PIXELS
    max_images: int = DEFAULT_MAX_IMAGES  # images in one request
    max_batch: int = 16            # images in one forward pass
    max_wait_ms: float = 5.0       # wait for more images, only while other requests are decoding
    max_queue: int = 64            # images admitted at once (decoding, queued or running); more -> 503
    deadline_s: float = 55.0       # per request, from admission to answer; -> 504
    body_timeout_s: float = 20.0   # whole body must arrive within this; -> 408 and the connection closes
    min_upload_kbps: float = 16.0  # after upload_grace_s a body must have arrived at this average rate; -> 408
    upload_grace_s: float = 2.0    # the time a body has before min_upload_kbps applies
    max_uploads_per_client: int = 16  # bodies arriving at once from one client address; more -> 503 (0: no cap)
    upload_buffer_mb: float = 192.0  # bytes held by all bodies still arriving; over -> 503
    header_timeout_s: float = 10.0  # request line + headers must arrive within this; else closed (408 if partial)
    max_connections: int = 256     # open connections; at the cap a silent one of the biggest client goes, else 503
    max_connections_per_client: int = 64  # open connections of one client address (0: no cap)
    max_requests: int = 32         # requests with a complete body (decoding, queued, running); more -> 503
    memory_ceiling_mb: float = 0.0  # RSS (server + decode workers) above which bodies are refused (503);
    #                                 0 = the RSS once the model is loaded and warmed up + 1024 MB
    decode_workers: int = 2        # decode processes
    decode_timeout_s: float = 10.0  # per image; a decode running longer is killed -> 422, worker replaced
    decode_memory_mb: int = 1024   # address-space limit of each decode process; over -> 413
    max_jpeg_scans: int = imageio.DEFAULT_MAX_JPEG_SCANS  # more scans -> 422 before decoding (scan bombs)
    max_concurrent_transforms: int = 4  # advertised to SageMaker batch transform
    graceful_s: float = 25.0       # SIGTERM: finish in-flight requests for at most this long
    auth_token_file: str | None = None  # bearer token every route but the health checks needs (401)
    tls_cert: str | None = None    # PEM certificate (chain) for HTTPS, with tls_key
    tls_key: str | None = None     # PEM private key of tls_cert
    capture: str | None = None     # data capture folder (medpipe.monitor.capture); None: no capture
    capture_sample: float = 1.0    # share of /invocations requests captured
    capture_inputs: bool = False   # capture the request bodies (base64), not only their fingerprints
    capture_max_mb: float = 1024.0  # capture folder cap: the oldest files are removed above it
    monitor_baseline: str | None = None  # live drift gauges against this baseline (medpipe.monitor.live)
    monitor_window: int = 500      # images in the live monitor's rolling window

    def __post_init__(self):
        positive = ("max_body_mb", "spool_mb", "max_pixels", "max_images", "max_batch", "max_queue", "deadline_s",
                    "body_timeout_s", "header_timeout_s", "max_connections", "max_requests", "decode_workers",
                    "decode_timeout_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.decode_memory_mb and self.decode_memory_mb < 256:
            raise ConfigError(f"--decode-memory-mb must be 0 (no limit) or at least 256 (a decode process needs "
                              f"about 120 MB before it decodes anything), got {self.decode_memory_mb}")
        if self.max_jpeg_scans < 0 or self.memory_ceiling_mb < 0:
            raise ConfigError("--max-jpeg-scans and --memory-ceiling-mb must be >= 0 (0: no limit / automatic)")
        for name in ("streams", "min_upload_kbps", "upload_grace_s", "max_uploads_per_client",
                     "max_connections_per_client"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.upload_buffer_mb >= self.max_body_mb:
            raise ConfigError(f"--upload-buffer-mb ({self.upload_buffer_mb:g}) must hold at least one body of "
                              f"--max-body-mb ({self.max_body_mb:g})")
        if self.profile not in PROFILES:
            raise ConfigError(f"--profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together: give both or neither")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
