"""Certificate use cases: issue from a CSR, renew, revoke, publish the CRL, answer OCSP.

Flow of an issuance: the caller's thread validates what is cheap (device id, profile, CSR size) and hands the
request to a :class:`Writer`. In one write transaction the writer verifies the CSR, checks the device may get a
certificate (refusals are audited), signs, and records the certificate and its audit records; the caller gets the
certificate only after that transaction has committed. The writer runs one transaction per call, or a group
commit that verifies, signs and records every request queued meanwhile in one transaction (docs/adr/0003).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from warden.core import (
    DEFAULT_LIMITS,
    RESERVED_DEVICE_IDS,
    Clock,
    CSRRejectedError,
    IllegalTransitionError,
    InvalidInputError,
    IssuanceRefusedError,
    Limits,
    NotFoundError,
    Random,
    WardenError,
)
from warden.monitor import AuditEvent, AuditLog
from warden.pki import (
    BACKDATE,
    CertificateAuthority,
    CertificateSigningRequest,
    IssuedIdentity,
    OCSPAnswer,
    OCSPResponder,
    Profile,
    RevocationReason,
    RevokedEntry,
    build_crl,
    check_csr_size,
    key_csr,
    new_serial,
    parse_csr,
    parse_ocsp_request,
)
from warden.pki import CertificateStatus as OCSPStatus
from warden.registry._model import CertificateRecord, CertificateStatus, Device, DeviceState, PublishedCrl
from warden.registry._ports import CAProvider, RegistryUnitOfWork, Transactions, Writer

__all__ = [
    "CertificateService",
    "IssuancePolicy",
    "IssueHooks",
    "IssuedCertificate",
    "Refusal",
    "parse_reason",
]

#: how long an OCSP responder is used before its signer certificate is checked again
_RESPONDER_RECHECK = dt.timedelta(minutes=1)
_ISSUABLE = frozenset({DeviceState.PENDING, DeviceState.ACTIVE})
_DEVICE_PROFILES = frozenset({Profile.DEVICE, Profile.GATEWAY})
_SERVICE_PROFILES = frozenset({Profile.SERVICE, Profile.HUB_CLIENT, Profile.COMMAND_SIGNER})


@dataclass(frozen=True, slots=True)
class IssuancePolicy:
    fleet_domain: str
    validity: Mapping[Profile, dt.timedelta]
    allow_same_key_renewal: bool = False
    crl_validity: dt.timedelta = dt.timedelta(days=7)
    ocsp_validity: dt.timedelta = dt.timedelta(hours=1)
    limits: Limits = field(default=DEFAULT_LIMITS)


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    record: CertificateRecord
    certificate: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an issuance hook refuses a request, and the audit events the refusal raises besides the denial itself."""

    reason: str
    details: Mapping[str, object] = field(default_factory=dict)
    events: tuple[AuditEvent, ...] = ()


@dataclass(frozen=True, slots=True)
class Admitted:
    """A hook's check let the request through, having read the device's state with its row locked (``None``: no
    such device yet): the registry takes it from here instead of reading it again."""

    state: DeviceState | None


class IssueHooks(Protocol):
    """Work another context does inside the issuing transaction (provisioning: tokens, onboarding identities).

    ``check`` runs before the device's state is checked and may refuse (:class:`Refusal`); it lets the request
    through with ``None`` or, when it read the device's state with the row locked, with :class:`Admitted`.
    ``recorded`` runs once the certificate is signed and returns the audit events of what it changed. Both see
    every earlier request of the same batch."""

    def check(self, uow: RegistryUnitOfWork, now: dt.datetime) -> Refusal | Admitted | None: ...
    def details(self) -> Mapping[str, object]:
        """Added to the audit record of the issuance (how the request was authenticated, from where)."""
        ...

    def recorded(self, uow: RegistryUnitOfWork, record: CertificateRecord, now: dt.datetime) -> list[AuditEvent]: ...


