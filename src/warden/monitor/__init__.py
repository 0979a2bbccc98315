"""Monitoring and response. For now: the tamper-evident audit log."""

from warden.monitor._audit import (
    GENESIS_HASH,
    AuditEvent,
    AuditRecord,
    Checkpoint,
    VerifyReport,
    canonical_details,
    chain_records,
    record_hash,
    verify_chain,
)
from warden.monitor._log import AuditLog, AuditStore, AuditUnitOfWork, CheckpointKey, CheckpointMirror

__all__ = [
    "GENESIS_HASH",
    "AuditEvent",
    "AuditLog",
    "AuditRecord",
    "AuditStore",
    "AuditUnitOfWork",
    "Checkpoint",
    "CheckpointKey",
    "CheckpointMirror",
    "VerifyReport",
    "canonical_details",
    "chain_records",
    "record_hash",
    "verify_chain",
]
