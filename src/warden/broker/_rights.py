"""How device rights are expressed to Mosquitto (docs/adr/0005-broker-rights.md).

- **Base rights: an ACL file of patterns.** ``pattern write warden/%u/telemetry`` and friends: Mosquitto puts the
  connecting client's username (its certificate's CN, the device id) in place of ``%u``, so one file of eight lines
  gives every device its own topics and nothing else, whatever the fleet's size, with no per-device broker state.
- **Exceptions: the dynamic security plugin.** A device whose rights are not normal (restricted, quarantined,
  disabled) is a dynsec *client* with a role of literal topics. Mosquitto asks the plugin first: for a client it
  knows, an ACL that matches decides; for a client it does not know, or when no ACL matches, it defers to the ACL
  file. So every exception role ends with an explicit deny of ``#`` (lowest priority): without it, the plugin
  would defer and the ACL file would allow the device's normal topics again. Only exceptions live in the plugin's
  state file, which it rewrites on every command: its size, and each command's stall of the broker, follow the
  number of contained devices, not the fleet.
- **The hub** reads what devices publish and writes their commands and updates through its ``hub-client``
  certificate (CN ``hub.<fleet-domain>``, which contains a dot and so can never be a device id), by a ``user``
  section of the ACL file. The plugin's administrator is a username no certificate can carry (it has a colon) and
  exists only on the local admin socket.
"""

from __future__ import annotations

from typing import Any

from warden.broker._topics import DEVICE_PUBLISHES, DEVICE_RECEIVES, TOPIC_ROOT, Access, device_topic, rights
from warden.core import InvalidInputError, validate_device_id, validate_dns_name

__all__ = ["ADMIN_USERNAME", "acl_file", "exception_role", "role_name"]

#: the dynsec administrator: a colon cannot appear in a device id or a DNS name, so no certificate the hub issues
#: can make a TLS client this user
ADMIN_USERNAME = "warden:admin"
_ALLOW_PRIORITY = 10
_DENY_PRIORITY = 0


def acl_file(hub_client: str) -> str:
    """The ACL file: base rights of every device (patterns) and the hub's own rights (a ``user`` section)."""
    validate_dns_name(hub_client)
    normal = rights(Access.NORMAL)
    lines = [
        "# Written by Warden: every device's own topics (%u is the device id from its certificate). Do not edit: the",
        "# hub rewrites this file and repairs any drift.",
    ]
    lines += [f"pattern write {TOPIC_ROOT}/%u/{kind}" for kind in DEVICE_PUBLISHES if kind in normal.publish]
    lines += [f"pattern read {TOPIC_ROOT}/%u/{kind}" for kind in DEVICE_RECEIVES if kind in normal.receive]
    lines += ["", f"user {hub_client}"]
    lines += [f"topic read {TOPIC_ROOT}/+/{kind}" for kind in DEVICE_PUBLISHES]
    lines += [f"topic write {TOPIC_ROOT}/+/{kind}" for kind in DEVICE_RECEIVES]
    return "\n".join(lines) + "\n"


def role_name(device_id: str) -> str:
    """The dynsec role holding a device's exception (a colon: never a name an operator's role could take)."""
    return f"device:{device_id}"


def exception_role(device_id: str, access: Access) -> dict[str, Any]:
    """The dynsec role of a device whose access is not normal: its allowed literal topics, then a deny of
    everything else so the plugin never defers to the ACL file's base rights."""
    validate_device_id(device_id)
    if access is Access.NORMAL:
        raise InvalidInputError("normal access is the ACL file's, not an exception")
    allowed = rights(access)
    acls: list[dict[str, Any]] = []
    for kind in DEVICE_PUBLISHES:
        if kind in allowed.publish:
            acls.append(_acl("publishClientSend", device_topic(device_id, kind), allow=True))
    for kind in DEVICE_RECEIVES:
        if kind in allowed.receive:
            topic = device_topic(device_id, kind)
            acls.append(_acl("subscribeLiteral", topic, allow=True))
            acls.append(_acl("publishClientReceive", topic, allow=True))
    for acltype in ("publishClientSend", "publishClientReceive", "subscribeLiteral", "subscribePattern"):
        acls.append(_acl(acltype, "#", allow=False))
    return {"rolename": role_name(device_id), "textname": f"{access} ({device_id})", "acls": acls}


def _acl(acltype: str, topic: str, *, allow: bool) -> dict[str, Any]:
    return {
        "acltype": acltype,
        "topic": topic,
        "priority": _ALLOW_PRIORITY if allow else _DENY_PRIORITY,
        "allow": allow,
    }
