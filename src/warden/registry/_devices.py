"""Device groups and devices: registration, lookup, the state machine and restrictions, each change audited in its
own transaction."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from warden.core import (
    DEFAULT_LIMITS,
    Clock,
    IllegalTransitionError,
    InvalidInputError,
    Limits,
    NotFoundError,
    validate_device_id,
    validate_group_name,
)
from warden.monitor import AuditEvent, AuditLog
from warden.pki import RevocationReason
from warden.registry._model import (
    CertificateStatus,
    Device,
    DeviceGroup,
    DeviceState,
    Restriction,
    check_transition,
)
from warden.registry._ports import RegistryUnitOfWork, Transactions

__all__ = ["DeviceService"]


def _clean_text(value: str, limit: int, what: str) -> str:
    if len(value) > limit or not value.isprintable():
        raise InvalidInputError(f"{what} must be at most {limit} printable characters")
    return value


class DeviceService:
    def __init__(
        self, *, transactions: Transactions, audit: AuditLog, clock: Clock, limits: Limits = DEFAULT_LIMITS
    ) -> None:
        self._tx = transactions
        self._audit = audit
        self._clock = clock
        self._limits = limits

    # -- groups -------------------------------------------------------------------------------------------------

    def add_group(
        self,
        name: str,
        *,
        actor: str,
        description: str = "",
        settings: Mapping[str, object] | None = None,
    ) -> DeviceGroup:
        validate_group_name(name)
        _clean_text(description, 512, "a group description")
        group = DeviceGroup(
            name=name, description=description, settings=dict(settings or {}), created_at=self._clock.now()
        )
        with self._tx() as uow:
            uow.groups.insert(group)
            self._audit.append(
                uow, AuditEvent(actor, "group.add", f"group:{name}", details={"description": description})
            )
        return group

    def list_groups(self) -> list[tuple[DeviceGroup, int]]:
        with self._tx(readonly=True) as uow:
            return [(g, uow.groups.member_count(g.name)) for g in uow.groups.find()]

    def get_group(self, name: str) -> tuple[DeviceGroup, int]:
        with self._tx(readonly=True) as uow:
            group = uow.groups.get(name)
            if group is None:
                raise NotFoundError(f"no group named {name!r}", hint="see 'warden group list'")
            return group, uow.groups.member_count(name)

    # -- devices ------------------------------------------------------------------------------------------------

    def add_device(
        self,
        device_id: str,
        *,
        actor: str,
        display_name: str = "",
        groups: Sequence[str] = (),
        tags: Mapping[str, str] | None = None,
    ) -> Device:
        validate_device_id(device_id)
        _clean_text(display_name, self._limits.max_display_name_chars, "a display name")
        tags = dict(tags or {})
        if len(tags) > self._limits.max_tags_per_device:
            raise InvalidInputError(f"a device has at most {self._limits.max_tags_per_device} tags")
        unique_groups = tuple(dict.fromkeys(groups))
        if len(unique_groups) > self._limits.max_groups_per_device:
            raise InvalidInputError(f"a device belongs to at most {self._limits.max_groups_per_device} groups")
        for g in unique_groups:
            validate_group_name(g)
        now = self._clock.now()
        device = Device(
            id=device_id,
            display_name=display_name or device_id,
            state=DeviceState.PENDING,
            created_at=now,
            updated_at=now,
            tags=tags,
            groups=unique_groups,
        )
        with self._tx() as uow:
            missing = set(unique_groups) - uow.groups.existing(unique_groups)
            if missing:
                raise NotFoundError(
                    f"no group named {sorted(missing)[0]!r}", hint="create it first with 'warden group add'"
                )
            uow.devices.insert(device)
            self._audit.append(
                uow,
                AuditEvent(
                    actor,
                    "device.add",
                    f"device:{device_id}",
                    details={"groups": list(unique_groups), "tags": tags, "state": str(device.state)},
                ),
            )
        return device

    def get_device(self, device_id: str) -> Device:
        with self._tx(readonly=True) as uow:
            return _must_get(uow, device_id)

    def list_devices(
        self,
        *,
        state: DeviceState | None = None,
        group: str | None = None,
        tags: Mapping[str, str] | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[Device]:
        with self._tx(readonly=True) as uow:
            return uow.devices.find(state=state, group=group, tags=tags, limit=limit, after=after)

    def change_state(self, device_id: str, target: DeviceState, *, actor: str, reason: str = "") -> Device:
        """Move a device to ``target``. Decommissioning also revokes every certificate of the device."""
        _clean_text(reason, self._limits.max_reason_chars, "a reason")
        with self._tx() as uow:
            device = _must_get(uow, device_id)
            check_transition(device_id, device.state, target)
            now = self._clock.now()
            uow.devices.set_state(device_id, target, now)
            events = [
                AuditEvent(
                    actor,
                    "device.state",
                    f"device:{device_id}",
                    details={"from": str(device.state), "to": str(target), "reason": reason},
                )
            ]
            if target is DeviceState.DECOMMISSIONED:
                for record in uow.certificates.find(device_id=device_id, status=CertificateStatus.GOOD):
                    reason_code = RevocationReason.CESSATION_OF_OPERATION
                    uow.certificates.revoke(record.serial, revoked_at=now, reason=str(reason_code))
                    events.append(
                        AuditEvent(
                            actor,
                            "certificate.revoke",
                            f"device:{device_id}",
                            details={"serial": record.serial_hex, "reason": str(reason_code)},
                        )
                    )
            self._audit.append(uow, *events)
            return dataclasses.replace(device, state=target, updated_at=now)

    def rebind_onboarding(self, device_id: str, fingerprint: str, *, actor: str, reason: str) -> Device:
        """Bind a device to a new onboarding identity (after a repair): explicit and audited."""
        if len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
            raise InvalidInputError("an onboarding fingerprint is 64 lower-case hex characters (SHA-256)")
        _clean_text(reason, self._limits.max_reason_chars, "a reason")
        if not reason:
            raise InvalidInputError("re-binding a device's onboarding identity needs a reason")
        with self._tx() as uow:
            device = _must_get(uow, device_id)
            now = self._clock.now()
            uow.devices.set_onboarding_fingerprint(device_id, fingerprint, now)
            self._audit.append(
                uow,
                AuditEvent(
                    actor,
                    "device.rebind-onboarding",
                    f"device:{device_id}",
                    details={"from": device.onboarding_fingerprint, "to": fingerprint, "reason": reason},
                ),
            )
        return self.get_device(device_id)

    # -- restrictions -------------------------------------------------------------------------------------------

    def restrict(
        self,
        restrictions: Sequence[Restriction],
        *,
        details: Mapping[str, Mapping[str, object]] | None = None,
    ) -> list[Restriction]:
        """Record ``restrictions`` in one transaction, each audited as ``device.restricted`` (with its details and
        ``details[device_id]``, e.g. the measured rate). A device restricted already keeps its restriction and is
        left out of the result; a device that does not exist is skipped."""
        for restriction in restrictions:
            validate_device_id(restriction.device_id)
            _clean_text(restriction.reason, self._limits.max_reason_chars, "a reason")
        made: list[Restriction] = []
        with self._tx() as uow:
            states = uow.devices.states(r.device_id for r in restrictions)
            events = []
            for restriction in restrictions:
                if restriction.device_id not in states or uow.restrictions.get(restriction.device_id) is not None:
                    continue
                uow.restrictions.put(restriction)
                made.append(restriction)
                audit_details: dict[str, object] = {
                    "reason": restriction.reason,
                    "until": restriction.until.isoformat() if restriction.until else None,
                    "state": str(states[restriction.device_id]),
                    **restriction.details,
                    **(details or {}).get(restriction.device_id, {}),
                }
                target = f"device:{restriction.device_id}"
                events.append(AuditEvent(restriction.actor, "device.restricted", target, details=audit_details))
            if events:
                self._audit.append(uow, *events)
        return made

    def unrestrict(self, device_id: str, *, actor: str, reason: str = "") -> Restriction:
        """Lift the device's restriction (audited as ``device.unrestricted``); one it does not have is an
        :class:`IllegalTransitionError`."""
        _clean_text(reason, self._limits.max_reason_chars, "a reason")
        with self._tx() as uow:
            _must_get(uow, device_id)
            current = uow.restrictions.get(device_id)
            if current is None:
                raise IllegalTransitionError(
                    f"device {device_id!r} is not restricted", hint="see 'warden device show ID'", device=device_id
                )
            uow.restrictions.delete(device_id)
            self._audit.append(uow, _lifted(current, actor, reason))
        return current

    def lift_expired_restrictions(self, *, actor: str) -> list[Restriction]:
        """Lift every restriction whose cool-down has passed, in one transaction (each audited)."""
        now = self._clock.now()
        with self._tx() as uow:
            expired = uow.restrictions.expired(now)
            for restriction in expired:
                uow.restrictions.delete(restriction.device_id)
            if expired:
                self._audit.append(uow, *(_lifted(r, actor, "cool-down over") for r in expired))
        return expired

    def get_restriction(self, device_id: str) -> Restriction | None:
        with self._tx(readonly=True) as uow:
            return uow.restrictions.get(device_id)

    def list_restrictions(self) -> list[Restriction]:
        with self._tx(readonly=True) as uow:
            return uow.restrictions.find()

    def access_view(self, device_id: str) -> tuple[DeviceState, bool]:
        """The device's state and whether it is restricted, read together (what its broker rights follow)."""
        with self._tx(readonly=True) as uow:
            device = uow.devices.identity(device_id)
            if device is None:
                raise NotFoundError(f"no device with id {device_id!r}", hint="see 'warden device list'")
            return device[0], uow.restrictions.get(device_id) is not None


def _lifted(restriction: Restriction, actor: str, reason: str) -> AuditEvent:
    return AuditEvent(
        actor,
        "device.unrestricted",
        f"device:{restriction.device_id}",
        details={
            "reason": reason,
            "restricted_since": restriction.since.isoformat(),
            "restricted_by": restriction.actor,
            "restriction_reason": restriction.reason,
        },
    )


def _must_get(uow: RegistryUnitOfWork, device_id: str) -> Device:
    device = uow.devices.get(device_id)
    if device is None:
        raise NotFoundError(f"no device with id {device_id!r}", hint="see 'warden device list'")
    return device
