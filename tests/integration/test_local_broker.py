"""The embedded broker as the hub runs it (:class:`warden.broker.LocalBroker`) on a real Mosquitto: it writes its
files and starts with the registry's exceptions in place, contains a connected device at once, repairs any drift of
its exceptions and ACL file from the registry, reloads its CRL through the pid file, keeps its secrets out of what
others can read, and lets no malformed device id into the broker's files.

The "registry" is a plain dict of exceptions (``exceptions`` answers a copy of it). ``mosquitto_pub`` (through
:class:`tests.brokerkit.Broker`, built around the running broker) and paho are the independent clients; the
broker's name does not resolve here, so they skip only the host name check (see tests/brokerkit.py)."""

from __future__ import annotations

import datetime as dt
import getpass
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion

from tests.brokerkit import BROKER_NAME, FLEET, HUB_CLIENT, Broker, Identity
from tests.hubserver import csr_der, free_port
from warden.broker import Access, BrokerLayout, LocalBroker, MosquittoProcess, acl_file, exception_role
from warden.core import InvalidInputError
from warden.hub import Hub
from warden.pki import RevocationReason

pytestmark = pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="needs mosquitto-clients")

#: MQTT 5 reason codes
SUCCESS, NO_SUBSCRIBERS, NOT_AUTHORIZED = 0, 16, 135
#: the device every broker here starts with in quarantine (the registry holds it before start)
HELD = "dev-q"


@dataclass
class Setup:
    """A hub, the broker's files issued by it, a registry of exceptions and a :class:`LocalBroker` (not started
    until :meth:`start`); ``kit`` makes device certificates and publishes with ``mosquitto_pub``."""

    hub: Hub
    local: LocalBroker
    registry: dict[str, Access]
    password: str
    chain_pem: bytes
    certificate_pem: bytes
    key_pem: bytes
    crl_pem: bytes
    kit: Broker

    def start(self) -> None:
        self.local.start(
            chain_pem=self.chain_pem, certificate_pem=self.certificate_pem, key_pem=self.key_pem, crl_pem=self.crl_pem
        )

    def device(self, device_id: str) -> Identity:
        return self.kit.device(device_id)

    def publish(self, who: Identity, device_id: str, kind: str) -> int | None:
        return self.kit.publish(who, f"warden/{device_id}/{kind}")


@pytest.fixture
def setup(hub_factory: Callable[..., Hub], tmp_path: Path) -> Iterator[Setup]:
    hub = hub_factory(fleet_domain=FLEET)
    key = ec.generate_private_key(ec.SECP256R1())
    csr, _ = csr_der("broker", key)
    issued = hub.certificates.issue_service(names=(BROKER_NAME,), csr=csr, actor="test")
    chain = hub.chain_pem()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    crl_pem = hub.certificates.issue_crl(actor="test").public_bytes(serialization.Encoding.PEM)
    registry: dict[str, Access] = {}
    password = secrets.token_urlsafe(24)
    layout = BrokerLayout(tmp_path / "broker")
    local = LocalBroker(
        layout,
        host="127.0.0.1",
        port=free_port(),
        hub_client=HUB_CLIENT,
        admin_password=lambda: password,
        exceptions=lambda: dict(registry),
        user=getpass.getuser(),
    )
    clients = tmp_path / "clients"
    clients.mkdir()
    kit = Broker(
        hub=hub,
        directory=clients,
        port=local.port,
        process=MosquittoProcess(layout.config, layout.log),  # never started: the LocalBroker runs the broker
        config=local.config(),
        admin_password=password,
    )
    try:
        yield Setup(hub, local, registry, password, chain, issued.pem + chain, key_pem, crl_pem, kit)
    finally:
        local.stop()


@pytest.fixture
def running(setup: Setup) -> Setup:
    setup.registry[HELD] = Access.QUARANTINED
    setup.start()
    assert setup.local.running()
    return setup


def test_exceptions_of_the_registry_hold_from_the_start(running: Setup) -> None:
    held, normal = running.device(HELD), running.device("dev-n")
    assert running.publish(held, HELD, "health") == NO_SUBSCRIBERS
    assert running.publish(held, HELD, "telemetry") == NOT_AUTHORIZED
    assert running.publish(normal, "dev-n", "telemetry") == NO_SUBSCRIBERS
    assert running.local.exception_clients() == {HELD: [f"device:{HELD}"]}


