"""The ingest's pure logic: validation, attribution, duplicates, aggregation, batches, flood windows, the stored
activity and the recorder (against an in-memory store). No broker or database here: tests/integration/
test_hub_ingest.py runs the whole path with a real Mosquitto and a real warden serve."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.broker._ingestkit import MemoryStore, event, health, recorder_for, telemetry, topic
from warden.broker import (
    MAX_MESSAGE_BYTES,
    Flood,
    FloodWatch,
    Ingest,
    IngestConfig,
    decode_message,
    merge_activity,
    metrics_from_json,
    metrics_json,
)
from warden.broker._ingest import _decode
from warden.core import InvalidInputError

T0 = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def cut(ingest: Ingest, now: float = 1.0) -> Any:
    return ingest.cut(now=now, at=T0)


# -- aggregation --------------------------------------------------------------------------------------------------


def test_messages_are_attributed_and_aggregated_per_device() -> None:
    ingest = Ingest()
    ingest.receive(topic("dev-a", "telemetry"), telemetry(1, temperature=20.5, humidity=40))
    ingest.receive(topic("dev-a", "telemetry"), telemetry(2, temperature=18.0))
    ingest.receive(topic("dev-a", "telemetry"), telemetry(3, temperature=22.0))
    ingest.receive(topic("dev-a", "health"), health(4, "degraded", disk="full"))
    ingest.receive(topic("dev-a", "events"), event(5, "renewal.done"))
    ingest.receive(topic("dev-b", "telemetry"), telemetry(1, temperature=5.0))
    batch = cut(ingest)
    a, b = batch.devices["dev-a"], batch.devices["dev-b"]
    assert (a.messages, a.telemetry, a.health, a.events, a.duplicates, a.malformed) == (5, 3, 1, 1, 0, 0)
    t = a.metrics["temperature"]
    assert (t.count, t.last, t.min, t.max) == (3, 22.0, 18.0, 22.0)
    assert a.metrics["humidity"].count == 1
    assert (a.health_status, dict(a.health_checks or {})) == ("degraded", {"disk": "full"})
    assert a.event_type == "renewal.done"
    assert a.seq == 5
    assert (b.messages, b.telemetry, b.seq) == (1, 1, 1)
    assert batch.messages == 6
    assert cut(ingest, 2.0).devices == {}  # a cut starts an empty batch


MALFORMED = [
    pytest.param("telemetry", b"{not json", "malformed telemetry message", id="invalid JSON"),
    pytest.param("telemetry", b"[]", "malformed telemetry message", id="not an object"),
    pytest.param("telemetry", b'{"v":1,"ts":"2030-01-02T03:04:05Z","metrics":{}}', "seq", id="no seq"),
    pytest.param("telemetry", telemetry(1)[:-1] + b',"extra":1}', "extra", id="unknown field"),
    pytest.param("telemetry", b'{"v":2,"seq":1,"ts":"2030-01-02T03:04:05Z","metrics":{}}', "v", id="version 2"),
    pytest.param("telemetry", telemetry(1, t=float("nan")), "finite number", id="NaN"),
    pytest.param("telemetry", telemetry(1, t=float("inf")), "finite number", id="infinity"),
    pytest.param("telemetry", b'{"v":1,"seq":-1,"ts":"2030-01-02T03:04:05Z","metrics":{}}', "seq", id="negative seq"),
    pytest.param("health", health(1, "splendid"), "status", id="unknown health status"),
    pytest.param("events", b'{"v":1,"seq":1,"ts":"2030-01-02T03:04:05Z","type":"a b"}', "type", id="bad event type"),
    pytest.param("telemetry", b"\xff\xfe", "malformed telemetry message", id="not UTF-8"),
    pytest.param("telemetry", b" " * (MAX_MESSAGE_BYTES + 1), "more than", id="oversized"),
]


@pytest.mark.parametrize(("kind", "payload", "reason"), MALFORMED)
def test_malformed_messages_are_counted_with_a_reason(kind: str, payload: bytes, reason: str) -> None:
    ingest = Ingest()
    ingest.receive(topic("dev-a", kind), payload)
    ingest.receive(topic("dev-a", "telemetry"), telemetry(7, t=3.0))  # the next good one is still taken
    pending = cut(ingest).devices["dev-a"]
    assert (pending.malformed, pending.telemetry, pending.messages) == (1, 1, 2)
    assert pending.reason is not None
    assert reason in pending.reason
    assert len(pending.reason) <= 256


def test_a_malformed_reason_never_quotes_the_payload() -> None:
    ingest = Ingest()
    ingest.receive(topic("dev-a", "telemetry"), b'{"v":1,"seq":1,"ts":"x","metrics":{"t":"hunter2-secret"}}')
    reason = cut(ingest).devices["dev-a"].reason
    assert reason is not None
    assert "hunter2" not in reason


def test_a_malformed_reason_is_printable_whatever_the_device_named() -> None:
    # pydantic names the failing key, and a key of the metrics map is the device's choice.
    name = "\u001b[31mred\n" + "k" * 500
    payload = json.dumps({"v": 1, "seq": 1, "ts": "2030-01-02T03:04:05Z", "metrics": {name: 1.0}}).encode()
    ingest = Ingest()
    ingest.receive(topic("dev-a", "telemetry"), payload)
    reason = cut(ingest).devices["dev-a"].reason
    assert reason is not None
    assert reason.isprintable()
    assert reason.isascii()
    assert "\x1b" not in reason
    assert len(reason) <= 256


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(b"warden/dev-a/commands", id="a topic devices receive"),
        pytest.param(b"warden/dev-a/other", id="unknown kind"),
        pytest.param(b"other/dev-a/telemetry", id="another root"),
        pytest.param(b"warden/Dev-A/telemetry", id="invalid device id"),
        pytest.param(b"warden/dev-a/telemetry/x", id="too deep"),
        pytest.param(b"warden/\xff/telemetry", id="not ASCII"),
        pytest.param(b"warden/" + b"a" * 200 + b"/telemetry", id="too long"),
    ],
)
def test_messages_on_other_topics_are_counted_as_invalid(name: bytes) -> None:
    ingest = Ingest()
    ingest.receive(name, telemetry(1))
    batch = cut(ingest)
    assert (batch.invalid_topic, batch.devices, batch.messages) == (1, {}, 1)


def test_the_fast_decoder_agrees_with_decode_message() -> None:
    for kind, payload, _ in (p.values for p in MALFORMED):
        if len(payload) > MAX_MESSAGE_BYTES:
            continue
        with pytest.raises(InvalidInputError) as fast:
            _decode(kind, payload)
        with pytest.raises(InvalidInputError) as reference:
            decode_message(kind, payload)
        assert fast.value.message == reference.value.message
    assert _decode("telemetry", telemetry(3, t=2.0)) == decode_message("telemetry", telemetry(3, t=2.0))


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["v", "seq", "ts", "metrics", "status", "checks", "type", "data", "x"]),
        st.one_of(
            st.integers(-2, 2**64),
            st.text(max_size=8),
            st.just("2030-01-02T03:04:05Z"),
            st.just("ok"),
            st.dictionaries(st.text(max_size=5), st.one_of(st.floats(), st.text(max_size=3)), max_size=3),
        ),
        max_size=6,
    ),
    st.sampled_from(["telemetry", "health", "events"]),
)
def test_the_fast_decoder_accepts_exactly_what_decode_message_accepts(data: dict[str, Any], kind: str) -> None:
    payload = json.dumps(data).encode()
    try:
        expected: object = decode_message(kind, payload)
    except InvalidInputError as e:
        expected = e.message
    try:
        found: object = _decode(kind, payload)
    except InvalidInputError as e:
        found = e.message
    assert found == expected


def test_the_telemetry_summary_keeps_at_most_max_metrics_names() -> None:
    ingest = Ingest(IngestConfig(max_metrics=2))
    ingest.receive(topic("dev-a", "telemetry"), telemetry(1, a=1.0, b=2.0, c=3.0))
    ingest.receive(topic("dev-a", "telemetry"), telemetry(2, c=4.0, a=5.0))
    pending = cut(ingest).devices["dev-a"]
    assert sorted(pending.metrics) == ["a", "b"]
    assert pending.metrics["a"].count == 2
    assert pending.telemetry == 2


# -- duplicates ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "accepted", "duplicates"),
    [
        pytest.param([(1, "T"), (1, "T")], 1, 1, id="the same message twice"),
        pytest.param([(1, "T"), (2, "T"), (1, "T"), (2, "T")], 2, 2, id="a redelivered pair"),
        pytest.param([(3, "T"), (1, "T"), (2, "T")], 3, 0, id="late but new (out of order)"),
        pytest.param([(3, "T"), (1, "T"), (1, "T")], 2, 1, id="a late one twice"),
        pytest.param([(5000, "T"), (3, "T")], 1, 1, id="further back than the window"),
        pytest.param([(10, "T"), (11, "T"), (1, "U")], 3, 0, id="the agent restarted its count"),
        pytest.param([(10, "T"), (1, "U"), (10, "T"), (2, "U")], 3, 1, id="the old run's redelivery after a restart"),
        pytest.param([(10, "T"), (1, "N"), (2, "N")], 3, 0, id="device time without a zone is UTC"),
    ],
)
def test_duplicates_are_told_from_new_messages(messages: list[tuple[int, str]], accepted: int, duplicates: int) -> None:
    times = {"T": "2030-01-02T03:04:05Z", "U": "2030-01-02T04:00:00Z", "N": "2030-01-02T05:00:00"}
    ingest = Ingest()
    for seq, ts in messages:
        ingest.receive(topic("dev-a", "telemetry"), telemetry(seq, times[ts], t=float(seq)))
    pending = cut(ingest).devices["dev-a"]
    assert (pending.telemetry, pending.duplicates) == (accepted, duplicates)
    assert pending.metrics["t"].count == accepted


def test_a_redelivery_in_a_later_batch_is_still_a_duplicate() -> None:
    ingest = Ingest()
    ingest.receive(topic("dev-a", "health"), health(1))
    cut(ingest)
    ingest.receive(topic("dev-a", "health"), health(1))
    ingest.receive(topic("dev-a", "health"), health(2))
    pending = cut(ingest, 2.0).devices["dev-a"]
    assert (pending.health, pending.duplicates, pending.seq) == (1, 1, 2)


def test_sequence_heads_from_storage_make_a_redelivery_a_duplicate() -> None:
    ingest = Ingest()
    ingest.seed({"dev-a": (10, dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC))})
    ingest.receive(topic("dev-a", "telemetry"), telemetry(9))  # counted by the previous run
    ingest.receive(topic("dev-a", "telemetry"), telemetry(10))
    ingest.receive(topic("dev-a", "telemetry"), telemetry(11))
    ingest.receive(topic("dev-a", "telemetry"), telemetry(1, "2030-01-03T00:00:00Z"))  # restarted since
    pending = cut(ingest).devices["dev-a"]
    assert (pending.telemetry, pending.duplicates) == (2, 2)


# -- bounded memory -----------------------------------------------------------------------------------------------


def test_a_batch_holds_at_most_max_batch_devices() -> None:
    ingest = Ingest(IngestConfig(max_batch_devices=3))
    for i in range(5):
        ingest.receive(topic(f"dev-{i}", "telemetry"), telemetry(1))
    ingest.receive(topic("dev-0", "telemetry"), telemetry(2))  # a device already in the batch still counts
    batch = cut(ingest)
    assert sorted(batch.devices) == ["dev-0", "dev-1", "dev-2"]
    assert batch.overflow == 2
    assert batch.devices["dev-0"].telemetry == 2
    assert batch.messages == 6


def test_sequence_state_stays_bounded_with_many_devices() -> None:
    ingest = Ingest(IngestConfig(max_devices=1000, max_routes=500))
    for i in range(800):
        ingest.receive(topic(f"old-{i}", "telemetry"), telemetry(1))
    cut(ingest, 1.0)
    for i in range(800):
        ingest.receive(topic(f"new-{i}", "telemetry"), telemetry(1))
    ingest.receive(topic("old-0", "telemetry"), telemetry(2))
    cut(ingest, 2.0)
    assert ingest.tracked <= 1000
    # The devices active most recently are the ones whose state was kept: their redeliveries are still told apart.
    for device in ("old-0", *(f"new-{i}" for i in range(800))):
        ingest.receive(topic(device, "telemetry"), telemetry(1))
    batch = cut(ingest, 3.0)
    assert all(p.duplicates == 1 for p in batch.devices.values())
    for round_ in range(20):
        for i in range(3000):
            ingest.receive(topic(f"many-{round_}-{i}", "health"), health(1))
        cut(ingest, 4.0 + round_)
        assert ingest.tracked <= 1000


def test_batches_merge_when_the_recorder_falls_behind() -> None:
    config = IngestConfig(max_batch_devices=2)
    ingest = Ingest(config)
    ingest.receive(topic("dev-a", "telemetry"), telemetry(1, t=5.0))
    first = ingest.cut(now=1.0, at=T0)
    ingest.receive(topic("dev-a", "telemetry"), telemetry(2, t=1.0))
    ingest.receive(topic("dev-b", "health"), health(1, "failing"))
    ingest.receive(topic("dev-c", "health"), health(1))
    second = ingest.cut(now=2.0, at=T0 + dt.timedelta(seconds=1))
    merged = first.merge(second, config)
    a = merged.devices["dev-a"]
    assert (a.telemetry, a.metrics["t"].count, a.metrics["t"].min, a.metrics["t"].last, a.seq) == (2, 2, 1.0, 1.0, 2)
    assert merged.devices["dev-b"].health_status == "failing"
    assert merged.overflow == 1  # dev-c: second had room for it, the merged batch has not
    assert (merged.started, merged.ended, merged.at) == (first.started, 2.0, second.at)
    assert merged.messages == 4


# -- flood windows ------------------------------------------------------------------------------------------------


def test_a_device_above_its_rate_over_the_window_floods() -> None:
    watch = FloodWatch(default_rate=50, window=10)
    # 490 messages over 10 s: within 50/s.
    for second in range(1, 11):
        assert watch.observe(float(second), {"dev-a": 49}, {}) == []
    # One second of 200 pushes the window (buckets after t=1) to 441 + 200 = 641 > 500.
    floods = watch.observe(11.0, {"dev-a": 200}, {})
    assert floods == [Flood("dev-a", rate=64.1, limit=50, window=10, messages=641)]


def test_old_buckets_leave_the_window() -> None:
    watch = FloodWatch(default_rate=10, window=5)
    assert watch.observe(1.0, {"dev-a": 40}, {}) == []
    assert watch.observe(6.0, {"dev-a": 40}, {}) == []  # the first bucket left the window
    assert watch.observe(7.0, {"dev-a": 11}, {})[0].messages == 51


def test_a_device_limit_overrides_the_default() -> None:
    watch = FloodWatch(default_rate=50, window=1)
    floods = watch.observe(1.0, {"dev-a": 20, "dev-b": 20, "dev-c": 20}, {"dev-a": 10, "dev-b": None})
    assert [(f.device_id, f.limit) for f in floods] == [("dev-a", 10)]


def test_a_flood_is_reported_once_then_needs_a_fresh_window() -> None:
    watch = FloodWatch(default_rate=1, window=2)
    assert len(watch.observe(1.0, {"dev-a": 10}, {})) == 1
    assert watch.observe(2.0, {"dev-a": 2}, {}) == []  # the window started afresh
    assert len(watch.observe(3.0, {"dev-a": 1}, {})) == 1


def test_flood_windows_stay_bounded() -> None:
    watch = FloodWatch(default_rate=100, window=10, max_devices=500)
    for second in range(30):
        watch.observe(float(second), {f"dev-{second}-{i}": 1 for i in range(100)}, {})
        assert watch.tracked <= 500
    watch.sweep(100.0, force=True)
    assert watch.tracked == 0


# -- what is stored -----------------------------------------------------------------------------------------------


def test_activity_accumulates_batch_after_batch() -> None:
    ingest = Ingest()
    ingest.receive(topic("dev-a", "telemetry"), telemetry(1, t=5.0))
    ingest.receive(topic("dev-a", "telemetry"), b"{}")
    first = merge_activity(None, "dev-a", cut(ingest).devices["dev-a"], T0, max_metrics=64)
    assert (first.first_seen, first.last_seen, first.telemetry, first.malformed) == (T0, T0, 1, 1)
    assert first.last_malformed_at == T0
    later = T0 + dt.timedelta(minutes=1)
    ingest.receive(topic("dev-a", "telemetry"), telemetry(2, t=-1.0))
    ingest.receive(topic("dev-a", "health"), health(3, "ok", fan="spinning"))
    second = merge_activity(first, "dev-a", cut(ingest, 2.0).devices["dev-a"], later, max_metrics=64)
    assert (second.first_seen, second.last_seen, second.telemetry, second.health) == (T0, later, 2, 1)
    assert second.metrics["t"].count == 2
    assert (second.metrics["t"].min, second.metrics["t"].max, second.metrics["t"].last) == (-1.0, 5.0, -1.0)
    assert (second.malformed, second.last_malformed_at) == (1, T0)  # nothing malformed in this batch
    assert (second.health_status, dict(second.health_checks), second.health_at) == ("ok", {"fan": "spinning"}, later)
    assert second.seq == 3
    assert second.seq_time == dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert second.to_json()["telemetry"]["t"] == {"count": 2, "last": -1.0, "min": -1.0, "max": 5.0}


def test_stored_metrics_stay_within_max_metrics() -> None:
    current = merge_activity(None, "dev-a", _pending({"a": 1.0, "b": 1.0}), T0, max_metrics=2)
    after = merge_activity(current, "dev-a", _pending({"c": 1.0, "a": 2.0}), T0, max_metrics=2)
    assert sorted(after.metrics) == ["a", "b"]
    assert metrics_from_json(metrics_json(after.metrics)) == after.metrics


def _pending(metrics: dict[str, float]) -> Any:
    ingest = Ingest()
    ingest.receive(topic("dev-a", "telemetry"), telemetry(1, **metrics))
    return ingest.cut(now=1.0, at=T0).devices["dev-a"]


# -- the recorder -------------------------------------------------------------------------------------------------


def test_one_transaction_per_batch_whatever_it_holds() -> None:
    store = MemoryStore({f"dev-{i}": None for i in range(10)})
    recorder = recorder_for(store)
    ingest = Ingest()
    for seq in range(1, 101):
        for i in range(10):
            ingest.receive(topic(f"dev-{i}", "telemetry"), telemetry(seq, t=float(seq)))
    result = recorder.record(cut(ingest))
    assert store.transactions == 1
    assert (result.messages, result.devices) == (1000, 10)
    assert store.rows["dev-3"].telemetry == 100
    assert store.rows["dev-3"].metrics["t"].max == 100.0
    assert store.totals.accepted == 1000
    assert (store.totals.flushes, store.totals.largest_batch, store.totals.last_flush_at) == (1, 1000, T0)


def test_messages_of_unknown_devices_are_counted_and_dropped() -> None:
    store = MemoryStore({"dev-a": None})
    recorder = recorder_for(store)
    ingest = Ingest()
    ingest.receive(topic("dev-a", "telemetry"), telemetry(1))
    ingest.receive(topic("ghost", "telemetry"), telemetry(1))
    ingest.receive(topic("ghost", "health"), b"{}")
    result = recorder.record(cut(ingest))
    assert result.unknown_devices == ("ghost",)
    assert sorted(store.rows) == ["dev-a"]
    totals = store.totals
    assert (totals.processed, totals.accepted, totals.unknown, totals.malformed) == (3, 1, 2, 0)


def test_the_recorder_reports_floods_of_known_devices_with_their_limits() -> None:
    store = MemoryStore({"dev-a": 2.0, "dev-b": None})
    recorder = recorder_for(store, rate=1000, window=1)
    ingest = Ingest()
    for seq in range(1, 6):
        for device in ("dev-a", "dev-b", "ghost"):
            ingest.receive(topic(device, "health"), health(seq))
    result = recorder.record(cut(ingest))
    assert result.floods == (Flood("dev-a", rate=5.0, limit=2.0, window=1, messages=5),)
    recorder.note_restricted(1)
    recorder.record(cut(ingest, 2.0))  # an empty batch still carries the count
    assert store.totals.restricted == 1


def test_malformed_messages_are_counted_per_device_and_in_total() -> None:
    store = MemoryStore({"dev-a": None, "dev-b": None})
    recorder = recorder_for(store)
    ingest = Ingest()
    ingest.receive(topic("dev-a", "telemetry"), b"garbage")
    ingest.receive(topic("dev-a", "telemetry"), b"garbage")
    ingest.receive(topic("dev-b", "events"), b"{}")
    result = recorder.record(cut(ingest))
    assert (store.rows["dev-a"].malformed, store.rows["dev-b"].malformed, store.totals.malformed) == (2, 1, 3)
    assert result.malformed == 3
    assert result.malformed_example is not None
    assert store.rows["dev-a"].last_malformed_reason == result.malformed_example[1]
    assert recorder.stats().malformed == 3
    assert recorder.activity("dev-b") == store.rows["dev-b"]


def test_the_recorder_reads_back_neither_rows_it_wrote_nor_fresh_limits() -> None:
    store = MemoryStore({"dev-a": None, "dev-b": 5.0})
    recorder = recorder_for(store)
    ingest = Ingest()

    def send(seq: int, now: float) -> None:
        for device in ("dev-a", "dev-b"):
            ingest.receive(topic(device, "telemetry"), telemetry(seq, t=float(seq)))
        recorder.record(ingest.cut(now=now, at=T0))

    send(1, 1.0)
    assert (sorted(store.asked_limits), sorted(store.read_rows)) == (["dev-a", "dev-b"], ["dev-a", "dev-b"])
    send(2, 2.0)
    send(3, 20.0)
    assert (len(store.asked_limits), len(store.read_rows)) == (2, 2)  # both from memory
    store.devices["dev-b"] = 7.0  # a group's new limit: read again once the entry is older than limits_ttl (30 s)
    send(4, 32.0)
    assert sorted(store.asked_limits[2:]) == ["dev-a", "dev-b"]
    assert store.rows["dev-b"].telemetry == 4
    assert store.rows["dev-b"].metrics["t"].max == 4.0


def test_a_failed_write_leaves_the_recorder_as_the_database_is() -> None:
    store = MemoryStore({"dev-a": None})
    recorder = recorder_for(store)
    ingest = Ingest()
    ingest.receive(topic("dev-a", "telemetry"), telemetry(1, t=1.0))
    recorder.record(ingest.cut(now=1.0, at=T0))
    ingest.receive(topic("dev-a", "telemetry"), telemetry(2, t=2.0))
    failed = ingest.cut(now=2.0, at=T0)
    store.fail_next_save = True
    with pytest.raises(RuntimeError):
        recorder.record(failed)
    ingest.receive(topic("dev-a", "telemetry"), telemetry(3, t=3.0))
    later = ingest.cut(now=3.0, at=T0)
    recorder.record(failed.merge(later, IngestConfig()))  # the pipeline merges a failed batch into the next
    assert store.rows["dev-a"].telemetry == 3
    assert store.rows["dev-a"].metrics["t"].count == 3
