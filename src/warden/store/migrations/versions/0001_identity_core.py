"""Identity core: device groups, devices, certificates, the audit chain and counters.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from warden.store._tables import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "device_groups",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("description", sa.String(512), nullable=False),
        sa.Column("settings", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_device_groups"),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(63), nullable=False),
        sa.Column("display_name", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("onboarding_fingerprint", sa.String(64), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_devices"),
        sa.UniqueConstraint("onboarding_fingerprint", name="uq_devices_onboarding_fingerprint"),
    )
    op.create_index("ix_devices_state", "devices", ["state"])
    op.create_table(
        "device_group_members",
        sa.Column("device_id", sa.String(63), nullable=False),
        sa.Column("group_name", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name="fk_device_group_members_device_id_devices"),
        sa.ForeignKeyConstraint(
            ["group_name"], ["device_groups.name"], name="fk_device_group_members_group_name_device_groups"
        ),
        sa.PrimaryKeyConstraint("device_id", "group_name", name="pk_device_group_members"),
    )
    op.create_index("ix_device_group_members_group_name", "device_group_members", ["group_name"])
    op.create_table(
        "device_tags",
        sa.Column("device_id", sa.String(63), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.String(256), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name="fk_device_tags_device_id_devices"),
        sa.PrimaryKeyConstraint("device_id", "key", name="pk_device_tags"),
    )
    op.create_index("ix_device_tags_key_value", "device_tags", ["key", "value"])
    op.create_table(
        "certificates",
        sa.Column("serial", sa.String(42), nullable=False),
        sa.Column("device_id", sa.String(63), nullable=True),
        sa.Column("common_name", sa.String(253), nullable=False),
        sa.Column("profile", sa.String(16), nullable=False),
        sa.Column("not_before", UTCDateTime(), nullable=False),
        sa.Column("not_after", UTCDateTime(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("key_fingerprint", sa.String(64), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("issued_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.Column("revocation_reason", sa.String(32), nullable=True),
        sa.Column("pem", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name="fk_certificates_device_id_devices"),
        sa.PrimaryKeyConstraint("serial", name="pk_certificates"),
        sa.UniqueConstraint("fingerprint", name="uq_certificates_fingerprint"),
    )
    op.create_index("ix_certificates_device_id", "certificates", ["device_id"])
    op.create_index("ix_certificates_key_fingerprint", "certificates", ["key_fingerprint"])
    op.create_index("ix_certificates_status", "certificates", ["status"])
    op.create_table(
        "audit_log",
        sa.Column("seq", _SEQ, autoincrement=False, nullable=False),
        sa.Column("time", UTCDateTime(), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_time", "audit_log", ["time"])
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("last_checkpoint_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_head"),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", _SEQ, autoincrement=False, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("time", UTCDateTime(), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_checkpoints"),
    )
    counters = op.create_table(
        "counters",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_counters"),
    )
    # The rows that serialise appends and allocations exist from the start, so no two writers race to create them.
    op.bulk_insert(head, [{"id": 1, "seq": 0, "hash": "0" * 64, "last_checkpoint_seq": 0}])
    op.bulk_insert(counters, [{"name": "crl_number", "value": 0}])


def downgrade() -> None:
    for table in (
        "counters",
        "audit_checkpoints",
        "audit_head",
        "audit_log",
        "certificates",
        "device_tags",
        "device_group_members",
        "devices",
        "device_groups",
    ):
        op.drop_table(table)