@dataclass(frozen=True, slots=True)
class _PendingIssue:
    """A request waiting to be verified, checked, signed and recorded."""

    csr: bytes
    profile: Profile
    identity: IssuedIdentity
    device_id: str | None
    actor: str
    action: str
    renew: bool
    revoke_superseded: bool
    validity: dt.timedelta | None = None
    #: registered (as pending) in the issuing transaction when it does not exist yet, and only if issuance succeeds
    new_device: Device | None = None
    hooks: IssueHooks | None = None


@dataclass(frozen=True, slots=True)
class IssuePlan:
    """An issuance ready for the writer: ``fn`` records ``item`` (in a batch, see :class:`Writer`), and
    :meth:`finish` turns what it returned for the item into the certificate, or raises the refusal. Built by
    :meth:`CertificateService.plan_enroll` for callers that hand it to the writer themselves (the hub's event
    loop, which must not block on it); :meth:`CertificateService.complete` does it for everyone else."""

    fn: Callable[[RegistryUnitOfWork, Sequence[_PendingIssue]], list[IssuedCertificate | WardenError]]
    item: _PendingIssue

    @staticmethod
    def finish(result: IssuedCertificate | WardenError) -> IssuedCertificate:
        if isinstance(result, WardenError):
            raise result
        return result


def _issue_details(
    item: _PendingIssue, request: CertificateSigningRequest, record: CertificateRecord
) -> dict[str, object]:
    details: dict[str, object] = {
        "serial": record.serial_hex,
        "profile": str(item.profile),
        "key": request.key_description,
        "not_after": record.not_after.isoformat(),
        "fingerprint": record.fingerprint,
    }
    if request.ignored_requests:
        details["ignored_from_csr"] = list(request.ignored_requests)
    return details


def parse_reason(text: str) -> RevocationReason:
    """Accept RFC 5280 reason names in any case, with or without '-' or '_' (key-compromise, keyCompromise)."""
    wanted = text.replace("-", "").replace("_", "").lower()
    if wanted in ("certificatehold", "removefromcrl"):
        raise InvalidInputError(
            f"revocation reason {text!r} is not supported",
            hint="certificate holds are not used: disable the device instead ('warden device disable')",
        )
    for reason in RevocationReason:
        if reason.value.lower() == wanted:
            return reason
    choices = ", ".join(r.value for r in RevocationReason)
    raise InvalidInputError(f"unknown revocation reason {text[:40]!r}", hint=f"use one of: {choices}")


def _fingerprint(certificate: x509.Certificate) -> str:
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


