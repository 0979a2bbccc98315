"""The group committer run by an event loop (LoopCommitter) on a real SQLite database: a batch per loop turn, results
through a sink in the loop's thread, blocking callers from other threads, a bad item failing alone, and the hub
moving its group commit into the server's loop."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy.engine import make_url

from tests.hubserver import ManufacturerCA, csr_der
from warden.core import AlreadyExistsError, StorageError
from warden.hub import Hub
from warden.provisioning import EnrollmentPlan, EnrollmentResult
from warden.registry import CertificateStatus, DeviceGroup, DeviceState, RegistryUnitOfWork
from warden.store import Database, DatabaseBusyError, LoopCommitter, UnitOfWork

NOW = dt.datetime(2026, 11, 24, tzinfo=dt.UTC)
SOURCE = "192.0.2.9"


@pytest.fixture
def database(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'w.db'}")
    db.migrate()
    return db


def add_groups(uow: UnitOfWork | RegistryUnitOfWork, names: Sequence[str]) -> list[str]:
    for name in names:
        uow.groups.insert(DeviceGroup(name=name, description="", settings={}, created_at=NOW))
    return [f"added {n}" for n in names]


def group_names(database: Database) -> list[str]:
    # A fresh engine: what it sees was committed, not merely written on the committer's connection.
    other = Database(database.url)
    try:
        with other.transaction(readonly=True) as uow:
            return sorted(g.name for g in uow.groups.find())
    finally:
        other.dispose()


class FutureSink:
    """Settles the asyncio future each token is, in the loop's thread (handing over from another thread, as the
    EST server's sink does). Keeps the size of every ``deliver`` call and the thread it came in."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls: list[int] = []
        self.threads: set[int] = set()

    def deliver(self, outcomes: list[tuple[Any, bool, Any]]) -> None:
        self.calls.append(len(outcomes))
        self.threads.add(threading.get_ident())
        try:
            in_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            in_loop = False
        if in_loop:
            _settle(outcomes)
        else:
            self.loop.call_soon_threadsafe(_settle, outcomes)


def _settle(outcomes: list[tuple[Any, bool, Any]]) -> None:
    for future, ok, value in outcomes:
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def submit(committer: LoopCommitter, sink: FutureSink, name: str) -> asyncio.Future[str]:
    future: asyncio.Future[str] = sink.loop.create_future()
    committer.submit(add_groups, name, sink, future)
    return future


def test_submissions_of_one_loop_turn_share_one_commit(database: Database) -> None:
    names = [f"g-{i}" for i in range(10)]

    async def main() -> tuple[list[str], list[str], LoopCommitter, FutureSink, int]:
        loop = asyncio.get_running_loop()
        committer = LoopCommitter(database, loop)
        sink = FutureSink(loop)

        async def one(name: str) -> str:
            return await submit(committer, sink, name)

        # Ten tasks, each submitting in its first step: all ten steps run in one turn, the commit at the next.
        together = await asyncio.gather(*(one(n) for n in names))
        assert (committer.commits, committer.requests) == (1, 10)
        # One at a time, each awaited before the next is submitted: a commit each.
        apart = [await submit(committer, sink, f"h-{i}") for i in range(3)]
        return together, apart, committer, sink, threading.get_ident()

    together, apart, committer, sink, loop_thread = asyncio.run(main())
    assert together == [f"added {n}" for n in names]
    assert apart == [f"added h-{i}" for i in range(3)]
    assert (committer.commits, committer.requests) == (4, 13)
    assert sink.calls == [10, 1, 1, 1]
    assert sink.threads == {loop_thread}  # delivered in the loop's own thread
    assert group_names(database) == sorted([*names, "h-0", "h-1", "h-2"])


def test_a_full_batch_is_committed_at_once(database: Database) -> None:
    async def main() -> tuple[list[str], list[int], LoopCommitter, FutureSink]:
        loop = asyncio.get_running_loop()
        committer = LoopCommitter(database, loop, max_batch=4)
        sink = FutureSink(loop)
        futures = [submit(committer, sink, f"g-{i}") for i in range(10)]
        # The 4th and the 8th submission filled a batch: those were committed within submit, the rest waits.
        done = [i for i, f in enumerate(futures) if f.done()]
        assert committer.commits == 2
        return list(await asyncio.gather(*futures)), done, committer, sink

    results, done, committer, sink = asyncio.run(main())
    assert done == list(range(8))
    assert results == [f"added g-{i}" for i in range(10)]
    assert committer.commits == 3
    assert sink.calls == [4, 4, 2]


