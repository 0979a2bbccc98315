"""Storage: SQLAlchemy tables, Alembic migrations, and the repositories that implement the storage protocols of the
registry, the audit log, provisioning and the policy context; leader locks for singleton jobs. SQLAlchemy and
Alembic are used nowhere else."""

from warden.store._db import (
    SCHEMA_REVISION,
    CommitSink,
    Database,
    DatabaseBusyError,
    GroupCommitter,
    LeaderLock,
    LoopCommitter,
)
from warden.store._repos import UnitOfWork

__all__ = [
    "SCHEMA_REVISION",
    "CommitSink",
    "Database",
    "DatabaseBusyError",
    "GroupCommitter",
    "LeaderLock",
    "LoopCommitter",
    "UnitOfWork",
]
