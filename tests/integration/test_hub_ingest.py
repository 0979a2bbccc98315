"""The hub's side of device traffic, end to end: ``warden serve`` with its embedded Mosquitto, devices onboarded
over EST and publishing with ``mosquitto_pub`` (an independent client). What they publish shows up in ``warden device
show`` and the API; many messages are written in few batches; malformed ones are counted and the hub keeps going; a
flooding device is restricted on the broker, stays so across a restart and reconciliation, and is released by an
operator; the hub's link comes back after the broker restarts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tests.brokerkit import Subscription, mosquitto_pub, mosquitto_pub_lines, tls_args
from tests.hubserver import HubServer, enroll_with_token, start_hub
from tests.integration._interop import eventually
from warden.broker import MAX_MESSAGE_BYTES

pytestmark = pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="needs mosquitto-clients")

SUCCESS, NO_SUBSCRIBERS, NOT_AUTHORIZED = 0, 16, 135
Device = tuple[Path, Path, int]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    server = start_hub(tmp_path, broker=True)
    try:
        yield server
    finally:
        server.stop()


def telemetry(seq: int, **metrics: float) -> str:
    return json.dumps({"v": 1, "seq": seq, "ts": "2030-01-02T03:04:05Z", "metrics": metrics or {"t": float(seq)}})


def health(seq: int, status: str = "ok") -> str:
    return json.dumps({"v": 1, "seq": seq, "ts": "2030-01-02T03:04:05Z", "status": status, "checks": {"disk": "ok"}})


def publish(hub: HubServer, device: Device, topic: str, lines: list[str]) -> None:
    cert, key, _ = device
    result = mosquitto_pub_lines(hub.broker_port, hub.data_dir / "broker" / "ca.pem", cert, key, topic, lines)
    assert result.returncode == 0, result.stderr


def puback(hub: HubServer, device: Device, topic: str, message: str) -> int | None:
    cert, key, _ = device
    return mosquitto_pub(hub.broker_port, hub.data_dir / "broker" / "ca.pem", cert, key, topic, message)


_viewer_tokens: dict[tuple[Path, int], str] = {}


def api_get(hub: HubServer, path: str) -> dict[str, Any]:
    """A GET of the operator API with a viewer token (made once per hub): polling through the CLI would start a
    Python process per poll."""
    key = (hub.data_dir, hub.port)
    if key not in _viewer_tokens:
        _viewer_tokens[key] = hub.token("viewer")
    with hub.client(headers={"Authorization": f"Bearer {_viewer_tokens[key]}"}) as api:
        answer = api.get(path)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def shown(hub: HubServer, device_id: str) -> dict[str, Any]:
    return api_get(hub, f"/api/v1/devices/{device_id}")


def ingest_status(hub: HubServer) -> dict[str, Any]:
    return api_get(hub, "/api/v1/ingest")


def activity_when(hub: HubServer, device_id: str, ready: Any, what: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        activity = shown(hub, device_id)["activity"]
        return activity if activity is not None and ready(activity) else None

    return eventually(probe, within=30, what=what)


def test_what_a_device_publishes_shows_in_device_show_and_the_api(hub: HubServer, tmp_path: Path) -> None:
    device = enroll_with_token(hub, "dev-a", tmp_path)
    assert shown(hub, "dev-a")["activity"] is None
    publish(
        hub,
        device,
        "warden/dev-a/telemetry",
        [telemetry(1, temperature=20.5, humidity=40), telemetry(2, temperature=18.0), telemetry(3, temperature=22.5)],
    )
    publish(hub, device, "warden/dev-a/health", [health(4, "degraded")])
    publish(
        hub,
        device,
        "warden/dev-a/events",
        [json.dumps({"v": 1, "seq": 5, "ts": "2030-01-02T03:04:05Z", "type": "agent.started"})],
    )
    activity = activity_when(
        hub,
        "dev-a",
        lambda a: a["messages"] == {"telemetry": 3, "health": 1, "events": 1},
        "the messages to be ingested",
    )
    assert activity["telemetry"]["temperature"] == {"count": 3, "last": 22.5, "min": 18.0, "max": 22.5}
    assert activity["telemetry"]["humidity"]["count"] == 1
    assert activity["health"]["status"] == "degraded"
    assert activity["health"]["checks"] == {"disk": "ok"}
    assert activity["last_event"]["type"] == "agent.started"
    assert (activity["seq"], activity["duplicates"], activity["malformed"]) == (5, 0, 0)
    assert shown(hub, "dev-a")["last_seen"] == activity["last_seen"]
    assert shown(hub, "dev-a")["restriction"] is None

    cli = json.loads(hub.warden("device", "show", "dev-a", "--json").stdout)
    assert cli["last_seen"] is not None
    assert cli["activity"]["telemetry"] == activity["telemetry"]
    assert cli["activity"]["messages"] == activity["messages"]
    assert cli["restriction"] is None

    text = hub.warden("device", "show", "dev-a").stdout
    assert "last seen: 20" in text
    assert "messages: telemetry 3, health 1, events 1" in text
    assert "telemetry temperature: last 22.5, min 18, max 22.5 (3 readings)" in text
    assert "health: degraded (disk=ok)" in text


def test_a_thousand_messages_are_written_in_a_few_batches(hub: HubServer, tmp_path: Path) -> None:
    devices = {f"dev-{i}": enroll_with_token(hub, f"dev-{i}", tmp_path) for i in range(4)}
    before = ingest_status(hub)
    publishers = []
    for device_id, (cert, key, _) in devices.items():
        args = tls_args(hub.broker_port, hub.data_dir / "broker" / "ca.pem", cert, key)
        publishers.append(
            subprocess.Popen(
                ["mosquitto_pub", *args, "-t", f"warden/{device_id}/telemetry", "-q", "1", "-l"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        )
    lines = "".join(telemetry(seq, t=float(seq)) + "\n" for seq in range(1, 251))
    for process in publishers:  # all four connected, each sends its 250
        process.communicate(lines, timeout=60)
        assert process.returncode == 0
    after = eventually(
        lambda: status if (status := ingest_status(hub))["accepted"] - before["accepted"] >= 1000 else None,
        within=30,
        what="1,000 messages to be ingested",
    )
    assert after["accepted"] - before["accepted"] == 1000
    assert after["processed"] - before["processed"] == 1000
    batches = after["flushes"] - before["flushes"]
    # One transaction per flush interval (a second), whatever it holds: never one per message.
    assert 1 <= batches <= 10, batches
    assert after["largest_batch"] >= 1000 // batches
    for device_id in devices:
        activity = shown(hub, device_id)["activity"]
        assert activity["messages"]["telemetry"] == 250
        assert activity["telemetry"]["t"] == {"count": 250, "last": 250.0, "min": 1.0, "max": 250.0}
    text = hub.warden("ingest", "status").stdout
    assert f"accepted {after['accepted']}" in text
    assert json.loads(hub.warden("ingest", "status", "--json").stdout)["flushes"] == after["flushes"]


def test_malformed_messages_are_counted_and_the_hub_keeps_ingesting(hub: HubServer, tmp_path: Path) -> None:
    device = enroll_with_token(hub, "dev-m", tmp_path)
    oversized = json.dumps(
        {"v": 1, "seq": 2, "ts": "2030-01-02T03:04:05Z", "metrics": {}, "pad": "z" * MAX_MESSAGE_BYTES}
    )
    publish(
        hub,
        device,
        "warden/dev-m/telemetry",
        ["not json at all, secret-ish-payload", json.dumps({"v": 1, "seq": 1}), oversized, telemetry(3, t=7.0)],
    )
    activity = activity_when(hub, "dev-m", lambda a: a["malformed"] == 3 and a["messages"]["telemetry"] == 1, "counts")
    assert "telemetry message" in activity["last_malformed_reason"]
    assert activity["telemetry"]["t"]["last"] == 7.0
    status = ingest_status(hub)
    assert status["malformed"] == 3
    # Still ingesting, and still serving.
    publish(hub, device, "warden/dev-m/health", [health(4)])
    activity_when(hub, "dev-m", lambda a: a["messages"]["health"] == 1, "the next good message")
    with hub.client() as client:
        assert client.get("/healthz").status_code == 200
    log = hub.log()
    assert "malformed message(s)" in log
    assert "secret-ish-payload" not in log
    assert "zzzz" not in log


def test_a_flooding_device_is_restricted_until_an_operator_lifts_it(tmp_path: Path) -> None:
    flood = {"WARDEN_INGEST_FLOOD_RATE": "5", "WARDEN_INGEST_FLOOD_WINDOW_SECONDS": "2"}
    hub = start_hub(tmp_path, broker=True, extra_env=flood)
    try:
        flooder = enroll_with_token(hub, "dev-f", tmp_path)
        calm = enroll_with_token(hub, "dev-c", tmp_path)
        publish(hub, calm, "warden/dev-c/telemetry", [telemetry(1), telemetry(2)])
        # 60 messages at once: more than 5/s over 2 s.
        publish(hub, flooder, "warden/dev-f/telemetry", [telemetry(seq) for seq in range(1, 61)])
        restriction = eventually(
            lambda: shown(hub, "dev-f")["restriction"], within=30, what="the flooding device to be restricted"
        )
        assert restriction["reason"] == "flooding"
        assert restriction["details"]["limit"] == 5.0
        assert restriction["details"]["rate"] > 5.0
        assert restriction["until"] is not None  # the cool-down
        audit = json.loads(hub.warden("audit", "list", "--json").stdout)
        restricted = [r for r in audit if r["action"] == "device.restricted"]
        assert [r["target"] for r in restricted] == ["device:dev-f"]
        assert restricted[0]["details"]["rate"] == restriction["details"]["rate"]
        assert restricted[0]["details"]["limit"] == 5.0
        # On the broker, at once: telemetry refused, health still taken (and read by the hub's link).
        assert puback(hub, flooder, "warden/dev-f/telemetry", telemetry(100)) == NOT_AUTHORIZED
        assert puback(hub, flooder, "warden/dev-f/health", health(101)) == SUCCESS
        assert puback(hub, calm, "warden/dev-c/telemetry", telemetry(3)) == SUCCESS
        assert shown(hub, "dev-c")["restriction"] is None
        assert ingest_status(hub)["restricted_now"] == ["dev-f"]
    finally:
        hub.stop()

    # Restarted, without the hub's own link, so that an independent mosquitto_sub can hold the hub-client
    # certificate's one session: the restriction is in the registry, not only in the ingest's memory.
    hub = start_hub(tmp_path, broker=True, init=False, extra_env={**flood, "WARDEN_HUB_LINK": "false"})
    try:
        status = json.loads(hub.warden("broker", "status", "--json").stdout)
        assert status["exceptions_in_registry"] == {"dev-f": "restricted"}
        assert status["exceptions_held"] == ["dev-f"]
        assert hub.warden("broker", "reconcile").stdout.strip().endswith("0 repair(s)")
        subscriber = Subscription(hub_client_tls(hub, tmp_path), ("warden/dev-f/#",))
        try:
            assert puback(hub, flooder, "warden/dev-f/telemetry", telemetry(200)) == NOT_AUTHORIZED
            assert puback(hub, flooder, "warden/dev-f/health", health(201)) == SUCCESS
            eventually(lambda: subscriber.messages("warden/dev-f/health", wait=0) or None, what="health delivered")
            assert subscriber.messages("warden/dev-f/telemetry", wait=0.5) == []

            # The API lifts it (the CLI's 'warden device unrestrict' is tested on its own).
            with hub.client(headers={"Authorization": f"Bearer {hub.token('operator')}"}) as api:
                answer = api.post("/api/v1/devices/dev-f/unrestrict", json={"reason": "firmware fixed"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["restriction"] is None
            assert puback(hub, flooder, "warden/dev-f/telemetry", telemetry(202)) == SUCCESS
            delivered = eventually(
                lambda: subscriber.messages("warden/dev-f/telemetry", wait=0) or None, what="telemetry delivered"
            )
            assert json.loads(delivered[0])["seq"] == 202
        finally:
            subscriber.close()
        audit = json.loads(hub.warden("audit", "list", "--json").stdout)
        lifted = [r for r in audit if r["action"] == "device.unrestricted"]
        assert [(r["target"], r["details"]["reason"]) for r in lifted] == [("device:dev-f", "firmware fixed")]
        assert json.loads(hub.warden("broker", "status", "--json").stdout)["exceptions_held"] == []
    finally:
        hub.stop()


def hub_client_tls(hub: HubServer, work: Path) -> list[str]:
    """mosquitto_sub arguments with the hub's own hub-client certificate (its key decrypted for the tool)."""
    passphrase = (hub.data_dir / "keys" / "ca-passphrase").read_bytes().strip()
    key = serialization.load_pem_private_key((hub.data_dir / "keys" / "hub-client.key.pem").read_bytes(), passphrase)
    plain = work / "hub-client.key"
    plain.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    plain.chmod(0o600)
    return tls_args(hub.broker_port, hub.data_dir / "broker" / "ca.pem", hub.data_dir / "ca" / "hub-client.pem", plain)