def test_a_bad_item_fails_alone(database: Database) -> None:
    with database.transaction() as uow:
        add_groups(uow, ["taken"])
    names = ["n-0", "n-1", "taken", "n-2", "n-3"]

    async def main() -> tuple[list[str | BaseException], LoopCommitter, FutureSink]:
        loop = asyncio.get_running_loop()
        committer = LoopCommitter(database, loop)
        sink = FutureSink(loop)
        futures = [submit(committer, sink, n) for n in names]
        results = await asyncio.gather(*futures, return_exceptions=True)
        return list(results), committer, sink

    results, committer, sink = asyncio.run(main())
    assert isinstance(results[2], AlreadyExistsError)
    assert [r for i, r in enumerate(results) if i != 2] == ["added n-0", "added n-1", "added n-2", "added n-3"]
    assert committer.commits == 1
    assert sink.calls == [5]
    assert group_names(database) == sorted(names)


def test_run_from_other_threads_waits_for_the_commit(database: Database) -> None:
    async def main() -> tuple[list[str], LoopCommitter]:
        loop = asyncio.get_running_loop()
        committer = LoopCommitter(database, loop)

        def write(name: str) -> str:
            result = committer.run(add_groups, name)
            # Answered after the commit: another connection sees it already.
            assert name in group_names(database)
            return result

        results = await asyncio.gather(*(loop.run_in_executor(None, write, f"t-{i}") for i in range(6)))
        return list(results), committer

    results, committer = asyncio.run(main())
    assert results == [f"added t-{i}" for i in range(6)]
    assert committer.requests == 6
    assert 1 <= committer.commits <= 6
    assert group_names(database) == [f"t-{i}" for i in range(6)]


def test_run_from_the_loop_thread_is_refused(database: Database) -> None:
    async def main() -> LoopCommitter:
        committer = LoopCommitter(database, asyncio.get_running_loop())
        with pytest.raises(RuntimeError, match="use submit"):
            committer.run(add_groups, "blocked")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return committer

    committer = asyncio.run(main())
    assert (committer.commits, committer.requests) == (0, 0)
    assert group_names(database) == []


def test_close_commits_what_is_pending(database: Database) -> None:
    async def main() -> tuple[list[bool], LoopCommitter]:
        loop = asyncio.get_running_loop()
        committer = LoopCommitter(database, loop)
        sink = FutureSink(loop)
        futures = [submit(committer, sink, f"p-{i}") for i in range(3)]
        assert committer.commits == 0
        committer.close()  # within this step: no turn of the loop in between
        done = [f.done() for f in futures]
        assert [f.result() for f in futures] == ["added p-0", "added p-1", "added p-2"]
        return done, committer

    done, committer = asyncio.run(main())
    assert done == [True, True, True]
    assert (committer.commits, committer.requests) == (1, 3)
    assert group_names(database) == ["p-0", "p-1", "p-2"]


def test_close_commits_what_is_pending_on_a_loop_that_no_longer_runs(database: Database) -> None:
    delivered: list[tuple[Any, bool, Any]] = []

    class ListSink:
        def deliver(self, outcomes: list[tuple[Any, bool, Any]]) -> None:
            delivered.extend(outcomes)

    loop = asyncio.new_event_loop()
    try:
        committer = LoopCommitter(database, loop)
        for i in range(3):
            committer.submit(add_groups, f"q-{i}", ListSink(), i)
        assert group_names(database) == []  # the loop never turned
        committer.close()
    finally:
        loop.close()
    assert delivered == [(i, True, f"added q-{i}") for i in range(3)]
    assert (committer.commits, committer.requests) == (1, 3)
    assert group_names(database) == ["q-0", "q-1", "q-2"]


