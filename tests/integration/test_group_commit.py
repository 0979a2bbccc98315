"""The group committer on a real SQLite database: batching, isolation of a bad item, durability before return."""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from warden.core import AlreadyExistsError
from warden.registry import DeviceGroup
from warden.store import Database, GroupCommitter, UnitOfWork

NOW = dt.datetime(2026, 11, 24, tzinfo=dt.UTC)


@pytest.fixture
def database(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'w.db'}")
    db.migrate()
    return db


def add_groups(uow: UnitOfWork, names: Sequence[str]) -> list[str]:
    for name in names:
        uow.groups.insert(DeviceGroup(name=name, description="", settings={}, created_at=NOW))
    return [f"added {n}" for n in names]


def test_many_threads_share_commits(database: Database) -> None:
    committer = GroupCommitter(database)
    results: dict[str, str] = {}
    gate = threading.Barrier(32)

    def worker(i: int) -> None:
        gate.wait()
        for j in range(20):
            name = f"g-{i}-{j}"
            results[name] = committer.run(add_groups, name)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    committer.close()
    assert len(results) == 640
    assert all(v == f"added {k}" for k, v in results.items())
    assert committer.requests == 640
    assert committer.commits < 640  # requests that arrived together shared a commit
    with database.transaction(readonly=True) as uow:
        assert len(uow.groups.find()) == 640


