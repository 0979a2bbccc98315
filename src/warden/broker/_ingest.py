"""Ingest: what the hub makes of the messages devices publish. Pure: no sockets, no clock, no database; time comes in
as arguments and storage through :class:`IngestStore` (implemented by ``warden.store``).

```
 HubLink (its network thread)                    the recorder (its own thread)
 ----------------------------                    ----------------------------
 receive(topic, payload) -> Ingest                Batch --> IngestRecorder.record(batch): ONE transaction
   validate (size, schema), attribute to the                   known devices (the registry) and their flood limits,
   topic's device, drop duplicates (sequence                   activity rows merged and written, totals added;
   numbers), aggregate in memory                               FloodWatch.observe -> [Flood] -> the hub restricts
 every flush interval: Ingest.cut() -> Batch --queue-->
```

Invariants:

- :meth:`Ingest.receive` never raises for anything a device can send: every message lands in exactly one counter of
  the batch (accepted by kind, duplicate, malformed, invalid topic, overflow), and unknown devices are counted when
  the batch is recorded.
- A duplicate (QoS 1 redelivery: the same sequence number and device time) is counted, never aggregated twice. A
  message with a lower sequence number but a newer device time than any seen means the agent restarted its count.
- Memory is bounded: a batch holds at most ``max_batch_devices`` devices (further devices' messages are counted as
  overflow), a device's telemetry summary at most ``max_metrics`` metrics, and the sequence and rate state at most
  ``max_devices`` devices (the least recently active are forgotten first).
- A batch is recorded in one transaction, whatever the number of messages it aggregates; a batch that could not be
  recorded is merged into the next one.
- The recorder is the only writer of device activity: it keeps the rows it wrote (at most ``max_cached``, updated
  only once their transaction committed) instead of reading them back, and trusts the registry's answer about a
  device (known, and its flood limit) for ``limits_ttl`` seconds.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from warden.broker._messages import MAX_MESSAGE_BYTES, Event, Health, Telemetry, decode_message
from warden.broker._topics import DEVICE_PUBLISHES, parse_device_topic
from warden.core import InvalidInputError

__all__ = [
    "Batch",
    "DeviceActivity",
    "DevicePending",
    "Flood",
    "FloodWatch",
    "Ingest",
    "IngestConfig",
    "IngestRecorder",
    "IngestStats",
    "IngestStore",
    "IngestTransactions",
    "IngestUnitOfWork",
    "MetricSummary",
    "RecordResult",
    "merge_activity",
    "metrics_from_json",
    "metrics_json",
]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: the longest malformed reason kept (pydantic's messages never quote the input; the cut is for the column)
_MAX_REASON = 256
#: the events with which an agent reports on a command (warden.agent._commands); the hub closes the command
COMMAND_REPORTS = frozenset({"command.result", "command.rejected"})
MAX_REPORTS = 1000
#: the longest topic the ingest parses: ``warden/`` + a 63-character device id + ``/telemetry``
_MAX_TOPIC_BYTES = 96


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """The ingest's limits; every one bounds memory or work."""

    #: the largest payload accepted on a device topic
    max_payload_bytes: int = MAX_MESSAGE_BYTES
    #: metrics kept in one device's telemetry summary (later names are not summarised)
    max_metrics: int = 64
    #: devices in one batch; messages of further devices are counted as overflow and dropped
    max_batch_devices: int = 100_000
    #: devices whose sequence numbers and message rates are tracked at once
    max_devices: int = 1_000_000
    #: how far behind the newest sequence number a late (out of order) message is still told from a duplicate
    sequence_window: int = 1024
    #: parsed topics kept (device id and kind of each topic seen)
    max_routes: int = 300_000
    #: devices whose stored activity the recorder keeps in memory (it is their only writer: a batch then costs no
    #: read of their rows); beyond it, the least recently written are read again when they next send
    max_cached: int = 100_000
    #: how long the recorder trusts a device's flood limit (and that the registry knows it) before reading it again
    limits_ttl: float = 30.0

    def __post_init__(self) -> None:
        for name in (
            "max_payload_bytes",
            "max_metrics",
            "max_batch_devices",
            "max_devices",
            "sequence_window",
            "max_routes",
            "max_cached",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"IngestConfig.{name} must be positive")
        if self.limits_ttl < 0:
            raise ValueError("IngestConfig.limits_ttl must not be negative")


