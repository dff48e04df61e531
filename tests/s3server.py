"""A real S3 API server for tests: moto's standalone server (``moto[server]``) on a free loopback port.

    from tests.s3server import s3_server, s3_env   # pytest fixtures (import both names into the test module)

    def test_x(s3_env):                       # os.environ holds the server's AWS_* settings for this test
        bucket = s3_env.bucket()              # a new, empty bucket (unique name)
        s3_env.put(f"s3://{bucket}/a.txt", b"x"); s3_env.get(f"s3://{bucket}/a.txt")

``s3_server`` (session) yields an :class:`S3Server`: ``endpoint_url``; ``env`` (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, ...: give it to a subprocess); ``fs`` (an s3fs
filesystem on the server, independent of os.environ); put/get/ls/put_tree helpers (s3fs, no boto3); ``stop()``
and ``start()`` (connections refused in between, objects kept: the server's state lives in this process, so
a test can cut the network mid-job and bring it back); ``auth()`` (a context in which moto enforces IAM, for
access-denied cases). The tests skip with the reason when moto or s3fs is not installed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import urllib.request
import uuid
from pathlib import Path

import pytest

KEY, SECRET, REGION = "medpipe-test-key", "medpipe-test-secret", "eu-west-1"


class S3Server:
    """moto's server in a thread of this process (its werkzeug app, as ``moto_server`` runs it)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self._server = None
        self.port = 0
        self.start()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": REGION,
                    "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_EC2_METADATA_DISABLED": "true",
                    "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                    "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url}  # MLflow's artifact client reads its own variable
        import s3fs

        self.fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=self.endpoint_url,
                                    client_kwargs={"region_name": REGION}, skip_instance_cache=True,
                                    use_listings_cache=False)

    def start(self) -> None:
        """Listen (again) on the same port; objects put before a stop are still there."""
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        self._server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]

    def stop(self) -> None:
        """Stop listening: every request is refused (a network error) until :meth:`start`."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def bucket(self, prefix: str = "medpipe") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.fs.mkdir(name)
        return name

    def put(self, url: str, data: bytes) -> None:
        self.fs.pipe_file(url, data)

    def get(self, url: str) -> bytes:
        return self.fs.cat_file(url)

    def ls(self, url: str) -> list[str]:
        """Every object under the prefix, as s3:// URLs, sorted."""
        return sorted("s3://" + p for p in self.fs.find(url))

    def put_tree(self, folder: Path, url: str) -> list[str]:
        """Upload every file under ``folder`` to ``url/<relative path>``."""
        urls = []
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                urls.append(f"{url.rstrip('/')}/{p.relative_to(folder).as_posix()}")
                self.fs.pipe_file(urls[-1], p.read_bytes())
        return urls

    def fail_fast(self, monkeypatch) -> None:
        """One attempt per request for this test (botocore's AWS_MAX_ATTEMPTS and s3fs's own retries): a stopped
        server is an error in a fraction of a second instead of after ~5 s of backoff."""
        import s3fs

        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)

    def _moto_api(self, path: str, body: bytes) -> dict:
        req = urllib.request.Request(self.endpoint_url + path, data=body, method="POST",
                                     headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"{}")

    def user(self, name: str, policy: dict) -> dict:
        """An IAM user with ``policy`` (inline) and an access key: the AWS_* env of a client acting as it."""
        import boto3  # moto's own dependency; IAM has no s3fs client

        iam = boto3.client("iam", endpoint_url=self.endpoint_url, aws_access_key_id=KEY,
                           aws_secret_access_key=SECRET, region_name=REGION)
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {**self.env, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    @contextlib.contextmanager
    def auth(self):
        """moto checks every request against IAM inside the block (keys and policies of :meth:`user`)."""
        self._moto_api("/moto-api/reset-auth", b"0")
        try:
            yield
        finally:
            self._moto_api("/moto-api/reset-auth", b"inf")


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'moto[server]')")
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'medpipe-imaging[s3]')")
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    """The session's server, with its AWS_* settings in os.environ for this test (restarted if a test stopped it)."""
    if s3_server._server is None:
        s3_server.start()
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(k, raising=False)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    yield s3_server
    if s3_server._server is None:
        s3_server.start()
