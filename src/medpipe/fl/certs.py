"""Credentials for a federation: a CA, the server's TLS certificate and one key pair per site.

    medpipe fl certs --out CERTS --sites vienna,queensland,rosendahl [--host 127.0.0.1 --host fl.example.org]

writes ``CERTS/ca.crt`` + ``ca.key`` (keep the CA key offline), ``server.pem`` + ``server.key`` (TLS
for the Flower SuperLink; the subject alternative names are the ``--host`` values, loopback by
default), and ``sites/NAME`` + ``sites/NAME.pub`` per site: an EC P-384 key pair in OpenSSH format,
the form Flower's SuperNode authentication reads (the private key stays at the site; the public key
is registered at the server). Private keys are written 0600. The same set can be made with
``openssl`` and ``ssh-keygen -t ecdsa -b 384 -m PEM``; this command only saves a dependency-free
recipe (``cryptography`` comes with Flower).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from pathlib import Path

from medpipe.errors import MedpipeError

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def check_site_name(name: str) -> str:
    if not SITE_NAME.match(name or ""):
        raise MedpipeError(f"site name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def make_certs(out: str | os.PathLike, sites: list[str], hosts: list[str] | None = None, days: int = 365) -> dict:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    hosts = hosts or ["127.0.0.1", "localhost"]
    for s in sites:
        check_site_name(s)
    if len(set(sites)) != len(sites):
        raise MedpipeError(f"site names must be unique, got {sites}")
    now = dt.datetime.now(dt.timezone.utc)
    pem = serialization.Encoding.PEM
    no_pw = serialization.NoEncryption()

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medpipe federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    alt = []
    for h in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])).issuer_name(ca_name)
           .public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
           .add_extension(x509.SubjectAlternativeName(alt), critical=False)
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .sign(ca_key, hashes.SHA256()))

    _write(out / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_pw), private=True)
    _write(out / "ca.crt", ca.public_bytes(pem))
    _write(out / "server.key", srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_pw), private=True)
    _write(out / "server.pem", srv.public_bytes(pem))
    for s in sites:
        key = ec.generate_private_key(ec.SECP384R1())
        _write(out / "sites" / s, key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, no_pw), private=True)
        _write(out / "sites" / f"{s}.pub", key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {s}\n".encode())
    return {"out": str(out), "ca": str(out / "ca.crt"), "server_cert": str(out / "server.pem"),
            "server_key": str(out / "server.key"), "hosts": hosts,
            "sites": {s: {"private_key": str(out / "sites" / s), "public_key": str(out / "sites" / f"{s}.pub")}
                      for s in sites}}