def test_a_busy_loop_committer_lingers_for_more_items(database: Database) -> None:
    # One item per loop turn: without the linger each would be committed at the next turn, alone. Right after a
    # commit the committer is busy and keeps the batch open for 50 ms instead.
    async def main() -> tuple[list[str], LoopCommitter]:
        loop = asyncio.get_running_loop()
        committer = LoopCommitter(database, loop, linger=0.05)
        sink = FutureSink(loop)
        assert await submit(committer, sink, "warm-up") == "added warm-up"
        futures = []
        for i in range(30):
            futures.append(submit(committer, sink, f"l-{i}"))
            await asyncio.sleep(0)
        return list(await asyncio.gather(*futures)), committer

    results, committer = asyncio.run(main())
    assert results == [f"added l-{i}" for i in range(30)]
    assert committer.requests == 31
    assert committer.commits - 1 <= 5, f"{committer.commits - 1} commits for 30 items"


# -- another writer holds the lock; shutting down -------------------------------------------------------------


class WriteLock:
    """SQLite's write lock, held by a plain ``sqlite3`` connection of its own (as a CLI command or another process
    would hold it) from ``with`` until :meth:`release`. A guard releases it after ``guard`` seconds whatever happens:
    a caller that waits for the lock in SQLite's busy handler (what these tests look for) then fails its test instead
    of hanging it for the 60 s busy timeout."""

    def __init__(self, database: Database, *, guard: float = 2.0) -> None:
        path = make_url(database.url).database
        assert path
        self._connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._mutex = threading.Lock()
        self._held = False
        self.guard_fired = False
        self._timer = threading.Timer(guard, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> WriteLock:
        self._connection.execute("BEGIN IMMEDIATE")
        self._held = True
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self.release()
        self._connection.close()

    def _expire(self) -> None:
        self.guard_fired = True
        self.release()

    def release(self) -> bool:
        """Give the lock up; False if it was not held any more."""
        with self._mutex:
            if not self._held:
                return False
            self._held = False
            self._connection.execute("ROLLBACK")
            return True


def wait_until_handed_over(committer: LoopCommitter) -> None:
    """Until a thread's ``run`` has registered its work (the committer offers no public sign of it)."""
    deadline = time.monotonic() + 2
    while not committer._foreign:
        assert time.monotonic() < deadline, "the thread never handed its work over"
        time.sleep(0.001)


def outcome_of(call: Callable[[], object]) -> object:
    try:
        return call()
    except Exception as e:
        return e


def test_a_write_lock_held_elsewhere_does_not_block_the_loop(database: Database) -> None:
    async def main() -> tuple[int, tuple[bool, list[bool], list[int], int], bool, list[str], str, FutureSink, int]:
        loop = asyncio.get_running_loop()
        committer = LoopCommitter(database, loop)
        sink = FutureSink(loop)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        with WriteLock(database) as lock:
            first = submit(committer, sink, "w-0")
            await asyncio.sleep(0.25)
            later = [submit(committer, sink, f"w-{i}") for i in (1, 2)]  # they join the batch that waits
            await asyncio.sleep(0.25)
            ticks_while_held = ticks
            before_release = (first.done(), [f.done() for f in later], list(sink.calls), committer.commits)
            released = lock.release()
            assert not lock.guard_fired
        results = list(await asyncio.wait_for(asyncio.gather(first, *later), 2))
        after_results = committer.commits
        # Back to normal once the lock is free: the next item is committed at the next turn.
        next_one = await asyncio.wait_for(submit(committer, sink, "w-3"), 2)
        ticker.cancel()
        return ticks_while_held, before_release, released, results, next_one, sink, after_results

    ticks, before_release, released, results, next_one, sink, commits = asyncio.run(main())
    # A loop stuck in SQLite's busy handler would not have ticked at all (or once) in the half second.
    assert ticks >= 10, f"the loop ticked {ticks} times while another connection held the write lock"
    assert before_release == (False, [False, False], [], 0)  # nothing committed or told while the lock was held
    assert released  # by the test, not by the guard
    assert results == ["added w-0", "added w-1", "added w-2"]
    assert commits == 1
    assert next_one == "added w-3"
    assert sink.calls == [3, 1]
    assert group_names(database) == ["w-0", "w-1", "w-2", "w-3"]


def test_close_commits_work_a_thread_handed_over_after_the_loop_closed(database: Database) -> None:
    async def make() -> LoopCommitter:
        return LoopCommitter(database, asyncio.get_running_loop())

    committer = asyncio.run(make())  # its loop is closed once asyncio.run returns
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(outcome_of(lambda: committer.run(add_groups, "late"))))
    thread.start()
    try:
        wait_until_handed_over(committer)
        thread.join(timeout=0.1)
        # The closed loop could not take the work: the thread waits (it did not fail), and nothing is recorded.
        assert thread.is_alive()
        assert outcome == []
        assert group_names(database) == []
        committer.close()
    finally:
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert outcome == ["added late"]
    assert (committer.commits, committer.requests) == (1, 1)
    assert group_names(database) == ["late"]


