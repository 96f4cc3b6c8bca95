"""Certificates for the TLS tests, made with ``cryptography`` in a test's directory: a CA and
the certificates it signs (Dask checks the signature, not the host name)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Pem:
    """A certificate and its private key, each in a PEM file."""

    cert: Path
    key: Path

    def flags(self, ca: Pem) -> list[str]:
        """``--tls-ca-file/--tls-cert/--tls-key`` for the ``dask`` CLI and flows/run.py."""
        return [
            "--tls-ca-file",
            str(ca.cert),
            "--tls-cert",
            str(self.cert),
            "--tls-key",
            str(self.key),
        ]


def make_ca(directory: Path, name: str = "imgtasks-test-ca") -> Pem:
    return _write(directory, name, issuer=None, valid_from=-DAY, valid_to=30 * DAY)


def make_cert(
    directory: Path,
    name: str,
    ca: Pem,
    valid_from: datetime.timedelta = -DAY,
    valid_to: datetime.timedelta = 30 * DAY,
    ip: str | None = None,
) -> Pem:
    """A certificate signed by ``ca``, valid from now + ``valid_from`` to now + ``valid_to``
    (both negative: expired); ``ip``: the address it names, for a client that checks it
    (an HTTPS server's)."""
    return _write(directory, name, issuer=ca, valid_from=valid_from, valid_to=valid_to, ip=ip)


def _write(
    directory: Path,
    name: str,
    issuer: Pem | None,
    valid_from: datetime.timedelta,
    valid_to: datetime.timedelta,
    ip: str | None = None,
) -> Pem:
    # EC keys: ~1 ms each, where RSA-2048 takes ~50-100 ms
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    if issuer is None:  # self-signed CA
        issuer_name, signing_key = subject, key
    else:
        issuer_cert = x509.load_pem_x509_certificate(issuer.cert.read_bytes())
        issuer_name = issuer_cert.subject
        signing_key = serialization.load_pem_private_key(issuer.key.read_bytes(), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + valid_from)
        .not_valid_after(now + valid_to)
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if ip is not None:
        names = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))])
        builder = builder.add_extension(names, critical=False)
    cert = builder.sign(signing_key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    pem = Pem(directory / f"{name}.pem", directory / f"{name}-key.pem")
    pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pem