# -- one batch ----------------------------------------------------------------------------------------------------


class _Metric:
    __slots__ = ("count", "last", "max", "min")

    def __init__(self, value: float) -> None:
        self.count = 1
        self.last = self.min = self.max = value


class DevicePending:
    """What one device sent during one batch (mutable; owned by the thread that calls :meth:`Ingest.receive`)."""

    __slots__ = (
        "duplicates",
        "event_type",
        "events",
        "health",
        "health_checks",
        "health_status",
        "malformed",
        "messages",
        "metrics",
        "reason",
        "seq",
        "seq_time",
        "telemetry",
    )

    def __init__(self) -> None:
        #: every message attributed to the device (what its flood rate counts)
        self.messages = 0
        self.telemetry = 0
        self.health = 0
        self.events = 0
        self.duplicates = 0
        self.malformed = 0
        self.reason: str | None = None
        self.metrics: dict[str, _Metric] = {}
        self.health_status: str | None = None
        self.health_checks: Mapping[str, str] | None = None
        self.event_type: str | None = None
        #: the device's sequence head when the batch was cut (the newest of the agent's current run)
        self.seq: int | None = None
        self.seq_time: float | None = None

    @property
    def accepted(self) -> int:
        return self.telemetry + self.health + self.events

    def absorb(self, later: DevicePending, max_metrics: int) -> None:
        """Add ``later`` (the same device, a later batch) to this one."""
        self.messages += later.messages
        self.telemetry += later.telemetry
        self.health += later.health
        self.events += later.events
        self.duplicates += later.duplicates
        self.malformed += later.malformed
        self.reason = later.reason or self.reason
        for name, m in later.metrics.items():
            mine = self.metrics.get(name)
            if mine is None:
                if len(self.metrics) < max_metrics:
                    self.metrics[name] = m
                continue
            mine.count += m.count
            mine.last = m.last
            mine.min = min(mine.min, m.min)
            mine.max = max(mine.max, m.max)
        if later.health_status is not None:
            self.health_status, self.health_checks = later.health_status, later.health_checks
        self.event_type = later.event_type or self.event_type
        if later.seq is not None:
            self.seq, self.seq_time = later.seq, later.seq_time


@dataclass(slots=True)
class Batch:
    """The messages of one flush interval, aggregated per device. ``started``/``ended`` are monotonic seconds,
    ``at`` the wall-clock time of the cut (what ``last seen`` records)."""

    started: float
    ended: float
    at: dt.datetime
    devices: dict[str, DevicePending] = field(default_factory=dict)
    #: messages on topics that are not device topics (the hub subscribes to device topics only: none expected)
    invalid_topic: int = 0
    #: messages dropped because the batch held ``max_batch_devices`` devices already
    overflow: int = 0
    #: what agents reported about commands: (device id, event type, event data), at most MAX_REPORTS a batch
    reports: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    @property
    def messages(self) -> int:
        return sum(p.messages for p in self.devices.values()) + self.invalid_topic + self.overflow

    def merge(self, later: Batch, config: IngestConfig) -> Batch:
        """This batch followed by ``later``, as one (when the recorder fell behind or a write failed)."""
        merged = Batch(self.started, later.ended, later.at, dict(self.devices), self.invalid_topic, self.overflow)
        merged.reports = [*self.reports, *later.reports][:MAX_REPORTS]
        merged.invalid_topic += later.invalid_topic
        merged.overflow += later.overflow
        for device_id, pending in later.devices.items():
            mine = merged.devices.get(device_id)
            if mine is not None:
                mine.absorb(pending, config.max_metrics)
            elif len(merged.devices) < config.max_batch_devices:
                merged.devices[device_id] = pending
            else:
                merged.overflow += pending.messages
        return merged