def test_the_link_reconnects_after_the_broker_restarts(hub: HubServer, tmp_path: Path) -> None:
    device = enroll_with_token(hub, "dev-r", tmp_path)
    publish(hub, device, "warden/dev-r/telemetry", [telemetry(1)])
    activity_when(hub, "dev-r", lambda a: a["messages"]["telemetry"] == 1, "the first message")
    pid_file = hub.data_dir / "broker" / "mosquitto.pid"
    first = int(pid_file.read_text().strip())
    os.kill(first, signal.SIGKILL)
    eventually(
        lambda: True if (text := _read(pid_file)).isdigit() and int(text) != first else None,
        within=30,
        what="the supervisor to start the broker again",
    )
    # PUBACK 0, not 16 (no matching subscribers): the link is back and has subscribed again.
    eventually(
        lambda: True if puback(hub, device, "warden/dev-r/telemetry", telemetry(2)) == SUCCESS else None,
        within=60,
        every=1.0,
        what="the hub's link to subscribe again",
    )
    publish(hub, device, "warden/dev-r/telemetry", [telemetry(10), telemetry(11)])
    activity = activity_when(hub, "dev-r", lambda a: a["seq"] == 11, "ingest to continue")
    assert activity["messages"]["telemetry"] >= 3
    assert "hub link lost its connection to the broker" in hub.log()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


@pytest.mark.postgres
@pytest.mark.slow
def test_with_several_workers_one_process_holds_the_link(tmp_path: Path, postgres_url: str) -> None:
    """Workers never connect with the hub-client certificate (each would take the session of the one before): the
    broker sees exactly one connection of the hub's, for the whole run, and what devices publish is ingested."""
    hub = start_hub(tmp_path, database_url=postgres_url, workers=2, broker=True)
    try:
        device = enroll_with_token(hub, "dev-w", tmp_path)
        publish(hub, device, "warden/dev-w/telemetry", [telemetry(seq) for seq in range(1, 21)])
        activity_when(hub, "dev-w", lambda a: a["messages"]["telemetry"] == 20, "the messages to be ingested")
        log = (hub.data_dir / "broker" / "mosquitto.log").read_text()
        assert log.count("as hub.fleet.acme.test") == 1, log
        assert "already connected, closing old connection" not in log
    finally:
        hub.stop()
