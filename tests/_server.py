"""Start the real `medpipe serve` process on loopback for tests, and talk to it over HTTP."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *args: str, env: dict | None = None, log: Path | None = None,
                 slow_infer_s: float = 0.0, headers: dict | None = None, tls=None, prefix: list[str] | None = None):
        """``slow_infer_s``: every forward pass sleeps that long first (tests/slow.py; deadlines, queues);
        ``headers``: sent with every request (e.g. the bearer token); ``tls``: an ``ssl.SSLContext`` to
        talk HTTPS with (the server started with --tls-cert/--tls-key); ``prefix``: a command the server runs
        under (it must exec its arguments, e.g. ``unshare``)."""
        self.port = free_port()
        self.headers, self.tls = dict(headers or {}), tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", *(["tests.slow", "infer", str(slow_infer_s)] if slow_infer_s else ["medpipe"]),
             "serve", "--model", str(model), "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],  # tests.slow
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})

    def wait_ready(self, timeout: float = 180) -> "Server":
        t = time.time()
        while time.time() - t < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            try:
                if self.request("GET", "/ping", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 60) -> tuple[int, dict, bytes]:
        if self.tls is not None:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=self.tls)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers={**self.headers, **(headers or {})})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def invoke(self, body: bytes, ctype: str = "image/jpeg", accept: str | None = "application/json",
               **kw) -> tuple[int, dict, bytes]:
        headers = {"Content-Type": ctype}
        if accept is not None:
            headers["Accept"] = accept
        headers.update(kw.pop("headers", {}))
        return self.request("POST", "/invocations", body, headers, **kw)

    def log_text(self) -> str:
        return Path(self.log_path).read_text(errors="replace") if self.log_path else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


def as_json(body: bytes) -> dict:
    return json.loads(body.decode())