# -- duplicates -----------------------------------------------------------------------------------------------------


class _Sequence:
    """One device's sequence state: the newest sequence number of the agent's current run (``head``), the device
    times of the run's first and newest messages, and a bitmap of the ``window`` numbers below the head already seen.

    A message is new when its number is above the head, or below it within the window and not seen yet (late, out
    of order). A message newer than everything seen, with a number that does not continue the sequence, starts a
    new run (the agent counts from 0 again after a restart). A message older than the current run's first belongs
    to an earlier run: counted already, or too late to tell, it counts as a duplicate."""

    __slots__ = ("head", "newest", "seen", "start", "touched")

    def __init__(self, head: int, ts: float, seen: int, touched: int) -> None:
        self.head = head
        self.start = ts
        self.newest = ts
        self.seen = seen
        self.touched = touched

    def accept(self, seq: int, ts: float, window: int) -> bool:
        """Whether ``(seq, ts)`` is new (and record it); False for a duplicate."""
        head = self.head
        if seq > head:
            if ts < self.start:
                return False  # an earlier run's message
            shift = seq - head
            self.seen = (((self.seen << shift) | 1) & ((1 << window) - 1)) if shift < window else 1
            self.head = seq
            if ts > self.newest:
                self.newest = ts
            return True
        if ts > self.newest:
            self.head, self.start, self.newest, self.seen = seq, ts, ts, 1  # a new run
            return True
        offset = head - seq
        if offset < window and ts >= self.start and not (self.seen >> offset) & 1:
            self.seen |= 1 << offset  # late, out of order: new
            return True
        return False


_MODELS: dict[str, type[Telemetry | Health | Event]] = {"telemetry": Telemetry, "health": Health, "events": Event}
_VALIDATORS = {kind: model.__pydantic_validator__ for kind, model in _MODELS.items()}


def _decode(kind: str, payload: bytes) -> Telemetry | Health | Event:
    """:func:`decode_message` on the hot path: the model's validator straight (``model_validate_json`` and the
    checks around it cost a fifth of the ingest's time per message); a message that fails goes through
    ``decode_message`` itself, so the reason is worded in one place. The caller has checked the size."""
    try:
        message: Telemetry | Health | Event = _VALIDATORS[kind].validate_json(payload)
    except ValidationError:
        return decode_message(kind, payload)  # raises InvalidInputError with the reason
    return message


def _printable(reason: str) -> str:
    """A reason as it may be stored and logged: pydantic names where the input failed, and a key there is the
    device's (a metric name, say), so anything but printable ASCII is replaced and the length is capped."""
    text = reason[:_MAX_REASON]
    return text if text.isascii() and text.isprintable() else "".join(c if " " <= c <= "~" else "?" for c in text)


def _timestamp(value: dt.datetime) -> float:
    # A device time without a zone is taken as UTC (the agent sends UTC); it only orders one device's messages.
    return (value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)).timestamp()


# -- the aggregator -------------------------------------------------------------------------------------------------


