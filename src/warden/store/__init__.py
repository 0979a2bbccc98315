"""Storage: SQLAlchemy tables, Alembic migrations, and the repositories that implement the registry's and the
audit log's storage protocols. SQLAlchemy and Alembic are used nowhere else."""

from warden.store._db import SCHEMA_REVISION, Database, GroupCommitter
from warden.store._repos import UnitOfWork

__all__ = ["SCHEMA_REVISION", "Database", "GroupCommitter", "UnitOfWork"]
