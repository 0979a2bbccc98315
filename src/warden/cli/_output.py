"""How the CLI prints: plain lines for people and pipes, ``--json`` for programs."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence

import typer

from warden.monitor import AuditRecord
from warden.policy import ApiToken
from warden.provisioning import EnrollmentGroup, IndividualEnrollment
from warden.registry import CertificateRecord, Device, DeviceGroup, Restriction

__all__ = [
    "audit_json",
    "certificate_json",
    "device_json",
    "emit_json",
    "enrollment_group_json",
    "enrollment_json",
    "group_json",
    "restriction_json",
    "table",
    "token_json",
]


def _time(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def emit_json(value: object) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))


def device_json(device: Device) -> dict[str, object]:
    return {
        "id": device.id,
        "display_name": device.display_name,
        "state": str(device.state),
        "groups": list(device.groups),
        "tags": dict(device.tags),
        "onboarding_fingerprint": device.onboarding_fingerprint,
        "enrollment_group": device.enrollment_group,
        "created_at": _time(device.created_at),
        "updated_at": _time(device.updated_at),
    }


def restriction_json(restriction: Restriction) -> dict[str, object]:
    return {
        "since": _time(restriction.since),
        "until": _time(restriction.until),
        "reason": restriction.reason,
        "by": restriction.actor,
        "details": dict(restriction.details),
    }


def group_json(group: DeviceGroup, members: int) -> dict[str, object]:
    return {
        "name": group.name,
        "description": group.description,
        "settings": dict(group.settings),
        "members": members,
        "created_at": _time(group.created_at),
    }


def certificate_json(record: CertificateRecord, *, with_pem: bool = False) -> dict[str, object]:
    data: dict[str, object] = {
        "serial": record.serial_hex,
        "device_id": record.device_id,
        "common_name": record.common_name,
        "profile": record.profile,
        "status": str(record.status),
        "not_before": _time(record.not_before),
        "not_after": _time(record.not_after),
        "issued_at": _time(record.issued_at),
        "fingerprint_sha256": record.fingerprint,
        "key_fingerprint_sha256": record.key_fingerprint,
        "revoked_at": _time(record.revoked_at),
        "revocation_reason": record.revocation_reason,
    }
    if with_pem:
        data["pem"] = record.pem
    return data


def audit_json(record: AuditRecord) -> dict[str, object]:
    return record.to_json()


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Aligned columns; plain text so it reads the same in a terminal and in a pipe."""
    cells = [[str(h).upper() for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        typer.echo("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


def enrollment_group_json(group: EnrollmentGroup) -> dict[str, object]:
    return {
        "name": group.name,
        "enabled": group.enabled,
        "id_field": str(group.id_field),
        "profile": group.profile,
        "validity_days": group.validity_days,
        "tags": dict(group.tags),
        "ca_fingerprints": list(group.ca_fingerprints),
        "allow": sorted(group.allow),
        "deny": sorted(group.deny),
        "flood_limit": group.flood_limit,
        "created_at": _time(group.created_at),
        "updated_at": _time(group.updated_at),
    }


def enrollment_json(enrollment: IndividualEnrollment) -> dict[str, object]:
    return {
        "id": enrollment.id,
        "device_id": enrollment.device_id,
        "kind": str(enrollment.kind),
        "status": str(enrollment.status),
        "profile": enrollment.profile,
        "validity_days": enrollment.validity_days,
        "certificate_fingerprint": enrollment.certificate_fingerprint,
        "created_at": _time(enrollment.created_at),
        "expires_at": _time(enrollment.expires_at),
        "used_at": _time(enrollment.used_at),
        "revoked_at": _time(enrollment.revoked_at),
    }


def token_json(token: ApiToken) -> dict[str, object]:
    return {
        "id": token.id,
        "name": token.name,
        "role": str(token.role),
        "created_at": _time(token.created_at),
        "expires_at": _time(token.expires_at),
        "revoked_at": _time(token.revoked_at),
        "created_by": token.created_by,
    }
