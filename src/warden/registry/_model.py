"""Registry domain objects and the device state machine. Pure: no I/O.

Legal transitions, and only these: ``pending -> active``, ``active <-> disabled``, ``active -> quarantined``,
``quarantined -> active``, and any state -> ``decommissioned``, which is final. Anything else raises
:class:`IllegalTransitionError`; a transition to the current state is illegal too, never a silent no-op.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from warden.core import IllegalTransitionError

__all__ = [
    "CertificateRecord",
    "CertificateStatus",
    "Device",
    "DeviceGroup",
    "DeviceState",
    "PublishedCrl",
    "Restriction",
    "check_transition",
]


class DeviceState(enum.StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    DISABLED = "disabled"
    QUARANTINED = "quarantined"
    DECOMMISSIONED = "decommissioned"


_TRANSITIONS: dict[DeviceState, frozenset[DeviceState]] = {
    DeviceState.PENDING: frozenset({DeviceState.ACTIVE, DeviceState.DECOMMISSIONED}),
    DeviceState.ACTIVE: frozenset({DeviceState.DISABLED, DeviceState.QUARANTINED, DeviceState.DECOMMISSIONED}),
    DeviceState.DISABLED: frozenset({DeviceState.ACTIVE, DeviceState.DECOMMISSIONED}),
    DeviceState.QUARANTINED: frozenset({DeviceState.ACTIVE, DeviceState.DECOMMISSIONED}),
    DeviceState.DECOMMISSIONED: frozenset(),
}


def check_transition(device_id: str, current: DeviceState, target: DeviceState) -> None:
    if target not in _TRANSITIONS[current]:
        allowed = ", ".join(sorted(_TRANSITIONS[current])) or "none (decommissioned is final)"
        raise IllegalTransitionError(
            f"device {device_id!r} cannot go from {current} to {target}",
            hint=f"from {current} it can go to: {allowed}",
            device=device_id,
            current=str(current),
            target=str(target),
        )


@dataclass(frozen=True, slots=True)
class DeviceGroup:
    name: str
    description: str
    #: settings that later features attach to (health baselines, allowed networks, update rings)
    settings: Mapping[str, object]
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    display_name: str
    state: DeviceState
    created_at: dt.datetime
    updated_at: dt.datetime
    tags: Mapping[str, str] = field(default_factory=dict)
    groups: tuple[str, ...] = ()
    #: SHA-256 of the onboarding identity (IDevID certificate or token binding); set once
    onboarding_fingerprint: str | None = None
    #: the enrollment group the device last onboarded through (None: registered or enrolled individually)
    enrollment_group: str | None = None


class CertificateStatus(enum.StrEnum):
    GOOD = "good"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    serial: int
    device_id: str | None
    common_name: str
    profile: str
    not_before: dt.datetime
    not_after: dt.datetime
    #: SHA-256 of the DER certificate, lower-case hex
    fingerprint: str
    #: SHA-256 of the DER SubjectPublicKeyInfo, lower-case hex
    key_fingerprint: str
    status: CertificateStatus
    issued_at: dt.datetime
    pem: str
    revoked_at: dt.datetime | None = None
    revocation_reason: str | None = None

    @property
    def serial_hex(self) -> str:
        return format_serial(self.serial)

    def is_expired(self, now: dt.datetime) -> bool:
        return now >= self.not_after


def format_serial(serial: int) -> str:
    """Serials print as colon-free upper-case hex, as ``openssl x509 -serial`` shows them."""
    text = f"{serial:X}"
    return text if len(text) % 2 == 0 else "0" + text


@dataclass(frozen=True, slots=True)
class PublishedCrl:
    """The CRL the hub serves at ``/pki/crl`` and hands to the broker."""

    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    der: bytes
    entries: int


@dataclass(frozen=True, slots=True)
class Restriction:
    """A device held to restricted broker rights (health and updates only), independently of its state: its state
    wins when that is stricter (quarantined, disabled, decommissioned). Set by the ingest for flooding; lifted by an
    operator or, when ``until`` is set, by the hub once that time has passed."""

    device_id: str
    since: dt.datetime
    reason: str
    actor: str
    #: when the hub lifts it on its own; None: only an operator does
    until: dt.datetime | None = None
    #: what the restriction was decided on (for flooding: the measured rate, the limit, the window)
    details: Mapping[str, object] = field(default_factory=dict)

    def expired(self, now: dt.datetime) -> bool:
        return self.until is not None and now >= self.until
