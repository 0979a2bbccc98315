"""``warden serve`` with its embedded Mosquitto, end to end: a device onboards over EST, publishes on its own topics
with ``mosquitto_pub``, is quarantined and released through the operator API, is cut off by a revocation, and the
hub repairs a change made to the broker behind its back."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokerkit import mosquitto_pub
from tests.hubserver import HubServer, enroll_with_token, start_hub
from tests.integration._interop import Interop, eventually
from warden.broker import Access, BrokerAdmin, access_commands

pytestmark = pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="needs mosquitto-clients")

NOT_AUTHORIZED = 135
#: PUBACK reason codes of an authorised publish: success (the hub's own link subscribes to device topics), or "no
#: matching subscribers" while that link is (re)connecting
ALLOWED = (0, 16)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    server = start_hub(tmp_path, broker=True)
    try:
        yield server
    finally:
        server.stop()


def enroll(hub: HubServer, device_id: str, work: Path) -> tuple[Path, Path, int]:
    return enroll_with_token(hub, device_id, work)


def publish(hub: HubServer, device: tuple[Path, Path, int], topic: str) -> int | None:
    cert, key, _ = device
    return mosquitto_pub(hub.broker_port, hub.data_dir / "broker" / "ca.pem", cert, key, topic)


def test_containment_and_revocation_through_the_hub(hub: HubServer, tmp_path: Path) -> None:
    device = enroll(hub, "dev-a", tmp_path)
    other = enroll(hub, "dev-b", tmp_path)
    assert publish(hub, device, "warden/dev-a/telemetry") in ALLOWED
    assert publish(hub, device, "warden/dev-b/telemetry") == NOT_AUTHORIZED

    admin = hub.client(headers={"Authorization": f"Bearer {hub.token('operator')}"})
    security = hub.client(headers={"Authorization": f"Bearer {hub.token('security-admin')}"})
    try:
        answer = admin.post("/api/v1/devices/dev-a/state", json={"state": "quarantined", "reason": "test"})
        assert answer.status_code == 200, answer.text
        # Applied by the API call itself, not by the next reconciliation.
        assert publish(hub, device, "warden/dev-a/telemetry") == NOT_AUTHORIZED
        assert publish(hub, device, "warden/dev-a/health") in ALLOWED

        answer = admin.post("/api/v1/devices/dev-a/state", json={"state": "active", "reason": "test"})
        assert answer.status_code == 200, answer.text
        assert publish(hub, device, "warden/dev-a/telemetry") in ALLOWED

        serial = format(device[2], "x")
        answer = security.post(f"/api/v1/certificates/{serial}/revoke", json={"reason": "keyCompromise"})
        assert answer.status_code == 200, answer.text
        eventually(
            lambda: True if publish(hub, device, "warden/dev-a/telemetry") is None else None,
            what="the revoked certificate to be refused by the broker",
        )
        assert publish(hub, other, "warden/dev-b/telemetry") in ALLOWED
    finally:
        admin.close()
        security.close()


def test_the_hub_repairs_the_broker(hub: HubServer, tmp_path: Path) -> None:
    device = enroll(hub, "dev-a", tmp_path)
    password = (hub.data_dir / "keys" / "broker-admin.secret").read_text().strip()
    admin = BrokerAdmin(hub.data_dir / "broker" / "admin" / "mosquitto.sock", password)
    try:
        # Behind the hub's back: dev-a is disabled on the broker, though the registry says it is active.
        admin.execute(access_commands("dev-a", Access.DISABLED, known=False))
        assert publish(hub, device, "warden/dev-a/telemetry") == NOT_AUTHORIZED
        eventually(
            lambda: True if publish(hub, device, "warden/dev-a/telemetry") in ALLOWED else None,
            what="reconciliation to remove the exception the registry does not have",
        )
    finally:
        admin.close()
    interop = Interop(hub, tmp_path / "interop")
    try:
        repairs = [r for r in interop.audit_after(0) if r["action"] == "broker.repair"]
    finally:
        interop.close()
    assert any("dev-a" in json.dumps(r["details"]) for r in repairs), repairs


def test_the_broker_stops_with_the_hub(tmp_path: Path) -> None:
    server = start_hub(tmp_path, broker=True)
    pid_file = server.data_dir / "broker" / "mosquitto.pid"
    pid = int(eventually(lambda: pid_file.read_text().strip() or None, what="the broker's pid file"))
    assert Path(f"/proc/{pid}").exists()
    server.stop()
    eventually(lambda: True if not Path(f"/proc/{pid}").exists() else None, what="mosquitto to exit")


def test_a_broker_that_dies_is_started_again(hub: HubServer, tmp_path: Path) -> None:
    device = enroll(hub, "dev-a", tmp_path)
    pid_file = hub.data_dir / "broker" / "mosquitto.pid"
    first = int(pid_file.read_text().strip())
    os.kill(first, signal.SIGKILL)
    second = eventually(
        lambda: int(text) if (text := _read(pid_file)).isdigit() and int(text) != first else None,
        what="the supervisor to start the broker again",
    )
    assert Path(f"/proc/{second}").exists()
    eventually(
        lambda: True if publish(hub, device, "warden/dev-a/telemetry") in ALLOWED else None,
        what="the device to publish through the new broker",
    )
    assert "the broker exited; starting it again" in hub.log()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def test_broker_status_and_reconcile_from_the_cli(hub: HubServer, tmp_path: Path) -> None:
    enroll(hub, "dev-a", tmp_path)
    status = json.loads(hub.warden("broker", "status", "--json").stdout)
    assert status["running"] is True
    assert status["listener"] == f"mqtts://127.0.0.1:{hub.broker_port}"
    assert status["exceptions_held"] == []
    assert status["in_line_with_registry"] is True

    hub.warden("device", "quarantine", "dev-a", "--reason", "test")
    status = json.loads(hub.warden("broker", "status", "--json").stdout)
    assert status["exceptions_held"] == ["dev-a"]
    assert status["exceptions_in_registry"] == {"dev-a": "quarantined"}
    assert status["in_line_with_registry"] is True
    assert hub.warden("broker", "reconcile").stdout.strip().endswith("0 repair(s)")
    text = hub.warden("broker", "status").stdout
    assert "broker: running on mqtts://127.0.0.1:" in text


def test_broker_commands_without_a_running_broker(tmp_path: Path) -> None:
    server = start_hub(tmp_path)  # WARDEN_BROKER=off
    try:
        assert json.loads(server.warden("broker", "status", "--json").stdout) == {"broker": "off"}
        refused = server.warden("broker", "reconcile", check=False)
        assert refused.returncode == 3
        assert "no broker is running" in refused.stderr
    finally:
        server.stop()
