"""Enrollment records: enrollment groups (trust a manufacturer CA) and individual enrollments (one device, one
onboarding certificate or one-time token). Pure: no I/O."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "EnrollmentGroup",
    "EnrollmentKind",
    "EnrollmentStatus",
    "IdField",
    "IndividualEnrollment",
    "Reonboarding",
]


class IdField(enum.StrEnum):
    """Where an onboarding certificate carries the device id."""

    CN = "cn"
    SERIAL_NUMBER = "serial-number"


@dataclass(frozen=True, slots=True)
class EnrollmentGroup:
    name: str
    #: the trusted manufacturer CA certificates (PEM): the CA that signs the IDevIDs, optionally with its parents
    ca_pem: str
    #: SHA-256 of each CA certificate in ``ca_pem`` (DER), lower-case hex
    ca_fingerprints: tuple[str, ...]
    id_field: IdField
    profile: str
    #: days an operational certificate issued through this group is valid; None: the profile's default
    validity_days: int | None
    tags: Mapping[str, str]
    enabled: bool
    #: when non-empty, only these device ids may enroll through the group
    allow: frozenset[str]
    #: these device ids never enroll through the group
    deny: frozenset[str]
    created_at: dt.datetime
    updated_at: dt.datetime
    #: messages per second (averaged over the hub's flood window) above which a device enrolled through this group is
    #: restricted for flooding; None: the hub's default (``ingest_flood_rate``)
    flood_limit: int | None = None

    def admits(self, device_id: str) -> str | None:
        """Why ``device_id`` may not enroll through this group by its lists, or None."""
        if device_id in self.deny:
            return f"device id {device_id!r} is on the deny list of enrollment group {self.name!r}"
        if self.allow and device_id not in self.allow:
            return f"device id {device_id!r} is not on the allow list of enrollment group {self.name!r}"
        return None


class EnrollmentKind(enum.StrEnum):
    CERTIFICATE = "certificate"
    TOKEN = "token"  # noqa: S105 - a kind, not a secret


class EnrollmentStatus(enum.StrEnum):
    ACTIVE = "active"
    USED = "used"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class IndividualEnrollment:
    id: str
    device_id: str
    kind: EnrollmentKind
    status: EnrollmentStatus
    profile: str
    validity_days: int | None
    created_at: dt.datetime
    #: for ``certificate``: SHA-256 of the onboarding certificate (DER) and the certificate itself (PEM)
    certificate_fingerprint: str | None = None
    certificate_pem: str | None = None
    #: for ``token``: HMAC-SHA256 of the token (never the token) and when it stops working
    token_mac: str | None = field(default=None, repr=False)
    expires_at: dt.datetime | None = None
    used_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None

    def is_expired(self, now: dt.datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True, slots=True)
class Reonboarding:
    """An operator's permission for one more onboarding of an enrolled device (its operational identity was lost)."""

    device_id: str
    armed_at: dt.datetime
    armed_by: str
    expires_at: dt.datetime
    reason: str
