"""Provisioning and operator access: enrollment groups, individual enrollments, re-onboarding permissions, API
tokens, published CRLs, and the change counters of enrollment groups and certificate enrollments.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from warden.store._tables import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_COUNTERS = ("enrollment_groups", "enrollment_certificates")


def upgrade() -> None:
    op.create_table(
        "enrollment_groups",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("ca_pem", sa.Text(), nullable=False),
        sa.Column("ca_fingerprints", sa.Text(), nullable=False),
        sa.Column("id_field", sa.String(16), nullable=False),
        sa.Column("profile", sa.String(16), nullable=False),
        sa.Column("validity_days", sa.Integer(), nullable=True),
        sa.Column("tags", sa.Text(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("allow_list", sa.Text(), nullable=False),
        sa.Column("deny_list", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_enrollment_groups"),
    )
    op.create_table(
        "enrollments",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("device_id", sa.String(63), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("profile", sa.String(16), nullable=False),
        sa.Column("validity_days", sa.Integer(), nullable=True),
        sa.Column("certificate_fingerprint", sa.String(64), nullable=True),
        sa.Column("certificate_pem", sa.Text(), nullable=True),
        sa.Column("token_mac", sa.String(64), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("used_at", UTCDateTime(), nullable=True),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name="fk_enrollments_device_id_devices"),
        sa.PrimaryKeyConstraint("id", name="pk_enrollments"),
    )
    op.create_index("ix_enrollments_device_id", "enrollments", ["device_id"])
    op.create_index("ix_enrollments_status", "enrollments", ["status"])
    op.create_index("ix_enrollments_certificate_fingerprint", "enrollments", ["certificate_fingerprint"])
    op.create_index(
        "uq_enrollments_active_certificate",
        "enrollments",
        ["certificate_fingerprint"],
        unique=True,
        sqlite_where=sa.text("status = 'active'"),
        postgresql_where=sa.text("status = 'active'"),
    )
    op.create_table(
        "reonboarding",
        sa.Column("device_id", sa.String(63), nullable=False),
        sa.Column("armed_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("armed_by", sa.String(128), nullable=False),
        sa.Column("reason", sa.String(512), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name="fk_reonboarding_device_id_devices"),
        sa.PrimaryKeyConstraint("device_id", name="pk_reonboarding"),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
    )
    op.create_table(
        "crls",
        sa.Column("number", _SEQ, autoincrement=False, nullable=False),
        sa.Column("this_update", UTCDateTime(), nullable=False),
        sa.Column("next_update", UTCDateTime(), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.Column("entries", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("number", name="pk_crls"),
    )
    # As in 0001: the counter rows exist from the start, so no two writers race to create them.
    counters = sa.table("counters", sa.column("name", sa.String(32)), sa.column("value", sa.BigInteger()))
    op.bulk_insert(counters, [{"name": name, "value": 0} for name in _COUNTERS])


def downgrade() -> None:
    counters = sa.table("counters", sa.column("name", sa.String(32)))
    op.execute(counters.delete().where(counters.c.name.in_(_COUNTERS)))
    for table in ("crls", "api_tokens", "reonboarding", "enrollments", "enrollment_groups"):
        op.drop_table(table)
