"""The broker context's pure logic: the topic scheme, the rights of each access level, the ACL file, the dynamic
security roles, state and commands, and the rendered Mosquitto configuration, with the bad input each refuses.
No broker runs here (tests/integration/test_broker_mosquitto.py runs a real one)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warden.broker import (
    ADMIN_USERNAME,
    DEVICE_PUBLISHES,
    DEVICE_RECEIVES,
    TOPIC_ROOT,
    Access,
    MosquittoConfig,
    access_commands,
    acl_file,
    device_topic,
    exception_role,
    hash_password,
    initial_state,
    parse_device_topic,
    render_config,
    rights,
    role_name,
    state_exceptions,
)
from warden.core import InvalidInputError

KINDS = (*DEVICE_PUBLISHES, *DEVICE_RECEIVES)
EXCEPTIONAL = [Access.RESTRICTED, Access.QUARANTINED, Access.DISABLED]
HUB = "hub.fleet.example.com"
BAD_DEVICE_IDS = [
    pytest.param("a/b", id="slash"),
    pytest.param("+", id="plus"),
    pytest.param("#", id="hash"),
    pytest.param("dev+", id="trailing plus"),
    pytest.param("dev#", id="trailing hash"),
    pytest.param("", id="empty"),
    pytest.param("Dev", id="upper case"),
    pytest.param("hub", id="reserved hub"),
    pytest.param("warden", id="reserved warden"),
    pytest.param("dev.1", id="dot"),
    pytest.param("dev\n", id="trailing newline"),
    pytest.param("-dev", id="leading hyphen"),
    pytest.param("a" * 64, id="64 chars"),
    pytest.param("xn--dev", id="idna prefix"),
    pytest.param("%u", id="acl substitution"),
    pytest.param("warden:admin", id="admin username"),
]
ACL_TYPES_DENIED = {"publishClientSend", "publishClientReceive", "subscribeLiteral", "subscribePattern"}


# --- topics ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_device_topic_builds_the_scheme(kind: str) -> None:
    assert device_topic("sensor-7", kind) == f"warden/sensor-7/{kind}"
    assert TOPIC_ROOT == "warden"


def test_the_topic_kinds_are_the_documented_five() -> None:
    assert DEVICE_PUBLISHES == ("telemetry", "health", "events")
    assert DEVICE_RECEIVES == ("commands", "updates")


@pytest.mark.parametrize("kind", ["", "status", "Telemetry", "telemetry/x", "+", "#", "telemetry\n"])
def test_device_topic_refuses_unknown_kinds(kind: str) -> None:
    with pytest.raises(InvalidInputError, match="unknown topic kind"):
        device_topic("sensor-7", kind)


@pytest.mark.parametrize("device_id", BAD_DEVICE_IDS)
def test_device_topic_refuses_invalid_and_reserved_ids(device_id: str) -> None:
    with pytest.raises(InvalidInputError):
        device_topic(device_id, "telemetry")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device_id", ["a", "sensor-0042", "0", "a" * 63])
def test_parse_device_topic_round_trips_every_kind(device_id: str, kind: str) -> None:
    assert parse_device_topic(device_topic(device_id, kind)) == (device_id, kind)


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param("", id="empty"),
        pytest.param("/", id="slash"),
        pytest.param("//", id="two slashes"),
        pytest.param("other/sensor-7/telemetry", id="other root"),
        pytest.param("Warden/sensor-7/telemetry", id="root in upper case"),
        pytest.param("$SYS/sensor-7/telemetry", id="system root"),
        pytest.param("/warden/sensor-7/telemetry", id="leading slash"),
        pytest.param("warden/sensor-7/telemetry/", id="trailing slash"),
        pytest.param("warden/sensor-7", id="two parts"),
        pytest.param("warden/sensor-7/telemetry/x", id="four parts"),
        pytest.param("warden", id="root only"),
        pytest.param("warden/sensor-7/status", id="unknown kind"),
        pytest.param("warden/sensor-7/", id="empty kind"),
        pytest.param("warden//telemetry", id="empty id"),
        pytest.param("warden/+/telemetry", id="single-level wildcard id"),
        pytest.param("warden/#", id="multi-level wildcard"),
        pytest.param("warden/sensor-7/#", id="wildcard kind"),
        pytest.param("warden/sensor-7/+", id="plus kind"),
        pytest.param("#", id="hash"),
        pytest.param("warden/Sensor-7/telemetry", id="upper-case id"),
        pytest.param("warden/hub/commands", id="reserved id"),
        pytest.param("warden/hub.fleet.example.com/telemetry", id="dotted id"),
        pytest.param("warden/sensor-7\n/telemetry", id="newline in id"),
    ],
)
def test_parse_device_topic_returns_none_for_anything_else(topic: str) -> None:
    assert parse_device_topic(topic) is None


_TOPIC_LIKE = st.one_of(
    st.text(),
    st.builds(
        lambda root, device, kind: f"{root}/{device}/{kind}",
        st.sampled_from([TOPIC_ROOT, "", "Warden", "#"]) | st.text(max_size=8),
        st.from_regex(r"[a-z0-9-]{1,64}", fullmatch=True) | st.text(max_size=70),
        st.sampled_from(KINDS) | st.text(max_size=10),
    ),
)


@settings(max_examples=500, deadline=None)
@given(_TOPIC_LIKE)
def test_parse_device_topic_never_raises_and_what_it_returns_round_trips(topic: str) -> None:
    parsed = parse_device_topic(topic)
    if parsed is not None:
        device_id, kind = parsed
        assert device_topic(device_id, kind) == topic


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True), st.sampled_from(KINDS))
def test_every_topic_device_topic_accepts_parses_back(device_id: str, kind: str) -> None:
    try:
        topic = device_topic(device_id, kind)
    except InvalidInputError:  # reserved ids and "--" in positions 3-4
        assert parse_device_topic(f"warden/{device_id}/{kind}") is None
    else:
        assert parse_device_topic(topic) == (device_id, kind)


# --- rights ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wider", "narrower"),
    [
        (Access.NORMAL, Access.RESTRICTED),
        (Access.RESTRICTED, Access.QUARANTINED),
        (Access.QUARANTINED, Access.DISABLED),
    ],
)
def test_each_access_level_is_strictly_narrower_than_the_one_before(wider: Access, narrower: Access) -> None:
    assert rights(wider).publish >= rights(narrower).publish
    assert rights(wider).receive >= rights(narrower).receive
    assert rights(wider) != rights(narrower)


def test_normal_rights_are_every_kind_in_its_direction() -> None:
    assert rights(Access.NORMAL).publish == frozenset(DEVICE_PUBLISHES)
    assert rights(Access.NORMAL).receive == frozenset(DEVICE_RECEIVES)


def test_restricted_rights_are_health_and_updates() -> None:
    assert rights(Access.RESTRICTED).publish == frozenset({"health"})
    assert rights(Access.RESTRICTED).receive == frozenset({"updates"})


def test_quarantined_publishes_health_only_and_receives_nothing() -> None:
    assert rights(Access.QUARANTINED).publish == frozenset({"health"})
    assert rights(Access.QUARANTINED).receive == frozenset()


def test_disabled_has_no_rights() -> None:
    assert rights(Access.DISABLED).publish == frozenset()
    assert rights(Access.DISABLED).receive == frozenset()


@pytest.mark.parametrize("access", list(Access))
def test_rights_never_let_a_device_publish_what_it_receives(access: Access) -> None:
    assert rights(access).publish <= frozenset(DEVICE_PUBLISHES)
    assert rights(access).receive <= frozenset(DEVICE_RECEIVES)


# --- the ACL file ------------------------------------------------------------------------------------------------


def _acl_rules(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_acl_file_patterns_are_exactly_the_normal_rights() -> None:
    patterns = [line for line in acl_file(HUB).splitlines() if line.startswith("pattern")]
    assert sorted(patterns) == sorted(
        [
            "pattern write warden/%u/telemetry",
            "pattern write warden/%u/health",
            "pattern write warden/%u/events",
            "pattern read warden/%u/commands",
            "pattern read warden/%u/updates",
        ]
    )


def test_acl_file_gives_the_hub_its_own_section() -> None:
    rules = _acl_rules(acl_file(HUB))
    assert rules.count(f"user {HUB}") == 1
    user_at = rules.index(f"user {HUB}")
    # No topic rule before the first user line (it would apply to clients without a username).
    assert not any(rule.startswith("topic") for rule in rules[:user_at])
    hub_topics = [rule for rule in rules[user_at + 1 :] if not rule.startswith("pattern")]
    assert sorted(hub_topics) == sorted(
        [
            "topic read warden/+/telemetry",
            "topic read warden/+/health",
            "topic read warden/+/events",
            "topic write warden/+/commands",
            "topic write warden/+/updates",
        ]
    )
    assert sum(rule.startswith("user ") for rule in rules) == 1


def test_acl_file_grants_nothing_on_everything_or_the_control_topics() -> None:
    text = acl_file(HUB)
    assert text.endswith("\n")
    rules = _acl_rules(text)
    assert len(rules) == 11  # five patterns, one user line, five hub topics
    for rule in rules:
        words = rule.split()
        assert words[0] in {"pattern", "topic", "user"}, rule
        if words[0] == "user":
            continue
        assert len(words) == 3, rule
        assert words[1] in {"read", "write"}, rule
        topic = words[2]
        assert "#" not in topic, rule
        assert not topic.startswith("$"), rule
        assert "CONTROL" not in topic, rule
        assert topic.startswith("warden/"), rule
        assert len(topic.split("/")) == 3, rule


@pytest.mark.parametrize(
    "hub_client",
    [
        pytest.param("hub", id="no dot"),
        pytest.param("", id="empty"),
        pytest.param("Hub.example.com", id="upper case"),
        pytest.param("hub example.com", id="space"),
        pytest.param("hub.example.com\n", id="trailing newline"),
        pytest.param("hub.example.com\ntopic readwrite #", id="injected rule"),
        pytest.param("hub.example.com\r\ntopic readwrite #", id="injected rule crlf"),
        pytest.param("#.example.com", id="hash"),
        pytest.param("+.example.com", id="plus"),
        pytest.param("hub.example.com/x", id="slash"),
        pytest.param("hub.example.123", id="numeric top-level label"),
        pytest.param("hub..example.com", id="empty label"),
        pytest.param("a" * 250 + ".com", id="too long"),
    ],
)
def test_acl_file_refuses_a_hub_name_that_is_not_a_dns_name(hub_client: str) -> None:
    with pytest.raises(InvalidInputError):
        acl_file(hub_client)


# --- exception roles ---------------------------------------------------------------------------------------------


def _allowed(role: dict[str, Any], acltype: str) -> set[str]:
    return {acl["topic"] for acl in role["acls"] if acl["allow"] and acl["acltype"] == acltype}


@pytest.mark.parametrize("access", EXCEPTIONAL)
def test_exception_role_allows_exactly_the_rights_of_its_access(access: Access) -> None:
    role = exception_role("sensor-7", access)
    expected = rights(access)
    assert role["rolename"] == role_name("sensor-7") == "device:sensor-7"
    assert _allowed(role, "publishClientSend") == {device_topic("sensor-7", kind) for kind in expected.publish}
    assert _allowed(role, "publishClientReceive") == {device_topic("sensor-7", kind) for kind in expected.receive}
    assert _allowed(role, "subscribeLiteral") == {device_topic("sensor-7", kind) for kind in expected.receive}
    allowed_types = {acl["acltype"] for acl in role["acls"] if acl["allow"]}
    assert allowed_types <= {"publishClientSend", "publishClientReceive", "subscribeLiteral"}


@pytest.mark.parametrize("access", EXCEPTIONAL)
def test_exception_role_ends_in_a_deny_of_everything_below_every_allow(access: Access) -> None:
    role = exception_role("sensor-7", access)
    denies = [acl for acl in role["acls"] if not acl["allow"]]
    allows = [acl for acl in role["acls"] if acl["allow"]]
    assert all(acl["allow"] is True or acl["allow"] is False for acl in role["acls"])
    assert {(acl["acltype"], acl["topic"]) for acl in denies} == {(t, "#") for t in ACL_TYPES_DENIED}
    assert len(denies) == len(ACL_TYPES_DENIED)
    max_deny = max(acl["priority"] for acl in denies)
    assert all(acl["priority"] > max_deny for acl in allows)
    for acl in allows:
        assert "#" not in acl["topic"] and "+" not in acl["topic"]


def test_a_disabled_device_has_no_allow_at_all() -> None:
    role = exception_role("sensor-7", Access.DISABLED)
    assert [acl for acl in role["acls"] if acl["allow"]] == []
    assert len(role["acls"]) == len(ACL_TYPES_DENIED)


@pytest.mark.parametrize("access", EXCEPTIONAL)
def test_exception_role_names_its_access(access: Access) -> None:
    role = exception_role("sensor-7", access)
    assert access.value in role["textname"]
    assert "sensor-7" in role["textname"]


def test_normal_access_is_no_exception() -> None:
    with pytest.raises(InvalidInputError, match="normal"):
        exception_role("sensor-7", Access.NORMAL)


@pytest.mark.parametrize("device_id", ["a/b", "#", "hub", "Dev"])
@pytest.mark.parametrize("access", [Access.RESTRICTED, Access.QUARANTINED])
def test_exception_role_refuses_invalid_ids(device_id: str, access: Access) -> None:
    with pytest.raises(InvalidInputError):
        exception_role(device_id, access)


# --- the admin password ------------------------------------------------------------------------------------------


def _pbkdf2_sha512_one_block(password: bytes, salt: bytes, iterations: int) -> bytes:
    """PBKDF2 (RFC 8018) for one 64-byte block, written out with hmac: independent of hashlib.pbkdf2_hmac."""
    u = hmac.new(password, salt + b"\x00\x00\x00\x01", "sha512").digest()
    result = bytearray(u)
    for _ in range(iterations - 1):
        u = hmac.new(password, u, "sha512").digest()
        result = bytearray(a ^ b for a, b in zip(result, u, strict=True))
    return bytes(result)


def test_hash_password_is_pbkdf2_sha512_over_its_salt() -> None:
    fields = hash_password("correct horse battery staple")
    salt = base64.b64decode(fields["salt"], validate=True)
    digest = base64.b64decode(fields["password"], validate=True)
    assert set(fields) == {"password", "salt", "iterations"}
    assert isinstance(fields["iterations"], int)
    assert fields["iterations"] >= 1000
    assert len(digest) == 64
    expected = hashlib.pbkdf2_hmac("sha512", b"correct horse battery staple", salt, fields["iterations"], 64)
    assert digest == expected


def test_hash_password_matches_an_rfc_8018_computation() -> None:
    salt = bytes(range(12))
    fields = hash_password("pässwörd", iterations=50, salt=salt)
    assert fields["iterations"] == 50
    assert base64.b64decode(fields["salt"]) == salt
    assert base64.b64decode(fields["password"]) == _pbkdf2_sha512_one_block("pässwörd".encode(), salt, 50)


def test_hash_password_salts_with_12_random_bytes() -> None:
    first, second = hash_password("same password"), hash_password("same password")
    assert len(base64.b64decode(first["salt"])) == 12
    assert len(base64.b64decode(second["salt"])) == 12
    assert first["salt"] != second["salt"]
    assert first["password"] != second["password"]


def test_hash_password_with_the_same_salt_is_deterministic() -> None:
    salt = b"\x01" * 12
    assert hash_password("pw", iterations=10, salt=salt) == hash_password("pw", iterations=10, salt=salt)
    assert hash_password("pw", iterations=10, salt=salt) != hash_password("px", iterations=10, salt=salt)


def test_hash_password_refuses_an_empty_password() -> None:
    with pytest.raises(InvalidInputError, match="empty"):
        hash_password("")


# --- the plugin's initial state ----------------------------------------------------------------------------------

EXCEPTIONS = {
    "dev-r": Access.RESTRICTED,
    "dev-q": Access.QUARANTINED,
    "dev-d": Access.DISABLED,
    "dev-n": Access.NORMAL,
}


def _state(exceptions: dict[str, Access] | None = None) -> dict[str, Any]:
    parsed = json.loads(initial_state("an admin password", EXCEPTIONS if exceptions is None else exceptions))
    assert isinstance(parsed, dict)
    return parsed


def _by(items: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    found = {item[key]: item for item in items}
    assert len(found) == len(items), f"duplicate {key}"
    return found


def test_initial_state_is_json_with_the_plugin_sections() -> None:
    text = initial_state("an admin password", EXCEPTIONS)
    assert text.endswith("\n")
    state = json.loads(text)
    assert set(state) == {"defaultACLAccess", "clients", "groups", "roles"}
    assert state["groups"] == []


def test_the_admin_client_holds_only_the_admin_role_on_the_control_topics() -> None:
    state = _state()
    admin = _by(state["clients"], "username")[ADMIN_USERNAME]
    assert len(admin["roles"]) == 1
    admin_role = _by(state["roles"], "rolename")[admin["roles"][0]["rolename"]]
    assert admin_role["acls"]
    for acl in admin_role["acls"]:
        assert acl["topic"] == "$CONTROL/dynamic-security/#"
    assert not admin.get("groups")


def test_the_admin_password_verifies_and_is_not_stored() -> None:
    password = secrets.token_urlsafe(24)
    text = initial_state(password, EXCEPTIONS)
    assert password not in text
    admin = _by(json.loads(text)["clients"], "username")[ADMIN_USERNAME]
    salt = base64.b64decode(admin["salt"])
    expected = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, admin["iterations"], 64)
    assert base64.b64decode(admin["password"]) == expected


def test_initial_state_has_one_client_and_role_per_exception_and_none_for_normal() -> None:
    state = _state()
    clients = _by(state["clients"], "username")
    roles = _by(state["roles"], "rolename")
    assert set(clients) == {ADMIN_USERNAME, "dev-r", "dev-q", "dev-d"}
    assert role_name("dev-n") not in roles
    assert len(roles) == 4
    for device_id in ("dev-r", "dev-q", "dev-d"):
        assert clients[device_id]["roles"] == [{"rolename": role_name(device_id)}]
        assert "password" not in clients[device_id]
        assert roles[role_name(device_id)] == exception_role(device_id, EXCEPTIONS[device_id])


def test_initial_state_without_exceptions_holds_the_admin_only() -> None:
    state = _state(exceptions={"dev-n": Access.NORMAL})
    assert [client["username"] for client in state["clients"]] == [ADMIN_USERNAME]
    assert len(state["roles"]) == 1


def test_initial_state_denies_by_default() -> None:
    default = _state()["defaultACLAccess"]
    assert default["publishClientSend"] is False
    assert default["publishClientReceive"] is False
    assert default["subscribe"] is False


@pytest.mark.parametrize("device_id", BAD_DEVICE_IDS)
def test_initial_state_refuses_an_invalid_device_id(device_id: str) -> None:
    with pytest.raises(InvalidInputError):
        initial_state("an admin password", {"dev-ok": Access.QUARANTINED, device_id: Access.DISABLED})


def test_initial_state_refuses_an_empty_admin_password() -> None:
    with pytest.raises(InvalidInputError):
        initial_state("", {})


def test_state_exceptions_reads_back_the_exceptions_without_the_admin() -> None:
    found = state_exceptions(_state())
    assert found == {
        "dev-r": [{"rolename": "device:dev-r"}],
        "dev-q": [{"rolename": "device:dev-q"}],
        "dev-d": [{"rolename": "device:dev-d"}],
    }


def test_state_exceptions_of_a_list_clients_answer() -> None:
    answer = {
        "clients": [
            {"username": ADMIN_USERNAME, "roles": [{"rolename": "warden:admin"}]},
            {"username": "dev-a", "roles": [{"rolename": "device:dev-a"}]},
            {"username": "dev-b"},
            {"textname": "no username"},
            {"username": 7, "roles": []},
        ]
    }
    assert state_exceptions(answer) == {"dev-a": [{"rolename": "device:dev-a"}], "dev-b": []}
    assert state_exceptions({}) == {}


# --- run-time commands -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("known", [True, False])
def test_normal_access_deletes_the_client_then_the_role(known: bool) -> None:
    assert access_commands("sensor-7", Access.NORMAL, known=known) == [
        {"command": "deleteClient", "username": "sensor-7"},
        {"command": "deleteRole", "rolename": "device:sensor-7"},
    ]


def _role_acls(commands: list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    """The ACLs the commands give ``role``: those its createRole carries and those of addRoleACL commands (the
    plugin takes either)."""
    acls: list[dict[str, Any]] = []
    for command in commands:
        if command["command"] == "createRole" and command["rolename"] == role:
            acls += command.get("acls", [])
        elif command["command"] == "addRoleACL" and command["rolename"] == role:
            acls.append({key: value for key, value in command.items() if key not in {"command", "rolename"}})
    return acls


def _without_acl_commands(commands: list[dict[str, Any]]) -> list[str]:
    return [command["command"] for command in commands if command["command"] != "addRoleACL"]


@pytest.mark.parametrize("access", EXCEPTIONAL)
def test_a_new_exception_creates_the_role_and_all_its_acls_before_the_client(access: Access) -> None:
    commands = access_commands("sensor-7", access, known=False)
    role = exception_role("sensor-7", access)
    assert _without_acl_commands(commands) == ["createRole", "createClient"]
    create_role = commands[0]
    assert create_role["command"] == "createRole"
    assert create_role["rolename"] == "device:sensor-7"
    assert create_role["textname"] == role["textname"]
    # Every ACL, the deny of everything included, is in place before the client exists.
    assert _role_acls(commands[:-1], "device:sensor-7") == role["acls"]
    assert commands[-1] == {
        "command": "createClient",
        "username": "sensor-7",
        "roles": [{"rolename": "device:sensor-7"}],
    }


@pytest.mark.parametrize("access", EXCEPTIONAL)
def test_a_known_exception_takes_the_role_off_the_client_before_deleting_it(access: Access) -> None:
    commands = access_commands("sensor-7", access, known=True)
    role = exception_role("sensor-7", access)
    # Mosquitto 2.0.11 crashes when a role a client holds is deleted: removeClientRole must come first.
    assert _without_acl_commands(commands) == ["removeClientRole", "deleteRole", "createRole", "addClientRole"]
    assert commands[0] == {"command": "removeClientRole", "username": "sensor-7", "rolename": "device:sensor-7"}
    assert commands[1] == {"command": "deleteRole", "rolename": "device:sensor-7"}
    assert commands[2]["command"] == "createRole"
    assert commands[2]["rolename"] == "device:sensor-7"
    assert commands[-1] == {"command": "addClientRole", "username": "sensor-7", "rolename": "device:sensor-7"}
    # The recreated role has every ACL before it is given back to the client.
    assert _role_acls(commands[2:-1], "device:sensor-7") == role["acls"]
    assert all(command["command"] == "addRoleACL" for command in commands[3:-1])


@pytest.mark.parametrize("device_id", BAD_DEVICE_IDS)
@pytest.mark.parametrize("access", list(Access))
@pytest.mark.parametrize("known", [True, False])
def test_access_commands_refuse_an_invalid_device_id(device_id: str, access: Access, known: bool) -> None:
    with pytest.raises(InvalidInputError):
        access_commands(device_id, access, known=known)


# --- the Mosquitto configuration ---------------------------------------------------------------------------------

BASE = Path("/var/lib/warden/broker")
SOCKET = Path("/run/warden/broker.sock")
CONFIG = MosquittoConfig(
    host="127.0.0.1",
    port=8883,
    cafile=BASE / "ca.pem",
    certfile=BASE / "broker.pem",
    keyfile=BASE / "broker.key",
    crlfile=BASE / "crl.pem",
    acl_file=BASE / "acl",
    dynsec_file=BASE / "dynsec.json",
    dynsec_plugin=Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"),
    admin_socket=SOCKET,
    persistence_dir=BASE / "data",
    user="mosquitto",
)


def _with(field: str, value: Any) -> MosquittoConfig:
    changes: dict[str, Any] = {field: value}
    return dataclasses.replace(CONFIG, **changes)


PATH_FIELDS = [
    "cafile",
    "certfile",
    "keyfile",
    "crlfile",
    "acl_file",
    "dynsec_file",
    "dynsec_plugin",
    "admin_socket",
    "persistence_dir",
]


def test_render_config_writes_the_listener_and_security_settings() -> None:
    text = render_config(CONFIG)
    assert text.endswith("\n")
    lines = text.splitlines()
    for expected in [
        "user mosquitto",
        "per_listener_settings false",
        "allow_anonymous false",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
        "set_tcp_nodelay true",
        "listener 8883 127.0.0.1",
        f"cafile {BASE}/ca.pem",
        f"certfile {BASE}/broker.pem",
        f"keyfile {BASE}/broker.key",
        f"crlfile {BASE}/crl.pem",
        f"acl_file {BASE}/acl",
        "plugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
        f"plugin_opt_config_file {BASE}/dynsec.json",
        f"persistence_location {BASE}/data/",
        f"max_packet_size {256 * 1024}",
        "max_queued_messages 20000",
        f"max_queued_bytes {64 * 1024 * 1024}",
        f"max_inflight_bytes {16 * 1024 * 1024}",
        f"listener 0 {SOCKET}",
    ]:
        assert expected in lines, expected
    assert "allow_anonymous true" not in lines


def test_the_tls_settings_belong_to_the_device_listener_and_the_socket_listener_comes_last() -> None:
    lines = render_config(CONFIG).splitlines()
    tls_at, socket_at = lines.index("listener 8883 127.0.0.1"), lines.index(f"listener 0 {SOCKET}")
    assert tls_at < socket_at
    assert [line for line in lines if line.startswith("listener")] == [lines[tls_at], lines[socket_at]]
    for setting in ["cafile", "certfile", "keyfile", "crlfile", "require_certificate", "use_identity_as_username"]:
        at = next(i for i, line in enumerate(lines) if line.startswith(setting + " "))
        assert tls_at < at < socket_at, setting
    # Global settings come before the first listener.
    for setting in ["acl_file", "plugin", "allow_anonymous", "per_listener_settings"]:
        at = next(i for i, line in enumerate(lines) if line.startswith(setting + " "))
        assert at < tls_at, setting


def test_render_config_accepts_the_boundaries() -> None:
    socket_107 = Path("/" + "s" * 106)
    assert len(str(socket_107).encode()) == 107
    for config in [
        dataclasses.replace(CONFIG, port=1),
        dataclasses.replace(CONFIG, port=65535),
        dataclasses.replace(CONFIG, max_packet_size=1024),
        dataclasses.replace(CONFIG, max_packet_size=256 * 1024 * 1024),
        dataclasses.replace(CONFIG, admin_socket=socket_107),
        dataclasses.replace(CONFIG, host="broker.example.com", user="_mosquitto"),
    ]:
        assert f"listener {config.port} {config.host}" in render_config(config).splitlines()


@pytest.mark.parametrize("field", PATH_FIELDS)
def test_render_config_refuses_a_relative_path(field: str) -> None:
    with pytest.raises(InvalidInputError, match="absolute"):
        render_config(_with(field, Path("relative/path")))


@pytest.mark.parametrize(
    "suffix",
    [
        pytest.param("x\nallow_anonymous true", id="newline"),
        pytest.param("x\rallow_anonymous true", id="carriage return"),
        pytest.param("x\r\nallow_anonymous true", id="crlf"),
        pytest.param("x\0y", id="nul"),
        pytest.param("x ", id="trailing space"),
        pytest.param("x\n", id="trailing newline"),
    ],
)
@pytest.mark.parametrize("field", PATH_FIELDS)
def test_render_config_refuses_a_path_that_could_inject_a_line(field: str, suffix: str) -> None:
    # render_config returns the whole text or raises: an injected line can only reach the broker through a return.
    with pytest.raises(InvalidInputError):
        render_config(_with(field, Path("/var/lib/warden/" + suffix)))


@pytest.mark.parametrize("port", [0, -1, 65536, 70000])
def test_render_config_refuses_a_port_out_of_range(port: int) -> None:
    with pytest.raises(InvalidInputError, match="port"):
        render_config(dataclasses.replace(CONFIG, port=port))


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("127.0.0.1 8884", id="space"),
        pytest.param("127.0.0.1\nallow_anonymous true", id="newline"),
        pytest.param("127.0.0.1\n", id="trailing newline"),
        pytest.param("", id="empty"),
        pytest.param("a" * 254, id="too long"),
        pytest.param("host:1", id="colon"),
        pytest.param("host/x", id="slash"),
    ],
)
def test_render_config_refuses_a_bad_host(host: str) -> None:
    with pytest.raises(InvalidInputError, match="host"):
        render_config(dataclasses.replace(CONFIG, host=host))


@pytest.mark.parametrize(
    "user",
    [
        pytest.param("mosquitto\nallow_anonymous true", id="newline"),
        pytest.param("mosquitto\n", id="trailing newline"),
        pytest.param("mosquitto extra", id="space"),
        pytest.param("", id="empty"),
        pytest.param("Mosquitto", id="upper case"),
        pytest.param("1mosquitto", id="leading digit"),
        pytest.param("m" * 33, id="too long"),
    ],
)
def test_render_config_refuses_a_bad_user_name(user: str) -> None:
    with pytest.raises(InvalidInputError, match="account"):
        render_config(dataclasses.replace(CONFIG, user=user))


@pytest.mark.parametrize(
    "socket_path",
    [
        pytest.param("/" + "s" * 107, id="108 ascii bytes"),
        pytest.param("/" + "s" * 105 + "é", id="107 characters but 108 bytes"),
        pytest.param("/" + "s" * 200, id="200 bytes"),
    ],
)
def test_render_config_refuses_an_admin_socket_path_longer_than_107_bytes(socket_path: str) -> None:
    assert len(socket_path.encode()) > 107
    with pytest.raises(InvalidInputError, match="107 bytes"):
        render_config(dataclasses.replace(CONFIG, admin_socket=Path(socket_path)))


@pytest.mark.parametrize("field", ["max_queued_bytes", "max_inflight_bytes"])
@pytest.mark.parametrize("size", [0, -1, 1023, 16 * 1024**3 + 1])
def test_render_config_refuses_byte_limits_out_of_range(field: str, size: int) -> None:
    with pytest.raises(InvalidInputError, match=field):
        render_config(dataclasses.replace(CONFIG, **{field: size}))


@pytest.mark.parametrize("size", [0, -1, 1023, 256 * 1024 * 1024 + 1])
def test_render_config_refuses_a_max_packet_size_out_of_range(size: int) -> None:
    with pytest.raises(InvalidInputError, match="max_packet_size"):
        render_config(dataclasses.replace(CONFIG, max_packet_size=size))


_BASELINE_LINES = render_config(CONFIG).count("\n")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["host", "user", "acl_file", "admin_socket", "crlfile"]), st.text(max_size=40))
def test_render_config_never_adds_a_line_whatever_the_text(field: str, text: str) -> None:
    value: str | Path = Path("/var/lib/warden/" + text) if field in PATH_FIELDS else text
    try:
        rendered = render_config(_with(field, value))
    except InvalidInputError:
        return
    assert rendered.count("\n") == _BASELINE_LINES
    assert "\r" not in rendered and "\0" not in rendered
