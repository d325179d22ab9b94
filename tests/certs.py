"""Certificates made at test time: a CA, leaf certificates with SANs, expired ones.

Nothing is stored in the repository; every test writes what it needs into its
own temporary directory.  Keys are ECDSA P-256 (fast to make and to use).
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = datetime.timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class CA:
    """A self-signed CA that issues leaf certificates into a directory."""

    directory: Path
    name: str = "nlbproxy test CA"

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = _key()
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.file = self.directory / "ca.pem"
        self.file.write_bytes(_pem(self.cert))

    def issue(self, file: str, dns: list[str] = (), ips: list[str] = (), cn: str | None = None,
              expired: bool = False, with_key: bool = True, rsa_bits: int = 0) -> Path:
        """A PEM file with the leaf certificate, the CA certificate and the leaf's key
        (ECDSA P-256, or RSA of ``rsa_bits``)."""
        key: Any = rsa.generate_private_key(65537, rsa_bits) if rsa_bits else _key()
        now = datetime.datetime.now(datetime.UTC)
        if expired:
            start, end = now - 30 * _DAY, now - _DAY
        else:
            start, end = now - _DAY, now + 10 * _DAY
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or (list(dns) or list(ips) or ["x"])[0])])
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        path = self.directory / file
        path.write_bytes(_pem(cert) + _pem(self.cert) + (_key_pem(key) if with_key else b""))
        return path


def leaf_names(der: bytes) -> list[str]:
    """The SAN dNSNames of a DER certificate (what a client was served)."""
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


def temp_dir(case: Any) -> Path:
    """A directory removed after the test (not mktemp(): under pytest it
    leaves directories in the working tree)."""
    path = Path(tempfile.mkdtemp(prefix="nlb-tls-test-"))
    case.addCleanup(shutil.rmtree, path, True)
    return path
