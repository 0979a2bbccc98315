"""Key stores: where the CA's private keys live. Keys never leave their store in the clear.

- :class:`FileKeyStore`: one encrypted PKCS#8 PEM file a key, mode 0600, written atomically.
- ``Pkcs11KeyStore`` (in ``_pkcs11``): a PKCS#11 token; keys are generated on the token, sensitive and
  non-extractable, and sign through the token.

Both hand out objects implementing cryptography's ``EllipticCurvePrivateKey`` interface, which the certificate,
CRL and OCSP builders accept.
"""

from __future__ import annotations

import enum
import os
import re
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from warden.core import DEFAULT_LIMITS, InvalidInputError, KeyStoreError, KeyStoreLockedError
from warden.core.files import write_private_file

__all__ = ["FileKeyStore", "KeyAlgorithm", "KeyStore", "check_label", "load_encrypted_key"]

_LABEL = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class KeyAlgorithm(enum.StrEnum):
    P256 = "P-256"
    P384 = "P-384"

    def curve(self) -> ec.EllipticCurve:
        return ec.SECP256R1() if self is KeyAlgorithm.P256 else ec.SECP384R1()


class KeyStore(Protocol):
    """Holds named CA keys. Every method raises :class:`KeyStoreError` (or a subclass) on failure."""

    @property
    def kind(self) -> str: ...

    def generate(self, label: str, algorithm: KeyAlgorithm) -> ec.EllipticCurvePrivateKey:
        """Create a new key under ``label``; refuse if one exists."""
        ...

    def load(self, label: str) -> ec.EllipticCurvePrivateKey: ...

    def exists(self, label: str) -> bool: ...

    def delete(self, label: str) -> None:
        """Remove the key for good (used after the root key has been exported for offline storage)."""
        ...

    def describe(self, label: str) -> str:
        """Where the key lives, for humans (never includes a PIN or passphrase)."""
        ...

    def close(self) -> None:
        """Release the store (a token session logs out); keys loaded from it stop working."""
        ...


def check_label(label: str) -> str:
    if not _LABEL.fullmatch(label):
        raise InvalidInputError(f"invalid key label {label[:80]!r}")
    return label


class FileKeyStore:
    """Encrypted PKCS#8 files in one directory (0700), each key encrypted with the hub passphrase."""

    def __init__(self, directory: Path, passphrase: bytes) -> None:
        if not passphrase:
            raise KeyStoreError("no passphrase for the file key store", hint="set WARDEN_CA_PASSPHRASE")
        self._dir = directory
        self._passphrase = passphrase

    @property
    def kind(self) -> str:
        return "file"

    def _path(self, label: str) -> Path:
        return self._dir / f"{check_label(label)}.key.pem"

    def exists(self, label: str) -> bool:
        return self._path(label).exists()

    def generate(self, label: str, algorithm: KeyAlgorithm) -> ec.EllipticCurvePrivateKey:
        path = self._path(label)
        if path.exists():
            raise KeyStoreError(f"a key named {label!r} already exists in {self._dir}")
        key = ec.generate_private_key(algorithm.curve())
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private_file(path, self.encrypt(key))
        return key

    def encrypt(self, key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(self._passphrase),
        )

    def load(self, label: str) -> ec.EllipticCurvePrivateKey:
        path = self._path(label)
        try:
            with path.open("rb") as f:
                data = f.read(DEFAULT_LIMITS.max_pem_file_bytes + 1)
        except FileNotFoundError:
            raise KeyStoreError(
                f"the key {label!r} is not in the file key store {self._dir}",
                hint="was it exported for offline storage, or is this the wrong data directory?",
            ) from None
        except OSError as e:
            raise KeyStoreError(f"cannot read the key {label!r}: {e.strerror}") from e
        return load_encrypted_key(data, self._passphrase, what=f"the key {label!r}")

    def delete(self, label: str) -> None:
        path = self._path(label)
        try:
            path.unlink()
        except FileNotFoundError:
            raise KeyStoreError(f"the key {label!r} is not in the file key store") from None
        dir_fd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def describe(self, label: str) -> str:
        return f"encrypted PKCS#8 file {self._path(label)}"

    def close(self) -> None:
        """Nothing to release: each key file is read when it is loaded."""


def load_encrypted_key(data: bytes, passphrase: bytes, *, what: str) -> ec.EllipticCurvePrivateKey:
    if len(data) > DEFAULT_LIMITS.max_pem_file_bytes:
        raise KeyStoreError(f"{what} is larger than {DEFAULT_LIMITS.max_pem_file_bytes} bytes")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except (ValueError, TypeError) as e:
        # cryptography says "Bad decrypt. Incorrect password?" for a wrong passphrase; never echo the input.
        raise KeyStoreLockedError(
            f"{what} could not be decrypted",
            hint="wrong CA passphrase? check WARDEN_CA_PASSPHRASE or the passphrase file",
        ) from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyStoreError(f"{what} is not an EC key")
    return key
