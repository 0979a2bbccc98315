"""Clients the broker must refuse in the TLS handshake, with the hub running: a certificate from another CA, an expired
certificate from the hub's own CA, and a device certificate presented without its key. The hub keeps serving, and a
good device's traffic still reaches the ingest afterwards."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.agentkit import running_agent, token_for, write_config
from tests.brokerkit import mosquitto_pub
from tests.hubserver import FLEET, HubServer, ManufacturerCA, start_hub
from tests.integration._interop import eventually
from warden.core import load_settings
from warden.hub import Hub
from warden.pki import IssuedIdentity, Profile, parse_csr

pytestmark = pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="needs mosquitto-clients")


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    server = start_hub(tmp_path, broker=True)
    try:
        yield server
    finally:
        server.stop()


def _expired_from_the_hub_ca(hub: HubServer, directory: Path, device_id: str) -> tuple[Path, Path]:
    """A device certificate signed by the hub's real issuing CA whose validity ended an hour ago."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    settings = load_settings(hub.data_dir)
    opened = Hub.open(settings)
    try:
        certificate = opened.ca.authority().issue(
            csr=parse_csr(csr.public_bytes(serialization.Encoding.DER)),
            profile=Profile.DEVICE,
            identity=IssuedIdentity.for_device(device_id, FLEET),
            serial=x509.random_serial_number(),
            now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2),
            validity=dt.timedelta(hours=1),
        )
    finally:
        opened.close()
    assert certificate.not_valid_after_utc < dt.datetime.now(dt.UTC)
    cert_path, key_path = directory / f"{device_id}-expired.pem", directory / f"{device_id}-expired.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def test_foreign_and_expired_certificates_are_refused_and_the_hub_keeps_going(hub: HubServer, tmp_path: Path) -> None:
    ca = hub.data_dir / "broker" / "ca.pem"
    maker = ManufacturerCA(tmp_path / "maker")
    foreign = maker.idevid("dev-f")
    assert mosquitto_pub(hub.broker_port, ca, foreign.cert_path, foreign.key_path, "warden/dev-f/telemetry") is None
    expired_cert, expired_key = _expired_from_the_hub_ca(hub, tmp_path, "dev-e")
    assert mosquitto_pub(hub.broker_port, ca, expired_cert, expired_key, "warden/dev-e/telemetry") is None

    config = write_config(hub, tmp_path / "dev-g", "dev-g", token=token_for(hub, "dev-g"))
    with running_agent(config) as running:
        eventually(running.connected, what="a good device connects")
        # Someone else's key with the good device's certificate: the handshake proves possession of the key.
        identity = running.agent.identity
        assert identity is not None
        assert mosquitto_pub(hub.broker_port, ca, identity.chain, expired_key, "warden/dev-g/telemetry") is None
        eventually(lambda: running.agent.session_state.delivered >= 4, what="the good device's messages")

        def seen() -> bool:
            shown = json.loads(hub.warden("device", "show", "dev-g", "--json").stdout)
            return bool((shown.get("activity") or {}).get("last_seen"))

        eventually(seen, what="the ingest recorded the good device")
    with hub.client() as client:
        assert client.get("/healthz").status_code == 200
    assert hub.process.poll() is None
