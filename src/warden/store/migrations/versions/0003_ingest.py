"""Ingest and restrictions: each device's activity (last seen, message counts, telemetry summary, last health and
event, malformed and duplicate counts, sequence head), the ingest's totals, devices restricted for flooding, the
enrollment group a device onboarded through, and an enrollment group's flood limit.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from warden.store._tables import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_STATS = (
    "processed",
    "accepted",
    "malformed",
    "duplicates",
    "unknown",
    "invalid_topic",
    "overflow",
    "restricted",
    "flushes",
    "largest_batch",
    "last_batch",
)


def upgrade() -> None:
    # Nullable columns without a default: SQLite adds them in place (ALTER TABLE ADD COLUMN), no table rebuild.
    op.add_column("devices", sa.Column("enrollment_group", sa.String(64), nullable=True))
    op.add_column("enrollment_groups", sa.Column("flood_limit", sa.Integer(), nullable=True))
    op.create_table(
        "device_activity",
        sa.Column("device_id", sa.String(63), nullable=False),
        sa.Column("first_seen", UTCDateTime(), nullable=False),
        sa.Column("last_seen", UTCDateTime(), nullable=False),
        sa.Column("telemetry", sa.BigInteger(), nullable=False),
        sa.Column("health", sa.BigInteger(), nullable=False),
        sa.Column("events", sa.BigInteger(), nullable=False),
        sa.Column("duplicates", sa.BigInteger(), nullable=False),
        sa.Column("malformed", sa.BigInteger(), nullable=False),
        sa.Column("last_malformed_reason", sa.String(256), nullable=True),
        sa.Column("last_malformed_at", UTCDateTime(), nullable=True),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("seq_time", UTCDateTime(), nullable=True),
        sa.Column("metrics", sa.Text(), nullable=False),
        sa.Column("health_status", sa.String(16), nullable=True),
        sa.Column("health_checks", sa.Text(), nullable=True),
        sa.Column("health_at", UTCDateTime(), nullable=True),
        sa.Column("last_event_type", sa.String(64), nullable=True),
        sa.Column("last_event_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name="fk_device_activity_device_id_devices"),
        sa.PrimaryKeyConstraint("device_id", name="pk_device_activity"),
    )
    op.create_index("ix_device_activity_last_seen", "device_activity", ["last_seen"])
    op.create_table(
        "ingest_stats",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in _STATS),
        sa.Column("last_flush_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_ingest_stats"),
    )
    # The one row exists from the start: the recorder only ever adds to it.
    stats = sa.table("ingest_stats", sa.column("id", sa.Integer()), *(sa.column(n, sa.BigInteger()) for n in _STATS))
    op.bulk_insert(stats, [{"id": 1, **dict.fromkeys(_STATS, 0)}])
    op.create_table(
        "device_restrictions",
        sa.Column("device_id", sa.String(63), nullable=False),
        sa.Column("since", UTCDateTime(), nullable=False),
        sa.Column("until", UTCDateTime(), nullable=True),
        sa.Column("reason", sa.String(512), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name="fk_device_restrictions_device_id_devices"),
        sa.PrimaryKeyConstraint("device_id", name="pk_device_restrictions"),
    )
    op.create_index("ix_device_restrictions_until", "device_restrictions", ["until"])


def downgrade() -> None:
    for table in ("device_restrictions", "ingest_stats", "device_activity"):
        op.drop_table(table)
    # SQLite 3.35 and later drop a plain column in place; a batch rebuild of ``devices`` would fail on the foreign
    # keys that point at it.
    op.drop_column("enrollment_groups", "flood_limit")
    op.drop_column("devices", "enrollment_group")
