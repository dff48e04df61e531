"""The one HTTP client for a running medpipe (or SageMaker-compatible) server, on httpx.

    client = Client("http://127.0.0.1:8080")
    answer = client.invoke(path)          # {"prediction": {...}} or {"error", "message", "transient"}

Transient answers (429, 502, 503, 504, and connections refused, reset or timed out) are retried with
exponential backoff, honouring ``Retry-After``; after ``retries`` attempts the item's answer is an error
marked ``transient`` (``medpipe batch`` keeps such rows out of its finished shards, so a rerun asks
again, and exits non-zero while any remain). Every other error is the server's JSON error, kept as is.
Used by ``medpipe predict --url`` and ``medpipe batch --url``.
"""

from __future__ import annotations

import base64
import json
import random
import time
from pathlib import Path

from medpipe.data.sources import MEDIA_TYPES, regular_file_problem
from medpipe.errors import MedpipeError

TRANSIENT_STATUS = frozenset({429, 502, 503, 504})


class Client:
    def __init__(self, url: str, *, timeout: float = 120.0, retries: int = 6, backoff_s: float = 0.25,
                 max_backoff_s: float = 10.0, connections: int = 8):
        import httpx

        if not url.startswith(("http://", "https://")):
            raise MedpipeError(f"--url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.http = httpx.Client(base_url=self.url, timeout=timeout,
                                 limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))
        self._transport_errors = (httpx.TransportError,)

    def close(self) -> None:
        self.http.close()

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        try:
            delay = float(retry_after) if retry_after else None
        except ValueError:  # an HTTP date: fall back to backoff
            delay = None
        if delay is None:
            delay = self.backoff_s * 2 ** attempt * (0.5 + random.random())  # noqa: S311 - jitter, not security
        time.sleep(min(max(delay, 0.0), self.max_backoff_s))

    def _request(self, method: str, path: str, **kwargs):
        """The response, retried while transient; or (None, reason) when it stayed transient."""
        reason = "no answer"
        for attempt in range(self.retries + 1):
            try:
                r = self.http.request(method, path, **kwargs)
            except self._transport_errors as exc:
                reason = f"cannot reach {self.url} ({exc.__class__.__name__})"
                retry_after = None
            else:
                if r.status_code not in TRANSIENT_STATUS:
                    return r, None
                reason = f"HTTP {r.status_code} from {self.url}{path}"
                retry_after = r.headers.get("Retry-After")
            if attempt < self.retries:
                self._wait(attempt, retry_after)
        return None, f"{reason} after {self.retries + 1} attempts"

    def get_json(self, path: str) -> dict:
        r, reason = self._request("GET", path)
        if r is None:
            raise MedpipeError(reason)
        if r.status_code != 200:
            raise MedpipeError(f"{self.url}{path} answered HTTP {r.status_code}")
        try:
            return r.json()
        except ValueError:
            raise MedpipeError(f"{self.url}{path} did not answer JSON") from None

    def invoke(self, body: bytes, content_type: str) -> dict:
        """One image to ``/invocations``: ``{"prediction": ...}`` or ``{"error", "message", "transient"}``."""
        r, reason = self._request("POST", "/invocations", content=body,
                                  headers={"Content-Type": content_type, "Accept": "application/json"})
        if r is None:
            return {"error": "unavailable", "message": reason, "transient": True}
        try:
            payload = r.json()
        except ValueError:
            payload = {}
        if r.status_code == 200 and isinstance(payload, dict) and payload.get("predictions"):
            return {"prediction": payload["predictions"][0]}
        err = payload if isinstance(payload, dict) else {}
        return {"error": str(err.get("error", f"http_{r.status_code}")),
                "message": str(err.get("message", f"HTTP {r.status_code}")), "transient": False}


def media_type(path: str | Path) -> str:
    return MEDIA_TYPES.get(Path(path).suffix.lower(), "application/x-image")


def predict_url(url: str, images: list[str], metadata: dict[str, dict] | None = None) -> list[dict]:
    """``medpipe predict --url``: each image's prediction (or error) from the server. With ``metadata``
    (image -> {age, sex, site}) each image goes as JSON ``{"images": [b64], "metadata": [values]}``."""

    client = Client(url)
    out = []
    try:
        for path in images:
            problem = regular_file_problem(path)
            if problem is not None:
                out.append({"image": path, "error": "unreadable_file", "message": f"{path}: {problem}"})
                continue
            data = Path(path).read_bytes()
            if metadata:
                answer = client.invoke(json.dumps({"images": [base64.b64encode(data).decode()],
                                                   "metadata": [metadata.get(path)]}).encode(), "application/json")
            else:
                answer = client.invoke(data, media_type(path))
            if "prediction" in answer:
                out.append({"image": path, **answer["prediction"]})
            elif answer["transient"]:
                raise MedpipeError(answer["message"])
            else:
                out.append({"image": path, "error": answer["error"], "message": f"{path}: {answer['message']}"})
    finally:
        client.close()
    return out