class Ingest:
    """Validates, attributes, de-duplicates and aggregates device messages. Not thread-safe by design: one thread
    (the link's) calls :meth:`receive` and :meth:`cut`, so the hot path takes no lock; batches cross to the
    recorder's thread whole, through a queue."""

    def __init__(
        self,
        config: IngestConfig | None = None,
        *,
        decode: Callable[[str, bytes], Telemetry | Health | Event] | None = None,
        started: float = 0.0,
    ) -> None:
        self.config = config or IngestConfig()
        self._decode = decode or _decode
        self._routes: dict[bytes, tuple[str, str]] = {}
        self._sequences: dict[str, _Sequence] = {}
        self._pending: dict[str, DevicePending] = {}
        self._invalid_topic = 0
        self._overflow = 0
        self._started = started
        self._cuts = 0
        self._reports: list[tuple[str, str, dict[str, Any]]] = []

    @property
    def tracked(self) -> int:
        """Devices whose sequence state is held."""
        return len(self._sequences)

    def seed(self, heads: Mapping[str, tuple[int, dt.datetime | None]]) -> None:
        """Sequence heads known from storage (the hub's previous run): a redelivered message the previous run
        counted already is then still a duplicate."""
        window = self.config.sequence_window
        for device_id, (head, newest) in heads.items():
            if len(self._sequences) >= self.config.max_devices:
                break
            seen = (1 << window) - 1  # everything at or below the stored head counts as seen
            stamp = _timestamp(newest) if newest else 0.0
            self._sequences[device_id] = _Sequence(head, stamp, seen, -1)

    def receive(self, topic: bytes, payload: bytes) -> None:
        """Take one message from the broker (the link's thread)."""
        route = self._routes.get(topic)
        if route is None:
            route = self._route(topic)
            if route is None:
                self._invalid_topic += 1
                return
        device_id, kind = route
        pending = self._pending.get(device_id)
        if pending is None:
            if len(self._pending) >= self.config.max_batch_devices:
                self._overflow += 1
                return
            pending = self._pending[device_id] = DevicePending()
        pending.messages += 1
        if len(payload) > self.config.max_payload_bytes:
            pending.malformed += 1
            pending.reason = f"the {kind} message has {len(payload)} bytes, more than {self.config.max_payload_bytes}"
            return
        try:
            message = self._decode(kind, payload)
        except InvalidInputError as e:
            pending.malformed += 1
            pending.reason = _printable(e.message)
            return
        if isinstance(message, Telemetry):
            self._telemetry(device_id, pending, message)
            return
        if not self._new(device_id, message.seq, message.ts):
            pending.duplicates += 1
        elif isinstance(message, Health):
            pending.health += 1
            pending.health_status = message.status
            pending.health_checks = message.checks
        else:
            pending.events += 1
            pending.event_type = message.type
            if message.type in COMMAND_REPORTS and len(self._reports) < MAX_REPORTS:
                self._reports.append((device_id, message.type, message.data))

    def _telemetry(self, device_id: str, pending: DevicePending, message: Telemetry) -> None:
        # NaN and infinity never get here: the schema refuses them (a unit test holds it to that).
        metrics = message.metrics
        if not self._new(device_id, message.seq, message.ts):
            pending.duplicates += 1
            return
        pending.telemetry += 1
        summary = pending.metrics
        for name, value in metrics.items():
            m = summary.get(name)
            if m is None:
                if len(summary) < self.config.max_metrics:
                    summary[name] = _Metric(value)
                continue
            m.count += 1
            m.last = value
            if value < m.min:
                m.min = value
            elif value > m.max:
                m.max = value

    def _route(self, topic: bytes) -> tuple[str, str] | None:
        if len(topic) > _MAX_TOPIC_BYTES:
            return None
        try:
            parsed = parse_device_topic(topic.decode("ascii"))
        except UnicodeDecodeError:
            return None
        if parsed is None or parsed[1] not in DEVICE_PUBLISHES:
            return None
        if len(self._routes) >= self.config.max_routes:
            self._routes.clear()
        self._routes[bytes(topic)] = parsed
        return parsed

    def _new(self, device_id: str, seq: int, ts: dt.datetime) -> bool:
        state = self._sequences.get(device_id)
        stamp = _timestamp(ts)
        if state is None:
            self._sequences[device_id] = _Sequence(seq, stamp, 1, self._cuts)
            return True
        state.touched = self._cuts
        return state.accept(seq, stamp, self.config.sequence_window)

    def cut(self, *, now: float, at: dt.datetime) -> Batch:
        """End the current batch and hand it over (the link's thread, every flush interval)."""
        pending, self._pending = self._pending, {}
        for device_id, entry in pending.items():
            state = self._sequences.get(device_id)
            if state is not None and entry.accepted:
                entry.seq = state.head
                entry.seq_time = state.newest
        batch = Batch(self._started, now, at, pending, self._invalid_topic, self._overflow, self._reports)
        self._reports = []
        self._invalid_topic = self._overflow = 0
        self._started = now
        self._cuts += 1
        if len(self._sequences) > self.config.max_devices:
            self._evict()
        return batch

    def _evict(self) -> None:
        """Forget the least recently active devices' sequence state, down to 90% of the limit."""
        keep = self.config.max_devices * 9 // 10
        ranked = sorted(self._sequences.items(), key=lambda item: item[1].touched, reverse=True)
        self._sequences = dict(ranked[:keep])


