"""Provisioning use cases: manage enrollment groups and individual enrollments, and turn an onboarding identity
(IDevID certificate or one-time token) into an operational certificate, and an operational certificate into its
successor.

Flow of an enrollment: the caller (the EST endpoint) authenticates the client and works out which device it claims
to be; everything that depends on stored state (is the token unused, is the onboarding identity this device's, is
the group still enabled, is a re-onboarding armed) is decided by the :class:`_Gate` hook *inside* the issuing
transaction, so two requests racing with one token or one identity can never both win, and a refused request leaves
nothing behind but its audit record.
"""

from __future__ import annotations

import contextvars
import csv
import dataclasses
import datetime as dt
import hashlib
import io
import threading
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from warden.core import (
    DEFAULT_LIMITS,
    AlreadyExistsError,
    AuthenticationError,
    Clock,
    CSRRejectedError,
    IllegalTransitionError,
    InvalidInputError,
    IssuanceRefusedError,
    Limits,
    NotFoundError,
    Random,
    Token,
    WardenError,
    new_token,
    split_token,
    token_mac,
    validate_device_id,
    validate_group_name,
    validate_tag,
    verify_mac,
)
from warden.monitor import AuditEvent, AuditLog
from warden.pki import BACKDATE, Profile, RevocationReason, check_csr_size
from warden.provisioning._attest import (
    GroupIndex,
    certificate_fingerprint,
    load_ca_bundle,
    parse_client_certificate,
)
from warden.provisioning._est import csr_identity_mismatch
from warden.provisioning._model import (
    EnrollmentGroup,
    EnrollmentKind,
    EnrollmentStatus,
    IdField,
    IndividualEnrollment,
    Reonboarding,
)
from warden.provisioning._ports import ProvisioningTransactions, ProvisioningUnitOfWork
from warden.registry import (
    Admitted,
    CertificateRecord,
    CertificateService,
    CertificateStatus,
    Device,
    DeviceState,
    IssuedCertificate,
    IssuePlan,
    Refusal,
    RegistryUnitOfWork,
)

__all__ = [
    "CONFLICT_EVENT",
    "EnrollmentPlan",
    "EnrollmentResult",
    "ProvisioningService",
    "TrustMaterial",
    "token_fingerprint",
]

#: the audit action of a security event: an onboarding identity presented for a device it is not bound to
CONFLICT_EVENT = "onboarding-identity-conflict"
_TOKEN_PREFIX = "enr"  # noqa: S105 - the id prefix of enrollment tokens
_CSV_FIELDS = ("device_id", "display_name", "state", "tags", "groups", "enrollment", "certificate_pem")
_MAX_VALIDITY_DAYS = 825
_ONBOARDABLE = frozenset({DeviceState.PENDING, DeviceState.ACTIVE})


def _trust_version(uow: ProvisioningUnitOfWork, groups_version: str | None = None) -> str:
    """Changes whenever an enrollment group or a pinned onboarding certificate changes."""
    groups = uow.enrollment_groups.version() if groups_version is None else groups_version
    return f"{groups}/{uow.enrollments.certificates_version()}"


def token_fingerprint(device_id: str) -> str:
    """The onboarding identity of a device enrolled by token: the token enrollment for that device id (each token is
    single use, so the binding is to the enrollment channel, not to one token)."""
    return hashlib.sha256(b"warden-token-enrollment:" + device_id.encode("ascii")).hexdigest()


@dataclass(frozen=True, slots=True)
class EnrollmentResult:
    device_id: str
    issued: IssuedCertificate
    chain: tuple[x509.Certificate, ...]


class _WouldBlockError(Exception):
    """A planning step would have touched the database where the caller asked it not to."""


#: set while planning must not touch the database (see ProvisioningService.plan_with_certificate_nowait)
_NO_IO: contextvars.ContextVar[bool] = contextvars.ContextVar("warden_provisioning_no_io", default=False)


@dataclass(frozen=True, slots=True)
class EnrollmentPlan:
    """An enrollment that passed every check that needs no write: ``issue`` goes to the writer (or to
    :meth:`ProvisioningService.complete`), and :meth:`finish` turns the writer's result into the enrollment's."""

    device_id: str
    issue: IssuePlan
    chain: tuple[x509.Certificate, ...]

    def finish(self, result: IssuedCertificate | WardenError) -> EnrollmentResult:
        return EnrollmentResult(device_id=self.device_id, issued=self.issue.finish(result), chain=self.chain)


@dataclass(frozen=True, slots=True)
class TrustMaterial:
    """What the EST listener's TLS trust store must hold: enabled groups' CAs and individually enrolled onboarding
    certificates. ``version`` changes whenever either changes."""

    version: str
    pem: tuple[str, ...]


def _check_profile(profile: str) -> Profile:
    try:
        value = Profile(profile)
    except ValueError:
        raise InvalidInputError(f"unknown profile {profile[:30]!r}", hint="use 'device' or 'gateway'") from None
    if value not in (Profile.DEVICE, Profile.GATEWAY):
        raise InvalidInputError(f"profile {profile} is not for devices", hint="use 'device' or 'gateway'")
    return value


def _check_validity(days: int | None) -> int | None:
    if days is not None and not 1 <= days <= _MAX_VALIDITY_DAYS:
        raise InvalidInputError(f"a validity is 1 to {_MAX_VALIDITY_DAYS} days")
    return days


#: the highest flood limit a group may set (messages per second)
MAX_FLOOD_LIMIT = 1_000_000


def _check_flood_limit(limit: int | None) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_FLOOD_LIMIT:
        raise InvalidInputError(
            f"a flood limit is 1 to {MAX_FLOOD_LIMIT:,} messages per second", hint="or none for the hub's default"
        )


def _check_ids(ids: Iterable[str], what: str, limits: Limits) -> frozenset[str]:
    result = frozenset(ids)
    if len(result) > limits.max_id_list_entries:
        raise InvalidInputError(f"a {what} holds at most {limits.max_id_list_entries} device ids")
    for device_id in result:
        validate_device_id(device_id)
    return result


