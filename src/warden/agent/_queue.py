"""The agent's outbound queue: every message waits here until the broker acknowledged it (QoS 1 PUBACK).

The queue is bounded. When it is full, the oldest *droppable* message (telemetry) is dropped and counted; health
reports and events are kept, and only when nothing droppable is left is the oldest message of any kind dropped.
:class:`FileQueue` keeps the messages in SQLite in the agent's state directory, so they also survive an agent
restart; :class:`MemoryQueue` only survives broker outages (the simulator runs hundreds of agents in one process).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["FileQueue", "MemoryQueue", "MessageQueue", "Queued"]


@dataclass(frozen=True, slots=True)
class Queued:
    id: int
    topic: str
    payload: bytes
    droppable: bool


class MessageQueue(Protocol):
    @property
    def dropped(self) -> int: ...

    def put(self, topic: str, payload: bytes, *, droppable: bool) -> int: ...

    def pending(self, limit: int, *, exclude: set[int] | frozenset[int] = frozenset()) -> list[Queued]:
        """Up to ``limit`` of the oldest messages whose id is not in ``exclude`` (those in flight)."""
        ...

    def ack(self, message_id: int) -> None: ...

    def __len__(self) -> int: ...

    def close(self) -> None: ...


class MemoryQueue:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._items: OrderedDict[int, Queued] = OrderedDict()
        self._next = 1
        self._dropped = 0
        self._lock = threading.Lock()

    @property
    def dropped(self) -> int:
        return self._dropped

    def put(self, topic: str, payload: bytes, *, droppable: bool) -> int:
        with self._lock:
            while len(self._items) >= self._limit:
                victim = next((k for k, v in self._items.items() if v.droppable), None)
                if victim is None:
                    victim = next(iter(self._items))
                del self._items[victim]
                self._dropped += 1
            message_id = self._next
            self._next += 1
            self._items[message_id] = Queued(message_id, topic, payload, droppable)
            return message_id

    def pending(self, limit: int, *, exclude: set[int] | frozenset[int] = frozenset()) -> list[Queued]:
        if limit <= 0:
            return []
        with self._lock:
            out: list[Queued] = []
            for message_id, item in self._items.items():
                if message_id not in exclude:
                    out.append(item)
                    if len(out) >= limit:
                        break
            return out

    def ack(self, message_id: int) -> None:
        with self._lock:
            self._items.pop(message_id, None)

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        pass


class FileQueue:
    """The same in SQLite (WAL, synchronous=NORMAL: a power cut may lose the last moments, never corrupt)."""

    def __init__(self, path: Path, limit: int) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Created 0600 before SQLite opens it (its -wal and -shm files take the same mode).
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS queue (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
            " payload BLOB NOT NULL, droppable INTEGER NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        self._count = int(self._db.execute("SELECT count(*) FROM queue").fetchone()[0])
        row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        self._dropped = int(row[0]) if row else 0

    @property
    def dropped(self) -> int:
        return self._dropped

    def put(self, topic: str, payload: bytes, *, droppable: bool) -> int:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                dropped = 0
                while self._count - dropped >= self._limit:
                    row = self._db.execute("SELECT id FROM queue WHERE droppable = 1 ORDER BY id LIMIT 1").fetchone()
                    if row is None:
                        row = self._db.execute("SELECT id FROM queue ORDER BY id LIMIT 1").fetchone()
                    self._db.execute("DELETE FROM queue WHERE id = ?", (row[0],))
                    dropped += 1
                if dropped:
                    self._db.execute(
                        "INSERT INTO counters (name, value) VALUES ('dropped', ?)"
                        " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                        (dropped,),
                    )
                cursor = self._db.execute(
                    "INSERT INTO queue (topic, payload, droppable) VALUES (?, ?, ?)", (topic, payload, int(droppable))
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._count += 1 - dropped
            self._dropped += dropped
            return int(cursor.lastrowid or 0)

    def pending(self, limit: int, *, exclude: set[int] | frozenset[int] = frozenset()) -> list[Queued]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, droppable FROM queue ORDER BY id LIMIT ?", (limit + len(exclude),)
            ).fetchall()
        out = [Queued(int(r[0]), str(r[1]), bytes(r[2]), bool(r[3])) for r in rows if int(r[0]) not in exclude]
        return out[:limit]

    def ack(self, message_id: int) -> None:
        with self._lock:
            cursor = self._db.execute("DELETE FROM queue WHERE id = ?", (message_id,))
            self._count -= cursor.rowcount

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        with self._lock:
            self._db.close()