# -- flooding -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Flood:
    """A device that published more than its limit: ``rate`` messages per second over the last ``window`` seconds
    (``messages`` in all), against ``limit``."""

    device_id: str
    rate: float
    limit: float
    window: float
    messages: int


class FloodWatch:
    """Each device's message rate over a sliding window (one bucket per recorded batch). A device above its limit
    is reported once; its window then starts afresh, so it is reported again only after another full window above
    the limit. At most ``max_devices`` are tracked; a device with no message for a whole window is forgotten."""

    def __init__(self, *, default_rate: float, window: float, max_devices: int = 1_000_000) -> None:
        if default_rate <= 0 or window <= 0:
            raise ValueError("the flood rate and window must be positive")
        self.default_rate = default_rate
        self.window = window
        self.max_devices = max_devices
        self._buckets: dict[str, deque[tuple[float, int]]] = {}
        self._sums: dict[str, int] = {}
        self._last_sweep = -math.inf

    @property
    def tracked(self) -> int:
        return len(self._buckets)

    def observe(self, now: float, counts: Mapping[str, int], limits: Mapping[str, float | None]) -> list[Flood]:
        """Add one batch (``counts``: messages per device, ending at monotonic time ``now``); the devices now above
        their limit (``limits``: a device's own, None or absent for the default)."""
        floods: list[Flood] = []
        horizon = now - self.window
        for device_id, count in counts.items():
            if count <= 0:
                continue
            buckets = self._buckets.get(device_id)
            if buckets is None:
                if len(self._buckets) >= self.max_devices:
                    self.sweep(now, force=True)
                    if len(self._buckets) >= self.max_devices:
                        continue  # full of active devices: this one is not watched until room is made
                buckets = self._buckets[device_id] = deque()
                self._sums[device_id] = 0
            buckets.append((now, count))
            total = self._sums[device_id] + count
            while buckets and buckets[0][0] <= horizon:
                total -= buckets.popleft()[1]
            self._sums[device_id] = total
            limit = limits.get(device_id) or self.default_rate
            if total > limit * self.window:
                floods.append(Flood(device_id, round(total / self.window, 1), limit, self.window, total))
                self.forget(device_id)
        if now - self._last_sweep >= self.window:
            self.sweep(now)
        return floods

    def forget(self, device_id: str) -> None:
        self._buckets.pop(device_id, None)
        self._sums.pop(device_id, None)

    def sweep(self, now: float, *, force: bool = False) -> None:
        """Forget devices with no message within the window (at most once a window unless ``force``)."""
        if not force and now - self._last_sweep < self.window:
            return
        self._last_sweep = now
        horizon = now - self.window
        idle = [d for d, b in self._buckets.items() if not b or b[-1][0] <= horizon]
        for device_id in idle:
            self.forget(device_id)


# -- what is stored -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetricSummary:
    count: int
    last: float
    min: float
    max: float


