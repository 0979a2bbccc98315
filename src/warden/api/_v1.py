"""The operator REST API, ``/api/v1``. Handlers are thin: validate (pydantic), authorise (``requires``), call the
hub's services, shape the answer. Every change is made under the token's identity, so the audit log names it."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from starlette.status import HTTP_201_CREATED

from warden.api._auth import AuthFirstRoute, principal_of, requires
from warden.api._schemas import (
    AuditPage,
    AuditRecordOut,
    AuditVerifyOut,
    CertificateOut,
    CertificatePage,
    CommandIn,
    CommandOut,
    DeviceDetailOut,
    DeviceIn,
    DeviceOut,
    DevicePage,
    EnrollmentCreated,
    EnrollmentGroupIn,
    EnrollmentGroupOut,
    EnrollmentIn,
    EnrollmentOut,
    EnrollmentPage,
    FloodLimitIn,
    IngestStatsOut,
    Problem,
    ReasonIn,
    RevokeIn,
    StateChangeIn,
    TokenCreated,
    TokenIn,
    TokenOut,
)
from warden.core import InvalidInputError, validate_tag
from warden.hub import Hub
from warden.policy import Action, parse_role
from warden.provisioning import EnrollmentStatus
from warden.registry import CertificateStatus, DeviceState, parse_reason

__all__ = ["router"]

log = logging.getLogger("warden.api")

_PROBLEM = {"model": Problem, "content": {"application/problem+json": {}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {**_PROBLEM, "description": text}
    for status, text in (
        (400, "Invalid input"),
        (401, "No or invalid API token"),
        (403, "The token's role does not allow this"),
        (404, "Not found"),
        (409, "Conflict with the current state"),
        (413, "Request body too large"),
        (422, "Request does not match the schema"),
    )
}
router = APIRouter(prefix="/api/v1", responses=_ERRORS, route_class=AuthFirstRoute)

Limit = Annotated[int, Query(ge=1, le=1000, description="Page size")]
Cursor = Annotated[str | None, Query(max_length=128, description="next_cursor of the previous page")]
DevicePath = Annotated[str, "path"]


def _hub(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


def _actor(request: Request) -> str:
    return principal_of(request).actor


def _trust_changed(request: Request) -> None:
    callback = getattr(request.app.state, "on_trust_change", None)
    if callback is not None:
        callback()


def _serial(text: str) -> int:
    try:
        if not 1 <= len(text) <= 42:
            raise ValueError
        return int(text.replace(":", ""), 16)
    except ValueError:
        raise InvalidInputError("a serial is hexadecimal, at most 40 digits") from None


# -- devices ----------------------------------------------------------------------------------------------------


@router.get("/devices", response_model=DevicePage, **requires(Action.DEVICE_READ), tags=["devices"])
def list_devices(
    request: Request,
    state: Annotated[DeviceState | None, Query()] = None,
    group: Annotated[str | None, Query(max_length=64)] = None,
    tag: Annotated[list[str] | None, Query(max_length=16, description="key=value; repeat to require several")] = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> DevicePage:
    tags = dict(validate_tag(t) for t in tag or [])
    devices = _hub(request).devices.list_devices(state=state, group=group, tags=tags, limit=limit + 1, after=cursor)
    page = devices[:limit]
    return DevicePage(items=[DeviceOut.of(d) for d in page], next_cursor=page[-1].id if len(devices) > limit else None)


@router.post(
    "/devices",
    response_model=DeviceOut,
    status_code=HTTP_201_CREATED,
    **requires(Action.DEVICE_MANAGE),
    tags=["devices"],
)
def add_device(request: Request, body: DeviceIn) -> DeviceOut:
    device = _hub(request).devices.add_device(
        body.id, actor=_actor(request), display_name=body.display_name, groups=body.groups, tags=body.tags
    )
    return DeviceOut.of(device)


@router.get("/devices/{device_id}", response_model=DeviceDetailOut, **requires(Action.DEVICE_READ), tags=["devices"])
def get_device(request: Request, device_id: str) -> DeviceDetailOut:
    return _detail(_hub(request), device_id)


def _detail(hub: Hub, device_id: str) -> DeviceDetailOut:
    device = hub.devices.get_device(device_id)
    return DeviceDetailOut.detail(device, hub.device_activity(device_id), hub.devices.get_restriction(device_id))


@router.post(
    "/devices/{device_id}/unrestrict",
    response_model=DeviceDetailOut,
    **requires(Action.DEVICE_MANAGE),
    tags=["devices"],
)
def unrestrict_device(request: Request, device_id: str, body: ReasonIn) -> DeviceDetailOut:
    hub = _hub(request)
    hub.unrestrict_device(device_id, actor=_actor(request), reason=body.reason)
    return _detail(hub, device_id)


@router.post(
    "/devices/{device_id}/commands",
    response_model=CommandOut,
    status_code=202,
    **requires(Action.DEVICE_MANAGE),
    tags=["devices"],
)
def send_command(request: Request, device_id: str, body: CommandIn) -> CommandOut:
    """Record a signed command for the device; the hub's broker link delivers it (state ``sent``), and the device's
    answer closes it (``done``, ``failed`` or ``rejected``)."""
    return CommandOut.of(_hub(request).commands.send(device_id, body.name, actor=_actor(request)))


@router.get(
    "/devices/{device_id}/commands",
    response_model=list[CommandOut],
    **requires(Action.DEVICE_READ),
    tags=["devices"],
)
def list_commands(request: Request, device_id: str) -> list[CommandOut]:
    return [CommandOut.of(c) for c in _hub(request).commands.list(device_id, limit=100)]


@router.get("/commands/{command_id}", response_model=CommandOut, **requires(Action.DEVICE_READ), tags=["devices"])
def get_command(request: Request, command_id: str) -> CommandOut:
    return CommandOut.of(_hub(request).commands.get(command_id))


@router.get("/ingest", response_model=IngestStatsOut, **requires(Action.DEVICE_READ), tags=["devices"])
def ingest_status(request: Request) -> IngestStatsOut:
    hub = _hub(request)
    restricted = [r.device_id for r in hub.devices.list_restrictions()]
    return IngestStatsOut.of(hub.ingest_stats(), restricted)


@router.post("/devices/{device_id}/state", response_model=DeviceOut, **requires(Action.DEVICE_MANAGE), tags=["devices"])
def change_state(request: Request, device_id: str, body: StateChangeIn) -> DeviceOut:
    hub = _hub(request)
    device = hub.devices.change_state(device_id, DeviceState(body.state), actor=_actor(request), reason=body.reason)
    hub.apply_device_access(device.id)  # containment at once; a broker that cannot be told is repaired later
    return DeviceOut.of(device)


@router.post(
    "/devices/{device_id}/rearm", response_model=DeviceOut, **requires(Action.ENROLLMENT_MANAGE), tags=["enrollments"]
)
def rearm_device(request: Request, device_id: str, body: ReasonIn) -> DeviceOut:
    hub = _hub(request)
    hub.provisioning.rearm(device_id, actor=_actor(request), reason=body.reason)
    return DeviceOut.of(hub.devices.get_device(device_id))


@router.get(
    "/devices/{device_id}/certificates",
    response_model=list[CertificateOut],
    **requires(Action.CERT_READ),
    tags=["certificates"],
)
def device_certificates(request: Request, device_id: str) -> list[CertificateOut]:
    hub = _hub(request)
    hub.devices.get_device(device_id)
    return [CertificateOut.of(r) for r in hub.certificates.find(device_id=device_id)]


# -- certificates -----------------------------------------------------------------------------------------------


@router.get("/certificates", response_model=CertificatePage, **requires(Action.CERT_READ), tags=["certificates"])
def list_certificates(
    request: Request,
    device_id: Annotated[str | None, Query(max_length=63)] = None,
    status: Annotated[CertificateStatus | None, Query()] = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> CertificatePage:
    records = _hub(request).certificates.page(device_id=device_id, status=status, limit=limit + 1, after=cursor)
    page = records[:limit]
    return CertificatePage(
        items=[CertificateOut.of(r) for r in page],
        next_cursor=page[-1].serial_hex if len(records) > limit else None,
    )


@router.get(
    "/certificates/{serial}", response_model=CertificateOut, **requires(Action.CERT_READ), tags=["certificates"]
)
def get_certificate(request: Request, serial: str) -> CertificateOut:
    return CertificateOut.of(_hub(request).certificates.get(_serial(serial)))


@router.post(
    "/certificates/{serial}/revoke",
    response_model=CertificateOut,
    **requires(Action.CERT_REVOKE),
    tags=["certificates"],
)
def revoke_certificate(request: Request, serial: str, body: RevokeIn) -> CertificateOut:
    hub = _hub(request)
    record = hub.certificates.revoke(_serial(serial), reason=parse_reason(body.reason), actor=_actor(request))
    # Relying parties learn of it at once: a new CRL is published now (and the broker reloads it and drops the
    # device's session), not at the leader's next round. The revocation has committed: a failure afterwards is
    # logged (the leader retries every second), never a 500.
    try:
        hub.after_revocation(record, actor=_actor(request))
    except Exception:
        log.exception("CRL publication after a revocation failed; the leader will retry")
    return CertificateOut.of(record)


# -- enrollment groups ------------------------------------------------------------------------------------------


@router.get(
    "/enrollment-groups",
    response_model=list[EnrollmentGroupOut],
    **requires(Action.ENROLLMENT_READ),
    tags=["enrollments"],
)
def list_enrollment_groups(request: Request) -> list[EnrollmentGroupOut]:
    return [EnrollmentGroupOut.of(g) for g in _hub(request).provisioning.list_groups()]


@router.post(
    "/enrollment-groups",
    response_model=EnrollmentGroupOut,
    status_code=HTTP_201_CREATED,
    **requires(Action.ENROLLMENT_MANAGE),
    tags=["enrollments"],
)
def add_enrollment_group(request: Request, body: EnrollmentGroupIn) -> EnrollmentGroupOut:
    group = _hub(request).provisioning.add_group(
        body.name,
        ca_pem=body.ca_pem.encode("utf-8"),
        actor=_actor(request),
        id_field=body.id_field,
        profile=body.profile,
        validity_days=body.validity_days,
        tags=body.tags,
        allow=body.allow,
        deny=body.deny,
        flood_limit=body.flood_limit,
    )
    _trust_changed(request)
    return EnrollmentGroupOut.of(group)


@router.get(
    "/enrollment-groups/{name}",
    response_model=EnrollmentGroupOut,
    **requires(Action.ENROLLMENT_READ),
    tags=["enrollments"],
)
def get_enrollment_group(request: Request, name: str) -> EnrollmentGroupOut:
    return EnrollmentGroupOut.of(_hub(request).provisioning.get_group(name))


@router.post(
    "/enrollment-groups/{name}/disable",
    response_model=EnrollmentGroupOut,
    **requires(Action.ENROLLMENT_MANAGE),
    tags=["enrollments"],
)
def disable_enrollment_group(request: Request, name: str) -> EnrollmentGroupOut:
    group = _hub(request).provisioning.set_group_enabled(name, False, actor=_actor(request))
    _trust_changed(request)
    return EnrollmentGroupOut.of(group)


@router.post(
    "/enrollment-groups/{name}/flood-limit",
    response_model=EnrollmentGroupOut,
    **requires(Action.ENROLLMENT_MANAGE),
    tags=["enrollments"],
)
def set_enrollment_group_flood_limit(request: Request, name: str, body: FloodLimitIn) -> EnrollmentGroupOut:
    group = _hub(request).provisioning.set_group_flood_limit(name, body.flood_limit, actor=_actor(request))
    return EnrollmentGroupOut.of(group)


@router.post(
    "/enrollment-groups/{name}/enable",
    response_model=EnrollmentGroupOut,
    **requires(Action.ENROLLMENT_MANAGE),
    tags=["enrollments"],
)
def enable_enrollment_group(request: Request, name: str) -> EnrollmentGroupOut:
    group = _hub(request).provisioning.set_group_enabled(name, True, actor=_actor(request))
    _trust_changed(request)
    return EnrollmentGroupOut.of(group)


# -- individual enrollments -------------------------------------------------------------------------------------


@router.get("/enrollments", response_model=EnrollmentPage, **requires(Action.ENROLLMENT_READ), tags=["enrollments"])
def list_enrollments(
    request: Request,
    device_id: Annotated[str | None, Query(max_length=63)] = None,
    status: Annotated[EnrollmentStatus | None, Query()] = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> EnrollmentPage:
    found = _hub(request).provisioning.list_enrollments(
        device_id=device_id, status=status, limit=limit + 1, after=cursor
    )
    page = found[:limit]
    return EnrollmentPage(
        items=[EnrollmentOut.of(e) for e in page], next_cursor=page[-1].id if len(found) > limit else None
    )


@router.post(
    "/enrollments",
    response_model=EnrollmentCreated,
    status_code=HTTP_201_CREATED,
    **requires(Action.ENROLLMENT_MANAGE),
    tags=["enrollments"],
)
def add_enrollment(request: Request, body: EnrollmentIn, response: Response) -> EnrollmentCreated:
    provisioning = _hub(request).provisioning
    if body.kind == "certificate":
        if body.certificate_pem is None:
            raise InvalidInputError("a certificate enrollment needs certificate_pem")
        enrollment = provisioning.add_certificate_enrollment(
            body.device_id,
            certificate_pem=body.certificate_pem.encode("utf-8"),
            actor=_actor(request),
            profile=body.profile,
            validity_days=body.validity_days,
        )
        _trust_changed(request)
        return EnrollmentCreated(**EnrollmentOut.of(enrollment).model_dump())
    if body.certificate_pem is not None:
        raise InvalidInputError("a token enrollment takes no certificate_pem")
    enrollment, token = provisioning.add_token_enrollment(
        body.device_id,
        actor=_actor(request),
        expires_in=dt.timedelta(hours=body.expires_in_hours) if body.expires_in_hours else None,
        profile=body.profile,
        validity_days=body.validity_days,
    )
    response.headers["Cache-Control"] = "no-store"
    return EnrollmentCreated(**EnrollmentOut.of(enrollment).model_dump(), token=str(token))


@router.get(
    "/enrollments/{enrollment_id}",
    response_model=EnrollmentOut,
    **requires(Action.ENROLLMENT_READ),
    tags=["enrollments"],
)
def get_enrollment(request: Request, enrollment_id: str) -> EnrollmentOut:
    return EnrollmentOut.of(_hub(request).provisioning.get_enrollment(enrollment_id))


@router.post(
    "/enrollments/{enrollment_id}/revoke",
    response_model=EnrollmentOut,
    **requires(Action.ENROLLMENT_MANAGE),
    tags=["enrollments"],
)
def revoke_enrollment(request: Request, enrollment_id: str) -> EnrollmentOut:
    enrollment = _hub(request).provisioning.revoke_enrollment(enrollment_id, actor=_actor(request))
    _trust_changed(request)
    return EnrollmentOut.of(enrollment)


# -- audit ------------------------------------------------------------------------------------------------------


@router.get("/audit", response_model=AuditPage, **requires(Action.AUDIT_READ), tags=["audit"])
def list_audit(
    request: Request,
    since: Annotated[dt.datetime | None, Query(description="only records at or after this time")] = None,
    limit: Limit = 100,
    cursor: Annotated[int | None, Query(ge=0, le=2**62, description="next_cursor of the previous page")] = None,
) -> AuditPage:
    hub = _hub(request)
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=dt.UTC)
    with hub.db.transaction(readonly=True) as uow:
        records = list(uow.audit.records(since_seq=cursor or 0, since_time=since, limit=limit + 1))
    page = records[:limit]
    return AuditPage(
        items=[AuditRecordOut.of(r) for r in page], next_cursor=page[-1].seq if len(records) > limit else None
    )


@router.get("/audit/verify", response_model=AuditVerifyOut, **requires(Action.AUDIT_READ), tags=["audit"])
def verify_audit(request: Request) -> AuditVerifyOut:
    hub = _hub(request)
    with hub.db.transaction(readonly=True) as uow:
        report = hub.audit.verify(uow)
    return AuditVerifyOut(
        ok=True, records=report.records, checkpoints=report.checkpoints, last_checkpoint_seq=report.last_checkpoint_seq
    )


# -- API tokens -------------------------------------------------------------------------------------------------


@router.get("/tokens", response_model=list[TokenOut], **requires(Action.TOKEN_MANAGE), tags=["tokens"])
def list_tokens(request: Request) -> list[TokenOut]:
    return [TokenOut.of(t) for t in _hub(request).tokens.list()]


@router.post(
    "/tokens",
    response_model=TokenCreated,
    status_code=HTTP_201_CREATED,
    **requires(Action.TOKEN_MANAGE),
    tags=["tokens"],
)
def create_token(request: Request, body: TokenIn, response: Response) -> TokenCreated:
    record, token = _hub(request).tokens.create(
        role=parse_role(body.role),
        expires_in=dt.timedelta(days=body.expires_in_days),
        actor=_actor(request),
        name=body.name,
    )
    response.headers["Cache-Control"] = "no-store"
    return TokenCreated(**TokenOut.of(record).model_dump(), token=str(token))


@router.post("/tokens/{token_id}/revoke", response_model=TokenOut, **requires(Action.TOKEN_MANAGE), tags=["tokens"])
def revoke_token(request: Request, token_id: str) -> TokenOut:
    return TokenOut.of(_hub(request).tokens.revoke(token_id, actor=_actor(request)))
