"""The device's operational identity on disk: the current key's label and its certificate chain.

``<state>/identity/current.json`` names the current key (in the key store) and chain file; replacing it (atomic
rename) is the one moment a renewal takes effect. A key created for a renewal that never completed is named in
``pending.json`` and deleted at the next start, so a crash mid-renewal leaves neither a half-written identity nor
an orphaned key.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from warden.agent._keys import DeviceKeys
from warden.core import InvalidInputError, KeyStoreError, WardenError
from warden.core.files import write_file_atomic

__all__ = ["Identity", "IdentityStore", "check_issued", "load_pem_bundle"]

_MAX_JSON = 16 * 1024
_MAX_PEM = 256 * 1024


@dataclass(frozen=True)
class Identity:
    label: str
    chain: Path
    certificate: x509.Certificate
    #: when the agent received it (certificates are back-dated: the lifetime to plan renewal with starts here)
    received: float

    @property
    def serial(self) -> str:
        """Upper-case hex, as the hub and ``openssl x509 -serial`` show it."""
        text = f"{self.certificate.serial_number:X}"
        return text if len(text) % 2 == 0 else "0" + text

    @property
    def not_before(self) -> float:
        return self.certificate.not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.certificate.not_valid_after_utc.timestamp()


def load_pem_bundle(path: Path, what: str) -> list[x509.Certificate]:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_PEM + 1)
    except OSError as e:
        raise WardenError(f"cannot read {what} {path}: {e.strerror}") from None
    if len(data) > _MAX_PEM:
        raise WardenError(f"{what} {path} is larger than {_MAX_PEM} bytes")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise WardenError(f"{what} {path} holds no PEM certificate") from None
    return certificates


def _pem(certificates: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def check_issued(
    certificates: list[x509.Certificate],
    key: ec.EllipticCurvePrivateKey,
    device_id: str,
    roots: list[x509.Certificate],
    *,
    at: dt.datetime | None = None,
) -> list[x509.Certificate]:
    """The issued chain ordered leaf first, after checking that the leaf is for this key and this device and that it
    chains to the pinned root (so that a hub that was not ours cannot hand the device an identity)."""
    mine = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    leaves = [
        c
        for c in certificates
        if c.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        == mine
    ]
    if len(leaves) != 1:
        raise WardenError("the hub's answer holds no certificate for the key the agent sent")
    leaf = leaves[0]
    names = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [device_id]:
        raise WardenError(f"the hub issued a certificate for {names!r}, not for {device_id!r}")
    intermediates = [c for c in certificates if c is not leaf and c not in roots]
    try:
        builder = PolicyBuilder().store(Store(roots))
        if at is not None:
            builder = builder.time(at)
        builder.build_client_verifier().verify(leaf, intermediates)
    except VerificationError as e:
        raise WardenError(f"the issued certificate does not chain to the pinned hub root: {e}") from None
    return [leaf, *intermediates]


class IdentityStore:
    def __init__(self, state_dir: Path, keys: DeviceKeys) -> None:
        self._dir = state_dir / "identity"
        self._keys = keys

    @property
    def directory(self) -> Path:
        return self._dir

    def current(self) -> Identity | None:
        path = self._dir / "current.json"
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_bytes()[:_MAX_JSON])
            label, chain = str(data["label"]), self._dir / str(data["chain"])
            received = float(data.get("received", 0.0))
        except (OSError, ValueError, KeyError, TypeError):
            raise WardenError(
                f"the agent's identity record {path} is unreadable", hint="re-onboard the device"
            ) from None
        certificates = load_pem_bundle(chain, "the operational certificate")
        if not self._keys.exists(label):
            raise KeyStoreError(f"the key {label!r} of the current certificate is missing from the key store")
        return Identity(label, chain, certificates[0], received or certificates[0].not_valid_before_utc.timestamp())

    def begin(self, label: str) -> None:
        """Record that a key for a new identity is about to be made."""
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_file_atomic(self._dir / "pending.json", json.dumps({"label": label}).encode(), mode=0o600)

    def commit(self, label: str, chain: list[x509.Certificate]) -> Identity:
        """Make ``label`` with ``chain`` the current identity, then remove the previous one's key and chain."""
        previous = self._current_label()
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        chain_name = f"{label}.pem"
        received = min(time.time(), chain[0].not_valid_after_utc.timestamp())
        write_file_atomic(self._dir / chain_name, _pem(chain), mode=0o644)
        record = {"label": label, "chain": chain_name, "received": received}
        write_file_atomic(self._dir / "current.json", json.dumps(record).encode(), mode=0o600)
        (self._dir / "pending.json").unlink(missing_ok=True)
        if previous is not None and previous != label:
            self._keys.delete(previous)
            (self._dir / f"{previous}.pem").unlink(missing_ok=True)
        return Identity(label, self._dir / chain_name, chain[0], received)

    def abandon_pending(self) -> None:
        """Delete the key of a renewal that never completed (after a crash or a refusal)."""
        path = self._dir / "pending.json"
        if not path.exists():
            return
        try:
            label = str(json.loads(path.read_bytes()[:_MAX_JSON])["label"])
        except (OSError, ValueError, KeyError, TypeError):
            label = ""
        if label and label != self._current_label():
            with contextlib.suppress(InvalidInputError):  # not a label the agent makes: nothing of ours to delete
                self._keys.delete(label)
            (self._dir / f"{label}.pem").unlink(missing_ok=True)
        path.unlink(missing_ok=True)

    def _current_label(self) -> str | None:
        path = self._dir / "current.json"
        try:
            return str(json.loads(path.read_bytes()[:_MAX_JSON])["label"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
