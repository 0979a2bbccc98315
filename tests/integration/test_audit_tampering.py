"""`warden audit verify` against a real database that someone with write access has tampered with."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable

import pytest

from tests.conftest import Cli
from warden.monitor import GENESIS_HASH, record_hash


def db(cli: Cli) -> sqlite3.Connection:
    return sqlite3.connect(cli.data_dir / "warden.db", isolation_level=None)


def recompute_chain(conn: sqlite3.Connection) -> None:
    """What an attacker does after an edit: recompute every hash from scratch, and the head."""
    prev = GENESIS_HASH
    rows = conn.execute(
        "SELECT seq, time, actor, action, target, outcome, details FROM audit_log ORDER BY seq"
    ).fetchall()
    import datetime as dt

    for seq, time, actor, action, target, outcome, details in rows:
        when = dt.datetime.fromisoformat(time).replace(tzinfo=dt.UTC)
        digest = record_hash(
            prev_hash=prev,
            seq=seq,
            time=when,
            actor=actor,
            action=action,
            target=target,
            outcome=outcome,
            details=json.loads(details),
        )
        conn.execute("UPDATE audit_log SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, digest, seq))
        prev = digest
    conn.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (len(rows), prev))


def edit(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE audit_log SET target = 'device:someone-else' WHERE seq = 5")


def delete(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM audit_log WHERE seq = 5")


def insert(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE audit_log SET seq = seq + 1000 WHERE seq >= 5")
    conn.execute(
        "INSERT INTO audit_log SELECT 5, time, 'mallory', action, target, outcome, details, prev_hash, hash "
        "FROM audit_log WHERE seq = 4"
    )
    conn.execute("UPDATE audit_log SET seq = seq - 999 WHERE seq >= 1005")


def reorder(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE audit_log SET seq = -1 WHERE seq = 5")
    conn.execute("UPDATE audit_log SET seq = 5 WHERE seq = 6")
    conn.execute("UPDATE audit_log SET seq = 6 WHERE seq = -1")


def truncate(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM audit_log WHERE seq > 7")


def truncate_and_rewrite_head(conn: sqlite3.Connection) -> None:
    truncate(conn)
    seq, digest = conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    conn.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (seq, digest))
    conn.execute("DELETE FROM audit_checkpoints WHERE seq > 7")


def edit_and_recompute(conn: sqlite3.Connection) -> None:
    edit(conn)
    recompute_chain(conn)


def edit_recompute_and_drop_checkpoints(conn: sqlite3.Connection) -> None:
    edit_and_recompute(conn)
    conn.execute("DELETE FROM audit_checkpoints")


CASES: list[tuple[str, Callable[[sqlite3.Connection], None], str]] = [
    ("edited record", edit, "record 5 was altered"),
    ("deleted record", delete, "record 5 is missing"),
    ("inserted record", insert, "record 5 does not link"),
    ("reordered records", reorder, "record 5 does not link"),
    ("truncated tail", truncate, "tail was truncated"),
    ("truncated tail, head rewritten", truncate_and_rewrite_head, "missing from the database"),
    ("chain recomputed after an edit", edit_and_recompute, "recomputed"),
    ("recomputed, checkpoints deleted", edit_recompute_and_drop_checkpoints, "missing from the database"),
]


@pytest.mark.parametrize(("tamper", "message"), [(t, m) for _, t, m in CASES], ids=[n for n, _, _ in CASES])
def test_verify_detects(initialised_cli: Cli, tamper: Callable[[sqlite3.Connection], None], message: str) -> None:
    cli = initialised_cli
    for i in range(8):
        cli.ok("device", "add", f"dev-{i}")
    cli.ok("audit", "checkpoint")
    cli.ok("device", "add", "dev-late")
    assert "audit log OK" in cli.ok("audit", "verify")
    conn = db(cli)
    try:
        tamper(conn)
    finally:
        conn.close()
    result = cli("audit", "verify")
    assert result.code == 9, result.err
    assert message in result.err
    assert result.err.startswith("error: ")