@dataclass(frozen=True, slots=True)
class DeviceActivity:
    """What the hub knows of a device's traffic, as stored."""

    device_id: str
    first_seen: dt.datetime
    last_seen: dt.datetime
    telemetry: int = 0
    health: int = 0
    events: int = 0
    duplicates: int = 0
    malformed: int = 0
    last_malformed_reason: str | None = None
    last_malformed_at: dt.datetime | None = None
    #: the newest sequence number of the agent's current run, and the device's time on it
    seq: int | None = None
    seq_time: dt.datetime | None = None
    metrics: Mapping[str, MetricSummary] = field(default_factory=dict)
    health_status: str | None = None
    health_checks: Mapping[str, str] = field(default_factory=dict)
    health_at: dt.datetime | None = None
    last_event_type: str | None = None
    last_event_at: dt.datetime | None = None

    def to_json(self) -> dict[str, Any]:
        def time(value: dt.datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {
            "first_seen": time(self.first_seen),
            "last_seen": time(self.last_seen),
            "messages": {"telemetry": self.telemetry, "health": self.health, "events": self.events},
            "duplicates": self.duplicates,
            "malformed": self.malformed,
            "last_malformed_reason": self.last_malformed_reason,
            "last_malformed_at": time(self.last_malformed_at),
            "seq": self.seq,
            "telemetry": {
                name: {"count": m.count, "last": m.last, "min": m.min, "max": m.max}
                for name, m in sorted(self.metrics.items())
            },
            "health": {"status": self.health_status, "checks": dict(self.health_checks), "at": time(self.health_at)}
            if self.health_status is not None
            else None,
            "last_event": {"type": self.last_event_type, "at": time(self.last_event_at)}
            if self.last_event_type is not None
            else None,
        }


def merge_activity(
    current: DeviceActivity | None, device_id: str, pending: DevicePending, at: dt.datetime, *, max_metrics: int
) -> DeviceActivity:
    """The stored activity after one batch of the device's messages (cut at ``at``)."""
    if current is None:
        current = DeviceActivity(device_id=device_id, first_seen=at, last_seen=at)
    metrics = dict(current.metrics)
    for name, m in pending.metrics.items():
        old = metrics.get(name)
        if old is None:
            if len(metrics) < max_metrics:
                metrics[name] = MetricSummary(m.count, m.last, m.min, m.max)
            continue
        metrics[name] = MetricSummary(old.count + m.count, m.last, min(old.min, m.min), max(old.max, m.max))
    seq, seq_time = current.seq, current.seq_time
    if pending.seq is not None:
        seq = pending.seq
        seq_time = _EPOCH + dt.timedelta(seconds=pending.seq_time) if pending.seq_time is not None else None
    health = pending.health_status is not None
    return DeviceActivity(
        device_id=device_id,
        first_seen=current.first_seen,
        last_seen=max(current.last_seen, at),
        telemetry=current.telemetry + pending.telemetry,
        health=current.health + pending.health,
        events=current.events + pending.events,
        duplicates=current.duplicates + pending.duplicates,
        malformed=current.malformed + pending.malformed,
        last_malformed_reason=pending.reason if pending.malformed else current.last_malformed_reason,
        last_malformed_at=at if pending.malformed else current.last_malformed_at,
        seq=seq,
        seq_time=seq_time,
        metrics=metrics,
        health_status=pending.health_status if health else current.health_status,
        health_checks=dict(pending.health_checks or {}) if health else current.health_checks,
        health_at=at if health else current.health_at,
        last_event_type=pending.event_type or current.last_event_type,
        last_event_at=at if pending.event_type else current.last_event_at,
    )


@dataclass(frozen=True, slots=True)
class IngestStats:
    """The ingest's totals (as stored, since the database was created), or one batch's additions to them."""

    #: messages the ingest took from the broker and recorded (whatever became of each)
    processed: int = 0
    #: valid, first-seen messages of known devices, aggregated into their activity
    accepted: int = 0
    malformed: int = 0
    duplicates: int = 0
    #: messages of devices the registry does not know (dropped)
    unknown: int = 0
    invalid_topic: int = 0
    overflow: int = 0
    #: devices restricted for flooding
    restricted: int = 0
    #: batches written (one transaction each) and the messages they held
    flushes: int = 0
    largest_batch: int = 0
    last_batch: int = 0
    last_flush_at: dt.datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "processed": self.processed,
            "accepted": self.accepted,
            "malformed": self.malformed,
            "duplicates": self.duplicates,
            "unknown_devices": self.unknown,
            "invalid_topic": self.invalid_topic,
            "overflow": self.overflow,
            "restricted_for_flooding": self.restricted,
            "flushes": self.flushes,
            "average_batch": round(self.processed / self.flushes, 1) if self.flushes else 0.0,
            "largest_batch": self.largest_batch,
            "last_batch": self.last_batch,
            "last_flush_at": self.last_flush_at.isoformat() if self.last_flush_at else None,
        }


