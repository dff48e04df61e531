"""A real ``mlflow server`` process on loopback for tests, on any backend store and artifact destination.

    server = MlflowServer("sqlite:///tmp/mlflow.db", "/tmp/artifacts").start()      # embedded store, local files
    server = MlflowServer(pg_server.create_db("mlflow"), "s3://bucket/mlartifacts", env=s3_server.env).start()
    ...
    server.kill()

The server proxies artifacts (``--artifacts-destination``): clients talk HTTP to it only, the server alone
needs the object store's credentials (``env``: the standard AWS_* variables; MLFLOW_S3_ENDPOINT_URL is set
from AWS_ENDPOINT_URL). It runs in its own process group, which :meth:`kill` ends (the server and its workers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests._server import free_port


class MlflowServer:
    def __init__(self, backend: str | Path, artifacts: str | Path, env: dict | None = None, log: Path | None = None):
        """``backend``: a store URI (a bare path is a SQLite file); ``artifacts``: a folder or an s3:// URL."""
        self.backend = backend if "://" in str(backend) else f"sqlite:///{backend}"
        self.port, self.artifacts, self.proc, self.log = free_port(), str(artifacts), None, log
        self.env = dict(env or {})
        if "AWS_ENDPOINT_URL" in self.env:
            self.env.setdefault("MLFLOW_S3_ENDPOINT_URL", self.env["AWS_ENDPOINT_URL"])

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> "MlflowServer":
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
               "--artifacts-destination", self.artifacts, "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1"]
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        env = {**os.environ, **self.env,  # (MLflow may start the venv's tools by name: its bin folder on PATH)
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        if self.log:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}"
                                   + (f": {self.log.read_text()[-3000:]}" if self.log else ""))
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start" + (f": {self.log.read_text()[-3000:]}" if self.log else ""))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers (our own process group)
            self.proc.wait(timeout=30)
