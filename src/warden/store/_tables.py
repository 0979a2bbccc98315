"""SQLAlchemy Core tables. The schema changes only through Alembic migrations (``migrations/versions``); a test
checks that a migrated database matches these definitions exactly."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.types import TypeDecorator

__all__ = [
    "api_tokens",
    "audit_checkpoints",
    "audit_head",
    "audit_log",
    "certificates",
    "counters",
    "crls",
    "device_activity",
    "device_commands",
    "device_group_members",
    "device_groups",
    "device_restrictions",
    "device_tags",
    "devices",
    "enrollment_groups",
    "enrollments",
    "ingest_stats",
    "metadata",
    "reonboarding",
    "sqlite_time",
]

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def sqlite_time(value: dt.datetime) -> str:
    """An aware datetime as SQLAlchemy's SQLite ``DateTime`` stores it (naive UTC, always with microseconds), for
    the few statements that go to the driver directly."""
    if value.tzinfo is None:
        raise ValueError("naive datetimes are not stored: pass an aware UTC datetime")
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out; stored naive (UTC) on every backend."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored: pass an aware UTC datetime")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        return value.replace(tzinfo=dt.UTC)


device_groups = Table(
    "device_groups",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("description", String(512), nullable=False),
    Column("settings", Text, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

devices = Table(
    "devices",
    metadata,
    Column("id", String(63), primary_key=True),
    Column("display_name", String(128), nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("onboarding_fingerprint", String(64), nullable=True, unique=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    # The enrollment group the device last onboarded through (revision 0003); a name, not a foreign key: groups
    # are never deleted, and SQLite cannot add a column with a foreign key in place.
    Column("enrollment_group", String(64), nullable=True),
)

device_group_members = Table(
    "device_group_members",
    metadata,
    Column("device_id", String(63), ForeignKey("devices.id"), primary_key=True),
    Column("group_name", String(64), ForeignKey("device_groups.name"), primary_key=True, index=True),
)

device_tags = Table(
    "device_tags",
    metadata,
    Column("device_id", String(63), ForeignKey("devices.id"), primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
    Index("ix_device_tags_key_value", "key", "value"),
)

certificates = Table(
    "certificates",
    metadata,
    # Upper-case hex without leading zeros beyond an even length; unique by the primary key, so a serial can never
    # be issued twice even if the random source failed.
    Column("serial", String(42), primary_key=True),
    Column("device_id", String(63), ForeignKey("devices.id"), nullable=True, index=True),
    Column("common_name", String(253), nullable=False),
    Column("profile", String(16), nullable=False),
    Column("not_before", UTCDateTime(), nullable=False),
    Column("not_after", UTCDateTime(), nullable=False),
    Column("fingerprint", String(64), nullable=False, unique=True),
    Column("key_fingerprint", String(64), nullable=False, index=True),
    Column("status", String(8), nullable=False, index=True),
    Column("issued_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("revocation_reason", String(32), nullable=True),
    Column("pem", Text, nullable=False),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=False),
    Column("time", UTCDateTime(), nullable=False, index=True),
    Column("actor", String(128), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(256), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("details", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

# One row (id = 1): the chain head. Every append locks it (BEGIN IMMEDIATE on SQLite, SELECT ... FOR UPDATE on
# PostgreSQL), which serialises appends so concurrent writers can never fork the chain.
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
    Column("last_checkpoint_seq", BigInteger, nullable=False),
)

audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("seq", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=False),
    Column("hash", String(64), nullable=False),
    Column("time", UTCDateTime(), nullable=False),
    Column("signature", String(128), nullable=False),
    Column("key_id", String(16), nullable=False),
)

# Named monotonic counters (the CRL number; the enrollment groups' and certificate enrollments' change counters),
# allocated under a row lock like the audit head.
counters = Table(
    "counters",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

# -- provisioning, operator access, published CRLs (revision 0002) ----------------------------------------------

# Lists and maps are JSON text (lists sorted where they are sets), so every backend stores them alike.
enrollment_groups = Table(
    "enrollment_groups",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("ca_pem", Text, nullable=False),
    Column("ca_fingerprints", Text, nullable=False),
    Column("id_field", String(16), nullable=False),
    Column("profile", String(16), nullable=False),
    Column("validity_days", Integer, nullable=True),
    Column("tags", Text, nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("allow_list", Text, nullable=False),
    Column("deny_list", Text, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    # Messages per second above which a device of the group is restricted for flooding (revision 0003).
    Column("flood_limit", Integer, nullable=True),
)

enrollments = Table(
    "enrollments",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("device_id", String(63), ForeignKey("devices.id"), nullable=False, index=True),
    Column("kind", String(16), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("profile", String(16), nullable=False),
    Column("validity_days", Integer, nullable=True),
    # Not unique: a revoked enrollment and a new one may name the same onboarding certificate.
    Column("certificate_fingerprint", String(64), nullable=True, index=True),
    Column("certificate_pem", Text, nullable=True),
    # HMAC-SHA256 of a one-time token, never the token.
    Column("token_mac", String(64), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=True),
    Column("used_at", UTCDateTime(), nullable=True),
    Column("revoked_at", UTCDateTime(), nullable=True),
    # At most one active enrollment per onboarding certificate, also under concurrent writers.
    Index(
        "uq_enrollments_active_certificate",
        "certificate_fingerprint",
        unique=True,
        sqlite_where=text("status = 'active'"),
        postgresql_where=text("status = 'active'"),
    ),
)

# At most one armed re-onboarding per device.
reonboarding = Table(
    "reonboarding",
    metadata,
    Column("device_id", String(63), ForeignKey("devices.id"), primary_key=True),
    Column("armed_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("armed_by", String(128), nullable=False),
    Column("reason", String(512), nullable=False),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("role", String(32), nullable=False),
    # HMAC-SHA256 of the token's secret, never the secret.
    Column("mac", String(64), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("created_by", String(128), nullable=False),
)

# Every CRL the hub has published, by CRL number (allocated from the ``crl_number`` counter).
crls = Table(
    "crls",
    metadata,
    Column("number", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=False),
    Column("this_update", UTCDateTime(), nullable=False),
    Column("next_update", UTCDateTime(), nullable=False),
    Column("der", LargeBinary, nullable=False),
    Column("entries", Integer, nullable=False),
)

# -- ingest and restrictions (revision 0003) ---------------------------------------------------------------------

# What the hub knows of each device's traffic: written by the ingest's recorder, one transaction per batch.
device_activity = Table(
    "device_activity",
    metadata,
    Column("device_id", String(63), ForeignKey("devices.id"), primary_key=True),
    Column("first_seen", UTCDateTime(), nullable=False),
    Column("last_seen", UTCDateTime(), nullable=False, index=True),
    Column("telemetry", BigInteger, nullable=False),
    Column("health", BigInteger, nullable=False),
    Column("events", BigInteger, nullable=False),
    Column("duplicates", BigInteger, nullable=False),
    Column("malformed", BigInteger, nullable=False),
    Column("last_malformed_reason", String(256), nullable=True),
    Column("last_malformed_at", UTCDateTime(), nullable=True),
    Column("seq", BigInteger, nullable=True),
    Column("seq_time", UTCDateTime(), nullable=True),
    # JSON {name: [count, last, min, max]}, at most IngestConfig.max_metrics names
    Column("metrics", Text, nullable=False),
    Column("health_status", String(16), nullable=True),
    # JSON {check: result}, bounded by the health message's schema
    Column("health_checks", Text, nullable=True),
    Column("health_at", UTCDateTime(), nullable=True),
    Column("last_event_type", String(64), nullable=True),
    Column("last_event_at", UTCDateTime(), nullable=True),
)

# One row (id = 1): the ingest's totals since the database was created.
ingest_stats = Table(
    "ingest_stats",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("processed", BigInteger, nullable=False),
    Column("accepted", BigInteger, nullable=False),
    Column("malformed", BigInteger, nullable=False),
    Column("duplicates", BigInteger, nullable=False),
    Column("unknown", BigInteger, nullable=False),
    Column("invalid_topic", BigInteger, nullable=False),
    Column("overflow", BigInteger, nullable=False),
    Column("restricted", BigInteger, nullable=False),
    Column("flushes", BigInteger, nullable=False),
    Column("largest_batch", BigInteger, nullable=False),
    Column("last_batch", BigInteger, nullable=False),
    Column("last_flush_at", UTCDateTime(), nullable=True),
)

# Devices held to restricted broker rights (health and updates only) until an operator, or the cool-down, lifts it.
device_restrictions = Table(
    "device_restrictions",
    metadata,
    Column("device_id", String(63), ForeignKey("devices.id"), primary_key=True),
    Column("since", UTCDateTime(), nullable=False),
    Column("until", UTCDateTime(), nullable=True, index=True),
    Column("reason", String(512), nullable=False),
    Column("actor", String(128), nullable=False),
    # JSON: what the restriction was decided on (for flooding: rate, limit, window)
    Column("details", Text, nullable=False),
)

# -- cloud-to-device commands (revision 0004) ----------------------------------------------------------------------

# The outbox of signed commands: one row per command, its counter unique per device.
device_commands = Table(
    "device_commands",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("device_id", String(63), ForeignKey("devices.id"), nullable=False),
    Column("counter", BigInteger, nullable=False),
    Column("name", String(64), nullable=False),
    Column("args", Text, nullable=False),
    Column("actor", String(128), nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("sent_at", UTCDateTime(), nullable=True),
    Column("result", String(256), nullable=True),
    Column("result_at", UTCDateTime(), nullable=True),
    UniqueConstraint("device_id", "counter", name="uq_device_commands_device_id_counter"),
    Index("ix_device_commands_state", "state"),
)