def test_a_bad_item_fails_alone(database: Database) -> None:
    with database.transaction() as uow:
        add_groups(uow, ["taken"])
    committer = GroupCommitter(database)
    errors: dict[str, BaseException] = {}
    ok: list[str] = []
    gate = threading.Barrier(12)

    def worker(name: str) -> None:
        gate.wait()
        try:
            committer.run(add_groups, name)
            ok.append(name)
        except AlreadyExistsError as e:
            errors[name] = e

    names = [f"n-{i}" for i in range(11)] + ["taken"]
    threads = [threading.Thread(target=worker, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    committer.close()
    assert sorted(ok) == sorted(names[:-1])
    assert list(errors) == ["taken"]
    with database.transaction(readonly=True) as uow:
        assert sorted(g.name for g in uow.groups.find()) == sorted(names)


def test_result_only_after_commit(database: Database) -> None:
    committer = GroupCommitter(database)
    committer.run(add_groups, "durable")
    # A fresh engine sees it: the caller was answered after the commit, not before.
    other = Database(database.url)
    with other.transaction(readonly=True) as uow:
        assert uow.groups.get("durable") is not None
    other.dispose()
    committer.close()


def test_follow_ups_of_a_rolled_back_savepoint_do_not_run(database: Database) -> None:
    ran: list[str] = []
    with database.transaction() as uow:
        uow.after_commit(lambda: ran.append("kept"))

        def failing_work() -> None:
            with uow.savepoint():
                uow.after_commit(lambda: ran.append("rolled back"))
                raise RuntimeError("the savepoint fails")

        with pytest.raises(RuntimeError):
            failing_work()
    assert ran == ["kept"]


def test_a_failing_follow_up_does_not_undo_the_commit(database: Database, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise OSError("disk full")

    with database.transaction() as uow:
        add_groups(uow, ["kept"])
        uow.after_commit(broken)
    with database.transaction(readonly=True) as uow:
        assert uow.groups.get("kept") is not None
    assert "follow-up of a committed transaction failed" in caplog.text


# -- submit: results through a sink, once per committed batch -----------------------------------------------------


class RecordingSink:
    """A commit sink that keeps every ``deliver`` call and the thread it came in, and sets ``all_in`` once
    ``expected`` outcomes have arrived."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.calls: list[list[tuple[Any, bool, Any]]] = []
        self.threads: set[str] = set()
        self.all_in = threading.Event()
        self._lock = threading.Lock()

    def deliver(self, outcomes: list[tuple[Any, bool, Any]]) -> None:
        with self._lock:
            self.calls.append(list(outcomes))
            self.threads.add(threading.current_thread().name)
            if sum(len(call) for call in self.calls) >= self.expected:
                self.all_in.set()

    def outcomes(self) -> dict[Any, tuple[bool, Any]]:
        """Token -> (ok, value); the test fails if a token came twice."""
        delivered = [(token, ok, value) for call in self.calls for token, ok, value in call]
        twice = [token for token, n in Counter(token for token, _, _ in delivered).items() if n > 1]
        assert twice == [], f"delivered more than once: {twice}"
        return {token: (ok, value) for token, ok, value in delivered}


@contextlib.contextmanager
def held(committer: GroupCommitter) -> Iterator[None]:
    """Keep the committer busy with a request of its own while inside: everything queued meanwhile is taken as one
    batch once it lets go (the committer drains its queue after each commit)."""
    busy, release = threading.Event(), threading.Event()

    def hold(_uow: UnitOfWork, items: Sequence[None]) -> list[None]:
        busy.set()
        release.wait(timeout=30)
        return [None] * len(items)

    holder = threading.Thread(target=committer.run, args=(hold, None))
    holder.start()
    assert busy.wait(timeout=30)
    try:
        yield
    finally:
        release.set()
        holder.join(timeout=30)
    assert not holder.is_alive()


def group_names(database: Database) -> list[str]:
    with database.transaction(readonly=True) as uow:
        return sorted(g.name for g in uow.groups.find())


def test_submitted_items_from_many_threads_are_each_delivered_once(database: Database) -> None:
    committer = GroupCommitter(database)
    threads_, per_thread = 8, 25
    sink = RecordingSink(threads_ * per_thread)
    gate = threading.Barrier(threads_)

    def worker(i: int) -> None:
        gate.wait()
        for j in range(per_thread):
            committer.submit(add_groups, f"s-{i}-{j}", sink, (i, j))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sink.all_in.wait(timeout=30), "not every submitted item was delivered"
    committer.close()

    outcomes = sink.outcomes()
    expected = {(i, j) for i in range(threads_) for j in range(per_thread)}
    assert set(outcomes) == expected
    assert all(outcomes[(i, j)] == (True, f"added s-{i}-{j}") for i, j in expected)
    assert committer.requests == len(expected)
    # At most one call per committed batch (a batch holding none of the sink's items makes no call).
    assert 1 <= len(sink.calls) <= committer.commits
    assert sink.threads == {"warden-group-commit"}
    assert group_names(database) == sorted(f"s-{i}-{j}" for i, j in expected)


def test_one_batch_is_one_call_per_sink_and_a_bad_item_fails_alone(database: Database) -> None:
    with database.transaction() as uow:
        add_groups(uow, ["taken"])
    committer = GroupCommitter(database)
    first, second = RecordingSink(8), RecordingSink(3)
    first_names = [f"a-{i}" for i in range(4)] + ["taken"] + [f"a-{i}" for i in range(4, 7)]
    second_names = [f"b-{i}" for i in range(3)]
    with held(committer):
        for name in first_names:
            committer.submit(add_groups, name, first, f"token {name}")
        for name in second_names:
            committer.submit(add_groups, name, second, f"token {name}")
    assert first.all_in.wait(timeout=30)
    assert second.all_in.wait(timeout=30)
    committer.close()

    assert committer.commits == 2  # the holder's, then everything queued behind it
    assert committer.requests == 1 + len(first_names) + len(second_names)
    assert len(first.calls) == 1
    assert len(second.calls) == 1
    assert [token for token, _, _ in first.calls[0]] == [f"token {n}" for n in first_names]
    assert [token for token, _, _ in second.calls[0]] == [f"token {n}" for n in second_names]
    outcomes = first.outcomes()
    ok, error = outcomes.pop("token taken")
    assert not ok
    assert isinstance(error, AlreadyExistsError)
    assert outcomes == {f"token {n}": (True, f"added {n}") for n in first_names if n != "taken"}
    assert second.outcomes() == {f"token {n}": (True, f"added {n}") for n in second_names}
    assert group_names(database) == sorted(["taken", *first_names[:4], *first_names[5:], *second_names])


def test_a_failing_sink_does_not_stop_the_committer(database: Database, caplog: pytest.LogCaptureFixture) -> None:
    called = threading.Event()

    class BrokenSink:
        def deliver(self, outcomes: list[tuple[Any, bool, Any]]) -> None:
            called.set()
            raise RuntimeError("the loop went away")

    committer = GroupCommitter(database)
    committer.submit(add_groups, "submitted", BrokenSink(), 1)
    assert called.wait(timeout=30)
    # The committer logged the sink's failure and goes on: the next request, in a later batch, commits.
    assert committer.run(add_groups, "after") == "added after"
    committer.close()
    assert "a commit sink failed" in caplog.text
    assert group_names(database) == ["after", "submitted"]


# -- linger -------------------------------------------------------------------------------------------------------


def test_a_busy_committer_lingers_for_more_items(database: Database) -> None:
    # Items come a few milliseconds apart, more than a commit of one takes: without the linger nearly every one would
    # get a commit of its own. Right after a commit the committer is busy, and keeps a batch open for 50 ms.
    committer = GroupCommitter(database, linger=0.05)
    assert committer.run(add_groups, "warm-up") == "added warm-up"
    sink = RecordingSink(30)
    for i in range(30):
        committer.submit(add_groups, f"l-{i}", sink, i)
        time.sleep(0.003)
    assert sink.all_in.wait(timeout=30)
    committer.close()
    assert committer.requests == 31
    assert committer.commits - 1 <= 10, f"{committer.commits - 1} commits for 30 items"
    assert sink.outcomes() == {i: (True, f"added l-{i}") for i in range(30)}


def test_an_idle_committer_does_not_linger(database: Database) -> None:
    # With a linger of a minute, a request to an idle committer (the first one, or one after a pause) is still
    # committed at once: the generous join timeout only fails if it lingered.
    committer = GroupCommitter(database, linger=60)
    results: list[str] = []
    for name in ("first", "after-a-pause"):
        thread = threading.Thread(target=lambda name=name: results.append(committer.run(add_groups, name)))
        thread.start()
        thread.join(timeout=20)
        assert not thread.is_alive(), f"{name!r} waited for the linger"
        time.sleep(0.1)  # well past the 20 ms after which the committer counts as idle
    committer.close()
    assert results == ["added first", "added after-a-pause"]
    assert committer.commits == 2
