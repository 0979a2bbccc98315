"""The dynamic security plugin's state file, written before the broker starts, and the commands that change it
while it runs (``$CONTROL/dynamic-security/v1``).

Writing the whole state before start puts any number of exceptions in place at no cost to a running broker; at
run time each containment is a handful of commands sent in one message."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping
from typing import Any

from warden.broker._rights import ADMIN_USERNAME, exception_role, role_name
from warden.broker._topics import Access
from warden.core import InvalidInputError, validate_device_id

__all__ = [
    "ADMIN_ROLE",
    "CONTROL_TOPIC",
    "RESPONSE_TOPIC",
    "access_commands",
    "hash_password",
    "initial_state",
    "state_exceptions",
]

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"
ADMIN_ROLE = "warden:admin"
#: PBKDF2-SHA512 rounds of the admin password. The plugin hashes on the broker's only thread at every admin login,
#: and the hub logs in once per connection to a local socket: 10,000 rounds is a few milliseconds.
PASSWORD_ITERATIONS = 10_000
_SALT_BYTES = 12


def hash_password(password: str, *, iterations: int = PASSWORD_ITERATIONS, salt: bytes | None = None) -> dict[str, Any]:
    """The plugin's password fields: base64 of PBKDF2-HMAC-SHA512 (64 bytes) over a random 12-byte salt."""
    if not password:
        raise InvalidInputError("the broker admin password is empty")
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    return {
        "password": base64.b64encode(digest).decode("ascii"),
        "salt": base64.b64encode(salt).decode("ascii"),
        "iterations": iterations,
    }


def _admin_role() -> dict[str, Any]:
    topic = "$CONTROL/dynamic-security/#"
    return {
        "rolename": ADMIN_ROLE,
        "textname": "Warden hub: broker administration",
        "acls": [
            {"acltype": acltype, "topic": topic, "priority": 0, "allow": True}
            for acltype in ("publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern")
        ],
    }


def initial_state(admin_password: str, exceptions: Mapping[str, Access]) -> str:
    """The plugin's whole state as JSON: the hub's administrator, and one client with one role per device whose
    access is not normal (devices with normal access have no entry: the ACL file serves them)."""
    clients: list[dict[str, Any]] = [
        {
            "username": ADMIN_USERNAME,
            "textname": "Warden hub",
            "roles": [{"rolename": ADMIN_ROLE}],
            **hash_password(admin_password),
        }
    ]
    roles: list[dict[str, Any]] = [_admin_role()]
    for device_id, access in sorted(exceptions.items()):
        validate_device_id(device_id)
        if access is Access.NORMAL:
            continue
        roles.append(exception_role(device_id, access))
        clients.append({"username": device_id, "roles": [{"rolename": role_name(device_id)}]})
    state = {
        # Nothing is granted by default: a client the plugin knows gets what its role says, and the ACL file
        # decides for everyone else (the plugin defers when no ACL matches and the default is deny).
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": clients,
        "groups": [],
        "roles": roles,
    }
    return json.dumps(state, indent=1, sort_keys=True) + "\n"


def state_exceptions(state: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Device exception clients in a state file or a ``listClients``-style answer: device id -> its roles
    (everything but the administrator)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for client in state.get("clients", []):
        username = client.get("username")
        if isinstance(username, str) and username != ADMIN_USERNAME:
            found[username] = list(client.get("roles", []))
    return found


def access_commands(device_id: str, access: Access, *, known: bool) -> list[dict[str, Any]]:
    """The commands that give ``device_id`` ``access``. ``known``: the plugin has a client and role for it now.

    Normal access deletes the exception (the ACL file's patterns apply again); any other replaces the role's ACLs.
    A new exception creates the role before the client, so the client never exists without its deny-all."""
    validate_device_id(device_id)
    role = role_name(device_id)
    if access is Access.NORMAL:
        return [{"command": "deleteClient", "username": device_id}, {"command": "deleteRole", "rolename": role}]
    wanted = exception_role(device_id, access)
    commands: list[dict[str, Any]] = []
    if known:
        # Replace the role wholesale: take it off the client, delete it, recreate it, put it back. (Mosquitto 2.0.11
        # crashes on the next ACL check when a role is deleted while a client still holds it.) The broker runs the
        # whole message before it looks at any client's traffic, so no message sees the client without its role.
        commands.append({"command": "removeClientRole", "username": device_id, "rolename": role})
        commands.append({"command": "deleteRole", "rolename": role})
    # One createRole carrying its ACLs: each command rewrites the plugin's whole state file.
    commands.append({"command": "createRole", **wanted})
    if known:
        commands.append({"command": "addClientRole", "username": device_id, "rolename": role})
    else:
        commands.append({"command": "createClient", "username": device_id, "roles": [{"rolename": role}]})
    return commands
