"""Request and response bodies of the operator API. Every field has a bound: lengths, counts, ranges."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from warden.broker import DeviceActivity, IngestStats
from warden.monitor import AuditRecord
from warden.policy import ApiToken
from warden.provisioning import EnrollmentGroup, IndividualEnrollment
from warden.registry import CertificateRecord, Device, DeviceCommand, Restriction

__all__ = [
    "AuditPage",
    "AuditRecordOut",
    "AuditVerifyOut",
    "CertificateOut",
    "CertificatePage",
    "DeviceActivityOut",
    "DeviceDetailOut",
    "DeviceIn",
    "DeviceOut",
    "DevicePage",
    "EnrollmentCreated",
    "EnrollmentGroupIn",
    "EnrollmentGroupOut",
    "EnrollmentIn",
    "EnrollmentOut",
    "EnrollmentPage",
    "FloodLimitIn",
    "IngestStatsOut",
    "Problem",
    "ReasonIn",
    "RestrictionOut",
    "RevokeIn",
    "StateChangeIn",
    "TokenCreated",
    "TokenIn",
    "TokenOut",
]

DeviceId = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")]
GroupName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
TagKey = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:/-]{1,64}$")]
TagValue = Annotated[str, Field(max_length=256)]
#: additionalProperties false: pydantic puts the key pattern into patternProperties only, which alone lets any other
#: key through in the schema while the server refuses it
TagMap = Annotated[dict[TagKey, TagValue], Field(max_length=64, json_schema_extra={"additionalProperties": False})]
Reason = Annotated[str, Field(max_length=512)]
FloodLimit = Annotated[int, Field(ge=1, le=1_000_000)]
Pem = Annotated[str, Field(min_length=1, max_length=256 * 1024)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str | None = None
    request_id: str | None = None
    errors: list[dict[str, Any]] | None = None


class DeviceIn(_In):
    id: DeviceId
    display_name: Annotated[str, Field(max_length=128)] = ""
    groups: Annotated[list[GroupName], Field(max_length=32)] = []
    tags: TagMap = {}


class DeviceOut(BaseModel):
    id: str
    display_name: str
    state: str
    tags: dict[str, str]
    groups: list[str]
    onboarding_fingerprint: str | None
    enrollment_group: str | None = None
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def of(cls, device: Device) -> DeviceOut:
        return cls(
            id=device.id,
            display_name=device.display_name,
            state=str(device.state),
            tags=dict(device.tags),
            groups=list(device.groups),
            onboarding_fingerprint=device.onboarding_fingerprint,
            enrollment_group=device.enrollment_group,
            created_at=device.created_at,
            updated_at=device.updated_at,
        )


class MetricOut(BaseModel):
    count: int
    last: float
    min: float
    max: float


class HealthOut(BaseModel):
    status: str
    checks: dict[str, str]
    at: dt.datetime | None


class EventOut(BaseModel):
    type: str
    at: dt.datetime | None


class DeviceActivityOut(BaseModel):
    """What the hub's ingest recorded of the device's messages."""

    first_seen: dt.datetime
    last_seen: dt.datetime
    messages: dict[str, int]
    duplicates: int
    malformed: int
    last_malformed_reason: str | None
    last_malformed_at: dt.datetime | None
    seq: int | None
    telemetry: dict[str, MetricOut]
    health: HealthOut | None
    last_event: EventOut | None

    @classmethod
    def of(cls, activity: DeviceActivity) -> DeviceActivityOut:
        return cls(
            first_seen=activity.first_seen,
            last_seen=activity.last_seen,
            messages={"telemetry": activity.telemetry, "health": activity.health, "events": activity.events},
            duplicates=activity.duplicates,
            malformed=activity.malformed,
            last_malformed_reason=activity.last_malformed_reason,
            last_malformed_at=activity.last_malformed_at,
            seq=activity.seq,
            telemetry={
                name: MetricOut(count=m.count, last=m.last, min=m.min, max=m.max)
                for name, m in sorted(activity.metrics.items())
            },
            health=HealthOut(status=activity.health_status, checks=dict(activity.health_checks), at=activity.health_at)
            if activity.health_status is not None
            else None,
            last_event=EventOut(type=activity.last_event_type, at=activity.last_event_at)
            if activity.last_event_type is not None
            else None,
        )


class RestrictionOut(BaseModel):
    since: dt.datetime
    until: dt.datetime | None
    reason: str
    by: str
    details: dict[str, Any]

    @classmethod
    def of(cls, restriction: Restriction) -> RestrictionOut:
        return cls(
            since=restriction.since,
            until=restriction.until,
            reason=restriction.reason,
            by=restriction.actor,
            details=dict(restriction.details),
        )


class DeviceDetailOut(DeviceOut):
    """One device with what the ingest knows of it and its restriction, if any."""

    last_seen: dt.datetime | None
    activity: DeviceActivityOut | None
    restriction: RestrictionOut | None

    @classmethod
    def detail(
        cls, device: Device, activity: DeviceActivity | None, restriction: Restriction | None
    ) -> DeviceDetailOut:
        return cls(
            **DeviceOut.of(device).model_dump(),
            last_seen=activity.last_seen if activity else None,
            activity=DeviceActivityOut.of(activity) if activity else None,
            restriction=RestrictionOut.of(restriction) if restriction else None,
        )


class DevicePage(BaseModel):
    items: list[DeviceOut]
    next_cursor: str | None


class StateChangeIn(_In):
    state: Literal["active", "disabled", "quarantined", "decommissioned"]
    reason: Reason = ""


class ReasonIn(_In):
    reason: Reason = ""


class RevokeIn(_In):
    reason: Annotated[str, Field(max_length=40)] = "unspecified"


class CertificateOut(BaseModel):
    serial: str
    device_id: str | None
    common_name: str
    profile: str
    status: str
    not_before: dt.datetime
    not_after: dt.datetime
    issued_at: dt.datetime
    fingerprint: str
    key_fingerprint: str
    revoked_at: dt.datetime | None
    revocation_reason: str | None
    pem: str

    @classmethod
    def of(cls, record: CertificateRecord) -> CertificateOut:
        return cls(
            serial=record.serial_hex,
            device_id=record.device_id,
            common_name=record.common_name,
            profile=record.profile,
            status=str(record.status),
            not_before=record.not_before,
            not_after=record.not_after,
            issued_at=record.issued_at,
            fingerprint=record.fingerprint,
            key_fingerprint=record.key_fingerprint,
            revoked_at=record.revoked_at,
            revocation_reason=record.revocation_reason,
            pem=record.pem,
        )


class CertificatePage(BaseModel):
    items: list[CertificateOut]
    next_cursor: str | None


class EnrollmentGroupIn(_In):
    name: GroupName
    ca_pem: Pem
    id_field: Literal["cn", "serial-number"] = "cn"
    profile: Literal["device", "gateway"] = "device"
    validity_days: Annotated[int, Field(ge=1, le=825)] | None = None
    tags: TagMap = {}
    allow: Annotated[list[DeviceId], Field(max_length=100_000)] = []
    deny: Annotated[list[DeviceId], Field(max_length=100_000)] = []
    #: messages per second above which a device of the group is restricted; None: the hub's default
    flood_limit: FloodLimit | None = None


class FloodLimitIn(_In):
    flood_limit: FloodLimit | None


class EnrollmentGroupOut(BaseModel):
    name: str
    ca_fingerprints: list[str]
    ca_pem: str
    id_field: str
    profile: str
    validity_days: int | None
    tags: dict[str, str]
    enabled: bool
    allow: list[str]
    deny: list[str]
    flood_limit: int | None = None
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def of(cls, group: EnrollmentGroup) -> EnrollmentGroupOut:
        return cls(
            name=group.name,
            ca_fingerprints=list(group.ca_fingerprints),
            ca_pem=group.ca_pem,
            id_field=str(group.id_field),
            profile=group.profile,
            validity_days=group.validity_days,
            tags=dict(group.tags),
            enabled=group.enabled,
            allow=sorted(group.allow),
            deny=sorted(group.deny),
            flood_limit=group.flood_limit,
            created_at=group.created_at,
            updated_at=group.updated_at,
        )


class EnrollmentIn(_In):
    device_id: DeviceId
    kind: Literal["certificate", "token"]
    certificate_pem: Pem | None = None
    expires_in_hours: Annotated[int, Field(ge=1, le=8760)] | None = None
    profile: Literal["device", "gateway"] = "device"
    validity_days: Annotated[int, Field(ge=1, le=825)] | None = None


class EnrollmentOut(BaseModel):
    id: str
    device_id: str
    kind: str
    status: str
    profile: str
    validity_days: int | None
    certificate_fingerprint: str | None
    created_at: dt.datetime
    expires_at: dt.datetime | None
    used_at: dt.datetime | None
    revoked_at: dt.datetime | None

    @classmethod
    def of(cls, enrollment: IndividualEnrollment) -> EnrollmentOut:
        return cls(
            id=enrollment.id,
            device_id=enrollment.device_id,
            kind=str(enrollment.kind),
            status=str(enrollment.status),
            profile=enrollment.profile,
            validity_days=enrollment.validity_days,
            certificate_fingerprint=enrollment.certificate_fingerprint,
            created_at=enrollment.created_at,
            expires_at=enrollment.expires_at,
            used_at=enrollment.used_at,
            revoked_at=enrollment.revoked_at,
        )


class EnrollmentCreated(EnrollmentOut):
    #: the one-time enrollment token, shown in this response only
    token: str | None = None


class EnrollmentPage(BaseModel):
    items: list[EnrollmentOut]
    next_cursor: str | None


class AuditRecordOut(BaseModel):
    seq: int
    time: dt.datetime
    actor: str
    action: str
    target: str
    outcome: str
    details: dict[str, Any]
    hash: str

    @classmethod
    def of(cls, record: AuditRecord) -> AuditRecordOut:
        return cls(
            seq=record.seq,
            time=record.time,
            actor=record.actor,
            action=record.action,
            target=record.target,
            outcome=record.outcome,
            details=dict(record.details),
            hash=record.hash,
        )


class AuditPage(BaseModel):
    items: list[AuditRecordOut]
    next_cursor: int | None


class AuditVerifyOut(BaseModel):
    ok: bool
    records: int
    checkpoints: int
    last_checkpoint_seq: int


class TokenIn(_In):
    role: Literal["viewer", "operator", "security-admin", "auditor"]
    expires_in_days: Annotated[int, Field(ge=1, le=366)] = 30
    name: Annotated[str, Field(max_length=64, pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$")] = ""


class TokenOut(BaseModel):
    id: str
    name: str
    role: str
    created_at: dt.datetime
    expires_at: dt.datetime
    revoked_at: dt.datetime | None
    created_by: str

    @classmethod
    def of(cls, token: ApiToken) -> TokenOut:
        return cls(
            id=token.id,
            name=token.name,
            role=str(token.role),
            created_at=token.created_at,
            expires_at=token.expires_at,
            revoked_at=token.revoked_at,
            created_by=token.created_by,
        )


class TokenCreated(TokenOut):
    #: the API token, shown in this response only
    token: str


class IngestStatsOut(BaseModel):
    """The ingest's totals since the database was created."""

    processed: int
    accepted: int
    malformed: int
    duplicates: int
    unknown_devices: int
    invalid_topic: int
    overflow: int
    restricted_for_flooding: int
    flushes: int
    average_batch: float
    largest_batch: int
    last_batch: int
    last_flush_at: dt.datetime | None
    restricted_now: list[str]

    @classmethod
    def of(cls, stats: IngestStats, restricted_now: list[str]) -> IngestStatsOut:
        return cls(**stats.to_json(), restricted_now=restricted_now)


class CommandIn(_In):
    name: Literal["ping", "report-health", "renew-certificate"]


class CommandOut(BaseModel):
    id: str
    device_id: str
    counter: int
    name: str
    actor: str
    state: str
    created_at: dt.datetime
    sent_at: dt.datetime | None
    result: str | None
    result_at: dt.datetime | None

    @classmethod
    def of(cls, command: DeviceCommand) -> CommandOut:
        return cls(
            id=command.id,
            device_id=command.device_id,
            counter=command.counter,
            name=command.name,
            actor=command.actor,
            state=str(command.state),
            created_at=command.created_at,
            sent_at=command.sent_at,
            result=command.result,
            result_at=command.result_at,
        )