# -- storage --------------------------------------------------------------------------------------------------------


class IngestStore(Protocol):
    def device_limits(self, device_ids: Collection[str]) -> dict[str, float | None]:
        """The devices among ``device_ids`` that the registry knows, each with the flood limit of the enrollment
        group it onboarded through (None: the hub's default)."""
        ...

    def activity(self, device_ids: Collection[str]) -> dict[str, DeviceActivity]:
        """The stored activity of those of ``device_ids`` that have any."""
        ...

    def save_activity(self, inserted: Sequence[DeviceActivity], updated: Sequence[DeviceActivity]) -> None:
        """Insert the first, replace the second (rows :meth:`activity` returned in the same transaction)."""
        ...

    def add_stats(self, delta: IngestStats) -> None:
        """Add ``delta``'s counts to the totals; ``largest_batch`` keeps the larger, ``last_batch`` and
        ``last_flush_at`` are replaced."""
        ...

    def stats(self) -> IngestStats: ...
    def sequence_heads(self, limit: int) -> dict[str, tuple[int, dt.datetime | None]]:
        """The stored sequence head of up to ``limit`` devices, most recently seen first."""
        ...


class IngestUnitOfWork(Protocol):
    @property
    def ingest(self) -> IngestStore: ...


class IngestTransactions(Protocol):
    def __call__(self, *, readonly: bool = False) -> AbstractContextManager[IngestUnitOfWork]: ...


@dataclass(frozen=True, slots=True)
class RecordResult:
    messages: int
    devices: int
    unknown_devices: tuple[str, ...]
    floods: tuple[Flood, ...]
    #: one device's last malformed reason in this batch, for the log (None: nothing malformed)
    malformed: int
    malformed_example: tuple[str, str] | None