def test_close_commits_thread_work_the_loop_never_took_and_the_loop_does_not_record_it_again(
    database: Database,
) -> None:
    loop = asyncio.new_event_loop()
    outcome: list[object] = []
    try:
        committer = LoopCommitter(database, loop)  # this thread's loop, which does not run
        thread = threading.Thread(
            target=lambda: outcome.append(outcome_of(lambda: committer.run(add_groups, "queued")))
        )
        thread.start()
        try:
            wait_until_handed_over(committer)
            committer.close()
        finally:
            thread.join(timeout=5)
        assert not thread.is_alive()
        assert outcome == ["added queued"]
        # The loop runs the hand-over the thread scheduled at last: close() took that work, nothing is added.
        loop.run_until_complete(asyncio.sleep(0.01))
    finally:
        loop.close()
    assert (committer.commits, committer.requests) == (1, 1)
    assert group_names(database) == ["queued"]


def test_a_closed_loop_committer_refuses_writes_and_submit_is_for_the_loop_thread(database: Database) -> None:
    async def main() -> tuple[object, tuple[int, int], object, LoopCommitter, FutureSink]:
        loop = asyncio.get_running_loop()
        committer = LoopCommitter(database, loop)
        sink = FutureSink(loop)
        token = loop.create_future()
        wrong_thread = await loop.run_in_executor(
            None, outcome_of, lambda: committer.submit(add_groups, "elsewhere", sink, token)
        )
        await asyncio.sleep(0.01)
        open_counts = (committer.commits, committer.requests)

        committer.close()
        with pytest.raises(StorageError, match="shut down"):
            committer.submit(add_groups, "after-close", sink, loop.create_future())
        late_run = await loop.run_in_executor(None, outcome_of, lambda: committer.run(add_groups, "after-close-run"))
        await asyncio.sleep(0.01)
        return wrong_thread, open_counts, late_run, committer, sink

    wrong_thread, open_counts, late_run, committer, sink = asyncio.run(main())
    assert isinstance(wrong_thread, RuntimeError)
    assert "loop's own thread" in str(wrong_thread)
    assert open_counts == (0, 0)  # the refused item was not queued
    assert isinstance(late_run, StorageError)
    assert "shut down" in str(late_run)
    assert (committer.commits, committer.requests) == (0, 0)
    assert sink.calls == []
    assert group_names(database) == []


def test_a_nowait_transaction_fails_at_once_while_another_connection_holds_the_lock(database: Database) -> None:
    assert issubclass(DatabaseBusyError, StorageError)
    with database.transaction(nowait=True) as uow:  # a free lock: an ordinary transaction
        add_groups(uow, ["free"])

    ran: list[bool] = []

    def write() -> None:
        with database.transaction(nowait=True) as uow:
            ran.append(True)
            add_groups(uow, ["never"])

    with WriteLock(database) as lock:
        with pytest.raises(DatabaseBusyError, match="write lock"):
            write()
        assert not lock.guard_fired
    assert ran == []  # raised before the block

    # The pooled connection's busy timeout is back ...
    with database.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 60000

    # ... so an ordinary transaction waits for a writer that holds the lock instead of failing with "locked".
    taken, released = threading.Event(), threading.Event()

    def hold() -> None:
        with WriteLock(database) as lock:
            taken.set()
            time.sleep(0.3)
            released.set()
            lock.release()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert taken.wait(2)
        with database.transaction() as uow:
            add_groups(uow, ["after"])
        assert released.is_set()  # it got the lock only once the holder gave it up
    finally:
        holder.join(timeout=5)
    assert not holder.is_alive()
    assert group_names(database) == ["after", "free"]