class _Gate:
    """The issuance gate of one EST request, run inside the issuing transaction (see :class:`IssueHooks`).

    It refuses with a reason a human can act on: enrollment revoked, used or expired; group disabled or its lists
    exclude the device; onboarding identity bound to another device (a security event); device enrolled already
    without an armed re-onboarding; renewal with a revoked or superseded certificate. The registry adds the device
    state (disabled, quarantined, decommissioned). Later issues add health and context here."""

    def __init__(
        self,
        *,
        device_id: str,
        actor: str,
        source: str,
        method: str,
        fingerprint: str | None = None,
        group: str | None = None,
        group_snapshot: tuple[str, EnrollmentGroup] | None = None,
        enrollment_id: str | None = None,
        token: Token | None = None,
        token_key: bytes | None = None,
        renewing_serial: int | None = None,
    ) -> None:
        self.device_id = device_id
        self.actor = actor
        self.source = source
        self.method = method
        self.fingerprint = fingerprint
        self.group = group
        #: the group as the caller found it, with the groups' version it was read at
        self.group_snapshot = group_snapshot
        self.enrollment_id = enrollment_id
        self.token = token
        self.token_key = token_key
        self.renewing_serial = renewing_serial
        self._reonboard = False
        self._bind = False

    def _details(self, **extra: object) -> dict[str, object]:
        details: dict[str, object] = {"source": self.source, "method": self.method}
        if self.group:
            details["enrollment_group"] = self.group
        if self.enrollment_id:
            details["enrollment"] = self.enrollment_id
        details.update(extra)
        return details

    def check(self, registry_uow: RegistryUnitOfWork, now: dt.datetime) -> Refusal | Admitted | None:
        uow = cast(ProvisioningUnitOfWork, registry_uow)
        if self.renewing_serial is not None:
            return self._check_renewal(uow, now)
        refusal = self._check_enrollment(uow, now) if self.enrollment_id is not None else self._check_group(uow)
        if refusal is not None:
            return refusal
        return self._check_identity(uow, now)

    def _check_renewal(self, uow: ProvisioningUnitOfWork, now: dt.datetime) -> Refusal | Admitted:
        assert self.renewing_serial is not None
        device = uow.devices.identity(self.device_id, lock=True)
        if device is not None and device[0] is not DeviceState.ACTIVE:
            return Refusal(f"device {self.device_id!r} is {device[0]}; only active devices renew", self._details())
        record = uow.certificates.get(self.renewing_serial)
        if record is None or record.device_id != self.device_id or record.fingerprint != self.fingerprint:
            return Refusal("the client certificate is not a certificate of this hub", self._details())
        if record.status is CertificateStatus.REVOKED:
            return Refusal(
                f"the client certificate was revoked ({record.revocation_reason})",
                self._details(serial=record.serial_hex),
            )
        if record.is_expired(now):
            return Refusal("the client certificate has expired", self._details(serial=record.serial_hex))
        # Only the device's newest certificate renews: once a device has rotated, an older (perhaps stolen) one can
        # never mint another certificate, though it stays valid until it expires or is revoked.
        current = uow.certificates.find(device_id=self.device_id, status=CertificateStatus.GOOD)
        if current and current[-1].serial != record.serial:
            return Refusal(
                "the client certificate has been superseded; renew with the device's newest certificate",
                self._details(serial=record.serial_hex, newest=current[-1].serial_hex),
            )
        return Admitted(device[0] if device is not None else None)

    def _check_enrollment(self, uow: ProvisioningUnitOfWork, now: dt.datetime) -> Refusal | None:
        assert self.enrollment_id is not None
        # Locked: two workers racing with one token (or one enrollment) serialise here, and the second sees it used.
        enrollment = uow.enrollments.get(self.enrollment_id, lock=True)
        if self.token is not None:
            # One generic reason for the client; the audit record says which check failed.
            generic = "the enrollment token is not valid (unknown, used, revoked or expired)"
            if enrollment is None or enrollment.kind is not EnrollmentKind.TOKEN or enrollment.token_mac is None:
                return Refusal(generic, self._details(why="unknown token"))
            assert self.token_key is not None
            if not verify_mac(self.token_key, self.token, enrollment.token_mac):
                return Refusal(generic, self._details(why="wrong secret"))
            if enrollment.status is not EnrollmentStatus.ACTIVE:
                return Refusal(generic, self._details(why=f"token {enrollment.status}"))
            if enrollment.is_expired(now):
                return Refusal(generic, self._details(why="token expired"))
            return None
        if enrollment is None or enrollment.status is not EnrollmentStatus.ACTIVE:
            return Refusal(
                f"the individual enrollment of device {self.device_id!r} was revoked",
                self._details(),
            )
        return None

    def _check_group(self, uow: ProvisioningUnitOfWork) -> Refusal | None:
        assert self.group is not None
        # The caller's copy is used while no group has changed since it was read (one counter read instead of
        # loading the group, whose allow and deny lists may hold 100,000 ids).
        group: EnrollmentGroup | None
        if self.group_snapshot is not None and self.group_snapshot[0] == uow.enrollment_groups.version():
            group = self.group_snapshot[1]
        else:
            group = uow.enrollment_groups.get(self.group)
        if group is None or not group.enabled:
            return Refusal(f"enrollment group {self.group!r} is disabled", self._details())
        assert self.fingerprint is not None
        claims = uow.enrollments.active_claims(self.device_id, self.fingerprint)
        if any(e.device_id == self.device_id for e in claims):
            # A device enrolled individually onboards only through that enrollment (its pinned certificate or its
            # token), never through a group that happens to trust a certificate naming it.
            return Refusal(
                f"device {self.device_id!r} has an individual enrollment; it onboards only through it",
                self._details(),
            )
        if claims:
            # An individual enrollment for this certificate appeared since the caller looked: it decides the
            # device id, not the group. The client retries.
            return Refusal("this onboarding certificate has just been enrolled individually; retry", self._details())
        reason = group.admits(self.device_id)
        if reason is not None:
            return Refusal(reason, self._details())
        return None

    def _check_identity(self, uow: ProvisioningUnitOfWork, now: dt.datetime) -> Refusal | Admitted:
        assert self.fingerprint is not None
        # The device row is locked first: two workers onboarding one device (with one or two identities) serialise
        # here, and the second sees what the first bound. A new device id has no row: there the unique keys of the
        # device id and the onboarding fingerprint make the second commit fail, and its retry sees the first.
        device, holder = uow.devices.identity_and_holder(self.device_id, self.fingerprint, lock=True)
        bound = device[1] if device is not None else None
        conflict: str | None = None
        if holder is not None and holder != self.device_id:
            conflict = f"this onboarding identity belongs to device {holder!r}"
        elif bound not in (None, self.fingerprint):
            conflict = f"device {self.device_id!r} is bound to another onboarding identity"
        if conflict is not None:
            event = AuditEvent(
                self.actor,
                CONFLICT_EVENT,
                f"device:{self.device_id}",
                "denied",
                self._details(
                    presented=self.fingerprint,
                    bound_to=holder if holder != self.device_id else None,
                    expected=bound,
                ),
            )
            return Refusal(conflict, self._details(security_event=CONFLICT_EVENT), (event,))
        if device is not None and device[0] not in _ONBOARDABLE:
            return Refusal(f"device {self.device_id!r} is {device[0]}", self._details())
        if bound == self.fingerprint:
            armed = uow.reonboarding.get(self.device_id)
            if armed is None or now >= armed.expires_at:
                return Refusal(
                    f"device {self.device_id!r} is enrolled already; renew with its operational certificate",
                    self._details(hint="an operator can arm a re-onboarding: warden enrollment rearm"),
                )
            self._reonboard = True
        # A device the enrollment creates carries its fingerprint already; one registered earlier gets it bound.
        self._bind = device is not None and bound is None
        return Admitted(device[0] if device is not None else None)

    def details(self) -> dict[str, object]:
        details = self._details()
        if self.renewing_serial is None:
            details["onboarding"] = self.fingerprint
        return details

    def recorded(
        self, registry_uow: RegistryUnitOfWork, record: CertificateRecord, now: dt.datetime
    ) -> list[AuditEvent]:
        uow = cast(ProvisioningUnitOfWork, registry_uow)
        target = f"device:{self.device_id}"
        if self.renewing_serial is not None:
            return []
        events: list[AuditEvent] = []
        if self.token is not None:
            assert self.enrollment_id is not None
            uow.enrollments.set_status(self.enrollment_id, EnrollmentStatus.USED, now)
        if self._bind:
            assert self.fingerprint is not None
            uow.devices.set_onboarding_fingerprint(self.device_id, self.fingerprint, now)
        if self.group is not None and (self._bind or self._reonboard):
            # A device registered before it onboarded, or onboarding again: a new device carries its group already.
            uow.devices.set_enrollment_group(self.device_id, self.group, now)
        if self._reonboard:
            uow.reonboarding.delete(self.device_id)
            revoked: list[str] = []
            for old in uow.certificates.find(device_id=self.device_id, status=CertificateStatus.GOOD):
                if old.serial == record.serial:
                    continue
                uow.certificates.revoke(old.serial, revoked_at=now, reason=str(RevocationReason.SUPERSEDED))
                revoked.append(old.serial_hex)
                events.append(
                    AuditEvent(
                        self.actor,
                        "certificate.revoke",
                        target,
                        details={"serial": old.serial_hex, "reason": str(RevocationReason.SUPERSEDED)},
                    )
                )
            events.append(
                AuditEvent(self.actor, "enrollment.reonboard", target, details=self._details(revoked=revoked))
            )
        return events


