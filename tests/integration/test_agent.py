"""The device agent against a real ``warden serve`` with its embedded Mosquitto: onboarding with a token and with an
IDevID, the MQTT session on its own topics, renewal of short-lived certificates on its own, a broker restart with
messages queued meanwhile, containment seen from the device, and ``warden-agent status``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agentkit import running_agent, token_for, write_config
from tests.hubserver import HubServer, ManufacturerCA, start_hub
from tests.integration._interop import eventually
from warden.agent import Agent, load_config, read_status
from warden.core import KeyStoreError

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(), reason="needs mosquitto"
)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    server = start_hub(tmp_path, broker=True)
    try:
        yield server
    finally:
        server.stop()


def _delivered(agent: object) -> int:
    return int(agent.session_state.delivered)  # type: ignore[attr-defined]


def test_token_onboarding_session_and_status(hub: HubServer, tmp_path: Path) -> None:
    config = write_config(hub, tmp_path / "dev-a", "dev-a", token=token_for(hub, "dev-a"))
    with running_agent(config) as running:
        eventually(running.connected, what="the agent connected to the broker")
        # agent.enrolled, agent.started, health, telemetry: all acknowledged by the broker (QoS 1)
        eventually(lambda: _delivered(running.agent) >= 4, what="four messages acknowledged")
        state_dir = tmp_path / "dev-a" / "state"
        key_files = list((state_dir / "keys").glob("*.key"))
        assert len(key_files) == 1
        assert key_files[0].stat().st_mode & 0o777 == 0o600
        eventually(
            lambda: (read_status(state_dir) or {}).get("broker", {}).get("connected"), what="status file: connected"
        )
        shown = subprocess.run(
            [sys.executable, "-m", "warden.agent", "status", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert "dev-a  (running)" in shown
        assert "connected" in shown and "disconnected" not in shown
        assert "queue" in shown and "file" in shown
        as_json = json.loads(
            subprocess.run(
                [sys.executable, "-m", "warden.agent", "status", "--config", str(config), "--json"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
        )
        assert as_json["running"] is True
        assert as_json["certificate"]["serial"] == running.agent.identity.serial  # type: ignore[union-attr]
        assert as_json["broker"]["connected"] is True
        assert abs(as_json["clock_offset_seconds"]) < 5
        assert running.agent.session_state.refused == 0
    stopped = subprocess.run(
        [sys.executable, "-m", "warden.agent", "status", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "NOT RUNNING" in stopped


def test_idevid_onboarding_refuses_a_key_others_can_read(hub: HubServer, tmp_path: Path) -> None:
    maker = ManufacturerCA(tmp_path / "maker")
    hub.warden("enrollment", "group", "add", "acme-sensors", "--ca", str(maker.path))
    idevid = maker.idevid("sensor-7")
    config = write_config(hub, tmp_path / "sensor-7", "sensor-7", idevid=idevid)
    idevid.key_path.chmod(0o644)
    agent = Agent(load_config(config))
    with pytest.raises(KeyStoreError, match="looser than 0600"):
        agent.onboard()
    assert agent.identity is None
    idevid.key_path.chmod(0o600)
    # The group's TLS trust store follows within seconds of the group being added.
    identity = eventually(lambda: _try_onboard(agent), within=20, what="onboarding with the IDevID")
    assert identity.certificate.subject.rfc4514_string().startswith("CN=sensor-7,")
    agent.stop()


def _try_onboard(agent: Agent) -> object | None:
    try:
        return agent.onboard()
    except Exception:
        return None


def test_short_lived_certificates_renew_on_their_own(tmp_path: Path) -> None:
    server = start_hub(tmp_path, broker=True, extra_env={"WARDEN_DEVICE_VALIDITY_MINUTES": "3"})
    try:
        # 3-minute certificates renewed at 12 % of their lifetime, without jitter: after about 22 s.
        config = write_config(
            server,
            tmp_path / "dev-r",
            "dev-r",
            token=token_for(server, "dev-r"),
            extra="renew_at = 0.12\njitter_fraction = 0",
        )
        with running_agent(config) as running:
            eventually(running.connected, what="connected")
            first = running.agent.identity
            assert first is not None
            assert first.not_after - first.not_before < 10 * 60
            eventually(lambda: running.agent.renewal.renewals >= 1, within=120, what="a renewal")
            second = running.agent.identity
            assert second is not None and second.serial != first.serial
            before = _delivered(running.agent)
            eventually(running.connected, what="reconnected with the new certificate")
            eventually(lambda: _delivered(running.agent) > before + 2, what="publishing after the renewal")
            assert running.agent.renewal.failures == 0
            assert running.agent.session_state.refused == 0
            # The old key is gone from the key store; only the current one is left.
            keys = sorted(p.stem for p in (tmp_path / "dev-r" / "state" / "keys").glob("*.key"))
            assert keys == [second.label]
        listed = {
            c["serial"]: c for c in json.loads(server.warden("cert", "list", "--device", "dev-r", "--json").stdout)
        }
        assert listed[second.serial]["status"] == "good"
        assert listed[first.serial]["status"] == "revoked"
        assert listed[first.serial]["revocation_reason"] == "superseded"
    finally:
        server.stop()


def test_messages_queued_during_a_broker_outage_are_all_delivered(hub: HubServer, tmp_path: Path) -> None:
    config = write_config(hub, tmp_path / "dev-q", "dev-q", token=token_for(hub, "dev-q"))
    with running_agent(config) as running:
        eventually(running.connected, what="connected")
        pid = int((hub.data_dir / "broker" / "mosquitto.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        eventually(lambda: not running.connected(), what="the agent noticed the outage")
        for i in range(50):
            running.agent.publish_telemetry({"i": float(i)})
        assert len(running.agent.queue) >= 50
        # The hub's supervisor restarts the broker; the agent reconnects with backoff and drains its queue.
        eventually(running.connected, within=60, what="reconnected after the broker restart")
        eventually(lambda: len(running.agent.queue) == 0, within=30, what="the queue drained")
        assert running.agent.queue.dropped == 0
        assert running.agent.session_state.refused == 0
        assert running.agent.session_state.connects >= 2


def test_quarantine_seen_from_the_device(hub: HubServer, tmp_path: Path) -> None:
    config = write_config(hub, tmp_path / "dev-c", "dev-c", token=token_for(hub, "dev-c"))
    admin = hub.client(headers={"Authorization": f"Bearer {hub.token('operator')}"})
    with running_agent(config) as running, admin:
        eventually(running.connected, what="connected")
        answer = admin.post("/api/v1/devices/dev-c/state", json={"state": "quarantined", "reason": "test"})
        assert answer.status_code == 200, answer.text
        # Kicked: it reconnects on its own; telemetry is now refused by the broker (PUBACK reason code), health not.
        eventually(lambda: running.agent.session_state.refused > 0, what="telemetry refused in quarantine")
        delivered = _delivered(running.agent)
        running.agent.publish_health()
        eventually(lambda: _delivered(running.agent) > delivered, what="health still delivered in quarantine")
        answer = admin.post("/api/v1/devices/dev-c/state", json={"state": "active", "reason": "cleared"})
        assert answer.status_code == 200, answer.text
        refused = running.agent.session_state.refused
        time.sleep(0)  # the release takes effect on the broker at once; the agent reconnects after the kick
        eventually(
            lambda: _delivered(running.agent) > delivered + 3 and running.agent.session_state.refused == refused,
            what="telemetry delivered again after the release",
        )
