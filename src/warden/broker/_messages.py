"""What devices publish on their topics, as the hub's ingest validates it and the agent produces it.

Every message is one JSON object carrying the schema version ``v``, the agent's message sequence number ``seq``
(monotonic per device and agent run, so that duplicates of QoS 1 redelivery can be told apart) and the device's
time ``ts``. The device id is *not* in the payload: the topic names it, and the broker guarantees that a device can
publish only on its own topics.

```
warden/<id>/telemetry  {"v": 1, "seq": 17, "ts": "2026-11-25T10:00:00Z", "metrics": {"temperature": 21.5}}
warden/<id>/health     {"v": 1, "seq": 18, "ts": "...", "status": "ok", "checks": {"disk": "ok"}}
warden/<id>/events     {"v": 1, "seq": 19, "ts": "...", "type": "agent.started", "data": {...}}
```

Issue 5 extends the health report; the version field lets the hub accept both shapes during an upgrade.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from warden.core import InvalidInputError

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MESSAGE_VERSION",
    "Event",
    "Health",
    "Telemetry",
    "decode_message",
    "encode_message",
]

MESSAGE_VERSION = 1
#: the largest payload the hub accepts on a device topic (the broker's own limit is set to the same value)
MAX_MESSAGE_BYTES = 64 * 1024
_NAME = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    seq: Annotated[int, Field(ge=0, lt=2**63)]
    ts: dt.datetime


class Telemetry(_Message):
    """Numeric readings: at most 64 metrics per message."""

    metrics: Annotated[dict[_NAME, Annotated[float, Field(allow_inf_nan=False)]], Field(max_length=64)]


class Health(_Message):
    """The agent's own view of its health; the hub's assessment (issue 5) decides what it means."""

    status: Literal["ok", "degraded", "failing"]
    checks: Annotated[dict[_NAME, Annotated[str, Field(max_length=256)]], Field(max_length=128)] = {}


class Event(_Message):
    """Something that happened on the device (agent start, renewal, a command's result, a local security event)."""

    type: _NAME
    data: dict[str, Any] = {}


_MODELS: dict[str, type[_Message]] = {"telemetry": Telemetry, "health": Health, "events": Event}
_KINDS = (Telemetry, Health, Event)


def decode_message(kind: str, payload: bytes) -> Telemetry | Health | Event:
    """Validate the payload published on a device topic of ``kind``; :class:`InvalidInputError` says why not."""
    model = _MODELS.get(kind)
    if model is None:
        raise InvalidInputError(f"devices do not publish on {kind!r} topics")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise InvalidInputError(f"the {kind} message has {len(payload)} bytes, more than {MAX_MESSAGE_BYTES}")
    try:
        message = model.model_validate_json(payload)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "message"
        raise InvalidInputError(f"malformed {kind} message: {where}: {first.get('msg', 'invalid')}") from None
    assert isinstance(message, _KINDS)
    return message


def encode_message(message: Telemetry | Health | Event) -> bytes:
    """The JSON the agent publishes (compact, UTC times)."""
    data = message.model_dump(mode="json")
    return json.dumps(data, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
