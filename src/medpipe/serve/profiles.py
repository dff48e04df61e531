"""Serving profiles: the one place that says which limits ``medpipe serve --profile NAME`` sets.

``realtime`` (the default) is ServeConfig's own defaults: SageMaker real-time inference, 6 MB payloads
and a 60 s invocation timeout. ``async`` is for SageMaker Asynchronous Inference, whose requests come
from S3 through SageMaker's own client on the instance: payloads up to 1 GB, processing up to one hour,
and at most ``MaxConcurrentInvocationsPerInstance`` requests in flight per instance. Bodies above
``spool_mb`` go to a temporary file (medpipe.serve.spool), and an image body is decoded from there,
so a 1 GB body never sits in the server's memory.

Options given on the command line win over the profile's values. A container picks the profile with
the ``MEDPIPE_SERVE_PROFILE`` environment variable (SageMaker ``Model(env=...)``).
"""

from __future__ import annotations

from medpipe.errors import ConfigError

PROFILE_ENV = "MEDPIPE_SERVE_PROFILE"

# SageMaker Asynchronous Inference limits (AWS docs: "Asynchronous inference"): payload <= 1 GB,
# InvocationTimeoutSeconds <= 3600.
ASYNC_MAX_PAYLOAD_MB = 1024
ASYNC_MAX_PROCESSING_S = 3600
# Set AsyncInferenceClientConfig.MaxConcurrentInvocationsPerInstance to this: the server takes this many
# requests at once (max_requests); SageMaker never sends more, so none is refused with 503. Two decode
# processes decode while two more bodies wait on disk: each body may be up to 1 GB of temporary file.
ASYNC_MAX_CONCURRENT_INVOCATIONS = 4

PROFILES: dict[str, dict] = {
    "realtime": {},
    "async": {
        "max_body_mb": float(ASYNC_MAX_PAYLOAD_MB),
        "deadline_s": float(ASYNC_MAX_PROCESSING_S),
        # SageMaker's client streams the body from the instance's own copy of the S3 object: 1 GB in
        # 15 min is ~1.1 MB/s, far below a local copy's speed
        "body_timeout_s": 900.0,
        "upload_buffer_mb": float(ASYNC_MAX_CONCURRENT_INVOCATIONS * ASYNC_MAX_PAYLOAD_MB),
        "max_requests": ASYNC_MAX_CONCURRENT_INVOCATIONS,
        "max_uploads_per_client": ASYNC_MAX_CONCURRENT_INVOCATIONS,
        "decode_timeout_s": 60.0,  # one image up to max_pixels (decoded) may be a slow 40 MP PNG
    },
}


def apply_profile(values: dict) -> dict:
    """ServeConfig keyword values with the profile's limits filled in under the ones given."""
    name = values.get("profile") or "realtime"
    if name not in PROFILES:
        raise ConfigError(f"--profile must be one of {', '.join(PROFILES)}, got {name!r}")
    return {**PROFILES[name], **values, "profile": name}


def body_too_large(cap_bytes: int, max_body_mb: float, profile: str, size: int | None = None) -> str:
    """The 413 message: the limit, and which option or profile takes a larger body."""
    what = f"body of {size} bytes is" if size is not None else "body is"
    more = (f"send it to a server started with a larger --max-body-mb, or with --profile async "
            f"(up to {ASYNC_MAX_PAYLOAD_MB} MB, for SageMaker Asynchronous Inference)"
            if profile != "async" or max_body_mb < ASYNC_MAX_PAYLOAD_MB else
            "the async profile's limit is SageMaker Asynchronous Inference's own")
    return f"{what} over the {cap_bytes}-byte limit (--max-body-mb {max_body_mb:g}); {more}"
