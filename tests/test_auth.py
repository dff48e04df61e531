"""Who may call `medpipe serve`: the bearer token on every route but the health checks, TLS verified
against a test CA, and what a server bound beyond loopback says (RELIABILITY.md "Added after the second
review / Service: who may call it"). One real server process with both a token and TLS."""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import socket
import ssl
from pathlib import Path

import pytest

from tests._server import Server, as_json
from tests.conftest import untrained_package

pytest.importorskip("fastapi")
pytest.importorskip("pebble")
x509 = pytest.importorskip("cryptography.x509")
pytestmark = pytest.mark.slow

TOKEN = "t0k3n-" + "A" * 20 + "-medpipe"


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca_and_server_cert(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate it signed for 127.0.0.1 / localhost: (ca.pem, cert.pem, key.pem)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, srv_key = _key(), _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medpipe test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
           .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                          critical=False)
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
           .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem_key(srv_key))
    os.chmod(paths[2], 0o600)
    return paths


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return untrained_package(tmp_path_factory.mktemp("auth") / "pkg", name="authpkg", image_size=32)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_ca_and_server_cert(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(package, pki, tmp_path_factory):
    ca, cert, key = pki
    folder = tmp_path_factory.mktemp("auth-server")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    client_tls = ssl.create_default_context(cafile=str(ca))  # verifies the chain and the host name
    s = Server(package, "--backend", "eager", "--threads", "1", "--decode-workers", "1",
               "--auth-token-file", str(token_file), "--tls-cert", str(cert), "--tls-key", str(key),
               log=folder / "server.log", tls=client_tls, headers={"Authorization": f"Bearer {TOKEN}"}).wait_ready()
    yield s
    s.stop()
    text = s.log_text()
    assert "Traceback" not in text, text[-3000:]
    assert TOKEN not in text  # the token is never logged


def png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(40 * 40 * 3) % 251).astype(np.uint8).reshape(40, 40, 3)).save(buf, "PNG")
    return buf.getvalue()


def guarded_requests() -> list[tuple[str, str, bytes | None, dict]]:
    """One request per route that needs the token, each valid (so 200 once authorised)."""
    infer = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                    "data": [base64.b64encode(png()).decode()]}]}).encode()
    return [("GET", "/", None, {}), ("GET", "/metrics", None, {}), ("GET", "/execution-parameters", None, {}),
            ("POST", "/invocations", png(), {"Content-Type": "image/png"}),
            ("POST", "/explain", png(), {"Content-Type": "image/png"}),
            ("GET", "/v2", None, {}), ("GET", "/v2/models/authpkg", None, {}),
            ("GET", "/v2/models/authpkg/ready", None, {}),
            ("POST", "/v2/models/authpkg/infer", infer, {"Content-Type": "application/json"})]


def test_token_is_required_on_every_route_but_the_health_checks(server):
    wrong = [{"Authorization": ""}, {"Authorization": f"Bearer {TOKEN[:-1]}"},
             {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Basic {TOKEN}"},
             {"Authorization": f"Bearer {TOKEN.lower()}"}, {"Authorization": TOKEN}]
    for method, path, body, headers in guarded_requests():
        for bad in wrong:
            st, h, b = server.request(method, path, body, {**headers, **bad})
            err = as_json(b)
            # the same answer for a missing and a wrong token: no detail, no echo of what was sent
            assert st == 401 and h["www-authenticate"] == "Bearer", (path, bad, st, b)
            assert {k: v for k, v in err.items() if k != "request_id"} == {
                "error": "unauthorized", "message": "authentication required"}, err
            assert TOKEN[:8].encode() not in b
        st, h, b = server.request(method, path, body, headers)
        assert st == 200, (path, st, b[:300])
    # an unknown route is 401 too (the route set is not revealed), and 404 with the token
    assert server.request("GET", "/nope", headers={"Authorization": ""})[0] == 401
    assert server.request("GET", "/nope")[0] == 404
    for path in ("/ping", "/v2/health/live", "/v2/health/ready"):
        assert server.request("GET", path, headers={"Authorization": ""})[0] == 200, path


def test_refused_body_is_not_read(server):
    """A POST without the token is answered 401 before its body arrives, and the connection is closed."""
    ctx = server.tls
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      b"Content-Length: 1000000\r\n\r\n")
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 401") and b"connection: close" in reply.lower(), reply[:300]


def test_tls_is_verified_against_the_ca_and_plain_http_gets_nothing(server, pki, tmp_path):
    ca, cert, _ = pki
    assert server.url.startswith("https://")
    assert server.request("GET", "/ping")[0] == 200  # the client context verifies chain and host name
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        with server.tls.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            assert s.version() in ("TLSv1.2", "TLSv1.3")
            assert s.getpeercert()["subject"] == ((("commonName", "localhost"),),)
    # a client that trusts another CA refuses the server
    other_ca, _, _ = make_ca_and_server_cert(tmp_path)
    strict = ssl.create_default_context(cafile=str(other_ca))
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            strict.wrap_socket(raw, server_hostname="127.0.0.1")
    # plain HTTP on the TLS port gets no HTTP answer
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(10)
        try:
            reply = s.recv(100)
        except (ConnectionResetError, socket.timeout):
            reply = b""
    assert not reply.startswith(b"HTTP/1.1 200")


# -- start-up policy (no server process needed) ------------------------------------------------------

def _cfg(tmp_path, **kw):
    from medpipe.serve.config import ServeConfig

    return ServeConfig(model=str(tmp_path / "pkg"), **kw)


