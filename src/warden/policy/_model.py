"""Operator roles, the actions they allow, and API tokens. Pure: no I/O.

Least privilege: each role gets only what its job needs. ``viewer`` reads the fleet; ``operator`` also runs the
device lifecycle; ``security-admin`` also revokes certificates and manages enrollments and tokens; ``auditor`` reads
and verifies the audit log and nothing else. Issue-6's policy engine replaces this table; the actions stay.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

__all__ = ["ROLE_ACTIONS", "Action", "ApiToken", "Principal", "Role"]


class Role(enum.StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    SECURITY_ADMIN = "security-admin"
    AUDITOR = "auditor"


class Action(enum.StrEnum):
    DEVICE_READ = "device.read"
    DEVICE_MANAGE = "device.manage"
    ENROLLMENT_READ = "enrollment.read"
    ENROLLMENT_MANAGE = "enrollment.manage"
    CERT_READ = "cert.read"
    CERT_REVOKE = "cert.revoke"
    AUDIT_READ = "audit.read"
    TOKEN_MANAGE = "token.manage"  # noqa: S105 - an action name
    METRICS_READ = "metrics.read"


_READ = frozenset({Action.DEVICE_READ, Action.ENROLLMENT_READ, Action.CERT_READ, Action.METRICS_READ})

ROLE_ACTIONS: dict[Role, frozenset[Action]] = {
    Role.VIEWER: _READ,
    Role.OPERATOR: _READ | {Action.DEVICE_MANAGE},
    Role.SECURITY_ADMIN: _READ | {Action.CERT_REVOKE, Action.ENROLLMENT_MANAGE, Action.TOKEN_MANAGE, Action.AUDIT_READ},
    Role.AUDITOR: frozenset({Action.AUDIT_READ}),
}


@dataclass(frozen=True, slots=True)
class ApiToken:
    id: str
    name: str
    role: Role
    created_at: dt.datetime
    expires_at: dt.datetime
    created_by: str
    revoked_at: dt.datetime | None = None

    def usable(self, now: dt.datetime) -> bool:
        return self.revoked_at is None and now < self.expires_at


@dataclass(frozen=True, slots=True)
class Principal:
    """Who makes a request: ``actor`` is how the audit log names them (``token:<id>``)."""

    actor: str
    role: Role
    token_id: str

    def may(self, action: Action) -> bool:
        return action in ROLE_ACTIONS[self.role]
