"""A simulated fleet: a device maker's CA issuing onboarding certificates, an enrollment group for it on the hub, and
N real agents in one process, each with its own key, enrollment, renewal and MQTT session.

Only the telemetry is simulated (a temperature random walk and a few counters); everything else is the agent that
runs on a device. Each agent runs in its own thread (and paho's network thread): a few hundred agents per process.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion

from warden.agent._agent import Agent
from warden.agent._config import AgentConfig, BrokerConfig, HubConfig, OnboardingConfig
from warden.agent._est import _Connection, client_context
from warden.agent._queue import MemoryQueue
from warden.agent._session import NamedAddressClient
from warden.core import WardenError
from warden.core.files import write_file_atomic, write_private_file

__all__ = ["Factory", "Fleet", "Impostor", "SimulatedDevice", "create_enrollment_group"]

_MAX_ANSWER = 1024 * 1024


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


class Factory:
    """A device maker's CA: it signs the onboarding certificates (IDevIDs, CN = device id) of the devices it builds."""

    def __init__(self, directory: Path, name: str = "Simulated Devices Manufacturing CA") -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.ca_path = directory / "maker-ca.pem"
        key_path = directory / "maker-ca.key"
        if self.ca_path.exists() and key_path.exists():
            loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            assert isinstance(loaded, ec.EllipticCurvePrivateKey)
            self.key = loaded
            self.certificate = x509.load_pem_x509_certificate(self.ca_path.read_bytes())
            return
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        write_private_file(
            key_path,
            self.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        write_file_atomic(self.ca_path, _pem(self.certificate))

    def idevid(self, device_id: str, directory: Path) -> tuple[Path, Path]:
        """An onboarding certificate and its key file (0600) for ``device_id``."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert_path, key_path = directory / "idevid.pem", directory / "idevid.key"
        if cert_path.exists() and key_path.exists():
            return cert_path, key_path
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        write_private_file(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        write_file_atomic(cert_path, _pem(certificate))
        return cert_path, key_path


def create_enrollment_group(hub: HubConfig, api_token: str, name: str, ca: Path) -> bool:
    """Create the enrollment group ``name`` trusting ``ca`` through the operator API; False if it exists already."""
    context = client_context(hub.ca)
    connection = _Connection(hub.host, hub.port, address=hub.address, context=context, timeout=hub.timeout_seconds)
    body = json.dumps({"name": name, "ca_pem": ca.read_text(), "tags": {"simulated": "true"}}).encode()
    try:
        connection.request(
            "POST",
            f"{hub.path_prefix}/api/v1/enrollment-groups",
            body=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_token}"},
        )
        response = connection.getresponse()
        answer = response.read(_MAX_ANSWER)
    except OSError as e:
        raise WardenError(f"cannot reach the hub at {hub.url}: {e}") from None
    finally:
        connection.close()
    if response.status == 201:
        return True
    if response.status == 409:
        return False
    raise WardenError(f"the hub refused to create the enrollment group ({response.status}): {answer[:300]!r}")


def _walk(rng: random.Random) -> Callable[[], dict[str, float]]:
    temperature = rng.uniform(18.0, 24.0)
    count = 0

    def metrics() -> dict[str, float]:
        nonlocal temperature, count
        temperature += rng.gauss(0, 0.2)
        count += 1
        return {"temperature_c": round(temperature, 2), "readings": float(count), "rssi_dbm": round(rng.gauss(-60, 4))}

    return metrics


@dataclass
class Impostor:
    """An MQTT client using a device's stolen certificate and key; it records what the broker does to it."""

    device_id: str
    client: NamedAddressClient
    refused: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)
    disconnects: list[float] = field(default_factory=list)
    connected: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def with_stolen(cls, device_id: str, chain: Path, key: Path, root: Path, broker: BrokerConfig) -> Impostor:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(root))
        context.load_cert_chain(chain, key)
        client = NamedAddressClient(
            broker.address, callback_api_version=CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5
        )
        client.tls_set_context(context)
        impostor = cls(device_id, client)
        client.on_connect = lambda *_a: impostor.connected.set()
        client.on_publish = impostor._published
        client.on_disconnect = impostor._disconnected
        client.connect(broker.host, broker.port, keepalive=30)
        client.loop_start()
        return impostor

    def _published(self, _c: object, _u: object, _mid: int, reason: Any, _p: object) -> None:
        (self.refused if reason.is_failure else self.accepted).append(time.monotonic())

    def _disconnected(self, *_a: object) -> None:
        self.connected.clear()
        self.disconnects.append(time.monotonic())

    def publish(self, topic: str, payload: bytes = b'{"v":1}') -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=1)

    def cut_after(self, start: float) -> float | None:
        """Seconds from ``start`` to the first refusal or disconnect after it."""
        moments = [t for t in (*self.refused, *self.disconnects) if t >= start]
        return min(moments) - start if moments else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class SimulatedDevice:
    device_id: str
    agent: Agent
    thread: threading.Thread | None = None
    error: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass
