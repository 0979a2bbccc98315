"""Storage: SQLAlchemy tables, Alembic migrations, and the repositories that implement the registry's and the
audit log's storage protocols. SQLAlchemy and Alembic are used nowhere else."""

from warden.store._db import Database, GroupCommitter
from warden.store._repos import UnitOfWork

__all__ = ["Database", "GroupCommitter", "UnitOfWork"]
