"""A real PostgreSQL server for tests: Debian's binaries, a temporary data directory, loopback only.

    from tests.pgserver import pg_server        # session fixture (import it into the test module)

    def test_x(pg_server):
        url = pg_server.create_db("study")      # postgresql://postgres@127.0.0.1:PORT/study

The server runs as the ``postgres`` user when the tests run as root (CI: PostgreSQL refuses to run as root;
``subprocess`` drops to that user as ``runuser -u postgres`` would),
else as the current user. It listens on 127.0.0.1 on a free port and on a unix socket inside its data
directory, trusts local connections (no password: nothing but this machine can reach it) and is stopped and
deleted at the end of the session. Tests skip, with the reason, when the binaries (Debian's ``postgresql``,
.ci/apt.d/postgresql.txt) or the driver (psycopg 3) are missing.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests._server import free_port

BIN_GLOBS = ("/usr/lib/postgresql/*/bin",)
SETTINGS = {  # a throwaway test server: no durability, small memory, enough connections for a few processes
    "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "shared_buffers": "32MB",
    "max_connections": "200", "dynamic_shared_memory_type": "mmap",  # containers may have a tiny /dev/shm
}


def find_bin() -> Path | None:
    """The newest PostgreSQL bin folder holding initdb, pg_ctl and postgres, or None."""
    found = [Path(p) for p in glob.glob(BIN_GLOBS[0])]
    for b in (*(sorted(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)),
              *([Path(shutil.which("initdb")).parent] if shutil.which("initdb") else [])):
        if all((b / x).is_file() for x in ("initdb", "pg_ctl", "postgres")):
            return b
    return None


class PgServer:
    """One PostgreSQL server in a temporary data directory (:meth:`start`, :meth:`stop`)."""

    def __init__(self, bindir: Path):
        self.bindir, self.port, self.proc = bindir, free_port(), None
        self.root = Path(tempfile.mkdtemp(prefix="medpipe-pg-"))  # not under pytest's 0700 folder: postgres reads it
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.user = None
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and no `postgres` user to run the PostgreSQL server as")
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)

    def _as_owner(self) -> dict:
        """Popen arguments that run a command as the server's owner (``postgres`` when we are root)."""
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []} if self.user else {}

    def start(self, timeout: float = 60) -> "PgServer":
        r = subprocess.run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                            "-E", "UTF8", "--no-sync", "--no-instructions"],
                           capture_output=True, text=True, timeout=120, cwd=self.root, **self._as_owner())
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stderr[-2000:]}")
        opts = [f"-c{k}={v}" for k, v in {**SETTINGS, "listen_addresses": "127.0.0.1", "port": str(self.port),
                                            "unix_socket_directories": str(self.root)}.items()]
        log = open(self.log, "ab")
        self.proc = subprocess.Popen([str(self.bindir / "postgres"), "-D", str(self.data), *opts], cwd=self.root,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self._as_owner())
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                self.connect("postgres").close()
                return self
            except Exception:  # noqa: BLE001 - not accepting connections yet
                time.sleep(0.2)
        raise RuntimeError(f"postgres did not accept connections in {timeout:.0f} s: {self.log.read_text()[-2000:]}")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def connect(self, db: str = "postgres"):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=db, connect_timeout=5,
                               autocommit=True)

    def create_db(self, name: str) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown: ends the sessions still open (SIGTERM waits)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server():
    """A running PostgreSQL server for the session (skips with the reason when it cannot run here)."""
    pytest.importorskip("psycopg", reason="psycopg (the PostgreSQL driver: the tune extra) is not installed")
    bindir = find_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: apt-get install postgresql "
                    "(.ci/apt.d/postgresql.txt)")
    server = PgServer(bindir)
    try:
        yield server.start()
    finally:
        server.stop()
