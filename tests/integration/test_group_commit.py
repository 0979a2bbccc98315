"""The group committer on a real SQLite database: batching, isolation of a bad item, durability before return."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Sequence
from pathlib import Path

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
