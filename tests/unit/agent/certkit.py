"""A small certificate factory for the agent's and the command verifier's tests: roots, CAs and leaves made at test
time with cryptography (never committed), with the usual extensions so that path validation accepts them."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

__all__ = [
    "CLIENT_AUTH",
    "Ca",
    "certificate",
    "key_pem",
    "make_ca",
    "make_root",
    "new_key",
    "pem",
    "utcnow",
    "write_pem",
]

CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def utcnow() -> dt.datetime:
    """Now, to the second (certificates carry no fractions of a second)."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True)
class Ca:
    certificate: x509.Certificate
    key: PrivateKey

    @property
    def name(self) -> x509.Name:
        return self.certificate.subject


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme Test"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def certificate(
    *,
    subject: str,
    public_key: PublicKey,
    issuer: Ca | None,
    signing_key: PrivateKey | None = None,
    not_before: dt.datetime,
    not_after: dt.datetime,
    ca: bool | None = False,
    eku: Sequence[ObjectIdentifier] | None = None,
    dns_names: Sequence[str] = (),
) -> x509.Certificate:
    """One certificate. ``issuer`` None: self-signed with ``signing_key``. ``ca`` None: no basic constraints at all;
    ``eku`` None: no extended key usage; ``dns_names``: a subject alternative name (a device's, as the hub issues
    it: path validation of a client certificate requires one)."""
    subject_name = _name(subject)
    issuer_name = issuer.name if issuer is not None else subject_name
    key = issuer.key if issuer is not None else signing_key
    assert key is not None, "a self-signed certificate needs its signing key"
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject_name)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    authority_key = issuer.key.public_key() if issuer is not None else public_key
    builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(authority_key), critical=False)
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    builder = builder.add_extension(
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=bool(ca),
            crl_sign=bool(ca),
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if dns_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name) for name in dns_names]), critical=False
        )
    return builder.sign(key, hashes.SHA256())


def make_root(common_name: str = "Test Root", *, now: dt.datetime | None = None, days: int = 3650) -> Ca:
    now = now or utcnow()
    key = new_key()
    cert = certificate(
        subject=common_name,
        public_key=key.public_key(),
        issuer=None,
        signing_key=key,
        not_before=now - dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=days),
        ca=True,
    )
    return Ca(cert, key)


def make_ca(
    issuer: Ca,
    common_name: str = "Test Issuing CA",
    *,
    now: dt.datetime | None = None,
    days: int = 1000,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    ca: bool | None = True,
) -> Ca:
    """A CA under ``issuer`` (``ca`` False or None: a certificate that is *not* a CA, but holds a key all the same)."""
    now = now or utcnow()
    key = new_key()
    cert = certificate(
        subject=common_name,
        public_key=key.public_key(),
        issuer=issuer,
        not_before=not_before or now - dt.timedelta(days=1),
        not_after=not_after or now + dt.timedelta(days=days),
        ca=ca,
    )
    return Ca(cert, key)


def pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def write_pem(path: Path, *certificates: x509.Certificate) -> Path:
    path.write_bytes(pem(*certificates))
    return path


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
