"""Cloud-to-device commands: the outbox of signed commands with each device's counter.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

from warden.store._tables import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_commands",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("device_id", sa.String(63), nullable=False),
        sa.Column("counter", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("args", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("sent_at", UTCDateTime(), nullable=True),
        sa.Column("result", sa.String(256), nullable=True),
        sa.Column("result_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name="fk_device_commands_device_id_devices"),
        sa.PrimaryKeyConstraint("id", name="pk_device_commands"),
        sa.UniqueConstraint("device_id", "counter", name="uq_device_commands_device_id_counter"),
    )
    op.create_index("ix_device_commands_state", "device_commands", ["state"])


def downgrade() -> None:
    op.drop_table("device_commands")