# -- the hub ------------------------------------------------------------------------------------------------------


def committer_threads() -> int:
    return sum(t.name == "warden-group-commit" for t in threading.enumerate())


def test_a_hub_on_sqlite_moves_its_group_commit_into_the_loop(hub_factory: Callable[..., Hub], tmp_path: Path) -> None:
    hub = hub_factory(group_commit=True)
    maker = ManufacturerCA(tmp_path / "maker")
    hub.provisioning.add_group(
        "line-1", ca_pem=maker.certificate.public_bytes(serialization.Encoding.PEM), actor="admin"
    )

    def plan(device_id: str) -> EnrollmentPlan:
        onboarding = maker.idevid(device_id).certificate.public_bytes(serialization.Encoding.DER)
        return hub.provisioning.plan_with_certificate(onboarding, csr_der(device_id)[0], source=SOURCE)

    async def main() -> tuple[EnrollmentResult, EnrollmentResult, FutureSink, int, int]:
        loop = asyncio.get_running_loop()
        threads_before = committer_threads()
        assert hub.commit_in(loop)
        threads_after = committer_threads()
        assert not hub.commit_in(loop)  # it commits in the loop already
        sink = FutureSink(loop)

        first = plan("dev-1")
        future: asyncio.Future[Any] = loop.create_future()
        assert hub.submit_write(first.issue.fn, first.issue.item, sink, future)
        submitted: EnrollmentResult = first.finish(await future)

        # The hub's blocking writes now go through the loop: refused in its own thread, fine from another.
        second = plan("dev-2")
        with pytest.raises(RuntimeError):
            hub.provisioning.complete(second)
        blocking = await loop.run_in_executor(None, hub.provisioning.complete, second)
        return submitted, blocking, sink, threads_before - threads_after, threading.get_ident()

    submitted, blocking, sink, stopped, loop_thread = asyncio.run(main())
    assert stopped == 1  # the committer thread was closed
    assert sink.threads == {loop_thread}
    assert (submitted.device_id, blocking.device_id) == ("dev-1", "dev-2")
    for result in (submitted, blocking):
        result.issued.certificate.verify_directly_issued_by(hub.ca_info().issuing)
        record = hub.certificates.find(device_id=result.device_id)
        assert [(c.serial, c.status) for c in record] == [(result.issued.record.serial, CertificateStatus.GOOD)]
        assert hub.devices.get_device(result.device_id).state is DeviceState.ACTIVE


def test_a_hub_without_group_commit_keeps_writing_itself(hub_factory: Callable[..., Hub]) -> None:
    hub = hub_factory()

    async def main() -> tuple[bool, bool, FutureSink]:
        loop = asyncio.get_running_loop()
        sink = FutureSink(loop)
        moved = hub.commit_in(loop)
        handed = hub.submit_write(add_groups, "never", sink, loop.create_future())
        await asyncio.sleep(0)
        return moved, handed, sink

    moved, handed, sink = asyncio.run(main())
    assert (moved, handed) == (False, False)
    assert sink.calls == []


@pytest.mark.postgres
def test_a_hub_on_postgres_keeps_its_committer_thread(hub_factory: Callable[..., Hub], postgres_url: str) -> None:
    hub = hub_factory(database_url=postgres_url, group_commit=True)
    hub.devices.add_group("seed", actor="admin")

    async def main() -> tuple[bool, list[str], FutureSink]:
        loop = asyncio.get_running_loop()
        moved = hub.commit_in(loop)
        sink = FutureSink(loop)
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(3)]
        for i, future in enumerate(futures):
            assert hub.submit_write(add_groups, f"pg-{i}", sink, future)
        return moved, list(await asyncio.gather(*futures)), sink

    moved, results, sink = asyncio.run(main())
    assert not moved
    assert results == [f"added pg-{i}" for i in range(3)]
    # Delivered by the committer's thread, which hands the outcomes to the loop.
    assert sink.threads
    assert threading.get_ident() not in sink.threads
    assert sorted(g.name for g, _ in hub.devices.list_groups()) == ["pg-0", "pg-1", "pg-2", "seed"]
