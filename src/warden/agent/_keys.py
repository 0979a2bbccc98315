"""Where the device's private keys live: a directory of 0600 files, or a PKCS#11 token whose keys never leave it.

Both stores hand out keys as cryptography ``EllipticCurvePrivateKey`` objects (a token key signs inside the token,
see :class:`warden.pki.Pkcs11PrivateKey`), so the CSR code is the same for both, and both install a key as the
TLS client identity of an ``ssl.SSLContext`` (:meth:`DeviceKeys.install`): from the file, or through OpenSSL's
pkcs11 engine for a token key (:mod:`warden.agent._p11tls`).
"""

from __future__ import annotations

import os
import re
import ssl
import stat
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from warden.core import InvalidInputError, KeyStoreError
from warden.core.files import write_private_file

__all__ = ["DeviceKeys", "FileDeviceKeys", "Pkcs11DeviceKeys", "check_private_file"]

_LABEL = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_MAX_KEY_FILE = 64 * 1024


def _check_label(label: str) -> str:
    if not _LABEL.fullmatch(label):
        raise InvalidInputError(f"invalid key label {label[:80]!r}")
    return label


class DeviceKeys(Protocol):
    """Named private keys of one device."""

    @property
    def kind(self) -> str: ...

    @property
    def hardware_backed(self) -> bool: ...

    def generate(self, label: str) -> ec.EllipticCurvePrivateKey:
        """A new P-256 key under ``label`` (an existing one of that label is replaced)."""
        ...

    def load(self, label: str) -> ec.EllipticCurvePrivateKey: ...

    def exists(self, label: str) -> bool: ...

    def delete(self, label: str) -> None: ...

    def install(self, context: ssl.SSLContext, label: str, chain: Path) -> None:
        """Make ``chain`` (PEM, leaf first) and the key ``label`` the context's TLS client identity."""
        ...


def check_private_file(path: Path) -> None:
    """Refuse a key file that others may read or write, or that someone else owns."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyStoreError(f"the key file {path} does not exist") from None
    except OSError as e:
        raise KeyStoreError(f"cannot read the key file {path}: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyStoreError(f"the key file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise KeyStoreError(
            f"the key file {path} has permissions {stat.S_IMODE(info.st_mode):04o}, looser than 0600",
            hint=f"chmod 600 {path}",
        )
    if info.st_uid != os.geteuid():
        raise KeyStoreError(f"the key file {path} belongs to another user (uid {info.st_uid})")


class FileDeviceKeys:
    """Keys as unencrypted PKCS#8 PEM files, mode 0600, in ``directory`` (``<label>.key``), plus named extra files
    (the onboarding key, which the device maker put somewhere of its own)."""

    def __init__(self, directory: Path, *, files: dict[str, Path] | None = None) -> None:
        self._directory = directory
        self._files = dict(files or {})

    @property
    def kind(self) -> str:
        return "file"

    @property
    def hardware_backed(self) -> bool:
        return False

    def path(self, label: str) -> Path:
        return self._files.get(label) or self._directory / f"{_check_label(label)}.key"

    def generate(self, label: str) -> ec.EllipticCurvePrivateKey:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private_file(self.path(label), pem)
        return key

    def load(self, label: str) -> ec.EllipticCurvePrivateKey:
        path = self.path(label)
        check_private_file(path)
        with path.open("rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
        if len(data) > _MAX_KEY_FILE:
            raise KeyStoreError(f"the key file {path} is larger than {_MAX_KEY_FILE} bytes")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise KeyStoreError(f"the key file {path} holds no readable unencrypted private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KeyStoreError(f"the key file {path} holds a {type(key).__name__}; the agent uses EC keys")
        return key

    def exists(self, label: str) -> bool:
        return self.path(label).is_file()

    def delete(self, label: str) -> None:
        self.path(label).unlink(missing_ok=True)

    def install(self, context: ssl.SSLContext, label: str, chain: Path) -> None:
        path = self.path(label)
        check_private_file(path)
        try:
            context.load_cert_chain(chain, path)
        except ssl.SSLError as e:
            raise KeyStoreError(
                f"the certificate {chain} and the key {path} do not make a TLS identity", cause=e.reason or str(e)
            ) from None
        except OSError as e:
            raise KeyStoreError(f"cannot read {chain} or {path}: {e.strerror}") from None


class Pkcs11DeviceKeys:
    """Keys generated inside a PKCS#11 token (non-extractable); they sign in the token, for CSRs through python-pkcs11
    and for TLS through OpenSSL's pkcs11 engine."""

    def __init__(self, *, module: Path, token: str, pin_file: Path) -> None:
        from warden.pki import Pkcs11KeyStore, parse_pkcs11_uri

        self._module = module
        self._token = token
        self._pin_file = pin_file
        check_private_file(pin_file)
        from warden.agent._p11tls import prepare_pkcs11_module

        # Before python-pkcs11 touches the module: the engine and python-pkcs11 then share one initialisation (with
        # OS locking) and one login (see warden.agent._p11tls).
        prepare_pkcs11_module(module=module, token=token, pin=self._pin())
        uri = parse_pkcs11_uri(
            "pkcs11:token=" + _uri_escape(token) + "?module-path=" + _uri_escape(str(module)) + "&pin-source=file:"
            f"{_uri_escape(str(pin_file))}"
        )
        self._store = Pkcs11KeyStore(uri)

    @property
    def kind(self) -> str:
        return "pkcs11"

    @property
    def hardware_backed(self) -> bool:
        return True

    def _pin(self) -> str:
        return self._pin_file.read_text(encoding="utf-8").strip()

    def generate(self, label: str) -> ec.EllipticCurvePrivateKey:
        from warden.pki import KeyAlgorithm

        if self._store.exists(_check_label(label)):
            self._store.delete(label)
        return self._store.generate(label, KeyAlgorithm.P256)

    def load(self, label: str) -> ec.EllipticCurvePrivateKey:
        return self._store.load(_check_label(label))

    def exists(self, label: str) -> bool:
        return self._store.exists(_check_label(label))

    def delete(self, label: str) -> None:
        if self._store.exists(_check_label(label)):
            self._store.delete(label)

    def install(self, context: ssl.SSLContext, label: str, chain: Path) -> None:
        from warden.agent._p11tls import use_pkcs11_key

        use_pkcs11_key(
            context, chain=chain, module=self._module, token=self._token, key_label=_check_label(label), pin=self._pin()
        )


def _uri_escape(value: str) -> str:
    import urllib.parse

    return urllib.parse.quote(value, safe="/._-")
