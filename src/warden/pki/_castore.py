"""The CA's certificates on disk (``<data-dir>/ca/``) and its keys in a key store.

Layout: ``root-ca.pem``, ``issuing-ca.pem``, ``chain.pem`` (issuing then root), ``ocsp-signer.pem``. Keys are
named ``root-ca``, ``issuing-ca`` and ``ocsp-signer`` in the key store. After ``warden ca export-root`` the
``root-ca`` key is gone from the hub and only the issuing CA signs.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from warden.core import DEFAULT_LIMITS, ConfigurationError, KeyStoreError, NotInitialisedError
from warden.core.files import read_limited, write_file_atomic
from warden.pki._authority import build_issuing_ca, build_root_ca, hash_for, new_serial
from warden.pki._keystore import KeyAlgorithm, KeyStore

__all__ = [
    "ISSUING_KEY",
    "OCSP_SIGNER_KEY",
    "ROOT_KEY",
    "CAFiles",
    "Hierarchy",
    "create_hierarchy",
    "key_csr",
]

ROOT_KEY = "root-ca"
ISSUING_KEY = "issuing-ca"
OCSP_SIGNER_KEY = "ocsp-signer"


@dataclass(frozen=True, slots=True)
class Hierarchy:
    root: x509.Certificate
    issuing: x509.Certificate


def create_hierarchy(
    *,
    store: KeyStore,
    algorithm: KeyAlgorithm,
    org: str,
    now: dt.datetime,
    root_serial_bytes: bytes,
    issuing_serial_bytes: bytes,
    root_days: int,
    issuing_days: int,
) -> Hierarchy:
    """Generate the root and issuing keys in ``store`` and build both CA certificates."""
    for label in (ROOT_KEY, ISSUING_KEY):
        if store.exists(label):
            raise KeyStoreError(
                f"the key store already holds a key named {label!r}",
                hint="use a fresh data directory or token, or remove the old keys first",
            )
    root_key = store.generate(ROOT_KEY, algorithm)
    issuing_key = store.generate(ISSUING_KEY, algorithm)
    root = build_root_ca(key=root_key, org=org, now=now, days=root_days, serial=new_serial(root_serial_bytes))
    issuing = build_issuing_ca(
        key=issuing_key,
        root=root,
        root_key=root_key,
        org=org,
        now=now,
        days=issuing_days,
        serial=new_serial(issuing_serial_bytes),
    )
    return Hierarchy(root=root, issuing=issuing)


def key_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> bytes:
    """A PEM CSR for a key held by the hub (the OCSP signer), made through the key store's signing interface."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hash_for(key))
    )
    return csr.public_bytes(serialization.Encoding.PEM)


class CAFiles:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    @property
    def exists(self) -> bool:
        return self.path(ISSUING_KEY).exists()

    def write(self, name: str, *certificates: x509.Certificate) -> None:
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)
        write_file_atomic(self.path(name), data)

    def write_hierarchy(self, hierarchy: Hierarchy) -> None:
        self.write(ROOT_KEY, hierarchy.root)
        self.write(ISSUING_KEY, hierarchy.issuing)
        self.write("chain", hierarchy.issuing, hierarchy.root)

    def read(self, name: str) -> x509.Certificate:
        path = self.path(name)
        if not path.exists():
            if name in (ROOT_KEY, ISSUING_KEY):
                raise NotInitialisedError(
                    f"no CA in {self.directory.parent}",
                    hint="run 'warden init --org NAME --fleet-domain DOMAIN'",
                )
            raise ConfigurationError(f"{path} is missing")
        data = read_limited(path, DEFAULT_LIMITS.max_pem_file_bytes, what="the CA certificate")
        try:
            return x509.load_pem_x509_certificate(data)
        except ValueError as e:
            raise ConfigurationError(f"{path} is not a PEM certificate") from e

    def chain_pem(self) -> bytes:
        return read_limited(self.path("chain"), DEFAULT_LIMITS.max_pem_file_bytes, what="the CA chain")
