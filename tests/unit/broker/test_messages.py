"""The device messages (telemetry, health, events): what encode_message writes, what decode_message accepts, and
the bad payloads the hub's ingest refuses with a message that says why."""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warden.broker import (
    MAX_MESSAGE_BYTES,
    MESSAGE_VERSION,
    Event,
    Health,
    Telemetry,
    decode_message,
    encode_message,
)
from warden.core import InvalidInputError

TS = dt.datetime(2026, 11, 25, 10, 0, tzinfo=dt.UTC)
KIND = {Telemetry: "telemetry", Health: "health", Event: "events"}


def kind_of(message: Telemetry | Health | Event) -> str:
    return KIND[type(message)]


def raw(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def refused(kind: str, payload: bytes) -> str:
    with pytest.raises(InvalidInputError) as info:
        decode_message(kind, payload)
    return info.value.message


# --- round trips --------------------------------------------------------------------------------------------------

EXAMPLES = [
    pytest.param(Telemetry(seq=17, ts=TS, metrics={"temperature": 21.5, "load1": 0.25}), id="telemetry"),
    pytest.param(Telemetry(seq=0, ts=TS, metrics={}), id="telemetry without metrics"),
    pytest.param(Health(seq=18, ts=TS, status="ok", checks={"disk": "ok", "clock": "skewed"}), id="health"),
    pytest.param(Health(seq=1, ts=TS, status="failing"), id="health without checks"),
    pytest.param(
        Event(seq=19, ts=TS, type="agent.started", data={"version": 1, "nested": {"list": [1, "two", None, True]}}),
        id="event",
    ),
    pytest.param(Event(seq=2**63 - 1, ts=TS, type="x"), id="event without data, largest seq"),
]


@pytest.mark.parametrize("message", EXAMPLES)
def test_decode_of_encode_is_the_message(message: Telemetry | Health | Event) -> None:
    decoded = decode_message(kind_of(message), encode_message(message))
    assert decoded == message
    assert type(decoded) is type(message)


def test_the_encoding_is_compact_sorted_json_in_utc() -> None:
    plus_one = dt.timezone(dt.timedelta(hours=1))
    message = Telemetry(seq=17, ts=dt.datetime(2026, 11, 25, 11, 0, tzinfo=plus_one), metrics={"b": 2, "a": 1.5})
    data = encode_message(message)
    assert b" " not in data
    parsed = json.loads(data)
    assert list(parsed) == sorted(parsed)
    assert parsed == {"v": 1, "seq": 17, "ts": "2026-11-25T11:00:00+01:00", "metrics": {"a": 1.5, "b": 2.0}}
    assert json.loads(encode_message(Telemetry(seq=1, ts=TS, metrics={})))["ts"] == "2026-11-25T10:00:00Z"


def test_the_documented_examples_decode() -> None:
    telemetry = decode_message(
        "telemetry", b'{"v": 1, "seq": 17, "ts": "2026-11-25T10:00:00Z", "metrics": {"temperature": 21.5}}'
    )
    assert telemetry == Telemetry(seq=17, ts=TS, metrics={"temperature": 21.5})
    health = decode_message("health", b'{"v": 1, "seq": 18, "ts": "2026-11-25T10:00:00Z", "status": "ok"}')
    assert isinstance(health, Health)
    assert health.checks == {}
    event = decode_message("events", b'{"v": 1, "seq": 19, "ts": "2026-11-25T10:00:00Z", "type": "agent.started"}')
    assert isinstance(event, Event)
    assert event.data == {}


def test_the_version_defaults_to_the_current_one() -> None:
    assert MESSAGE_VERSION == 1
    assert decode_message("telemetry", raw(seq=1, ts="2026-11-25T10:00:00Z", metrics={})).v == MESSAGE_VERSION


def test_messages_are_immutable() -> None:
    message = Telemetry(seq=1, ts=TS, metrics={})
    with pytest.raises(ValueError, match="frozen"):
        message.seq = 2  # type: ignore[misc]


# --- refusals -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["commands", "updates", "status", "", "Telemetry", "event"])
def test_a_kind_devices_do_not_publish_is_refused(kind: str) -> None:
    assert refused(kind, raw(seq=1, ts="2026-11-25T10:00:00Z")) == f"devices do not publish on {kind!r} topics"


def test_the_size_limit_is_checked_before_parsing() -> None:
    payload = raw(seq=1, ts="2026-11-25T10:00:00Z", metrics={"a": 1})
    exact = payload + b" " * (MAX_MESSAGE_BYTES - len(payload))
    assert len(exact) == MAX_MESSAGE_BYTES
    assert isinstance(decode_message("telemetry", exact), Telemetry)
    over = exact + b" "
    message = refused("telemetry", over)
    assert message == f"the telemetry message has {MAX_MESSAGE_BYTES + 1} bytes, more than {MAX_MESSAGE_BYTES}"
    # Not even parsed: garbage of that size gets the same answer.
    assert refused("events", b"\xff" * (MAX_MESSAGE_BYTES + 1)).startswith("the events message has")


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        pytest.param(b"", "message: Invalid JSON", id="empty"),
        pytest.param(b"not json", "message: Invalid JSON", id="text"),
        pytest.param(b'{"seq": 1,', "message: Invalid JSON", id="truncated"),
        pytest.param(b"\xff\xfe{}", "message: Invalid JSON", id="not utf-8"),
        pytest.param(b"[]", "message: Input should be an object", id="array"),
        pytest.param(b"null", "message: Input should be an object", id="null"),
    ],
)
def test_a_payload_that_is_not_a_json_object_is_refused(payload: bytes, where: str) -> None:
    assert refused("telemetry", payload).startswith(f"malformed telemetry message: {where}")


