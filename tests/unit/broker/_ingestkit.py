"""Fakes and message makers shared by the ingest's unit tests: an in-memory ``IngestStore`` and a recorder on it."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Collection, Iterator, Sequence

from warden.broker import DeviceActivity, FloodWatch, IngestConfig, IngestRecorder, IngestStats


def telemetry(seq: int, ts: str = "2030-01-02T03:04:05Z", **metrics: float) -> bytes:
    return json.dumps({"v": 1, "seq": seq, "ts": ts, "metrics": metrics or {"t": 1.0}}).encode()


def health(seq: int, status: str = "ok", ts: str = "2030-01-02T03:04:05Z", **checks: str) -> bytes:
    return json.dumps({"v": 1, "seq": seq, "ts": ts, "status": status, "checks": checks}).encode()


def event(seq: int, kind: str = "agent.started", ts: str = "2030-01-02T03:04:05Z") -> bytes:
    return json.dumps({"v": 1, "seq": seq, "ts": ts, "type": kind, "data": {"x": 1}}).encode()


def topic(device: str, kind: str) -> bytes:
    return f"warden/{device}/{kind}".encode()


class MemoryStore:
    def __init__(self, devices: dict[str, float | None]) -> None:
        self.devices = devices
        self.rows: dict[str, DeviceActivity] = {}
        self.totals = IngestStats()
        self.transactions = 0
        self.asked_limits: list[str] = []
        self.read_rows: list[str] = []
        self.fail_next_save = False

    def device_limits(self, device_ids: Collection[str]) -> dict[str, float | None]:
        self.asked_limits += device_ids
        return {d: self.devices[d] for d in device_ids if d in self.devices}

    def activity(self, device_ids: Collection[str]) -> dict[str, DeviceActivity]:
        self.read_rows += device_ids
        return {d: self.rows[d] for d in device_ids if d in self.rows}

    def save_activity(self, inserted: Sequence[DeviceActivity], updated: Sequence[DeviceActivity]) -> None:
        if self.fail_next_save:
            self.fail_next_save = False
            raise RuntimeError("the database is gone")
        assert not any(a.device_id in self.rows for a in inserted)
        assert all(a.device_id in self.rows for a in updated)
        self.rows.update((a.device_id, a) for a in (*inserted, *updated))

    def add_stats(self, delta: IngestStats) -> None:
        t = self.totals
        self.totals = IngestStats(
            **{
                name: getattr(t, name) + getattr(delta, name)
                for name in ("processed", "accepted", "malformed", "duplicates", "unknown", "invalid_topic")
            },
            overflow=t.overflow + delta.overflow,
            restricted=t.restricted + delta.restricted,
            flushes=t.flushes + delta.flushes,
            largest_batch=max(t.largest_batch, delta.largest_batch),
            last_batch=delta.last_batch,
            last_flush_at=delta.last_flush_at,
        )

    def stats(self) -> IngestStats:
        return self.totals

    def sequence_heads(self, limit: int) -> dict[str, tuple[int, dt.datetime | None]]:
        return {d: (a.seq, a.seq_time) for d, a in self.rows.items() if a.seq is not None}


class MemoryUnitOfWork:
    def __init__(self, store: MemoryStore) -> None:
        self.ingest = store


def recorder_for(store: MemoryStore, *, rate: float = 1000, window: float = 10) -> IngestRecorder:
    @contextlib.contextmanager
    def transactions(*, readonly: bool = False) -> Iterator[MemoryUnitOfWork]:
        if not readonly:
            store.transactions += 1
        yield MemoryUnitOfWork(store)

    return IngestRecorder(
        transactions=transactions, config=IngestConfig(), flood=FloodWatch(default_rate=rate, window=window)
    )