class ProvisioningService:
    def __init__(
        self,
        *,
        transactions: ProvisioningTransactions,
        certificates: CertificateService,
        audit: AuditLog,
        clock: Clock,
        random: Random,
        token_key: bytes,
        fleet_domain: str,
        chain: Sequence[x509.Certificate],
        limits: Limits = DEFAULT_LIMITS,
        token_validity: dt.timedelta = dt.timedelta(days=7),
        reonboard_window: dt.timedelta = dt.timedelta(days=7),
        cache_seconds: float = 2.0,
        anonymous_audits_per_minute: int = 10,
    ) -> None:
        self._transactions = transactions
        self._certificates = certificates
        self._audit = audit
        self._clock = clock
        self._random = random
        self._token_key = token_key
        self._fleet_domain = fleet_domain
        #: issuing CA first, then the root
        self.chain = tuple(chain)
        self._limits = limits
        self._token_validity = token_validity
        self._reonboard_window = reonboard_window
        self._cache_seconds = cache_seconds
        self._index_lock = threading.Lock()
        self._anonymous_budget = anonymous_audits_per_minute
        self._anonymous_minute = 0
        self._anonymous_audits: dict[str, int] = {}
        #: refusals of unauthenticated clients not written to the audit log (over the per-address budget)
        self.suppressed_refusals = 0
        self._index: tuple[str, tuple[GroupIndex, Mapping[str, IndividualEnrollment], str], dt.datetime] | None = None

    # -- enrollment groups --------------------------------------------------------------------------------------

    def add_group(
        self,
        name: str,
        *,
        ca_pem: bytes,
        actor: str,
        id_field: str = "cn",
        profile: str = "device",
        validity_days: int | None = None,
        tags: Mapping[str, str] | None = None,
        allow: Iterable[str] = (),
        deny: Iterable[str] = (),
        flood_limit: int | None = None,
    ) -> EnrollmentGroup:
        validate_group_name(name)
        _check_flood_limit(flood_limit)
        cas = load_ca_bundle(ca_pem, limits=self._limits)
        try:
            field = IdField(id_field)
        except ValueError:
            raise InvalidInputError(f"unknown id field {id_field[:30]!r}", hint="use 'cn' or 'serial-number'") from None
        tags = dict(tags or {})
        if len(tags) > self._limits.max_tags_per_device:
            raise InvalidInputError(f"a group sets at most {self._limits.max_tags_per_device} tags")
        for key, value in tags.items():
            validate_tag(f"{key}={value}")
        issuing = self.chain[0]
        if any(certificate_fingerprint(ca) == certificate_fingerprint(c) for ca in cas for c in self.chain):
            raise InvalidInputError(
                "an enrollment group cannot trust this hub's own CA",
                hint=f"operational certificates from {issuing.subject.rfc4514_string()} renew with simplereenroll",
            )
        now = self._clock.now()
        group = EnrollmentGroup(
            name=name,
            ca_pem="".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in cas),
            ca_fingerprints=tuple(certificate_fingerprint(c) for c in cas),
            id_field=field,
            profile=str(_check_profile(profile)),
            validity_days=_check_validity(validity_days),
            tags=tags,
            enabled=True,
            allow=_check_ids(allow, "allow list", self._limits),
            deny=_check_ids(deny, "deny list", self._limits),
            created_at=now,
            updated_at=now,
            flood_limit=flood_limit,
        )
        with self._tx() as uow:
            uow.enrollment_groups.insert(group)
            self._audit.append(
                uow,
                AuditEvent(
                    actor,
                    "enrollment-group.add",
                    f"enrollment-group:{name}",
                    details={
                        "ca": [c.subject.rfc4514_string() for c in cas],
                        "ca_fingerprints": list(group.ca_fingerprints),
                        "id_field": str(field),
                        "profile": group.profile,
                        "validity_days": validity_days,
                        "tags": tags,
                        "allow": len(group.allow),
                        "deny": len(group.deny),
                        "flood_limit": flood_limit,
                    },
                ),
            )
        self._forget_index()
        return group

    def list_groups(self) -> list[EnrollmentGroup]:
        with self._tx(readonly=True) as uow:
            return uow.enrollment_groups.find()

    def get_group(self, name: str) -> EnrollmentGroup:
        with self._tx(readonly=True) as uow:
            group = uow.enrollment_groups.get(name)
        if group is None:
            raise NotFoundError(f"no enrollment group named {name!r}", hint="see 'warden enrollment group list'")
        return group

    def set_group_enabled(self, name: str, enabled: bool, *, actor: str) -> EnrollmentGroup:
        with self._tx() as uow:
            group = uow.enrollment_groups.get(name)
            if group is None:
                raise NotFoundError(f"no enrollment group named {name!r}", hint="see 'warden enrollment group list'")
            if group.enabled == enabled:
                raise IllegalTransitionError(f"enrollment group {name!r} is {'enabled' if enabled else 'disabled'}")
            now = self._clock.now()
            uow.enrollment_groups.set_enabled(name, enabled, now)
            self._audit.append(
                uow,
                AuditEvent(
                    actor,
                    "enrollment-group.enable" if enabled else "enrollment-group.disable",
                    f"enrollment-group:{name}",
                ),
            )
        self._forget_index()
        return dataclasses.replace(group, enabled=enabled, updated_at=now)

    def set_group_flood_limit(self, name: str, limit: int | None, *, actor: str) -> EnrollmentGroup:
        """Set the flood limit (messages per second) of devices enrolled through the group; None: the hub's
        default. A running ingest applies it within 30 seconds (it reads limits again that often)."""
        _check_flood_limit(limit)
        with self._tx() as uow:
            group = uow.enrollment_groups.get(name)
            if group is None:
                raise NotFoundError(f"no enrollment group named {name!r}", hint="see 'warden enrollment group list'")
            now = self._clock.now()
            uow.enrollment_groups.set_flood_limit(name, limit, now)
            self._audit.append(
                uow,
                AuditEvent(
                    actor,
                    "enrollment-group.flood-limit",
                    f"enrollment-group:{name}",
                    details={"from": group.flood_limit, "to": limit},
                ),
            )
        self._forget_index()
        return dataclasses.replace(group, flood_limit=limit, updated_at=now)

    # -- individual enrollments ---------------------------------------------------------------------------------

    def _new_enrollment_device(self, uow: ProvisioningUnitOfWork, device_id: str, actor: str, now: dt.datetime) -> None:
        """Register the device (pending) when it is not known yet, so it shows up in the registry at once."""
        if uow.devices.get(device_id) is not None:
            return
        uow.devices.insert(
            Device(id=device_id, display_name=device_id, state=DeviceState.PENDING, created_at=now, updated_at=now)
        )
        self._audit.append(
            uow,
            AuditEvent(
                actor,
                "device.add",
                f"device:{device_id}",
                details={"groups": [], "tags": {}, "state": "pending", "reason": "individual enrollment"},
            ),
        )

    def _one_certificate(self, pem: bytes, what: str = "the onboarding certificate") -> x509.Certificate:
        """Exactly one PEM certificate, within the size limit."""
        if len(pem) > self._limits.max_pem_file_bytes:
            raise InvalidInputError(f"{what} is larger than {self._limits.max_pem_file_bytes} bytes")
        try:
            certificates = x509.load_pem_x509_certificates(pem)
        except ValueError:
            raise InvalidInputError(f"{what} is not a PEM certificate") from None
        if len(certificates) != 1:
            raise InvalidInputError(f"{what} must be exactly one certificate")
        return certificates[0]

    def _certificate_enrollment(
        self, device_id: str, certificate: x509.Certificate, now: dt.datetime, profile: str, validity_days: int | None
    ) -> IndividualEnrollment:
        return IndividualEnrollment(
            id=f"enc_{self._random.token_bytes(8).hex()}",
            device_id=device_id,
            kind=EnrollmentKind.CERTIFICATE,
            status=EnrollmentStatus.ACTIVE,
            profile=str(_check_profile(profile)),
            validity_days=_check_validity(validity_days),
            created_at=now,
            certificate_fingerprint=certificate_fingerprint(certificate),
            certificate_pem=certificate.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        )

    def _token_enrollment(
        self, device_id: str, now: dt.datetime, lifetime: dt.timedelta, profile: str, validity_days: int | None
    ) -> tuple[IndividualEnrollment, Token]:
        token = new_token(_TOKEN_PREFIX, self._random)
        enrollment = IndividualEnrollment(
            id=token.id,
            device_id=device_id,
            kind=EnrollmentKind.TOKEN,
            status=EnrollmentStatus.ACTIVE,
            profile=str(_check_profile(profile)),
            validity_days=_check_validity(validity_days),
            created_at=now,
            token_mac=token_mac(self._token_key, token),
            expires_at=now + lifetime,
        )
        return enrollment, token

    def _refuse_second_active(self, uow: ProvisioningUnitOfWork, device_id: str) -> None:
        if uow.enrollments.active_for_device(device_id):
            raise AlreadyExistsError(
                f"device {device_id!r} has an active individual enrollment already",
                hint="revoke it first with 'warden enrollment revoke'",
            )

    def add_certificate_enrollment(
        self,
        device_id: str,
        *,
        certificate_pem: bytes,
        actor: str,
        profile: str = "device",
        validity_days: int | None = None,
    ) -> IndividualEnrollment:
        """Bind ``device_id`` to one onboarding certificate (its fingerprint). The certificate is trusted for this
        device alone, self-signed or from any CA."""
        validate_device_id(device_id)
        now = self._clock.now()
        enrollment = self._certificate_enrollment(
            device_id, self._one_certificate(certificate_pem), now, profile, validity_days
        )
        fingerprint = enrollment.certificate_fingerprint
        assert fingerprint is not None
        with self._tx() as uow:
            self._refuse_second_active(uow, device_id)
            if uow.enrollments.by_certificate(fingerprint) is not None:
                raise AlreadyExistsError("this onboarding certificate is enrolled for a device already")
            holder = uow.devices.by_onboarding(fingerprint)
            if holder is not None and holder.id != device_id:
                raise AlreadyExistsError(f"this onboarding certificate is bound to device {holder.id!r}")
            self._new_enrollment_device(uow, device_id, actor, now)
            uow.enrollments.insert(enrollment)
            self._audit.append(
                uow,
                AuditEvent(
                    actor,
                    "enrollment.add",
                    f"device:{device_id}",
                    details={"enrollment": enrollment.id, "kind": "certificate", "fingerprint": fingerprint},
                ),
            )
        self._forget_index()
        return enrollment

    def add_token_enrollment(
        self,
        device_id: str,
        *,
        actor: str,
        expires_in: dt.timedelta | None = None,
        profile: str = "device",
        validity_days: int | None = None,
    ) -> tuple[IndividualEnrollment, Token]:
        """A one-time enrollment token for ``device_id``. The token is returned once and never stored."""
        validate_device_id(device_id)
        lifetime = expires_in or self._token_validity
        if not dt.timedelta(minutes=1) <= lifetime <= dt.timedelta(days=365):
            raise InvalidInputError("an enrollment token expires after 1 minute to 365 days")
        now = self._clock.now()
        enrollment, token = self._token_enrollment(device_id, now, lifetime, profile, validity_days)
        with self._tx() as uow:
            self._refuse_second_active(uow, device_id)
            self._new_enrollment_device(uow, device_id, actor, now)
            uow.enrollments.insert(enrollment)
            self._audit.append(
                uow,
                AuditEvent(
                    actor,
                    "enrollment.add",
                    f"device:{device_id}",
                    details={"enrollment": enrollment.id, "kind": "token", "expires_at": enrollment.expires_at},
                ),
            )
        return enrollment, token

    def list_enrollments(
        self,
        *,
        device_id: str | None = None,
        status: EnrollmentStatus | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[IndividualEnrollment]:
        with self._tx(readonly=True) as uow:
            return uow.enrollments.find(device_id=device_id, status=status, limit=limit, after=after)

    def get_enrollment(self, enrollment_id: str) -> IndividualEnrollment:
        with self._tx(readonly=True) as uow:
            enrollment = uow.enrollments.get(enrollment_id)
        if enrollment is None:
            raise NotFoundError(f"no enrollment {enrollment_id[:40]!r}", hint="see 'warden enrollment list'")
        return enrollment

    def revoke_enrollment(self, enrollment_id: str, *, actor: str) -> IndividualEnrollment:
        with self._tx() as uow:
            enrollment = uow.enrollments.get(enrollment_id)
            if enrollment is None:
                raise NotFoundError(f"no enrollment {enrollment_id[:40]!r}", hint="see 'warden enrollment list'")
            if enrollment.status is not EnrollmentStatus.ACTIVE:
                raise IllegalTransitionError(f"enrollment {enrollment_id} is {enrollment.status} already")
            now = self._clock.now()
            uow.enrollments.set_status(enrollment_id, EnrollmentStatus.REVOKED, now)
            self._audit.append(
                uow,
                AuditEvent(
                    actor, "enrollment.revoke", f"device:{enrollment.device_id}", details={"enrollment": enrollment_id}
                ),
            )
        self._forget_index()
        return dataclasses.replace(enrollment, status=EnrollmentStatus.REVOKED, revoked_at=now)

    def rearm(self, device_id: str, *, actor: str, reason: str = "") -> Reonboarding:
        """Allow one more onboarding of an enrolled device (lost or expired operational certificate). The next
        onboarding revokes the device's earlier certificates."""
        if len(reason) > self._limits.max_reason_chars or not reason.isprintable():
            raise InvalidInputError(f"a reason is at most {self._limits.max_reason_chars} printable characters")
        now = self._clock.now()
        entry = Reonboarding(
            device_id=device_id,
            armed_at=now,
            armed_by=actor[:128],
            expires_at=now + self._reonboard_window,
            reason=reason,
        )
        with self._tx() as uow:
            device = uow.devices.get(device_id)
            if device is None:
                raise NotFoundError(f"no device with id {device_id!r}", hint="see 'warden device list'")
            if device.onboarding_fingerprint is None:
                raise IllegalTransitionError(
                    f"device {device_id!r} has not onboarded yet; its first onboarding needs no re-arming"
                )
            if device.state is DeviceState.DECOMMISSIONED:
                raise IllegalTransitionError(f"device {device_id!r} is decommissioned")
            uow.reonboarding.put(entry)
            self._audit.append(
                uow,
                AuditEvent(
                    actor,
                    "enrollment.rearm",
                    f"device:{device_id}",
                    details={"reason": reason, "expires_at": entry.expires_at},
                ),
            )
        return entry

    def rebind(self, device_id: str, *, certificate_pem: bytes, actor: str, reason: str) -> Device:
        """Bind an enrolled device to a new onboarding certificate (after a repair that replaced its IDevID)."""
        certificate = self._one_certificate(certificate_pem)
        if not reason or len(reason) > self._limits.max_reason_chars or not reason.isprintable():
            raise InvalidInputError("re-binding needs a reason (at most 512 printable characters)")
        fingerprint = certificate_fingerprint(certificate)
        with self._tx() as uow:
            device = uow.devices.get(device_id)
            if device is None:
                raise NotFoundError(f"no device with id {device_id!r}", hint="see 'warden device list'")
            holder = uow.devices.by_onboarding(fingerprint)
            if holder is not None:
                raise AlreadyExistsError(f"this onboarding certificate is bound to device {holder.id!r} already")
            now = self._clock.now()
            uow.devices.set_onboarding_fingerprint(device_id, fingerprint, now)
            for enrollment in uow.enrollments.active_for_device(device_id):
                if enrollment.kind is EnrollmentKind.CERTIFICATE:
                    uow.enrollments.set_status(enrollment.id, EnrollmentStatus.REVOKED, now)
            self._audit.append(
                uow,
                AuditEvent(
                    actor,
                    "device.rebind-onboarding",
                    f"device:{device_id}",
                    details={"from": device.onboarding_fingerprint, "to": fingerprint, "reason": reason},
                ),
            )
            result = uow.devices.get(device_id)
        assert result is not None
        return result

    # -- the EST use cases --------------------------------------------------------------------------------------

    def _tx(self, *, readonly: bool = False) -> AbstractContextManager[ProvisioningUnitOfWork]:
        if _NO_IO.get():
            raise _WouldBlockError
        return self._transactions(readonly=readonly)

    def plan_with_certificate_nowait(
        self, client_certificate: bytes, csr: bytes, *, source: str
    ) -> EnrollmentPlan | None:
        """:meth:`plan_with_certificate` if it can be made without the database (the usual case: the trust view
        is cached and nothing is refused), else None, and the caller runs :meth:`plan_with_certificate` where it
        may block. Made for an event loop: most enrollments then cost no thread at all."""
        token = _NO_IO.set(True)
        try:
            return self.plan_with_certificate(client_certificate, csr, source=source)
        except _WouldBlockError:
            return None
        finally:
            _NO_IO.reset(token)

    def _trust_view(self) -> tuple[GroupIndex, Mapping[str, IndividualEnrollment], str]:
        """The enabled groups and the active certificate enrollments (by fingerprint), read at most every
        ``cache_seconds`` and only when their versions moved. Only used to find which device a certificate claims
        to be: the issuing transaction re-checks the group or enrollment it picked, with the row locked."""
        now = self._clock.now()
        with self._index_lock:
            cached = self._index
        if cached is not None and now < cached[2]:
            return cached[1]
        with self._tx(readonly=True) as uow:
            groups_version = uow.enrollment_groups.version()
            version = _trust_version(uow, groups_version)
            if cached is not None and cached[0] == version:
                view = cached[1]
            else:
                index = GroupIndex(uow.enrollment_groups.find(enabled=True))
                pinned = {
                    e.certificate_fingerprint: e
                    for e in uow.enrollments.find(status=EnrollmentStatus.ACTIVE)
                    if e.kind is EnrollmentKind.CERTIFICATE and e.certificate_fingerprint is not None
                }
                view = (index, pinned, groups_version)
        with self._index_lock:
            self._index = (version, view, now + dt.timedelta(seconds=self._cache_seconds))
        return view

    def _forget_index(self) -> None:
        with self._index_lock:
            self._index = None

    def forget_caches(self) -> None:
        """Drop cached enrollment groups (the server calls this when it sees the trust material change, so that a
        group another process added is used at once, not after the cache's lifetime)."""
        self._forget_index()

    def audit_refusal(
        self, *, actor: str, action: str, target: str, reason: str, source: str, authenticated: bool = True
    ) -> None:
        """Record an EST request refused before it reached the use cases (an unreadable body, a wrong media type).
        Refusals of clients nothing has authenticated yet are sampled per source address (see
        :meth:`_may_audit_anonymous`)."""
        if authenticated or self._may_audit_anonymous(source):
            self._refuse(actor, action, target, reason[:300], source=source)

    def _may_audit_anonymous(self, source: str) -> bool:
        """At most ``anonymous_audits_per_minute`` audit records a minute per source address for refusals of
        unauthenticated clients (unknown tokens, unreadable bodies sent with one): anyone can send those, and each
        would otherwise cost a durable write to the audit chain. The rest are counted in
        ``suppressed_refusals``. At most 10,000 addresses are tracked."""
        minute = int(self._clock.now().timestamp() // 60)
        with self._index_lock:
            if self._anonymous_minute != minute or len(self._anonymous_audits) > 10_000:
                self._anonymous_minute, self._anonymous_audits = minute, {}
            count = self._anonymous_audits.get(source, 0)
            if count >= self._anonymous_budget:
                self.suppressed_refusals += 1
                return False
            self._anonymous_audits[source] = count + 1
            return True

    def trust_material(self) -> TrustMaterial:
        """The CA certificates and pinned onboarding certificates the EST listener must trust, with a version."""
        with self._tx(readonly=True) as uow:
            version = _trust_version(uow)
            groups = uow.enrollment_groups.find(enabled=True)
            pinned = uow.enrollments.active_certificates()
        return TrustMaterial(version=version, pem=tuple(g.ca_pem for g in groups) + tuple(pinned))

    def trust_version(self) -> str:
        with self._tx(readonly=True) as uow:
            return _trust_version(uow)

    def _is_operational(self, certificate: x509.Certificate) -> bool:
        issuing = self.chain[0]
        if certificate.issuer != issuing.subject:
            return False
        try:
            certificate.verify_directly_issued_by(issuing)
        except Exception:  # any failure means: not ours
            return False
        return True

    def _refuse(self, actor: str, action: str, target: str, reason: str, **details: object) -> IssuanceRefusedError:
        """Audit a refusal decided before the issuing transaction, and return the error to raise."""
        with self._tx() as uow:
            self._audit.append(uow, AuditEvent(actor, action, target, "denied", {"reason": reason, **details}))
        return IssuanceRefusedError(reason, target=target)

    def _check_csr_names(self, csr: bytes, device_id: str, actor: str, action: str, source: str) -> None:
        try:
            check_csr_size(csr, limits=self._limits)
            mismatch = csr_identity_mismatch(csr, device_id, self._fleet_domain)
        except CSRRejectedError as e:
            self._refuse(actor, action, f"device:{device_id}", e.message, source=source)
            raise
        if mismatch is not None:
            raise self._refuse(actor, action, f"device:{device_id}", mismatch, source=source)

    def enroll_with_certificate(self, client_certificate: bytes, csr: bytes, *, source: str) -> EnrollmentResult:
        """``simpleenroll`` authenticated by an onboarding certificate (already verified in the TLS handshake)."""
        return self.complete(self.plan_with_certificate(client_certificate, csr, source=source))

    def enroll_with_token(self, token_text: str, csr: bytes, *, source: str) -> EnrollmentResult:
        """``simpleenroll`` authenticated by a one-time enrollment token (HTTP Basic password or Bearer)."""
        return self.complete(self.plan_with_token(token_text, csr, source=source))

    def reenroll(self, client_certificate: bytes, csr: bytes, *, source: str) -> EnrollmentResult:
        """``simplereenroll``: renewal authenticated by the device's current operational certificate."""
        return self.complete(self.plan_reenroll(client_certificate, csr, source=source))

    def complete(self, plan: EnrollmentPlan) -> EnrollmentResult:
        """Record ``plan`` through the writer, waiting for its commit."""
        return EnrollmentResult(
            device_id=plan.device_id, issued=self._certificates.complete(plan.issue), chain=plan.chain
        )

    def plan_with_certificate(self, client_certificate: bytes, csr: bytes, *, source: str) -> EnrollmentPlan:
        """:meth:`enroll_with_certificate` up to the write: every refusal that needs no issuing transaction is
        raised (and audited) here."""
        action = "enrollment.enroll"
        onboarding = parse_client_certificate(client_certificate)
        now = self._clock.now()
        anonymous = f"onboarding:{onboarding.fingerprint[:16]}"
        if self._is_operational(onboarding.certificate):
            raise self._refuse(
                anonymous,
                action,
                "est:simpleenroll",
                "an operational certificate renews with simplereenroll",
                source=source,
            )
        if not onboarding.is_current(now):
            raise self._refuse(
                anonymous, action, "est:simpleenroll", "the onboarding certificate is not valid now", source=source
            )
        _, pinned, groups_version = self._trust_view()
        enrollment = pinned.get(onboarding.fingerprint)
        group: EnrollmentGroup | None = None
        if enrollment is not None:
            device_id = enrollment.device_id
            profile, validity_days = enrollment.profile, enrollment.validity_days
        else:
            groups = self._trust_view()[0].match(onboarding.certificate)
            if not groups:
                raise self._refuse(
                    anonymous,
                    action,
                    "est:simpleenroll",
                    "no enrollment group or individual enrollment trusts this onboarding certificate",
                    source=source,
                    issuer=onboarding.certificate.issuer.rfc4514_string()[:200],
                )
            # Several groups may trust one CA: the first (by name) whose id field and lists admit the device.
            group, device_id, problem = None, "", ""
            for candidate in groups:
                try:
                    candidate_id = onboarding.device_id(candidate.id_field)
                except InvalidInputError as e:
                    problem = problem or e.message
                    continue
                if group is None or (candidate.admits(candidate_id) is None and group.admits(device_id) is not None):
                    group, device_id = candidate, candidate_id
            if group is None:
                raise self._refuse(anonymous, action, "est:simpleenroll", problem, source=source, group=groups[0].name)
            profile, validity_days = group.profile, group.validity_days
        actor = f"device:{device_id}"
        self._check_csr_names(csr, device_id, actor, action, source)
        gate = _Gate(
            device_id=device_id,
            actor=actor,
            source=source,
            method="certificate",
            fingerprint=onboarding.fingerprint,
            group=group.name if group is not None else None,
            group_snapshot=(groups_version, group) if group is not None else None,
            enrollment_id=enrollment.id if enrollment is not None else None,
        )
        new_device = Device(
            id=device_id,
            display_name=device_id,
            state=DeviceState.PENDING,
            created_at=now,
            updated_at=now,
            tags=dict(group.tags) if group is not None else {},
            onboarding_fingerprint=onboarding.fingerprint,
            enrollment_group=group.name if group is not None else None,
        )
        return self._plan(device_id, csr, actor, action, profile, validity_days, gate, new_device)

    def plan_with_token(self, token_text: str, csr: bytes, *, source: str) -> EnrollmentPlan:
        """:meth:`enroll_with_token` up to the write."""
        action = "enrollment.enroll"
        token = split_token(token_text, prefix=_TOKEN_PREFIX)
        with self._tx(readonly=True) as uow:
            enrollment = uow.enrollments.get(token.id)
        if (
            enrollment is None
            or enrollment.token_mac is None
            or not verify_mac(self._token_key, token, enrollment.token_mac)
        ):
            # Not audited with the device's name: the token proves nothing. The refusal is audited with the token
            # id only (the secret is never written anywhere), sampled per source address: anyone can send these.
            if self._may_audit_anonymous(source):
                self._refuse(
                    f"token:{token.id}", action, "est:simpleenroll", "unknown or wrong enrollment token", source=source
                )
            raise AuthenticationError("the enrollment token is not valid")
        device_id = enrollment.device_id
        actor = f"device:{device_id}"
        self._check_csr_names(csr, device_id, actor, action, source)
        gate = _Gate(
            device_id=device_id,
            actor=actor,
            source=source,
            method="token",
            fingerprint=token_fingerprint(device_id),
            enrollment_id=enrollment.id,
            token=token,
            token_key=self._token_key,
        )
        return self._plan(device_id, csr, actor, action, enrollment.profile, enrollment.validity_days, gate, None)

    def plan_reenroll(self, client_certificate: bytes, csr: bytes, *, source: str) -> EnrollmentPlan:
        """:meth:`reenroll` up to the write."""
        action = "enrollment.reenroll"
        current = parse_client_certificate(client_certificate)
        anonymous = f"certificate:{current.fingerprint[:16]}"
        if not self._is_operational(current.certificate):
            raise self._refuse(
                anonymous,
                action,
                "est:simplereenroll",
                "renewal needs an operational certificate of this hub; onboard with simpleenroll",
                source=source,
            )
        with self._tx(readonly=True) as uow:
            record = uow.certificates.get(current.certificate.serial_number)
        if record is None or record.device_id is None or record.fingerprint != current.fingerprint:
            raise self._refuse(
                anonymous,
                action,
                "est:simplereenroll",
                "the client certificate is not a device certificate",
                source=source,
            )
        device_id = record.device_id
        actor = f"device:{device_id}"
        self._check_csr_names(csr, device_id, actor, action, source)
        gate = _Gate(
            device_id=device_id,
            actor=actor,
            source=source,
            method="renewal",
            fingerprint=current.fingerprint,
            renewing_serial=record.serial,
        )
        lifetime = record.not_after - record.not_before - BACKDATE
        validity_days = max(1, round(lifetime / dt.timedelta(days=1)))
        return self._plan(device_id, csr, actor, action, record.profile, validity_days, gate, None, renew=True)

    def _plan(
        self,
        device_id: str,
        csr: bytes,
        actor: str,
        action: str,
        profile: str,
        validity_days: int | None,
        gate: _Gate,
        new_device: Device | None,
        *,
        renew: bool = False,
    ) -> EnrollmentPlan:
        issue = self._certificates.plan_enroll(
            device_id=device_id,
            csr=csr,
            actor=actor,
            action=action,
            profile=Profile(profile),
            validity=dt.timedelta(days=validity_days) if validity_days else None,
            renew=renew,
            # A re-enrollment supersedes the certificate it was authenticated with: revoked, so that a copy of the
            # old key is worth nothing (the agent reconnects with the new certificate at once).
            revoke_superseded=renew,
            new_device=new_device,
            hooks=gate,
        )
        return EnrollmentPlan(device_id=device_id, issue=issue, chain=self.chain)

    # -- bulk import and export ---------------------------------------------------------------------------------

    def export_csv(self) -> str:
        """Every device with its state, tags, groups and active individual enrollment (certificate PEM for
        certificate enrollments; tokens are never exported)."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=_CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        with self._tx(readonly=True) as uow:
            after: str | None = None
            while True:
                page = uow.devices.find(limit=1000, after=after)
                if not page:
                    break
                for device in page:
                    enrollments = uow.enrollments.active_for_device(device.id)
                    enrollment = enrollments[0] if enrollments else None
                    writer.writerow(
                        {
                            "device_id": device.id,
                            "display_name": device.display_name,
                            "state": str(device.state),
                            "tags": ";".join(f"{k}={v}" for k, v in sorted(device.tags.items())),
                            "groups": ";".join(device.groups),
                            "enrollment": str(enrollment.kind) if enrollment is not None else "",
                            "certificate_pem": (enrollment.certificate_pem or "") if enrollment is not None else "",
                        }
                    )
                after = page[-1].id
        return out.getvalue()

    def import_csv(self, data: bytes, *, actor: str) -> tuple[int, list[tuple[str, Token]]]:
        """Register the devices of a CSV (columns as :meth:`export_csv` writes them; ``device_id`` required, the
        rest optional) with their certificate enrollments; ``enrollment=token`` rows get a new one-time token.
        Every row is checked first: one bad row refuses the whole file and nothing is written."""
        if len(data) > self._limits.max_csv_bytes:
            raise InvalidInputError(f"the CSV file is larger than {self._limits.max_csv_bytes} bytes")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InvalidInputError("the CSV file is not UTF-8") from None
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or "device_id" not in reader.fieldnames:
            raise InvalidInputError("the CSV file needs a header row with a device_id column")
        unknown = set(reader.fieldnames) - set(_CSV_FIELDS)
        if unknown:
            raise InvalidInputError(
                f"unknown CSV column {sorted(unknown)[0][:40]!r}", hint=f"columns: {', '.join(_CSV_FIELDS)}"
            )
        now = self._clock.now()
        devices: list[Device] = []
        certificate_rows: list[IndividualEnrollment] = []
        token_rows: list[str] = []
        seen: set[str] = set()
        try:
            rows = list(reader)
        except csv.Error as e:
            raise InvalidInputError(f"the CSV file is malformed: {e}") from None
        if len(rows) > self._limits.max_csv_rows:
            raise InvalidInputError(f"a CSV import holds at most {self._limits.max_csv_rows} rows")
        for number, row in enumerate(rows, start=2):
            try:
                device, enrollment, wants_token = self._parse_row(row, now)
            except InvalidInputError as e:
                raise InvalidInputError(f"line {number}: {e.message}", hint=e.hint) from None
            if device.id in seen:
                raise InvalidInputError(f"line {number}: device {device.id!r} appears twice")
            seen.add(device.id)
            devices.append(device)
            if enrollment is not None:
                certificate_rows.append(enrollment)
            if wants_token:
                token_rows.append(device.id)
        tokens: list[tuple[str, Token]] = []
        with self._tx() as uow:
            existing = [d.id for d in devices if uow.devices.get(d.id) is not None]
            if existing:
                raise AlreadyExistsError(
                    f"device {existing[0]!r} exists already", hint="the import adds new devices only"
                )
            missing = {g for d in devices for g in d.groups} - uow.groups.existing(
                {g for d in devices for g in d.groups}
            )
            if missing:
                raise NotFoundError(f"no group named {sorted(missing)[0]!r}", hint="create it with 'warden group add'")
            fingerprints: set[str] = set()
            for enrollment in certificate_rows:
                assert enrollment.certificate_fingerprint is not None
                if (
                    enrollment.certificate_fingerprint in fingerprints
                    or uow.enrollments.by_certificate(enrollment.certificate_fingerprint)
                    or uow.devices.by_onboarding(enrollment.certificate_fingerprint)
                ):
                    raise AlreadyExistsError(
                        f"the onboarding certificate of {enrollment.device_id!r} is enrolled already"
                    )
                fingerprints.add(enrollment.certificate_fingerprint)
            events: list[AuditEvent] = []
            for device in devices:
                uow.devices.insert(device)
                events.append(
                    AuditEvent(
                        actor,
                        "device.add",
                        f"device:{device.id}",
                        details={
                            "groups": list(device.groups),
                            "tags": dict(device.tags),
                            "state": "pending",
                            "reason": "import",
                        },
                    )
                )
            for enrollment in certificate_rows:
                uow.enrollments.insert(enrollment)
                events.append(
                    AuditEvent(
                        actor,
                        "enrollment.add",
                        f"device:{enrollment.device_id}",
                        details={
                            "enrollment": enrollment.id,
                            "kind": "certificate",
                            "fingerprint": enrollment.certificate_fingerprint,
                        },
                    )
                )
            for device_id in token_rows:
                enrollment, token = self._token_enrollment(
                    device_id, now, self._token_validity, str(Profile.DEVICE), None
                )
                uow.enrollments.insert(enrollment)
                events.append(
                    AuditEvent(
                        actor,
                        "enrollment.add",
                        f"device:{device_id}",
                        details={"enrollment": token.id, "kind": "token"},
                    )
                )
                tokens.append((device_id, token))
            self._audit.append(uow, *events)
        return len(devices), tokens

    def _parse_row(
        self, row: Mapping[str, str | None], now: dt.datetime
    ) -> tuple[Device, IndividualEnrollment | None, bool]:
        def cell(name: str) -> str:
            value = row.get(name)
            return (value or "").strip() if isinstance(value, str) else ""

        device_id = cell("device_id")
        validate_device_id(device_id)
        display_name = cell("display_name") or device_id
        if len(display_name) > self._limits.max_display_name_chars or not display_name.isprintable():
            raise InvalidInputError("the display name is too long or not printable")
        if cell("state") not in ("", *(str(s) for s in DeviceState)):
            raise InvalidInputError(f"unknown state {cell('state')[:20]!r}")
        # Whatever state an export recorded, an imported device starts pending: it must onboard on this hub.
        tags: dict[str, str] = {}
        for pair in filter(None, cell("tags").split(";")):
            key, value = validate_tag(pair)
            tags[key] = value
        if len(tags) > self._limits.max_tags_per_device:
            raise InvalidInputError(f"a device has at most {self._limits.max_tags_per_device} tags")
        groups = tuple(dict.fromkeys(filter(None, cell("groups").split(";"))))
        if len(groups) > self._limits.max_groups_per_device:
            raise InvalidInputError(f"a device belongs to at most {self._limits.max_groups_per_device} groups")
        for group in groups:
            validate_group_name(group)
        device = Device(
            id=device_id,
            display_name=display_name,
            state=DeviceState.PENDING,
            created_at=now,
            updated_at=now,
            tags=tags,
            groups=groups,
        )
        kind = cell("enrollment")
        if kind == "":
            return device, None, False
        if kind == "token":
            return device, None, True
        if kind != "certificate":
            raise InvalidInputError(f"unknown enrollment kind {kind[:20]!r}", hint="use certificate, token or nothing")
        certificate = self._one_certificate(
            cell("certificate_pem").encode("ascii", errors="replace"), "certificate_pem"
        )
        return device, self._certificate_enrollment(device_id, certificate, now, str(Profile.DEVICE), None), False