class _Session:
    """One paho MQTT 5 session with a device's certificate that does not reconnect while a test runs."""

    def __init__(self, running: Setup, who: Identity) -> None:
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(running.local.layout.cafile), certfile=str(who.cert), keyfile=str(who.key))
        self.client.tls_insecure_set(True)  # the broker's name does not resolve here (see the module docstring)
        self.client.reconnect_delay_set(120, 120)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.connect("127.0.0.1", running.local.port)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        self.connected.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        self.disconnected.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_set_access_cuts_a_connected_device_off_and_lifting_restores_it(running: Setup) -> None:
    a = running.device("dev-a")
    session = _Session(running, a)
    try:
        assert session.connected.wait(10)
        assert not session.disconnected.is_set()
        running.local.set_access("dev-a", Access.QUARANTINED)
        # The plugin ends the session, so the device's reconnect meets the new rules.
        assert session.disconnected.wait(10)
    finally:
        session.close()
    assert running.local.exception_clients() == {HELD: [f"device:{HELD}"], "dev-a": ["device:dev-a"]}
    assert running.publish(a, "dev-a", "telemetry") == NOT_AUTHORIZED
    assert running.publish(a, "dev-a", "health") == NO_SUBSCRIBERS

    running.local.set_access("dev-a", Access.NORMAL)
    assert running.local.exception_clients() == {HELD: [f"device:{HELD}"]}
    assert running.publish(a, "dev-a", "telemetry") == NO_SUBSCRIBERS

    # Normal access for a device the broker holds no exception for: nothing to do.
    running.local.set_access("dev-b", Access.NORMAL)
    assert running.local.exception_clients() == {HELD: [f"device:{HELD}"]}


def _acl_granted(running: Setup, who: Identity, device_id: str, *, granted: bool) -> bool:
    """Publish outside the scheme until the answer says the ACL file in force grants it (or not); SIGHUP is
    asynchronous, so the broker reads the file again at its next loop turn."""
    deadline = time.monotonic() + 10
    while True:
        code = running.kit.publish(who, f"outside/{device_id}")
        if (code == NO_SUBSCRIBERS) == granted or time.monotonic() > deadline:
            return (code == NO_SUBSCRIBERS) == granted
        time.sleep(0.1)


def test_reconcile_repairs_every_drift_and_lists_each_repair(running: Setup) -> None:
    local = running.local
    q, x, c = running.device(HELD), running.device("dev-x"), running.device("dev-c")

    # (a) An exception the registry does not list, made by hand.
    role = exception_role("dev-x", Access.QUARANTINED)
    local.admin().execute(
        [
            {"command": "createRole", **role},
            {"command": "createClient", "username": "dev-x", "roles": [{"rolename": role["rolename"]}]},
        ]
    )
    assert running.publish(x, "dev-x", "telemetry") == NOT_AUTHORIZED
    # (b) The quarantined device's role widened by hand.
    local.admin().execute(
        [
            {
                "command": "addRoleACL",
                "rolename": f"device:{HELD}",
                "acltype": "publishClientSend",
                "topic": f"warden/{HELD}/telemetry",
                "priority": 100,
                "allow": True,
            }
        ]
    )
    assert running.publish(q, HELD, "telemetry") == NO_SUBSCRIBERS
    # (c) An exception the registry gained that the broker never got.
    running.registry["dev-c"] = Access.QUARANTINED
    assert running.publish(c, "dev-c", "telemetry") == NO_SUBSCRIBERS
    # (d) The ACL file edited on disk, and the broker made to read it.
    with local.layout.acl.open("a") as f:
        f.write("pattern write #\n")
    assert local.reload()
    assert _acl_granted(running, c, "dev-c", granted=True)

    repairs = local.reconcile()
    expected = {
        "acl file rewritten",
        "dev-x: exception removed (the registry has none)",
        f"{HELD}: quarantined role repaired",
        "dev-c: quarantined restored",
    }
    assert expected <= set(repairs), repairs
    # Nothing else, but for the line test_reconcile_lists_only_repairs_it_made shows to be spurious.
    assert set(repairs) - expected <= {"role device:dev-x removed"}, repairs

    assert local.layout.acl.read_text() == acl_file("hub.fleet.acme.test")
    assert _acl_granted(running, c, "dev-c", granted=False)
    assert local.exception_clients() == {HELD: [f"device:{HELD}"], "dev-c": ["device:dev-c"]}
    assert running.publish(x, "dev-x", "telemetry") == NO_SUBSCRIBERS
    assert running.publish(q, HELD, "telemetry") == NOT_AUTHORIZED
    assert running.publish(q, HELD, "health") == NO_SUBSCRIBERS
    assert running.publish(c, "dev-c", "telemetry") == NOT_AUTHORIZED
    assert running.publish(c, "dev-c", "health") == NO_SUBSCRIBERS

    assert local.reconcile() == []


def test_reconcile_lists_only_repairs_it_made(running: Setup) -> None:
    """Removing an exception the registry does not list deletes its client and its role: one repair, one line."""
    role = exception_role("dev-x", Access.DISABLED)
    running.local.admin().execute(
        [
            {"command": "createRole", **role},
            {"command": "createClient", "username": "dev-x", "roles": [{"rolename": role["rolename"]}]},
        ]
    )
    assert running.local.reconcile() == ["dev-x: exception removed (the registry has none)"]


def test_reconcile_rewrites_a_deleted_acl_file(running: Setup) -> None:
    running.local.layout.acl.unlink()
    assert running.local.reconcile() == ["acl file rewritten"]
    assert running.local.layout.acl.read_text() == acl_file(HUB_CLIENT)


