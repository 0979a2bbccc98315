"""Cloud-to-device commands: signed by the hub, verified by the agent, replay-protected by a per-device counter.

The broker already lets only the hub publish on ``warden/<id>/commands``, but a command must also be safe against
whoever gets into the broker, and against replays: every command is signed with the hub's dedicated command-signing
key, whose certificate (issued by the hub's CA with the command-signing extended key usage, and rotated on its own)
travels with the command. The agent checks the chain to its pinned root, the key usage, the device id and a
counter that must exceed the last one it accepted (persisted on the device: timestamps alone fail on devices whose
clocks drift).

```
{"v": 1, "payload": "<base64url JSON>", "sig": "<base64url DER ECDSA-SHA256 over the payload bytes>",
 "signer": "<base64 DER certificate>"}
payload: {"id": "cmd_…", "device": "dev-a", "counter": 7, "name": "ping", "args": {}, "issued": "2026-…Z"}
```
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from warden.core import COMMAND_SIGNING_EKU_OID, InvalidInputError

__all__ = [
    "COMMAND_NAMES",
    "COMMAND_SIGNING_EKU",
    "MAX_COMMAND_BYTES",
    "Command",
    "CommandRejectedError",
    "CommandVerifier",
    "sign_command",
]

#: the extended key usage of the hub's command-signing certificate
COMMAND_SIGNING_EKU = ObjectIdentifier(COMMAND_SIGNING_EKU_OID)
MAX_COMMAND_BYTES = 16 * 1024
#: what the agent executes; anything else is rejected (and reported) by the agent
COMMAND_NAMES = frozenset({"ping", "report-health", "renew-certificate"})
_ID = re.compile(r"^cmd_[0-9a-f]{16,32}$")
_CLOCK_TOLERANCE = dt.timedelta(minutes=10)


class CommandRejectedError(InvalidInputError):
    """A command the agent must not execute, with the reason it reports back (and the command's id when the
    signed payload could be read, so that the hub can close that command)."""

    command_id: str | None = None


@dataclass(frozen=True)
class Command:
    id: str
    device: str
    counter: int
    name: str
    issued: dt.datetime
    args: Mapping[str, Any] = field(default_factory=dict)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: object, what: str) -> bytes:
    if not isinstance(text, str) or len(text) > MAX_COMMAND_BYTES * 2:
        raise CommandRejectedError(f"the command's {what} is missing or too long")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise CommandRejectedError(f"the command's {what} is not base64url") from None


def sign_command(key: ec.EllipticCurvePrivateKey, signer: x509.Certificate, command: Command) -> bytes:
    """The signed envelope the hub publishes on the device's command topic."""
    if command.name not in COMMAND_NAMES:
        raise InvalidInputError(f"unknown command {command.name!r}", hint=f"one of {', '.join(sorted(COMMAND_NAMES))}")
    payload = json.dumps(
        {
            "id": command.id,
            "device": command.device,
            "counter": command.counter,
            "name": command.name,
            "args": dict(command.args),
            "issued": command.issued.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    envelope = {
        "v": 1,
        "payload": _b64url(payload),
        "sig": _b64url(signature),
        "signer": base64.b64encode(signer.public_bytes(serialization.Encoding.DER)).decode("ascii"),
    }
    data = json.dumps(envelope, separators=(",", ":")).encode()
    if len(data) > MAX_COMMAND_BYTES:
        raise InvalidInputError(f"the signed command has {len(data)} bytes, more than {MAX_COMMAND_BYTES}")
    return data


class CommandVerifier:
    """Verifies commands for one device against the hub's pinned root and the CA certificates between."""

    def __init__(self, device_id: str, roots: Sequence[x509.Certificate], intermediates: Sequence[x509.Certificate]):
        self._device_id = device_id
        self._roots = list(roots)
        self._intermediates = list(intermediates)

    def verify(self, data: bytes, *, last_counter: int, now: dt.datetime) -> Command:
        if len(data) > MAX_COMMAND_BYTES:
            raise CommandRejectedError(f"the command has {len(data)} bytes, more than {MAX_COMMAND_BYTES}")
        try:
            envelope = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise CommandRejectedError("the command is not JSON") from None
        if not isinstance(envelope, dict) or type(envelope.get("v")) is not int or envelope.get("v") != 1:
            raise CommandRejectedError("the command is not a version 1 envelope")
        payload = _unb64url(envelope.get("payload"), "payload")
        signature = _unb64url(envelope.get("sig"), "signature")
        try:
            signer_der = base64.b64decode(str(envelope.get("signer", "")), validate=True)
            signer = x509.load_der_x509_certificate(signer_der)
            signer.extensions  # noqa: B018 (parsed here, so that a malformed extension is a rejection)
        except (binascii.Error, ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
            raise CommandRejectedError("the command's signer certificate is unreadable") from None
        self._check_signer(signer, now)
        public_key = signer.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise CommandRejectedError("the command's signer has no EC key")
        try:
            public_key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise CommandRejectedError("the command's signature does not verify") from None
        command = _parse_payload(payload)
        problem = None
        if command.device != self._device_id:
            problem = f"the command is for {command.device!r}, not for this device"
        elif command.counter <= last_counter:
            problem = f"replayed or stale command: counter {command.counter}, last accepted {last_counter}"
        elif command.name not in COMMAND_NAMES:
            problem = f"unknown command {command.name!r}"
        if problem is not None:
            error = CommandRejectedError(problem)
            # Only for the device's own commands: a replay names a command the hub has closed already anyway.
            error.command_id = command.id if command.device == self._device_id else None
            raise error
        return command

    def _check_signer(self, signer: x509.Certificate, now: dt.datetime) -> None:
        if not signer.not_valid_before_utc - _CLOCK_TOLERANCE <= now <= signer.not_valid_after_utc + _CLOCK_TOLERANCE:
            raise CommandRejectedError("the command's signer certificate is not valid now")
        try:
            usages = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise CommandRejectedError("the command's signer is not a command-signing certificate") from None
        if COMMAND_SIGNING_EKU not in usages or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usages:
            raise CommandRejectedError("the command's signer is not a command-signing certificate")
        if _is_ca(signer):
            raise CommandRejectedError("the command's signer is a CA certificate, not a command-signing one")
        if not self._chains(signer, now):
            raise CommandRejectedError("the command's signer does not chain to the pinned hub root")

    def _chains(self, certificate: x509.Certificate, now: dt.datetime, depth: int = 0) -> bool:
        if depth > 4:
            return False
        for root in self._roots:
            if _issued_by(certificate, root):
                return True
        for ca in self._intermediates:
            if ca is certificate or not _is_ca(ca) or not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
                continue
            if _issued_by(certificate, ca) and self._chains(ca, now, depth + 1):
                return True
        return False


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    if certificate.issuer != issuer.subject or not _is_ca(issuer):
        return False
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _parse_payload(payload: bytes) -> Command:
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CommandRejectedError("the command's payload is not JSON") from None
    if not isinstance(data, dict):
        raise CommandRejectedError("the command's payload is not an object")
    command_id, device, counter, name = data.get("id"), data.get("device"), data.get("counter"), data.get("name")
    args, issued = data.get("args", {}), data.get("issued")
    if not isinstance(command_id, str) or not _ID.fullmatch(command_id):
        raise CommandRejectedError("the command has no valid id")
    if not isinstance(device, str) or not isinstance(name, str) or not isinstance(args, dict):
        raise CommandRejectedError("the command lacks its device, name or arguments")
    if not isinstance(counter, int) or isinstance(counter, bool) or not 0 < counter < 2**63:
        raise CommandRejectedError("the command's counter is not a positive integer")
    try:
        when = dt.datetime.fromisoformat(str(issued))
    except ValueError:
        raise CommandRejectedError("the command's issue time is unreadable") from None
    return Command(command_id, device, counter, name, when, args)