class IngestRecorder:
    """Writes batches (one transaction each) and watches flood rates; reads activity and totals back. Used from
    one thread (the recorder's) for writing; reading is safe from any."""

    def __init__(self, *, transactions: IngestTransactions, config: IngestConfig, flood: FloodWatch) -> None:
        self._tx = transactions
        self._config = config
        self.flood = flood
        self._restricted = 0
        # The recorder writes a device's activity and nobody else does: what it wrote last is what is stored. Both
        # caches are in least-recently-written order (a dict keeps insertion order; a write moves a key to the end).
        self._cache: dict[str, DeviceActivity] = {}
        #: known devices' flood limits, with the monotonic time they were read
        self._limits: dict[str, tuple[float | None, float]] = {}

    def note_restricted(self, count: int) -> None:
        """Devices the hub restricted for flooding: added to the totals with the next batch."""
        self._restricted += count

    def record(self, batch: Batch) -> RecordResult:
        """Write ``batch``: the known devices' activity and the totals, in one transaction; then watch the known
        devices' rates. Raises what the storage raised (the caller keeps the batch for the next attempt)."""
        config = self._config
        devices = batch.devices
        unknown_messages = 0
        now = batch.ended
        horizon = now - config.limits_ttl
        with self._tx() as uow:
            # The registry is asked only about devices not seen lately (whether it knows them, their limits).
            ask = [d for d in devices if (entry := self._limits.get(d)) is None or entry[1] < horizon]
            fresh = uow.ingest.device_limits(ask) if ask else {}
            limits: dict[str, float | None] = {}
            for device_id in devices:
                entry = self._limits.get(device_id)
                if device_id in fresh:
                    limits[device_id] = fresh[device_id]
                elif entry is not None and entry[1] >= horizon:
                    limits[device_id] = entry[0]
            unknown = tuple(sorted(d for d in devices if d not in limits))
            cached = self._cache
            current = uow.ingest.activity([d for d in limits if d not in cached])
            inserted: list[DeviceActivity] = []
            updated: list[DeviceActivity] = []
            accepted = malformed = duplicates = 0
            for device_id in limits:
                pending = devices[device_id]
                accepted += pending.accepted
                malformed += pending.malformed
                duplicates += pending.duplicates
                before = cached.get(device_id) or current.get(device_id)
                after = merge_activity(before, device_id, pending, batch.at, max_metrics=config.max_metrics)
                (inserted if before is None else updated).append(after)
            uow.ingest.save_activity(inserted, updated)
            for device_id in unknown:
                unknown_messages += devices[device_id].messages
            messages = batch.messages
            uow.ingest.add_stats(
                IngestStats(
                    processed=messages,
                    accepted=accepted,
                    malformed=malformed,
                    duplicates=duplicates,
                    unknown=unknown_messages,
                    invalid_topic=batch.invalid_topic,
                    overflow=batch.overflow,
                    restricted=self._restricted,
                    flushes=1,
                    largest_batch=messages,
                    last_batch=messages,
                    last_flush_at=batch.at,
                )
            )
        # Committed: only now does the cache hold what the database holds.
        self._restricted = 0
        for device_id, limit in fresh.items():
            self._limits.pop(device_id, None)
            self._limits[device_id] = (limit, now)
        for activity in (*inserted, *updated):
            cached.pop(activity.device_id, None)
            cached[activity.device_id] = activity
        _trim(cached, config.max_cached)
        _trim(self._limits, config.max_cached)
        floods = self.flood.observe(batch.ended, {d: devices[d].messages for d in limits}, limits)
        example = next(((d, p.reason) for d, p in devices.items() if p.malformed and p.reason and d in limits), None)
        return RecordResult(
            messages=messages,
            devices=len(limits),
            unknown_devices=unknown,
            floods=tuple(floods),
            malformed=malformed,
            malformed_example=example,
        )

    def activity(self, device_id: str) -> DeviceActivity | None:
        with self._tx(readonly=True) as uow:
            return uow.ingest.activity([device_id]).get(device_id)

    def stats(self) -> IngestStats:
        with self._tx(readonly=True) as uow:
            return uow.ingest.stats()

    def sequence_heads(self) -> dict[str, tuple[int, dt.datetime | None]]:
        with self._tx(readonly=True) as uow:
            return uow.ingest.sequence_heads(self._config.max_devices)


def _trim(cache: dict[str, Any], size: int) -> None:
    """Drop the least recently written entries beyond ``size`` (in steps of a tenth, so it is not every batch)."""
    if len(cache) > size:
        for key in list(itertools.islice(cache, len(cache) - size * 9 // 10)):
            del cache[key]


def metrics_json(metrics: Mapping[str, MetricSummary]) -> str:
    """The telemetry summary as stored: ``{name: [count, last, min, max]}``."""
    return json.dumps({n: [m.count, m.last, m.min, m.max] for n, m in sorted(metrics.items())}, separators=(",", ":"))


def metrics_from_json(text: str) -> dict[str, MetricSummary]:
    data = json.loads(text)
    return {str(n): MetricSummary(int(v[0]), float(v[1]), float(v[2]), float(v[3])) for n, v in data.items()}
