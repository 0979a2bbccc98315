"""The database: engine set-up, transactions (units of work), migrations, and group commit.

Invariants:
- SQLite runs in WAL mode with ``synchronous=FULL``: a transaction that has committed survives a crash or power
  loss. Every write transaction starts with ``BEGIN IMMEDIATE``, so writers queue up front instead of failing
  with "database is locked" half-way.
- PostgreSQL runs at READ COMMITTED; the rows that serialise work (the audit head, counters) are taken with
  ``SELECT ... FOR UPDATE``.
- Either every change of a unit of work commits, with its audit records, or none does.
- A singleton job (one CRL publisher, one expiry sweeper, ...) runs only while it holds its leader lock
  (:meth:`Database.try_leader_lock`): a PostgreSQL session-level advisory lock, held by a dedicated connection, so
  among all hub processes on one database at most one holds each name, and a crashed holder's lock is freed by the
  server when its connection drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

from sqlalchemy import Connection, create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, SQLAlchemyError

from warden.core import AlreadyExistsError, ConfigurationError, StorageError, WardenError
from warden.store._repos import UnitOfWork

__all__ = [
    "SCHEMA_REVISION",
    "CommitSink",
    "Database",
    "DatabaseBusyError",
    "GroupCommitter",
    "LeaderLock",
    "LoopCommitter",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

_MIGRATIONS = Path(__file__).parent / "migrations"
#: the newest migration; a test checks that it is Alembic's head
SCHEMA_REVISION = "0004"

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "FULL",
    "foreign_keys": "ON",
    "busy_timeout": "60000",
    # Savepoints and large sorts would otherwise create and delete a temporary file on many commits.
    "temp_store": "MEMORY",
}


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise ConfigurationError(
                "the database URL could not be parsed", hint="use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
            ) from None
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            # One connection per thread via the default pool; NullPool would reopen the file each time.
            self.engine: Engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})
            _install_sqlite_hooks(self.engine)
        else:
            try:
                self.engine = create_engine(url, pool_pre_ping=True, isolation_level="READ COMMITTED")
            except (ArgumentError, ImportError) as e:
                raise ConfigurationError(
                    f"unsupported database URL ({type(e).__name__})", hint="use sqlite:/// or postgresql+psycopg://"
                ) from None
        self._leader_guard = threading.RLock()
        #: the leader locks this object holds, by name (released by :meth:`dispose`)
        self._leaders: dict[str, LeaderLock] = {}

    def dispose(self) -> None:
        with self._leader_guard:
            held = list(self._leaders.values())
        for lock in held:
            lock.release()
        self.engine.dispose()

    # -- leader election ----------------------------------------------------------------------------------------

    def try_leader_lock(self, name: str) -> LeaderLock | None:
        """Take the leader lock ``name`` without waiting: a :class:`LeaderLock` if this caller now holds it, None if
        someone else does. Release it with :meth:`LeaderLock.release` (or use it as a context manager); a job should
        check :attr:`LeaderLock.held` before each round of work, since a lost connection loses the lock.

        On PostgreSQL this is ``pg_try_advisory_lock`` on a 64-bit key derived from ``name``, taken on a connection
        of its own that stays open (in autocommit, never idle in a transaction) until the lock is released: it
        excludes every other holder on the same database, in this process or another. On SQLite, where only one
        process serves a database, the lock is exclusive among the callers of this ``Database`` object only."""
        with self._leader_guard:
            current = self._leaders.get(name)
            if current is not None:
                if current.held:
                    return None
                current.release()
            if self.is_sqlite:
                lock = LeaderLock(name, on_release=self._forget_leader)
            else:
                lock_or_none = self._try_advisory_lock(name)
                if lock_or_none is None:
                    return None
                lock = lock_or_none
            self._leaders[name] = lock
            return lock

    def _try_advisory_lock(self, name: str) -> LeaderLock | None:
        key = leader_lock_key(name)
        try:
            connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except SQLAlchemyError as e:
            raise StorageError(f"the database failed: {_short(e)}", hint=_hint(self.url)) from e
        try:
            acquired = bool(connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar())
        except SQLAlchemyError as e:
            _close_quietly(connection, invalidate=True)
            raise StorageError(f"the database failed: {_short(e)}", hint=_hint(self.url)) from e
        if not acquired:
            _close_quietly(connection, invalidate=False)
            return None
        return LeaderLock(name, connection=connection, on_release=self._forget_leader)

    def _forget_leader(self, lock: LeaderLock) -> None:
        # Called by LeaderLock.release; re-entrant, as try_leader_lock releases a lost lock while holding the guard.
        with self._leader_guard:
            if self._leaders.get(lock.name) is lock:
                del self._leaders[lock.name]

    @contextlib.contextmanager
    def transaction(self, *, readonly: bool = False, nowait: bool = False) -> Iterator[UnitOfWork]:
        """A unit of work: commits when the block ends normally, rolls back on any exception. ``nowait`` (SQLite):
        raise :class:`DatabaseBusyError` at once, before the block runs, when another connection holds the write
        lock, instead of waiting for it."""
        callbacks: list[Callable[[], None]] = []
        began = False
        try:
            with self.engine.connect() as connection:
                if nowait and self.is_sqlite and not readonly:
                    connection = connection.execution_options(warden_nowait=True)
                if readonly:
                    connection = connection.execution_options(warden_readonly=True)
                    if not self.is_sqlite:
                        # One snapshot for the whole read (audit verify reads head, records and checkpoints).
                        connection = connection.execution_options(isolation_level="REPEATABLE READ")
                with connection.begin():
                    began = True
                    uow = UnitOfWork(connection, is_sqlite=self.is_sqlite)
                    yield uow
                    callbacks = uow.callbacks
        except IntegrityError as e:
            raise _integrity_error(e) from e
        except DBAPIError as e:
            if nowait and not began and "locked" in _short(e).lower():
                raise DatabaseBusyError("another connection holds the database's write lock") from e
            raise StorageError(f"the database failed: {_short(e)}", hint=_hint(self.url)) from e
        except SQLAlchemyError as e:
            raise StorageError(f"the database failed: {_short(e)}") from e
        for callback in callbacks:
            # The transaction has committed: a failing follow-up (such as mirroring a checkpoint to a file) must
            # not make the caller believe its work was lost; a checkpoint the mirror lacks is still verified by
            # its signature.
            try:
                callback()
            except Exception:
                log.exception("a follow-up of a committed transaction failed")

    # -- migrations ---------------------------------------------------------------------------------------------

    # Alembic is imported where it is used: it costs a fifth of a second at start-up, and most commands never
    # migrate.
    def _alembic_config(self, connection: Connection) -> Any:
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        config.attributes["connection"] = connection
        return config

    def migrate(self) -> None:
        """Bring the schema to the newest revision."""
        from alembic import command

        try:
            with self.engine.begin() as connection:
                command.upgrade(self._alembic_config(connection), "head")
        except SQLAlchemyError as e:
            raise StorageError(f"database migration failed: {_short(e)}", hint=_hint(self.url)) from e

    def drop_schema(self) -> None:
        """Undo every migration (used when ``warden init`` fails half-way on a server database)."""
        from alembic import command

        try:
            with self.engine.begin() as connection:
                command.downgrade(self._alembic_config(connection), "base")
        except SQLAlchemyError as e:
            raise StorageError(f"removing the schema failed: {_short(e)}", hint=_hint(self.url)) from e

    def revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        try:
            with self.engine.connect() as connection:
                return MigrationContext.configure(connection).get_current_revision()
        except SQLAlchemyError as e:
            raise StorageError(f"cannot open the database: {_short(e)}", hint=_hint(self.url)) from e

    def head_revision(self) -> str | None:
        from alembic.script import ScriptDirectory

        with self.engine.connect() as connection:
            return ScriptDirectory.from_config(self._alembic_config(connection)).get_current_head()

    def current_revision(self) -> str | None:
        """The schema revision recorded in the database, read without Alembic (it is slow to import)."""
        try:
            with self.engine.connect() as connection:
                if not inspect(connection).has_table("alembic_version"):
                    return None
                return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except SQLAlchemyError as e:
            raise StorageError(f"cannot open the database: {_short(e)}", hint=_hint(self.url)) from e

    def ensure_current(self) -> None:
        current = self.current_revision()
        if current is None:
            raise StorageError(
                "the database has no Warden schema", hint="run 'warden init' (or check the database URL)"
            )
        if current != SCHEMA_REVISION:
            raise StorageError(
                f"the database schema is at revision {current}, this Warden expects {SCHEMA_REVISION}",
                hint="run 'warden db upgrade'",
            )


def leader_lock_key(name: str) -> int:
    """The PostgreSQL advisory lock key (a signed 64-bit integer) of leader lock ``name``: stable across processes
    and versions, and namespaced so that it does not collide with other applications' keys by accident."""
    digest = hashlib.sha256(f"warden.leader:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class LeaderLock:
    """A held leader lock (see :meth:`Database.try_leader_lock`). Thread-safe; release is idempotent."""

    def __init__(
        self, name: str, *, connection: Connection | None = None, on_release: Callable[[LeaderLock], None]
    ) -> None:
        self.name = name
        self._connection = connection
        self._on_release = on_release
        self._guard = threading.Lock()
        self._released = False

    @property
    def held(self) -> bool:
        """Whether the lock is still held. On PostgreSQL this asks the server (``SELECT 1`` on the lock's
        connection): a connection that died took the lock with it, and the lock then counts as released."""
        with self._guard:
            if self._released:
                return False
            if self._connection is None:
                return True
            try:
                self._connection.execute(text("SELECT 1")).scalar()
                return True
            except SQLAlchemyError:
                log.warning("the connection holding leader lock %r was lost", self.name)
        self.release()
        return False

    def release(self) -> None:
        """Give the lock up. The PostgreSQL connection is closed for good (not returned to the pool), which frees
        the advisory lock even if an explicit unlock could not be sent."""
        with self._guard:
            if self._released:
                return
            self._released = True
            connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(SQLAlchemyError):
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": leader_lock_key(self.name)})
            _close_quietly(connection, invalidate=True)
        self._on_release(self)

    def __enter__(self) -> LeaderLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _close_quietly(connection: Connection, *, invalidate: bool) -> None:
    with contextlib.suppress(SQLAlchemyError):
        if invalidate:
            connection.invalidate()
        connection.close()


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module, so that BEGIN IMMEDIATE is ours to send.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for name, value in SQLITE_PRAGMAS.items():
            cursor.execute(f"PRAGMA {name}={value}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        options = connection.get_execution_options()
        if options.get("warden_readonly", False):
            connection.exec_driver_sql("BEGIN")
        elif options.get("warden_nowait", False):
            # Take the write lock only if it is free now: the loop committer must not sleep in SQLite's busy
            # handler while a CLI command or a job holds the lock (it retries later instead).
            connection.exec_driver_sql("PRAGMA busy_timeout=0")
            try:
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            finally:
                connection.exec_driver_sql(f"PRAGMA busy_timeout={SQLITE_PRAGMAS['busy_timeout']}")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def _short(e: Exception) -> str:
    text_ = str(getattr(e, "orig", e) or e).strip().splitlines()
    return text_[0][:200] if text_ else type(e).__name__


def _hint(url: str) -> str:
    return f"check the database at {make_url(url).render_as_string(hide_password=True)}"


def _integrity_error(e: IntegrityError) -> WardenError:
    message = _short(e).lower()
    if "unique" in message or "duplicate" in message:
        return AlreadyExistsError(f"a record with the same key exists already: {_short(e)}")
    return StorageError(f"the change violates a database constraint: {_short(e)}")


class CommitSink(Protocol):
    """Where the committer reports work submitted with :meth:`GroupCommitter.submit`: once per committed (or
    failed) batch, with ``(token, ok, value)`` for each item of this sink, in the committer's thread. ``value`` is
    the item's result when ``ok``, else the exception it failed with."""

    def deliver(self, outcomes: list[tuple[Any, bool, Any]]) -> None: ...


class _Work:
    """One caller's request. A blocking caller waits on ``done`` (acquired at creation) until the committer
    releases it: a plain lock costs far less than a Future's condition variable. A submitted request has a ``sink``
    instead, told once per batch."""

    __slots__ = ("done", "fn", "item", "ok", "sink", "token", "value")

    def __init__(
        self,
        fn: Callable[[UnitOfWork, Sequence[Any]], Sequence[Any]],
        item: Any,
        sink: CommitSink | None = None,
        token: Any = None,
    ) -> None:
        self.fn = fn
        self.item = item
        self.ok = False
        self.value: Any = None
        self.sink = sink
        self.token = token
        self.done: threading.Lock | None = None
        if sink is None:
            self.done = threading.Lock()
            self.done.acquire()

    def finish(self, ok: bool, value: Any) -> None:
        self.ok, self.value = ok, value
        if self.done is not None:
            self.done.release()


class DatabaseBusyError(StorageError):
    """A ``nowait`` transaction found the write lock taken; nothing was done."""


class _RetryBatchError(Exception):
    """The fast attempt at a batch failed: it is rolled back and recorded again with savepoints."""


#: the committer counts as busy when its previous commit ended less than this long before the next request came
_BUSY_SECONDS = 0.02


class _Committer:
    """What both committers share: recording a batch of requests in one transaction."""

    def __init__(self, database: Database, *, max_batch: int = 512, linger: float = 0.0) -> None:
        self._db = database
        self._max_batch = max_batch
        self._linger = linger
        self.commits = 0
        self.requests = 0

    def _commit(self, batch: list[_Work], *, nowait: bool = False) -> bool:
        """Record ``batch`` and tell its callers; False when ``nowait`` found the write lock taken (then nothing
        was done and nobody was told: the caller tries again later)."""
        groups: dict[Callable[[UnitOfWork, Sequence[Any]], Sequence[Any]], list[_Work]] = {}
        for work in batch:
            groups.setdefault(work.fn, []).append(work)
        outcomes: list[tuple[_Work, bool, Any]] = []
        try:
            try:
                # Fast path, no savepoints. Any failure rolls the whole attempt back (nothing of it was committed
                # or returned) and the batch is recorded again below, a savepoint per group and per item if need be.
                with self._db.transaction(nowait=nowait) as uow:
                    for fn, works in groups.items():
                        try:
                            results = fn(uow, [w.item for w in works])
                        except Exception as e:
                            raise _RetryBatchError from e
                        if len(results) != len(works):
                            raise _RetryBatchError
                        outcomes.extend((w, True, r) for w, r in zip(works, results, strict=True))
            except _RetryBatchError:
                outcomes = []
                with self._db.transaction(nowait=nowait) as uow:
                    for fn, works in groups.items():
                        outcomes.extend(_run_group(uow, fn, works))
        except DatabaseBusyError:
            return False
        except Exception as e:  # the commit itself failed: nobody's work is durable
            outcomes = [(work, False, e) for work in batch]
        else:
            self.commits += 1
            self.requests += len(batch)
        sinks: dict[int, tuple[CommitSink, list[tuple[Any, bool, Any]]]] = {}
        for work, ok, value in outcomes:
            work.finish(ok, value)
            if work.sink is not None:
                sinks.setdefault(id(work.sink), (work.sink, []))[1].append((work.token, ok, value))
        for sink, delivered in sinks.values():
            try:
                sink.deliver(delivered)
            except Exception:  # a sink that cannot take its results must not stop the committer
                log.exception("a commit sink failed")
        return True


def _wait(work: _Work) -> Any:
    assert work.done is not None
    work.done.acquire()
    if not work.ok:
        raise work.value
    return work.value


class GroupCommitter(_Committer):
    """Records work from many threads in shared transactions, in a thread of its own: one commit (one fsync) for
    every request that arrived while the previous commit was running.

    A request is ``(fn, item)``, where ``fn`` records a *batch* of items: the committer hands each ``fn`` all the
    items queued for it at once, in a savepoint. If that batch fails, its items are run again one by one, each in
    its own savepoint, so a bad item fails alone. Every caller returns only after the transaction holding its work
    has committed (or raises what failed)."""

    def __init__(self, database: Database, *, max_batch: int = 512, linger: float = 0.0) -> None:
        super().__init__(database, max_batch=max_batch, linger=linger)
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="warden-group-commit", daemon=True)
        self._thread.start()

    def run(self, fn: Callable[[UnitOfWork, Sequence[T]], Sequence[R]], item: T) -> R:
        work = _Work(fn, item)
        self._queue.put(work)
        result: R = _wait(work)
        return result

    def submit(
        self, fn: Callable[[UnitOfWork, Sequence[T]], Sequence[R]], item: T, sink: CommitSink, token: object
    ) -> None:
        """Queue ``item`` without waiting: ``sink`` hears of it, with ``token``, once its batch has committed or
        failed (an event loop's sink wakes the loop once per batch, not once per item)."""
        self._queue.put(_Work(fn, item, sink, token))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        last_commit = -1.0
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            # Under a stream of requests (the previous commit ended moments ago) the batch stays open for a little
            # while: each commit costs an fsync and a handful of statements whatever it holds, and a lone request
            # pays all of that itself. A request that arrives when the committer was idle is committed at once.
            linger = self._linger if time.monotonic() - last_commit < _BUSY_SECONDS else 0.0
            deadline = time.monotonic() + linger
            while len(batch) < self._max_batch:
                try:
                    remaining = deadline - time.monotonic()
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._commit(batch)
            last_commit = time.monotonic()
            if stop:
                return


class LoopCommitter(_Committer):
    """The group committer run by an event loop, in the loop's own thread: on SQLite (a local file, one worker)
    the hub's server records its writes this way. Measured with EST enrollment: a committer thread costs more CPU
    than the work it does, because it and the loop hand the GIL to each other around every SQLite call and every
    TLS operation (about 20 futex calls per enrollment). The loop is blocked while a batch commits, about a
    millisecond, once per batch.

    :meth:`submit` is for the loop's own coroutines; :meth:`run` for other threads (API calls, jobs), which wait as
    they do with :class:`GroupCommitter`. A batch is committed at the loop's next turn, or under a stream of
    requests after ``linger`` (see :class:`GroupCommitter`)."""

    def __init__(
        self, database: Database, loop: asyncio.AbstractEventLoop, *, max_batch: int = 512, linger: float = 0.0
    ) -> None:
        super().__init__(database, max_batch=max_batch, linger=linger)
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._pending: list[_Work] = []
        self._timer: asyncio.Handle | None = None
        self._last_commit = -1.0
        self._busy_delay = 0.0
        # Work from other threads on its way into the loop: close() commits what the loop never took.
        self._lock = threading.Lock()
        self._foreign: set[_Work] = set()
        self._closed = False

    def run(self, fn: Callable[[UnitOfWork, Sequence[T]], Sequence[R]], item: T) -> R:
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError("LoopCommitter.run would block its own event loop; use submit")
        work = _Work(fn, item)
        with self._lock:
            if self._closed:
                raise StorageError("the hub's writer has shut down")
            self._foreign.add(work)
        with contextlib.suppress(RuntimeError):  # the loop is closed: close() commits the work
            self._loop.call_soon_threadsafe(self._take, work)
        result: R = _wait(work)
        return result

    def _take(self, work: _Work) -> None:
        with self._lock:
            if work not in self._foreign:
                return  # close() took it
            self._foreign.discard(work)
        self._add(work)

    def submit(
        self, fn: Callable[[UnitOfWork, Sequence[T]], Sequence[R]], item: T, sink: CommitSink, token: object
    ) -> None:
        """Queue ``item`` (from the loop's thread); ``sink`` hears of it once its batch has committed or failed."""
        if threading.get_ident() != self._loop_thread:
            raise RuntimeError("LoopCommitter.submit is for the loop's own thread; other threads use run")
        if self._closed:
            raise StorageError("the hub's writer has shut down")
        self._add(_Work(fn, item, sink, token))

    def _add(self, work: _Work) -> None:
        self._pending.append(work)
        if len(self._pending) >= self._max_batch:
            self._flush()
        elif self._timer is None:
            busy = time.monotonic() - self._last_commit < _BUSY_SECONDS
            if busy and self._linger > 0:
                self._timer = self._loop.call_later(self._linger, self._flush)
            else:
                self._timer = self._loop.call_soon(self._flush)

    def _flush(self, *, wait: bool = False) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch and not self._commit(batch, nowait=not wait):
            # Another writer (a CLI command, a job's thread) holds SQLite's write lock: try again shortly rather
            # than stall every connection of the loop in SQLite's busy handler.
            self._pending = batch + self._pending
            self._busy_delay = min(self._busy_delay * 2, 0.05) if self._busy_delay else 0.002
            self._timer = self._loop.call_later(self._busy_delay, self._flush)
            return
        self._busy_delay = 0.0
        self._last_commit = time.monotonic()

    def close(self) -> None:
        """Commit what is pending, waiting for the write lock if need be (call it from the loop's thread, or once
        the loop has stopped). Later writes are refused."""
        with self._lock:
            self._closed = True
            stranded, self._foreign = list(self._foreign), set()
        self._pending.extend(stranded)
        self._flush(wait=True)


def _run_group(
    uow: UnitOfWork, fn: Callable[[UnitOfWork, Sequence[Any]], Sequence[Any]], works: list[_Work]
) -> list[tuple[_Work, bool, Any]]:
    try:
        with uow.savepoint():
            results = fn(uow, [w.item for w in works])
            if len(results) != len(works):
                raise RuntimeError(f"{fn!r} returned {len(results)} results for {len(works)} items")
        return [(w, True, r) for w, r in zip(works, results, strict=True)]
    except Exception as e:
        if len(works) == 1:
            return [(works[0], False, e)]
    # The batch failed as a whole: find the bad items by recording each alone.
    outcomes: list[tuple[_Work, bool, Any]] = []
    for work in works:
        try:
            with uow.savepoint():
                outcomes.append((work, True, fn(uow, [work.item])[0]))
        except Exception as e:  # this item alone is rolled back and its caller told why
            outcomes.append((work, False, e))
    return outcomes