class Fleet:
    """N agents against one hub. ``start`` returns at once; :meth:`wait_connected` waits for the sessions."""

    hub: HubConfig
    broker: BrokerConfig
    directory: Path
    devices: int
    prefix: str = "sim"
    telemetry_interval: float = 5.0
    seed: int | None = None
    renew_at: float = 2 / 3
    members: list[SimulatedDevice] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.factory = Factory(self.directory / "factory")
        rng = random.Random(self.seed)  # noqa: S311 (simulated readings)
        for i in range(self.devices):
            device_id = f"{self.prefix}-{i:04d}"
            home = self.directory / "devices" / device_id
            cert, key = self.factory.idevid(device_id, home)
            config = AgentConfig(
                state_dir=home / "state",
                device_id=device_id,
                hub=self.hub,
                broker=self.broker,
                onboarding=OnboardingConfig(certificate=cert, key=key),
                telemetry_interval_seconds=self.telemetry_interval,
                health_interval_seconds=max(30.0, self.telemetry_interval * 6),
                queue="memory",
                queue_limit=1000,
                renew_at=self.renew_at,
            )
            agent = Agent(
                config,
                queue=MemoryQueue(config.queue_limit),
                telemetry=_walk(random.Random(rng.random())),  # noqa: S311
                rng=random.Random(rng.random()),  # noqa: S311
            )
            self.members.append(SimulatedDevice(device_id, agent))

    def start(self, stagger: float = 0.02) -> None:
        for member in self.members:
            member.thread = threading.Thread(target=self._run, args=(member,), name=member.device_id, daemon=True)
            member.thread.start()
            time.sleep(stagger)

    def _run(self, member: SimulatedDevice) -> None:
        try:
            member.agent.run(member.stop)
        except WardenError as e:
            member.error = e.message
        except Exception as e:
            member.error = f"{type(e).__name__}: {e}"

    def connected(self) -> int:
        return sum(1 for m in self.members if m.agent.session_state.connected)

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connected() == len(self.members):
                return True
            if all(m.error for m in self.members if not m.agent.session_state.connected):
                return False
            time.sleep(0.1)
        return False

    def summary(self) -> dict[str, int]:
        states = [m.agent.session_state for m in self.members]
        return {
            "devices": len(self.members),
            "connected": sum(1 for s in states if s.connected),
            "delivered": sum(s.delivered for s in states),
            "refused": sum(s.refused for s in states),
            "queued": sum(len(m.agent.queue) for m in self.members),
            "renewals": sum(m.agent.renewal.renewals for m in self.members),
            "failed": sum(1 for m in self.members if m.error),
        }

    def stop_device(self, device_id: str) -> None:
        """Switch one device off (its agent disconnects and stops)."""
        member = next(m for m in self.members if m.device_id == device_id)
        member.stop.set()
        if member.thread is not None:
            member.thread.join(15)

    def stop(self) -> None:
        for member in self.members:
            member.stop.set()
        for member in self.members:
            if member.thread is not None:
                member.thread.join(15)