def test_a_deeply_nested_payload_is_refused_cleanly() -> None:
    data = b"[" * 3000 + b"]" * 3000
    message = refused("events", b'{"seq": 1, "ts": "2026-11-25T10:00:00Z", "type": "x", "data": {"a": ' + data + b"}}")
    assert message.startswith("malformed events message: message: Invalid JSON: recursion limit exceeded")


@pytest.mark.parametrize(
    ("kind", "fields", "extra"),
    [
        ("telemetry", {"metrics": {}, "device": "dev-a"}, "device"),
        ("health", {"status": "ok", "metrics": {}}, "metrics"),
        ("events", {"type": "x", "status": "ok"}, "status"),
    ],
)
def test_extra_fields_are_refused_by_name(kind: str, fields: dict[str, Any], extra: str) -> None:
    payload = raw(seq=1, ts="2026-11-25T10:00:00Z", **fields)
    assert refused(kind, payload) == f"malformed {kind} message: {extra}: Extra inputs are not permitted"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({"v": 2}, "v: Input should be 1", id="version 2"),
        pytest.param({"v": 0}, "v: Input should be 1", id="version 0"),
        pytest.param({"v": "1"}, "v: Input should be 1", id="version as a string"),
        pytest.param({"seq": None}, "seq: Field required", id="seq missing"),
        pytest.param({"seq": -1}, "seq: Input should be greater than or equal to 0", id="seq negative"),
        pytest.param({"seq": 2**63}, "seq: Input should be less than 9223372036854775808", id="seq too large"),
        pytest.param({"seq": "one"}, "seq: Input should be a valid integer", id="seq a word"),
        pytest.param({"seq": 1.5}, "seq: Input should be a valid integer", id="seq fractional"),
        pytest.param({"ts": None}, "ts: Field required", id="ts missing"),
        pytest.param({"ts": "yesterday"}, "ts: Input should be a valid datetime", id="ts a word"),
        pytest.param({"metrics": None}, "metrics: Field required", id="metrics missing"),
        pytest.param({"metrics": [1, 2]}, "metrics: Input should be an object", id="metrics a list"),
        pytest.param({"metrics": {"a": "warm"}}, "metrics.a: Input should be a valid number", id="metric a word"),
        pytest.param({"metrics": {"a": None}}, "metrics.a: Input should be a valid number", id="metric null"),
        pytest.param({"metrics": {"a": {"b": 1}}}, "metrics.a: Input should be a valid number", id="metric nested"),
    ],
)
def test_bad_telemetry_fields_are_refused_with_where_and_why(fields: dict[str, Any], expected: str) -> None:
    content: dict[str, Any] = {"seq": 1, "ts": "2026-11-25T10:00:00Z", "metrics": {"a": 1}}
    for name, value in fields.items():
        if value is None:
            content.pop(name)
        else:
            content[name] = value
    message = refused("telemetry", json.dumps(content).encode())
    assert message.startswith(f"malformed telemetry message: {expected}"), message


def test_at_most_64_metrics() -> None:
    metrics = {f"m{i}": float(i) for i in range(64)}
    decoded = decode_message("telemetry", raw(seq=1, ts="2026-11-25T10:00:00Z", metrics=metrics))
    assert isinstance(decoded, Telemetry)
    assert len(decoded.metrics) == 64
    metrics["m64"] = 64.0
    message = refused("telemetry", raw(seq=1, ts="2026-11-25T10:00:00Z", metrics=metrics))
    assert (
        message
        == "malformed telemetry message: metrics: Dictionary should have at most 64 items after validation, not more"
    )


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("a" * 65, id="65 characters"),
        pytest.param("with space", id="space"),
        pytest.param("slash/name", id="slash"),
        pytest.param("température", id="non-ascii"),
        pytest.param("new\nline", id="newline"),
        pytest.param("$dollar", id="dollar"),
    ],
)
def test_bad_metric_names_are_refused(name: str) -> None:
    message = refused("telemetry", raw(seq=1, ts="2026-11-25T10:00:00Z", metrics={name: 1.0}))
    assert message.startswith(f"malformed telemetry message: metrics.{name}.[key]: String should ")