class CertificateService:
    def __init__(
        self,
        *,
        transactions: Transactions,
        writer: Writer,
        audit: AuditLog,
        ca: CAProvider,
        policy: IssuancePolicy,
        clock: Clock,
        random: Random,
    ) -> None:
        self._tx = transactions
        self._write = writer
        self._audit = audit
        self._ca = ca
        self._policy = policy
        self._clock = clock
        self._random = random
        self._responder: tuple[OCSPResponder, dt.datetime] | None = None

    # -- issuance -----------------------------------------------------------------------------------------------

    def sign(self, *, device_id: str, csr: bytes, actor: str, profile: Profile = Profile.DEVICE) -> IssuedCertificate:
        """First (or another) certificate for a ``pending`` or ``active`` device; a pending device becomes active.

        The CSR is verified first; the device's state is checked, the certificate signed and recorded in one
        write transaction, so a device disabled a moment earlier never gets a certificate. A refusal is audited.
        """
        if profile not in _DEVICE_PROFILES:
            raise InvalidInputError(
                f"profile {profile} is not for devices", hint="use 'device' or 'gateway' with --device"
            )
        identity = IssuedIdentity.for_device(device_id, self._policy.fleet_domain)
        return self.complete(self._plan(csr, profile, identity, actor, device_id=device_id, action="certificate.issue"))

    def renew(self, *, device_id: str, csr: bytes, actor: str, revoke_superseded: bool = False) -> IssuedCertificate:
        """A new certificate for an ``active`` device that has had one, from a new CSR (a new key by default)."""
        identity = IssuedIdentity.for_device(device_id, self._policy.fleet_domain)
        with self._tx(readonly=True) as uow:
            previous = uow.certificates.find(device_id=device_id)
        # The renewed certificate keeps the profile of the device's newest one; the writing transaction re-checks
        # state and key reuse.
        profile = Profile(previous[-1].profile) if previous else Profile.DEVICE
        return self.complete(
            self._plan(
                csr,
                profile,
                identity,
                actor,
                device_id=device_id,
                action="certificate.renew",
                renew=True,
                revoke_superseded=revoke_superseded,
            )
        )

    def issue_service(
        self, *, names: tuple[str, ...], csr: bytes, actor: str, profile: Profile = Profile.SERVICE
    ) -> IssuedCertificate:
        """A certificate for the hub's or the broker's own TLS endpoints (``service``) or the hub's client identity
        (``hub-client``). Their names contain a dot, so they can never be taken for a device id."""
        if profile not in _SERVICE_PROFILES:
            raise InvalidInputError(f"profile {profile} is not for services", hint="use 'service' or 'hub-client'")
        identity = IssuedIdentity.for_service(names)
        suffix = f".{self._policy.fleet_domain}"
        for name in identity.dns_names:
            label = name.removesuffix(suffix)
            if name.endswith(suffix) and "." not in label and label not in RESERVED_DEVICE_IDS:
                # <label>.<fleet-domain> is the name a device with that id has, or will have.
                raise InvalidInputError(
                    f"{name!r} is a device's name",
                    hint=f"service names under {self._policy.fleet_domain} use a "
                    "reserved label (hub, broker, mqtt, ...) or another domain",
                )
        return self.complete(self._plan(csr, profile, identity, actor, device_id=None, action="certificate.issue"))

    def complete(self, plan: IssuePlan) -> IssuedCertificate:
        """Record ``plan`` through the writer (waiting for its commit) and return the certificate."""
        return plan.finish(self._write(plan.fn, plan.item))

    def plan_enroll(
        self,
        *,
        device_id: str,
        csr: bytes,
        actor: str,
        action: str,
        profile: Profile = Profile.DEVICE,
        validity: dt.timedelta | None = None,
        renew: bool = False,
        revoke_superseded: bool = False,
        new_device: Device | None = None,
        hooks: IssueHooks | None = None,
    ) -> IssuePlan:
        """Issuance on behalf of another context's use case (EST enrollment and re-enrollment), up to the point
        where the request goes to the writer (:meth:`complete`): ``hooks`` run in the issuing transaction,
        ``new_device`` is registered there if it does not exist, and ``validity`` overrides the profile's default
        (it is capped by the profile's maximum in the PKI). ``revoke_superseded``: a renewal revokes the device's
        earlier good certificates (reason superseded)."""
        if profile not in _DEVICE_PROFILES:
            raise InvalidInputError(f"profile {profile} is not for devices", hint="use 'device' or 'gateway'")
        if new_device is not None and new_device.id != device_id:
            raise ValueError("new_device must carry device_id")
        identity = IssuedIdentity.for_device(device_id, self._policy.fleet_domain)
        return self._plan(
            csr,
            profile,
            identity,
            actor,
            device_id=device_id,
            action=action,
            renew=renew,
            revoke_superseded=revoke_superseded,
            validity=validity,
            new_device=new_device,
            hooks=hooks,
        )

    def _plan(
        self,
        csr: bytes,
        profile: Profile,
        identity: IssuedIdentity,
        actor: str,
        *,
        device_id: str | None,
        action: str,
        renew: bool = False,
        revoke_superseded: bool = False,
        validity: dt.timedelta | None = None,
        new_device: Device | None = None,
        hooks: IssueHooks | None = None,
    ) -> IssuePlan:
        # An oversized request never reaches the writer's queue.
        check_csr_size(csr, limits=self._policy.limits)
        pending = _PendingIssue(
            csr=csr,
            profile=profile,
            identity=identity,
            device_id=device_id,
            actor=actor,
            action=action,
            renew=renew,
            revoke_superseded=revoke_superseded,
            validity=validity,
            new_device=new_device,
            hooks=hooks,
        )
        return IssuePlan(self._issue_batch, pending)

    def _issue_batch(
        self, uow: RegistryUnitOfWork, batch: Sequence[_PendingIssue]
    ) -> list[IssuedCertificate | WardenError]:
        """Verify, check, sign and record a batch of requests in one transaction: one state query, one insert of
        certificates, one audit append. A CSR that does not verify is refused before anything else happens; a
        request whose device may not have a certificate is refused before anything is signed, and audited.

        CSR verification and signing happen here, in the writer, rather than in the callers' threads: both hold
        the GIL, and callers doing them while one thread commits starve the committer, which must win the GIL back
        after every database call. One thread doing all of it keeps group commit's batches flowing (ADR 0003)."""
        authority = self._ca.authority()
        now = self._clock.now()
        requests: list[CertificateSigningRequest | CSRRejectedError] = []
        for item in batch:
            try:
                requests.append(parse_csr(item.csr, limits=self._policy.limits))
            except CSRRejectedError as e:
                requests.append(e)
        # A request with hooks reads its device's state itself, with the row locked (see below).
        states = uow.devices.states({p.device_id for p in batch if p.device_id is not None and p.hooks is None})
        key_uses = uow.certificates.key_uses(
            {r.key_fingerprint for r in requests if isinstance(r, CertificateSigningRequest)}
        )
        results: list[IssuedCertificate | WardenError] = []
        records: list[CertificateRecord] = []
        events: list[AuditEvent] = []
        activated: list[str] = []
        for item, request in zip(batch, requests, strict=True):
            device_id = item.device_id
            target = f"device:{device_id}" if device_id else f"service:{item.identity.common_name}"
            if isinstance(request, CSRRejectedError):
                events.append(AuditEvent(item.actor, item.action, target, "denied", {"reason": request.message}))
                results.append(request)
                continue
            if item.renew and records:
                # A renewal looks at the device's certificates: those signed earlier in this batch must be there.
                uow.certificates.insert_many(records)
                records = []
            admitted: Admitted | None = None
            if item.hooks is not None:
                hook_refusal = item.hooks.check(uow, now)
                if isinstance(hook_refusal, Admitted):
                    admitted, hook_refusal = hook_refusal, None
                if hook_refusal is not None:
                    events.extend(hook_refusal.events)
                    details = {"reason": hook_refusal.reason, **hook_refusal.details}
                    events.append(AuditEvent(item.actor, item.action, target, "denied", details))
                    results.append(IssuanceRefusedError(hook_refusal.reason, target=target))
                    continue
            state = states.get(device_id) if device_id is not None else None
            if admitted is not None:
                state = admitted.state
            elif item.hooks is not None and device_id is not None:
                # The hook locked the device's row: its state is read again now, not taken from the batch's start.
                current = uow.devices.identity(device_id)
                state = current[0] if current is not None else None
            create = item.new_device is not None and state is None
            if create:
                state = DeviceState.PENDING
            if device_id is not None:
                if state is None:
                    results.append(
                        NotFoundError(f"no device with id {device_id!r}", hint="add it with 'warden device add'")
                    )
                    continue
                refusal = self._device_refusal(uow, device_id, state, renew=item.renew)
                if refusal is not None:
                    events.append(AuditEvent(item.actor, item.action, target, "denied", {"reason": refusal}))
                    results.append(IssuanceRefusedError(refusal, device=device_id, state=str(state)))
                    continue
            uses = key_uses.setdefault(request.key_fingerprint, [])
            refusal = self._key_refusal(target, uses)
            if refusal is not None:
                events.append(AuditEvent(item.actor, item.action, target, "denied", {"reason": refusal}))
                results.append(IssuanceRefusedError(refusal, target=target))
                continue
            issued = self._sign(authority, item, request, now)
            # Later requests in the same batch see this certificate's key as in use.
            uses.append((target, CertificateStatus.GOOD))
            if create:
                # Registered active at once: it has its first certificate in this very transaction.
                assert item.new_device is not None
                # This transaction found no such device: the insert skips its own look (the primary key still
                # refuses a device another worker added meanwhile, and the batch's retry reports it).
                uow.devices.insert(dataclasses.replace(item.new_device, state=DeviceState.ACTIVE), known_absent=True)
                states[item.new_device.id] = state = DeviceState.ACTIVE
                events.append(
                    AuditEvent(
                        item.actor,
                        "device.add",
                        target,
                        details={
                            "groups": list(item.new_device.groups),
                            "tags": dict(item.new_device.tags),
                            "state": "active",
                            "reason": "enrollment",
                        },
                    )
                )
            records.append(issued.record)
            details = _issue_details(item, request, issued.record)
            if item.hooks is not None:
                details.update(item.hooks.details())
            events.append(AuditEvent(item.actor, item.action, target, details=details))
            if item.hooks is not None:
                if any(r.device_id == device_id for r in records[:-1]):
                    # The hook may act on the device's certificates (a re-onboarding revokes them): those signed
                    # earlier in this batch must be there.
                    uow.certificates.insert_many(records)
                    records = []
                events.extend(item.hooks.recorded(uow, issued.record, now))
            results.append(issued)
            if device_id is None:
                continue
            if item.renew and item.revoke_superseded:
                for old in uow.certificates.find(device_id=device_id, status=CertificateStatus.GOOD):
                    uow.certificates.revoke(old.serial, revoked_at=now, reason=str(RevocationReason.SUPERSEDED))
                    events.append(
                        AuditEvent(
                            item.actor,
                            "certificate.revoke",
                            target,
                            details={"serial": old.serial_hex, "reason": str(RevocationReason.SUPERSEDED)},
                        )
                    )
            if state is DeviceState.PENDING:
                states[device_id] = DeviceState.ACTIVE
                activated.append(device_id)
                events.append(
                    AuditEvent(
                        item.actor,
                        "device.state",
                        target,
                        details={"from": "pending", "to": "active", "reason": "first certificate"},
                    )
                )
        uow.certificates.insert_many(records)
        if activated:
            uow.devices.set_states(activated, DeviceState.ACTIVE, now)
        self._audit.append(uow, *events)
        return results

    def _sign(
        self, authority: CertificateAuthority, item: _PendingIssue, request: CertificateSigningRequest, now: dt.datetime
    ) -> IssuedCertificate:
        certificate = authority.issue(
            csr=request,
            profile=item.profile,
            identity=item.identity,
            serial=new_serial(self._random.token_bytes(16)),
            now=now,
            validity=item.validity or self._policy.validity[item.profile],
        )
        record = CertificateRecord(
            serial=certificate.serial_number,
            device_id=item.device_id,
            common_name=item.identity.common_name,
            profile=str(item.profile),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            fingerprint=_fingerprint(certificate),
            key_fingerprint=request.key_fingerprint,
            status=CertificateStatus.GOOD,
            issued_at=now,
            pem=certificate.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        )
        return IssuedCertificate(record=record, certificate=certificate)

    def _device_refusal(
        self, uow: RegistryUnitOfWork, device_id: str, state: DeviceState, *, renew: bool
    ) -> str | None:
        """Why ``device_id`` may not get a certificate in its current state, or None."""
        if renew:
            if state is not DeviceState.ACTIVE:
                return f"device {device_id!r} is {state}; only active devices renew"
            if not uow.certificates.find(device_id=device_id):
                return f"device {device_id!r} has no certificate to renew; use 'warden cert sign'"
        elif state not in _ISSUABLE:
            return f"device {device_id!r} is {state}; certificates are issued to pending and active devices"
        return None

    def _key_refusal(self, owner: str, uses: Sequence[tuple[str, CertificateStatus]]) -> str | None:
        """Why the CSR's key may not be certified for ``owner``, given every certificate already issued for it:
        never a key of a revoked certificate, never a key certified for another device or service, and the
        owner's current key only where same-key renewal is allowed."""
        for holder, status in uses:
            if status is CertificateStatus.REVOKED:
                return "the CSR's key belongs to a revoked certificate; generate a new key"
            if holder != owner:
                return "the CSR's key is already certified for another device or service; generate a new key"
        if uses and not self._policy.allow_same_key_renewal:
            return "the CSR reuses the current key; a new certificate requires a new key (re-key)"
        return None

    # -- queries ------------------------------------------------------------------------------------------------

    def find(self, *, device_id: str | None = None, status: CertificateStatus | None = None) -> list[CertificateRecord]:
        with self._tx(readonly=True) as uow:
            return uow.certificates.find(device_id=device_id, status=status)

    def page(
        self,
        *,
        device_id: str | None = None,
        status: CertificateStatus | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[CertificateRecord]:
        with self._tx(readonly=True) as uow:
            return uow.certificates.page(device_id=device_id, status=status, limit=limit, after=after)

    def get(self, serial: int) -> CertificateRecord:
        with self._tx(readonly=True) as uow:
            record = uow.certificates.get(serial)
        if record is None:
            raise NotFoundError(f"no certificate with serial {serial:X}", hint="see 'warden cert list'")
        return record

    # -- revocation ---------------------------------------------------------------------------------------------

    def revoke(self, serial: int, *, reason: RevocationReason, actor: str) -> CertificateRecord:
        with self._tx() as uow:
            record = uow.certificates.get(serial)
            if record is None:
                raise NotFoundError(f"no certificate with serial {serial:X}", hint="see 'warden cert list'")
            if record.status is CertificateStatus.REVOKED:
                raise IllegalTransitionError(
                    f"certificate {record.serial_hex} is already revoked ({record.revocation_reason})"
                )
            now = self._clock.now()
            uow.certificates.revoke(serial, revoked_at=now, reason=str(reason))
            target = f"device:{record.device_id}" if record.device_id else f"service:{record.common_name}"
            self._audit.append(
                uow,
                AuditEvent(
                    actor,
                    "certificate.revoke",
                    target,
                    details={"serial": record.serial_hex, "reason": str(reason)},
                ),
            )
            result = uow.certificates.get(serial)
        assert result is not None
        return result

    def issue_crl(self, *, actor: str) -> x509.CertificateRevocationList:
        """Build and sign a CRL of every revoked, unexpired certificate. The CRL number is allocated, the entries
        read and the issuance audited in one transaction, so a higher number never carries older content."""
        authority = self._ca.authority()
        with self._tx() as uow:
            number = uow.counters.next("crl_number")
            now = self._clock.now()
            entries = [
                RevokedEntry(serial, revoked_at, RevocationReason(reason))
                for serial, revoked_at, reason in uow.certificates.revoked(not_expired_at=now)
            ]
            crl = build_crl(
                issuer=authority.certificate,
                key=authority.key,
                revoked=entries,
                number=number,
                now=now,
                validity=self._policy.crl_validity,
            )
            assert crl.next_update_utc is not None
            uow.crls.publish(
                PublishedCrl(
                    number=number,
                    this_update=crl.last_update_utc,
                    next_update=crl.next_update_utc,
                    der=crl.public_bytes(serialization.Encoding.DER),
                    entries=len(entries),
                )
            )
            self._audit.append(
                uow,
                AuditEvent(
                    actor,
                    "crl.issue",
                    "ca:issuing",
                    details={
                        "number": number,
                        "entries": len(entries),
                        "next_update": crl.next_update_utc.isoformat(),
                    },
                ),
            )
        return crl

    def current_crl(self) -> PublishedCrl | None:
        """The newest published CRL."""
        with self._tx(readonly=True) as uow:
            return uow.crls.latest()

    def crl_number(self) -> int | None:
        with self._tx(readonly=True) as uow:
            return uow.crls.latest_number()

    def publish_crl_if_due(self, *, actor: str) -> PublishedCrl | None:
        """Issue a new CRL when there is none, when its content is out of date (a certificate was revoked after it
        was issued, or one of its entries expired), or when half of its validity has passed, so that relying
        parties (the broker refuses every client on an expired CRL) always hold a current one with a long time to
        run. Cheap when nothing is due (one aggregate query). Returns the new CRL, or None."""
        now = self._clock.now()
        with self._tx(readonly=True) as uow:
            current = uow.crls.latest()
            count, latest = uow.certificates.revocation_summary(not_expired_at=now)
        if current is not None:
            issued_at = current.this_update + BACKDATE
            fresh = now < current.this_update + (current.next_update - current.this_update) / 2
            if fresh and count == current.entries and (latest is None or latest <= issued_at):
                return None
        self.issue_crl(actor=actor)
        return self.current_crl()

    def ocsp_respond(self, request_der: bytes, *, actor: str) -> bytes:
        """A signed OCSP response (DER) for one DER request. The responder (signer certificate and key) is looked
        up at most once a minute, not per request; its renewal runs in :meth:`ensure_ocsp_responder`."""
        request = parse_ocsp_request(request_der, limits=self._policy.limits)
        now = self._clock.now()
        cached = self._responder
        if cached is None or now >= cached[1]:
            cached = (self.ensure_ocsp_responder(actor=actor), now + _RESPONDER_RECHECK)
            self._responder = cached
        responder = cached[0]
        with self._tx(readonly=True) as uow:
            record = uow.certificates.get(request.serial_number)
        answer = _answer(record)
        return responder.respond(request, lambda _serial: answer, now=now)

    def ensure_ocsp_responder(self, *, actor: str) -> OCSPResponder:
        """The delegated OCSP responder; its certificate is (re)issued when missing or in the last third of its
        life, through the normal issuance path so it is recorded and audited like any other."""
        authority = self._ca.authority()
        current = self._ca.ocsp_signer()
        now = self._clock.now()
        if current is not None:
            with self._tx(readonly=True) as uow:
                record = uow.certificates.get(current[0].serial_number)
            # A signer certificate that is revoked (or not ours) is never used again: its key may be compromised,
            # and OCSP clients do not check a responder certificate carrying ocsp-nocheck.
            if record is None or record.status is CertificateStatus.REVOKED or _needs_renewal(current[0], now):
                current = None
        if current is not None:
            certificate, key = current
        else:
            key = self._ca.new_ocsp_signer_key()
            issued = self.complete(
                self._plan(
                    key_csr(key, "ocsp-signer"),
                    Profile.OCSP_SIGNER,
                    IssuedIdentity.for_service((f"ocsp.{self._policy.fleet_domain}",)),
                    actor,
                    device_id=None,
                    action="certificate.issue",
                )
            )
            certificate = issued.certificate
            self._ca.store_ocsp_signer(certificate)
        return OCSPResponder(
            issuer=authority.certificate,
            responder_certificate=certificate,
            responder_key=key,
            validity=self._policy.ocsp_validity,
        )


def _needs_renewal(certificate: x509.Certificate, now: dt.datetime) -> bool:
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    return now >= certificate.not_valid_after_utc - lifetime / 3


def _answer(record: CertificateRecord | None) -> OCSPAnswer | None:
    if record is None:
        return None
    if record.status is CertificateStatus.REVOKED:
        return OCSPAnswer(
            OCSPStatus.REVOKED,
            revoked_at=record.revoked_at,
            reason=RevocationReason(record.revocation_reason or "unspecified"),
        )
    return OCSPAnswer(OCSPStatus.GOOD)
