"""The sandbox CA: it signs the TLS certificates of the sandbox's public endpoints (the cloud's
APIs and the CANFAR stand-ins) and the users' proxy certificates, as public CAs and CADC's CA do
on the real platform."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from sandbox import layout

CA_DIR = layout.STATE_DIR / "canfar" / "ca"
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ca_cert_path() -> Path:
    return CA_DIR / "ca.pem"


def bundle_path() -> Path:
    """System CAs plus the sandbox CA: what ``SSL_CERT_FILE`` should name."""
    return CA_DIR / "bundle.pem"


def ca_pem() -> str:
    """The sandbox CA certificate (PEM), for installing into a guest's trust store or for the
    product's optional CA bundle setting."""
    ensure_ca()
    return ca_cert_path().read_text()


def ensure_ca() -> None:
    if ca_cert_path().exists() and (CA_DIR / "ca.key").exists():
        if not bundle_path().exists():
            _write_bundle()
        return
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sails sandbox"),
            x509.NameAttribute(NameOID.COMMON_NAME, "sails sandbox CA"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write(CA_DIR / "ca.key", _key_pem(key), 0o600)
    _write(ca_cert_path(), cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_bundle()


def _write_bundle() -> None:
    system = SYSTEM_BUNDLE.read_bytes() if SYSTEM_BUNDLE.exists() else b""
    _write(bundle_path(), system + b"\n" + ca_cert_path().read_bytes(), 0o644)


def _ca() -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    ensure_ca()
    cert = x509.load_pem_x509_certificate(ca_cert_path().read_bytes())
    key = serialization.load_pem_private_key((CA_DIR / "ca.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return cert, key


def server_certificate(ip: str, *more: str) -> tuple[Path, Path]:
    """A TLS server certificate for ``ip`` and ``more`` addresses (IP SANs), made once."""
    stem = "+".join((ip, *more))
    cert_path, key_path = CA_DIR / f"server-{stem}.pem", CA_DIR / f"server-{stem}.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    ca_cert, ca_key = _ca()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(a)) for a in (ip, *more)]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def proxy_certificate(user: str, *, seconds: float) -> str:
    """A user's certificate + key as one PEM, valid ``seconds`` from now (CADC's proxy format:
    certificate first, then the unencrypted key)."""
    ca_cert, ca_key = _ca()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "ca"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sails sandbox"),
            x509.NameAttribute(NameOID.COMMON_NAME, user),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(seconds=seconds))
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return (cert.public_bytes(serialization.Encoding.PEM) + _key_pem(key)).decode()