@pytest.mark.parametrize("name", ["a", "A" * 64, "cpu.load_1", "net:eth0-rx", "0"])
def test_good_metric_names_are_accepted(name: str) -> None:
    decoded = decode_message("telemetry", raw(seq=1, ts="2026-11-25T10:00:00Z", metrics={name: 1}))
    assert isinstance(decoded, Telemetry)
    assert decoded.metrics == {name: 1.0}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({"status": "fine"}, "status: Input should be 'ok', 'degraded' or 'failing'", id="bad status"),
        pytest.param({"status": None}, "status: Field required", id="status missing"),
        pytest.param({"checks": {"disk": "x" * 257}}, "checks.disk: String should have at most 256", id="long check"),
        pytest.param({"checks": {"disk": 1}}, "checks.disk: Input should be a valid string", id="check a number"),
        pytest.param({"checks": {"bad name": "ok"}}, "checks.bad name.[key]: String should match", id="check name"),
        pytest.param(
            {"checks": {f"c{i}": "ok" for i in range(129)}},
            "checks: Dictionary should have at most 128 items after validation, not more",
            id="129 checks",
        ),
    ],
)
def test_bad_health_fields_are_refused(fields: dict[str, Any], expected: str) -> None:
    content: dict[str, Any] = {"seq": 1, "ts": "2026-11-25T10:00:00Z", "status": "ok"}
    for name, value in fields.items():
        if value is None:
            content.pop(name)
        else:
            content[name] = value
    message = refused("health", json.dumps(content).encode())
    assert message.startswith(f"malformed health message: {expected}"), message


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({"type": None}, "type: Field required", id="type missing"),
        pytest.param({"type": ""}, "type: String should have at least 1 character", id="type empty"),
        pytest.param({"type": "a b"}, "type: String should match pattern", id="type with space"),
        pytest.param({"type": "t" * 65}, "type: String should have at most 64 characters", id="type too long"),
        pytest.param({"data": [1]}, "data: Input should be an object", id="data a list"),
    ],
)
def test_bad_event_fields_are_refused(fields: dict[str, Any], expected: str) -> None:
    content: dict[str, Any] = {"seq": 1, "ts": "2026-11-25T10:00:00Z", "type": "agent.started"}
    for name, value in fields.items():
        if value is None:
            content.pop(name)
        else:
            content[name] = value
    message = refused("events", json.dumps(content).encode())
    assert message.startswith(f"malformed events message: {expected}"), message


def test_the_shape_of_one_kind_is_not_accepted_as_another() -> None:
    telemetry = encode_message(Telemetry(seq=1, ts=TS, metrics={"a": 1.0}))
    assert refused("health", telemetry).startswith("malformed health message: ")
    assert refused("events", telemetry).startswith("malformed events message: ")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_metric_never_reaches_the_wire(value: float) -> None:
    """What the agent publishes must be JSON that any consumer (PostgreSQL jsonb, a browser) parses; NaN and
    Infinity are not JSON. Either the model refuses them or the encoder does."""
    try:
        message = Telemetry(seq=1, ts=TS, metrics={"a": value})
    except ValueError:
        message = None
    if message is not None:
        with pytest.raises(ValueError, match=r"JSON|finite|nan|inf"):
            encode_message(message)
    literal = json.dumps({"seq": 1, "ts": "2026-11-25T10:00:00Z", "metrics": {"a": value}}).encode()
    assert refused("telemetry", literal).startswith("malformed telemetry message: metrics.a: ")


# --- properties ---------------------------------------------------------------------------------------------------

NAMES = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)
TIMES = st.datetimes(
    min_value=dt.datetime(2000, 1, 1),
    max_value=dt.datetime(2100, 1, 1),
    timezones=st.sampled_from(
        [dt.UTC, dt.timezone(dt.timedelta(hours=5, minutes=30)), dt.timezone(-dt.timedelta(hours=8))]
    ),
)
SEQS = st.integers(0, 2**63 - 1)
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | FLOATS | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
MESSAGES: st.SearchStrategy[Telemetry | Health | Event] = st.one_of(
    st.builds(Telemetry, seq=SEQS, ts=TIMES, metrics=st.dictionaries(NAMES, FLOATS, max_size=64)),
    st.builds(
        Health,
        seq=SEQS,
        ts=TIMES,
        status=st.sampled_from(["ok", "degraded", "failing"]),
        checks=st.dictionaries(NAMES, st.text(max_size=256), max_size=128),
    ),
    st.builds(
        Event, seq=SEQS, ts=TIMES, type=NAMES, data=st.dictionaries(st.text(max_size=16), JSON_VALUES, max_size=8)
    ),
)


@settings(max_examples=300, deadline=None)
@given(MESSAGES)
def test_decode_after_encode_is_the_identity(message: Telemetry | Health | Event) -> None:
    payload = encode_message(message)
    assert len(payload) <= MAX_MESSAGE_BYTES
    decoded = decode_message(kind_of(message), payload)
    assert decoded == message
    assert decoded.ts.utcoffset() == message.ts.utcoffset()
    # and the encoding is canonical: encoding again gives the same bytes
    assert encode_message(decoded) == payload


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(["telemetry", "health", "events"]), payload=st.binary(max_size=256))
def test_arbitrary_bytes_are_refused_or_decoded_never_crash(kind: str, payload: bytes) -> None:
    try:
        message = decode_message(kind, payload)
    except InvalidInputError as e:
        assert e.message.startswith(f"malformed {kind} message: ")
    else:
        assert kind_of(message) == kind
