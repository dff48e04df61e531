"""Client mode: send images to a running server's /invocations and return its JSON predictions."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from medpipe.errors import MedpipeError

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


def predict_url(url: str, images: list[str], timeout: float = 60.0) -> list[dict]:
    if not url.startswith(("http://", "https://")):
        raise MedpipeError(f"--url must start with http:// or https://, got {url!r}")
    out = []
    for path in images:
        p = Path(path)
        try:
            body = p.read_bytes()
        except OSError as exc:
            out.append({"image": path, "error": "unreadable_file", "message": f"{path}: {exc.strerror}"})
            continue
        req = urllib.request.Request(url.rstrip("/") + "/invocations", data=body, method="POST", headers={
            "Content-Type": CONTENT_TYPES.get(p.suffix.lower(), "application/x-image"), "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                payload = json.loads(resp.read())
            out.append({"image": path, **payload["predictions"][0]})
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read())
            except ValueError:
                err = {}
            out.append({"image": path, "error": err.get("error", f"http_{exc.code}"),
                        "message": f"{path}: {err.get('message', exc.reason)}"})
        except (urllib.error.URLError, OSError) as exc:
            raise MedpipeError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    return out
