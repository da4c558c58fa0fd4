"""Self-signed TLS material for the federation listeners of test homeservers.

Synapse insists on TLS for the federation listener.  Peers in the harness run
with ``federation_verify_certificates: false``, so one self-signed certificate
covering ``localhost`` and ``127.0.0.1`` is enough for every server in a test
session; it is generated once (see ``tls_files`` in ``tests/conftest.py``).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

__all__ = ["TLSFiles", "generate_self_signed"]


@dataclass(frozen=True)
class TLSFiles:
    """Paths of a PEM certificate and its PEM (unencrypted PKCS#8) private key."""

    cert_path: Path
    key_path: Path


def generate_self_signed(directory: Path, common_name: str = "localhost") -> TLSFiles:
    """Write ``tls.crt`` / ``tls.key`` into ``directory`` and return their paths.

    The certificate is valid from one day ago (tolerates small clock skew) for a
    year, carries SAN ``DNS:localhost`` and ``IP:127.0.0.1`` (plus ``IP:::1``), and
    is marked as a CA so that tools which *do* verify could pin it directly.
    RSA-2048 is used because every TLS stack Synapse may be linked against
    accepts it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "tls.crt"
    key_path = directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return TLSFiles(cert_path=cert_path, key_path=key_path)
