"""The device-scoped topic scheme and what each access level allows on it.

```
warden/<device-id>/telemetry      device -> hub
warden/<device-id>/health         device -> hub   (the only topic open in quarantine)
warden/<device-id>/events         device -> hub
warden/<device-id>/commands       hub -> device
warden/<device-id>/updates        hub -> device
```
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from warden.core import InvalidInputError, validate_device_id

__all__ = [
    "DEVICE_PUBLISHES",
    "DEVICE_RECEIVES",
    "TOPIC_ROOT",
    "Access",
    "Rights",
    "device_topic",
    "parse_device_topic",
    "rights",
]

TOPIC_ROOT = "warden"
#: what a device publishes (device -> hub) and receives (hub -> device), by topic kind
DEVICE_PUBLISHES = ("telemetry", "health", "events")
DEVICE_RECEIVES = ("commands", "updates")
_KINDS = frozenset(DEVICE_PUBLISHES + DEVICE_RECEIVES)


class Access(StrEnum):
    """A device's rights on the broker."""

    #: its own topics: publish telemetry, health and events; receive commands and updates
    NORMAL = "normal"
    #: health and updates only (a device that must be patched before it may do more)
    RESTRICTED = "restricted"
    #: its health topic only
    QUARANTINED = "quarantined"
    #: nothing at all
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class Rights:
    """The topic kinds a device may publish to and receive from."""

    publish: frozenset[str]
    receive: frozenset[str]


_RIGHTS = {
    Access.NORMAL: Rights(frozenset(DEVICE_PUBLISHES), frozenset(DEVICE_RECEIVES)),
    Access.RESTRICTED: Rights(frozenset({"health"}), frozenset({"updates"})),
    Access.QUARANTINED: Rights(frozenset({"health"}), frozenset()),
    Access.DISABLED: Rights(frozenset(), frozenset()),
}


def rights(access: Access) -> Rights:
    return _RIGHTS[access]


def device_topic(device_id: str, kind: str) -> str:
    """The literal topic of one kind for one device (the id is validated: it can hold no ``/``, ``+`` or ``#``)."""
    if kind not in _KINDS:
        raise InvalidInputError(f"unknown topic kind {kind!r}", hint=f"one of {', '.join(sorted(_KINDS))}")
    return f"{TOPIC_ROOT}/{validate_device_id(device_id)}/{kind}"


def parse_device_topic(topic: str) -> tuple[str, str] | None:
    """``(device_id, kind)`` of a device topic, or None for anything else (another root, a bad id, a wildcard)."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != TOPIC_ROOT or parts[2] not in _KINDS:
        return None
    try:
        return validate_device_id(parts[1]), parts[2]
    except InvalidInputError:
        return None
