"""Certificate use cases: issue from a CSR, renew, revoke, publish the CRL, answer OCSP.

Flow of an issuance: parse and verify the CSR (no database), check the device may get a certificate (a read),
sign (no database), then record the certificate and its audit record in one write, which re-checks the device's
state so a device disabled meanwhile never gets a recorded certificate. The write goes through a :class:`Writer`:
one transaction per call, or a group commit that shares one durable commit between concurrent requests.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from warden.core import (
    DEFAULT_LIMITS,
    Clock,
    IllegalTransitionError,
    InvalidInputError,
    IssuanceRefusedError,
    Limits,
    NotFoundError,
    Random,
)
from warden.monitor import AuditEvent, AuditLog
from warden.pki import (
    CertificateSigningRequest,
    IssuedIdentity,
    OCSPAnswer,
    OCSPResponder,
    Profile,
    RevocationReason,
    RevokedEntry,
    build_crl,
    key_csr,
    new_serial,
    parse_csr,
    parse_ocsp_request,
)
from warden.pki import CertificateStatus as OCSPStatus
from warden.registry._model import CertificateRecord, CertificateStatus, DeviceState
from warden.registry._ports import CAProvider, RegistryUnitOfWork, Transactions, Writer

__all__ = ["CertificateService", "IssuancePolicy", "IssuedCertificate", "parse_reason"]

_ISSUABLE = frozenset({DeviceState.PENDING, DeviceState.ACTIVE})
_DEVICE_PROFILES = frozenset({Profile.DEVICE, Profile.GATEWAY})
_SERVICE_PROFILES = frozenset({Profile.SERVICE, Profile.HUB_CLIENT})


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

    # -- issuance -----------------------------------------------------------------------------------------------

    def sign(self, *, device_id: str, csr: bytes, actor: str, profile: Profile = Profile.DEVICE) -> IssuedCertificate:
        """First (or another) certificate for a ``pending`` or ``active`` device; a pending device becomes active."""
        if profile not in _DEVICE_PROFILES:
            raise InvalidInputError(
                f"profile {profile} is not for devices", hint="use 'device' or 'gateway' with --device"
            )
        identity = IssuedIdentity.for_device(device_id, self._policy.fleet_domain)
        request = parse_csr(csr, limits=self._policy.limits)
        self._precheck(device_id, actor, "certificate.issue", profile)
        return self._issue(
            request, profile, identity, actor, device_id=device_id, action="certificate.issue", renew=False
        )

    def renew(self, *, device_id: str, csr: bytes, actor: str, revoke_superseded: bool = False) -> IssuedCertificate:
        """A new certificate for an ``active`` device that has had one, from a new CSR (a new key by default)."""
        identity = IssuedIdentity.for_device(device_id, self._policy.fleet_domain)
        request = parse_csr(csr, limits=self._policy.limits)
        profile = self._precheck(device_id, actor, "certificate.renew", None, request=request)
        return self._issue(
            request,
            profile,
            identity,
            actor,
            device_id=device_id,
            action="certificate.renew",
            renew=True,
            revoke_superseded=revoke_superseded,
        )

    def issue_service(
        self, *, names: tuple[str, ...], csr: bytes, actor: str, profile: Profile = Profile.SERVICE
    ) -> IssuedCertificate:
        """A certificate for the hub's or the broker's own TLS endpoints (``service``) or the hub's client identity
        (``hub-client``). Their names contain a dot, so they can never be taken for a device id."""
        if profile not in _SERVICE_PROFILES:
            raise InvalidInputError(f"profile {profile} is not for services", hint="use 'service' or 'hub-client'")
        identity = IssuedIdentity.for_service(names)
        request = parse_csr(csr, limits=self._policy.limits)
        return self._issue(request, profile, identity, actor, device_id=None, action="certificate.issue", renew=False)

    def _precheck(
        self,
        device_id: str,
        actor: str,
        action: str,
        profile: Profile | None,
        *,
        request: CertificateSigningRequest | None = None,
    ) -> Profile:
        """Refuse early (and audit the refusal) when the device may not get a certificate now. Returns the profile
        (for a renewal: the profile of the device's newest certificate)."""
        with self._tx(readonly=True) as uow:
            device = uow.devices.get(device_id)
            if device is None:
                raise NotFoundError(f"no device with id {device_id!r}", hint="add it with 'warden device add'")
            refusal = self._refusal(uow, device_id, device.state, renew=request is not None, request=request)
            previous = uow.certificates.find(device_id=device_id) if request is not None else []
        if refusal is not None:
            with self._tx() as uow:
                self._audit.append(uow, AuditEvent(actor, action, f"device:{device_id}", "denied", {"reason": refusal}))
            raise IssuanceRefusedError(refusal, device=device_id, state=str(device.state))
        if profile is not None:
            return profile
        return Profile(previous[-1].profile) if previous else Profile.DEVICE

    def _refusal(
        self,
        uow: RegistryUnitOfWork,
        device_id: str,
        state: DeviceState,
        *,
        renew: bool,
        request: CertificateSigningRequest | None,
    ) -> str | None:
        if renew:
            if state is not DeviceState.ACTIVE:
                return f"device {device_id!r} is {state}; only active devices renew"
        elif state not in _ISSUABLE:
            return f"device {device_id!r} is {state}; certificates are issued to pending and active devices"
        if request is not None:
            previous = uow.certificates.find(device_id=device_id)
            if not previous:
                return f"device {device_id!r} has no certificate to renew; use 'warden cert sign'"
            for record in previous:
                if record.key_fingerprint != request.key_fingerprint:
                    continue
                if record.status is CertificateStatus.REVOKED:
                    return "the CSR's key belongs to a revoked certificate; generate a new key"
                if not self._policy.allow_same_key_renewal:
                    return "the CSR reuses the current key; renewal requires a new key (re-key)"
        return None

    def _issue(
        self,
        request: CertificateSigningRequest,
        profile: Profile,
        identity: IssuedIdentity,
        actor: str,
        *,
        device_id: str | None,
        action: str,
        renew: bool,
        revoke_superseded: bool = False,
    ) -> IssuedCertificate:
        authority = self._ca.authority()
        now = self._clock.now()
        certificate = authority.issue(
            csr=request,
            profile=profile,
            identity=identity,
            serial=new_serial(self._random.token_bytes(16)),
            now=now,
            validity=self._policy.validity[profile],
        )
        pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
        record = CertificateRecord(
            serial=certificate.serial_number,
            device_id=device_id,
            common_name=identity.common_name,
            profile=str(profile),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            fingerprint=_fingerprint(certificate),
            key_fingerprint=request.key_fingerprint,
            status=CertificateStatus.GOOD,
            issued_at=now,
            pem=pem,
        )
        target = f"device:{device_id}" if device_id else f"service:{identity.common_name}"
        details: dict[str, object] = {
            "serial": record.serial_hex,
            "profile": str(profile),
            "key": request.key_description,
            "not_after": record.not_after.isoformat(),
            "fingerprint": record.fingerprint,
        }
        if request.ignored_requests:
            details["ignored_from_csr"] = list(request.ignored_requests)

        def write(uow: RegistryUnitOfWork) -> str | None:
            events: list[AuditEvent] = []
            if device_id is not None:
                state = uow.devices.state(device_id)
                if state is None:
                    return f"device {device_id!r} was removed meanwhile"
                # Re-check in the writing transaction: the device may have changed since the pre-check.
                refusal = self._refusal(uow, device_id, state, renew=renew, request=request if renew else None)
                if refusal is not None:
                    self._audit.append(uow, AuditEvent(actor, action, target, "denied", {"reason": refusal}))
                    return refusal
                if renew and revoke_superseded:
                    for old in uow.certificates.find(device_id=device_id, status=CertificateStatus.GOOD):
                        uow.certificates.revoke(old.serial, revoked_at=now, reason=str(RevocationReason.SUPERSEDED))
                        events.append(
                            AuditEvent(
                                actor,
                                "certificate.revoke",
                                target,
                                details={
                                    "serial": old.serial_hex,
                                    "reason": str(RevocationReason.SUPERSEDED),
                                },
                            )
                        )
                if state is DeviceState.PENDING:
                    uow.devices.set_state(device_id, DeviceState.ACTIVE, now)
                    events.append(
                        AuditEvent(
                            actor,
                            "device.state",
                            target,
                            details={"from": "pending", "to": "active", "reason": "first certificate"},
                        )
                    )
            uow.certificates.insert(record)
            self._audit.append(uow, AuditEvent(actor, action, target, details=details), *events)
            return None

        refusal = self._write(write)
        if refusal is not None:
            raise IssuanceRefusedError(refusal, device=device_id)
        return IssuedCertificate(record=record, certificate=certificate)

    # -- queries ------------------------------------------------------------------------------------------------

    def find(self, *, device_id: str | None = None, status: CertificateStatus | None = None) -> list[CertificateRecord]:
        with self._tx(readonly=True) as uow:
            return uow.certificates.find(device_id=device_id, status=status)

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

    def ocsp_respond(self, request_der: bytes, *, actor: str) -> bytes:
        """A signed OCSP response (DER) for one DER request."""
        request = parse_ocsp_request(request_der, limits=self._policy.limits)
        responder = self.ensure_ocsp_responder(actor=actor)
        with self._tx(readonly=True) as uow:
            record = uow.certificates.get(request.serial_number)
        answer = _answer(record)
        return responder.respond(request, lambda _serial: answer, now=self._clock.now())

    def ensure_ocsp_responder(self, *, actor: str) -> OCSPResponder:
        """The delegated OCSP responder; its certificate is (re)issued when missing or in the last third of its
        life, through the normal issuance path so it is recorded and audited like any other."""
        authority = self._ca.authority()
        certificate, key = self._ca.ocsp_signer()
        now = self._clock.now()
        if certificate is None or _needs_renewal(certificate, now):
            issued = self._issue(
                parse_csr(key_csr(key, "ocsp-signer"), limits=self._policy.limits),
                Profile.OCSP_SIGNER,
                IssuedIdentity.for_service((f"ocsp.{self._policy.fleet_domain}",)),
                actor,
                device_id=None,
                action="certificate.issue",
                renew=False,
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