def test_exposed_without_token_warns_what_is_exposed(tmp_path, caplog, monkeypatch):
    from medpipe.serve.guard import access_policy

    for name in ("SAGEMAKER_BIND_TO_PORT", "SAGEMAKER_SAFE_PORT_RANGE", "SM_MODEL_DIR"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.INFO, logger="medpipe.serve"):
        assert access_policy(_cfg(tmp_path, host="0.0.0.0")) == (None, True, {})
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for exposed in ("0.0.0.0:8080", "without --auth-token-file", "/invocations", "/explain", "/metrics",
                    "plain HTTP"):
        assert exposed in warning, warning
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medpipe.serve"):
        access_policy(_cfg(tmp_path, host="127.0.0.1"))  # loopback: nothing to warn about
        token = tmp_path / "token"
        token.write_text(TOKEN)
        os.chmod(token, 0o600)
        auth, per_client, _ = access_policy(_cfg(tmp_path, host="0.0.0.0", auth_token_file=str(token)))
    assert auth is not None and per_client and TOKEN not in repr(auth)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert TOKEN not in caplog.text


def test_under_sagemaker_routes_stay_open(tmp_path, caplog, monkeypatch):
    from medpipe.serve.guard import access_policy, sagemaker_hosting

    token = tmp_path / "token"
    token.write_text(TOKEN)
    os.chmod(token, 0o600)
    monkeypatch.setenv("SAGEMAKER_BIND_TO_PORT", "8080")
    with caplog.at_level(logging.INFO, logger="medpipe.serve"):
        auth, per_client, _ = access_policy(_cfg(tmp_path, host="0.0.0.0", auth_token_file=str(token)))
    assert auth is None and per_client is False
    assert "IAM guards the endpoint" in caplog.text and TOKEN not in caplog.text
    monkeypatch.delenv("SAGEMAKER_BIND_TO_PORT")
    # the container form: the model SageMaker extracted under the base folder, `medpipe serve` without --model
    (tmp_path / "ml" / "model").mkdir(parents=True)
    env = {"SAGEMAKER_BASE_DIR": str(tmp_path / "ml")}
    assert sagemaker_hosting(str(tmp_path / "ml" / "model"), env)
    assert not sagemaker_hosting(str(tmp_path / "pkg"), env)


def test_unusable_token_file_or_certificate_is_a_clear_error(tmp_path, pki):
    from medpipe.errors import ConfigError
    from medpipe.serve.guard import access_policy

    short = tmp_path / "short"
    short.write_text("abc\n")
    spaced = tmp_path / "spaced"
    spaced.write_text("a" * 20 + " " + "b" * 20)
    cases = [(dict(auth_token_file=str(tmp_path / "missing")), "cannot read it"),
             (dict(auth_token_file=str(short)), "at least 16"),
             (dict(auth_token_file=str(spaced)), "without spaces"),
             (dict(tls_cert=str(pki[1]), tls_key=str(pki[0])), "cannot load them"),  # a certificate as the key
             (dict(tls_cert=str(tmp_path / "no.pem"), tls_key=str(pki[2])), "cannot load them")]
    for kw, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            access_policy(_cfg(tmp_path, **kw))
        assert "abc" not in str(info.value) and "aaaa" not in str(info.value)
    with pytest.raises(ConfigError, match="go together"):
        _cfg(tmp_path, tls_cert=str(pki[1]))



@pytest.fixture(scope="module")
def folder_server(package, pki, tmp_path_factory):
    """A server of one's own whose model sits where SageMaker extracts it (no SageMaker variable), with a
    token, TLS and a 1 s header timeout."""
    import shutil

    tmp = tmp_path_factory.mktemp("folder-server")
    base = tmp / "ml"
    shutil.copytree(package, base / "model")
    token_file = tmp / "token"
    token_file.write_text(TOKEN)
    os.chmod(token_file, 0o600)
    env = {"SAGEMAKER_BASE_DIR": str(base), "SAGEMAKER_BIND_TO_PORT": "", "SAGEMAKER_SAFE_PORT_RANGE": "",
           "SM_MODEL_DIR": ""}
    s = Server(base / "model", "--backend", "eager", "--threads", "1", "--decode-workers", "1",
               "--auth-token-file", str(token_file), "--tls-cert", str(pki[1]), "--tls-key", str(pki[2]),
               "--header-timeout-s", "1", env=env, log=tmp / "server.log",
               tls=ssl.create_default_context(cafile=str(pki[0]))).wait_ready()
    yield s
    s.stop()
    assert TOKEN not in s.log_text()


def test_token_given_is_applied_when_only_the_model_folder_looks_like_sagemaker(folder_server):
    """`medpipe serve --auth-token-file` in a container of one's own, model in /opt/ml/model (the default
    --model) and no SageMaker variable: the token is applied, not silently dropped (fail closed)."""
    assert folder_server.request("GET", "/metrics")[0] == 401
    assert folder_server.request("GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200


def test_a_stalled_tls_handshake_is_closed_at_the_header_timeout(folder_server):
    """A connection that starts a TLS handshake and stalls was held for asyncio's 60 s, outside the header
    timeout and the connection caps (many from one address could use up the file descriptors)."""
    import time

    conns = [socket.create_connection(("127.0.0.1", folder_server.port), timeout=5) for _ in range(8)]
    try:
        for c in conns:
            c.sendall(b"\x16")  # the first byte of a ClientHello, then nothing
        time.sleep(3)
        for c in conns:
            c.settimeout(2)
            with contextlib.suppress(ConnectionResetError):  # closed by the server (a timeout fails the test)
                assert c.recv(10) == b""
    finally:
        for c in conns:
            c.close()
    assert folder_server.request("GET", "/ping")[0] == 200
