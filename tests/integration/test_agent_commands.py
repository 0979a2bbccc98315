"""Signed cloud-to-device commands end to end: ``warden device command`` records a command, the running hub signs it
with its command-signing key and publishes it over its broker link, the agent verifies signature, key usage, device
and counter, executes it, and its answer closes the command. A device that was offline gets it when it comes back."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.agentkit import running_agent, token_for, write_config
from tests.hubserver import HubServer, start_hub
from tests.integration._interop import eventually
from warden.broker import COMMAND_SIGNING_EKU

pytestmark = pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="needs mosquitto")


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    server = start_hub(tmp_path, broker=True)
    try:
        yield server
    finally:
        server.stop()


def _command(hub: HubServer, device_id: str, name: str, wait: float = 30) -> dict[str, object]:
    result = hub.warden("device", "command", device_id, name, "--wait", str(wait), "--json", check=False)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_commands_are_signed_verified_executed_and_answered(hub: HubServer, tmp_path: Path) -> None:
    config = write_config(hub, tmp_path / "dev-k", "dev-k", token=token_for(hub, "dev-k"))
    with running_agent(config) as running:
        eventually(running.connected, what="connected")
        first = _command(hub, "dev-k", "ping")
        assert first["state"] == "done", first
        assert first["result"] == "pong"
        assert first["counter"] == 1
        assert running.agent.commands.accepted == 1

        second = _command(hub, "dev-k", "renew-certificate")
        assert second["state"] == "done" and second["counter"] == 2, second
        eventually(lambda: running.agent.renewal.renewals >= 1, within=30, what="the commanded renewal")

        # The agent persisted the counter before executing: the last accepted one is on disk.
        counter_file = tmp_path / "dev-k" / "state" / "commands.json"
        assert json.loads(counter_file.read_text())["counter"] == 2
        assert running.agent.commands.rejected == 0

    listed = json.loads(hub.warden("device", "commands", "dev-k", "--json").stdout)
    assert [c["counter"] for c in listed] == [2, 1]
    assert all(c["sent_at"] and c["result_at"] for c in listed)
    # The signer is a dedicated certificate with the command-signing key usage (not the hub's TLS identities).
    signer = x509.load_pem_x509_certificate((hub.data_dir / "ca" / "command-signer.pem").read_bytes())
    usages = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [COMMAND_SIGNING_EKU]
    audit = hub.warden("audit", "list", "--json").stdout
    assert audit.count('"device.command"') == 2
    # SIGTERM: the dispatcher, the ingest and the broker stop in order, and serve exits cleanly.
    hub.stop()
    assert hub.process.returncode == 0, hub.log()[-2000:]


def test_a_command_for_an_offline_device_arrives_when_it_reconnects(hub: HubServer, tmp_path: Path) -> None:
    config = write_config(hub, tmp_path / "dev-o", "dev-o", token=token_for(hub, "dev-o"))
    with running_agent(config) as running:
        eventually(running.connected, what="connected")
    # Offline now; the broker keeps its persistent session, and the hub sends the command into it.
    sent = _command(hub, "dev-o", "report-health", wait=3)
    assert sent["state"] in ("pending", "sent"), sent
    with running_agent(config) as running:
        eventually(running.connected, what="reconnected")
        eventually(lambda: running.agent.commands.accepted == 1, within=30, what="the queued command executed")
    done = json.loads(hub.warden("device", "commands", "dev-o", "--json").stdout)[0]
    assert done["state"] == "done" and done["result"] == "health report queued"


def test_commands_refused_for_a_quarantined_device(hub: HubServer, tmp_path: Path) -> None:
    config = write_config(hub, tmp_path / "dev-z", "dev-z", token=token_for(hub, "dev-z"))
    with running_agent(config) as running:
        eventually(running.connected, what="connected")
    hub.warden("device", "quarantine", "dev-z", "--reason", "test")
    refused = hub.warden("device", "command", "dev-z", "ping", check=False)
    assert refused.returncode != 0
    assert "quarantined" in refused.stderr