def test_reload_makes_the_broker_read_a_new_crl(running: Setup) -> None:
    a, b = running.device("dev-a"), running.device("dev-b")
    assert running.publish(a, "dev-a", "telemetry") == NO_SUBSCRIBERS
    running.hub.certificates.revoke(a.serial, reason=RevocationReason.KEY_COMPROMISE, actor="test")
    crl = running.hub.certificates.issue_crl(actor="test").public_bytes(serialization.Encoding.PEM)
    assert running.local.reload(crl_pem=crl)
    assert running.local.layout.crlfile.read_bytes() == crl
    deadline = time.monotonic() + 10
    while running.publish(a, "dev-a", "telemetry") is not None and time.monotonic() < deadline:
        time.sleep(0.2)  # SIGHUP is asynchronous: the broker reloads at its next loop turn
    assert running.publish(a, "dev-a", "telemetry") is None
    assert running.publish(b, "dev-b", "telemetry") == NO_SUBSCRIBERS

    running.local.stop()
    assert not running.local.running()
    assert running.local.reload() is False


def test_the_admin_password_stays_secret_and_private_files_are_private(running: Setup) -> None:
    local, layout = running.local, running.local.layout
    # Log in as the administrator and change the plugin's state (it rewrites its file), and connect a device.
    local.set_access("dev-a", Access.RESTRICTED)
    assert running.publish(running.device("dev-a"), "dev-a", "health") == NO_SUBSCRIBERS
    local.stop()  # the log is complete
    password = running.password.encode()
    for path in (layout.config, layout.acl, layout.log, layout.dynsec):
        content = path.read_bytes()
        assert content, path
        assert password not in content, path
    assert b"warden:admin" in layout.log.read_bytes()  # the log saw the administrator's login
    assert stat.S_IMODE(layout.dynsec.stat().st_mode) == 0o600
    assert stat.S_IMODE(layout.keyfile.stat().st_mode) == 0o600
    assert stat.S_IMODE(layout.admin_socket.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(layout.directory.stat().st_mode) == 0o700


def _mosquitto_with_config(config: Path) -> list[int]:
    """Processes whose command line names ``config``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.fsencode(config) in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize(
    "bad_id",
    ["dev-a\npattern write #", "dev-a\n", "dev/+/#", "Dev-A", "dev a", "dev.a", "warden:admin", ""],
)
def test_a_malformed_device_id_in_the_registry_stops_the_start(setup: Setup, bad_id: str) -> None:
    setup.registry["dev-ok"] = Access.QUARANTINED
    setup.registry[bad_id] = Access.QUARANTINED
    with pytest.raises(InvalidInputError):
        setup.start()
    layout = setup.local.layout
    assert not setup.local.running()
    assert _mosquitto_with_config(layout.config) == []
    # Nothing written carries the id: neither the plugin's state nor the configuration exists.
    assert not layout.dynsec.exists()
    assert not layout.config.exists()
    if bad_id:
        needle = bad_id.encode()
        for path in layout.directory.rglob("*"):
            if path.is_file():
                assert needle not in path.read_bytes(), path


def test_concurrent_changes_from_threads_and_another_process_all_land(running: Setup) -> None:
    """Threads of one hub and a second LocalBroker on the same directory (another worker or a CLI command) change
    exceptions at the same time: each administrator has its own client id and answers, changes are serialised,
    and the broker ends up with exactly what was asked last for each device."""
    other = LocalBroker(
        running.local.layout,
        host="127.0.0.1",
        port=running.local.port,
        hub_client=HUB_CLIENT,
        admin_password=lambda: running.password,
        exceptions=lambda: dict(running.registry),
        user=getpass.getuser(),
    )
    devices = [f"dev-{i}" for i in range(8)]
    errors: list[BaseException] = []

    def work(broker: LocalBroker, names: list[str]) -> None:
        try:
            for name in names:
                broker.set_access(name, Access.QUARANTINED)
                broker.set_access(name, Access.DISABLED)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(running.local if i % 2 else other, devices[i::4])) for i in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        held = running.local.exception_clients()
        assert {d: held[d] for d in devices} == {d: [f"device:{d}"] for d in devices}
        roles = running.local.admin().execute([{"command": "getRole", "rolename": "device:dev-0"}])[0]["data"]["role"]
        allows = [acl for acl in roles["acls"] if acl["allow"]]
        assert allows == []  # disabled: the last change for dev-0, nothing allowed
    finally:
        other.stop()


def test_the_broker_knows_when_its_certificate_needs_renewal(running: Setup) -> None:
    certificate = x509.load_pem_x509_certificate(running.certificate_pem)
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    renew_at = certificate.not_valid_after_utc - lifetime / 3
    assert not running.local.needs_renewal(renew_at - dt.timedelta(seconds=1))
    assert running.local.needs_renewal(renew_at)
    assert running.local.needs_renewal(certificate.not_valid_after_utc)
