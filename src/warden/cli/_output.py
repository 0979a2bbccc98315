"""How the CLI prints: plain lines for people and pipes, ``--json`` for programs."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence

import typer

from warden.monitor import AuditRecord
from warden.registry import CertificateRecord, Device, DeviceGroup

__all__ = ["audit_json", "certificate_json", "device_json", "emit_json", "group_json", "table"]


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
        "created_at": _time(device.created_at),
        "updated_at": _time(device.updated_at),
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
