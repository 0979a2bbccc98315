"""Device rights on a real Mosquitto, configured the way the hub configures it (tests start their own broker on a
free port): the ACL file's patterns give each device its own topics only, the dynamic security plugin carries the
exceptions (quarantined, restricted, disabled), the CRL cuts revoked certificates off, and one certificate holds one
session. ``mosquitto_pub`` and ``mosquitto_sub`` are the independent clients.

The broker's certificate names ``broker.<fleet-domain>``, which nothing here resolves: the command-line clients
connect to 127.0.0.1 with ``--insecure`` (the chain is still verified against the hub's CA; only the host name
check is off), and :func:`test_the_broker_presents_its_name_and_requires_a_client_certificate` checks the name
with Python's TLS client."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion

from tests.brokerkit import BROKER_NAME, FLEET, Broker, Identity, start_broker
from tests.hubserver import free_port
from tests.integration._tls import REFUSED, control, s_client
from warden.broker import Access, BrokerAdmin, MosquittoProcess, access_commands
from warden.core import BrokerError
from warden.hub import Hub
from warden.pki import RevocationReason

pytestmark = pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="needs mosquitto-clients")

#: MQTT 5 reason codes
SUCCESS, NO_SUBSCRIBERS, NOT_AUTHORIZED = 0, 16, 135


@pytest.fixture
def broker(hub_factory: Callable[..., Hub], tmp_path: Path) -> Iterator[Broker]:
    running = start_broker(
        hub_factory(fleet_domain=FLEET), tmp_path / "broker", exceptions={"dev-held": Access.QUARANTINED}
    )
    try:
        yield running
    finally:
        running.process.stop()


def test_a_device_reaches_its_own_topics_only(broker: Broker) -> None:
    a, b = broker.device("dev-a"), broker.device("dev-b")
    assert broker.publish(a, "warden/dev-a/telemetry") == NO_SUBSCRIBERS
    assert broker.publish(a, "warden/dev-a/health") == NO_SUBSCRIBERS
    assert broker.publish(a, "warden/dev-a/events") == NO_SUBSCRIBERS
    # Another device's topics, its own hub-to-device topics, anything outside the scheme: refused.
    assert broker.publish(a, "warden/dev-b/telemetry") == NOT_AUTHORIZED
    assert broker.publish(a, "warden/dev-a/commands") == NOT_AUTHORIZED
    assert broker.publish(a, "warden/dev-a/updates") == NOT_AUTHORIZED
    assert broker.publish(a, "warden/dev-a") == NOT_AUTHORIZED
    assert broker.publish(a, "other/topic") == NOT_AUTHORIZED
    assert broker.publish(a, "$CONTROL/dynamic-security/v1", '{"commands":[]}') == NOT_AUTHORIZED
    assert broker.publish(b, "warden/dev-b/telemetry") == NO_SUBSCRIBERS


def test_a_device_reads_its_own_commands_and_nothing_else(broker: Broker) -> None:
    a, b, hub = broker.device("dev-a"), broker.device("dev-b"), broker.hub_client()
    reader = broker.subscribe(a, "warden/dev-a/commands", "warden/dev-b/commands", "warden/#")
    target = broker.subscribe(b, "warden/dev-b/commands")
    try:
        # Mosquitto grants the subscriptions (its ACL file checks each message as it is delivered) but delivers
        # only what the reader may read.
        assert reader.granted == [1, 1, 1]
        assert broker.publish(hub, "warden/dev-a/commands", "for-a") == SUCCESS
        assert broker.publish(hub, "warden/dev-b/commands", "for-b") == SUCCESS
        assert target.messages("warden/dev-b/commands") == ["for-b"]
        assert reader.messages("warden/dev-a/commands", wait=0.2) == ["for-a", "for-a"]  # own topic and warden/#
        assert reader.messages("warden/dev-b/commands", wait=0.2) == []
    finally:
        reader.close()
        target.close()


def test_the_hub_reads_device_topics_and_writes_commands(broker: Broker) -> None:
    a, hub = broker.device("dev-a"), broker.hub_client()
    telemetry = broker.subscribe(hub, "warden/+/telemetry")
    try:
        assert broker.publish(a, "warden/dev-a/telemetry", "t1") == SUCCESS
        assert telemetry.messages("warden/dev-a/telemetry") == ["t1"]
    finally:
        telemetry.close()
    # The hub's certificate gives it no device rights of its own and no administration.
    assert broker.publish(hub, "warden/dev-a/telemetry") == NOT_AUTHORIZED
    assert broker.publish(hub, "$CONTROL/dynamic-security/v1", '{"commands":[]}') == NOT_AUTHORIZED


def test_quarantine_leaves_the_health_topic_only_until_lifted(broker: Broker) -> None:
    a, hub = broker.device("dev-a"), broker.hub_client()
    admin = broker.admin()
    try:
        admin.execute(access_commands("dev-a", Access.QUARANTINED, known=False))
        # Every mosquitto_pub is a new connection: the rules hold after reconnecting.
        assert broker.publish(a, "warden/dev-a/telemetry") == NOT_AUTHORIZED
        assert broker.publish(a, "warden/dev-a/events") == NOT_AUTHORIZED
        assert broker.publish(a, "warden/dev-a/health") == NO_SUBSCRIBERS
        commands = broker.subscribe(a, "warden/dev-a/commands")
        try:
            assert commands.granted == [NOT_AUTHORIZED]
        finally:
            commands.close()

        admin.execute(access_commands("dev-a", Access.NORMAL, known=True))
        assert broker.publish(a, "warden/dev-a/telemetry") == NO_SUBSCRIBERS
        commands = broker.subscribe(a, "warden/dev-a/commands")
        try:
            assert commands.granted == [1]
            assert broker.publish(hub, "warden/dev-a/commands", "back") == SUCCESS
            assert commands.messages("warden/dev-a/commands") == ["back"]
        finally:
            commands.close()
    finally:
        admin.close()


def test_restricted_and_disabled_devices(broker: Broker) -> None:
    r, d = broker.device("dev-r"), broker.device("dev-d")
    admin = broker.admin()
    try:
        admin.execute(access_commands("dev-r", Access.RESTRICTED, known=False))
        admin.execute(access_commands("dev-d", Access.DISABLED, known=False))
    finally:
        admin.close()
    assert broker.publish(r, "warden/dev-r/health") == NO_SUBSCRIBERS
    assert broker.publish(r, "warden/dev-r/telemetry") == NOT_AUTHORIZED
    subscription = broker.subscribe(r, "warden/dev-r/updates", "warden/dev-r/commands")
    try:
        assert subscription.granted == [1, NOT_AUTHORIZED]
    finally:
        subscription.close()
    for topic in ("warden/dev-d/health", "warden/dev-d/telemetry", "warden/dev-d/events"):
        assert broker.publish(d, topic) == NOT_AUTHORIZED
    own = broker.subscribe(d, "warden/dev-d/commands")
    try:
        assert own.granted == [NOT_AUTHORIZED]
    finally:
        own.close()


def test_exceptions_written_before_start_hold_from_the_first_connection(broker: Broker) -> None:
    held = broker.device("dev-held")
    assert broker.publish(held, "warden/dev-held/telemetry") == NOT_AUTHORIZED
    assert broker.publish(held, "warden/dev-held/health") == NO_SUBSCRIBERS


def test_changing_an_exception_replaces_it(broker: Broker) -> None:
    a = broker.device("dev-a")
    admin = broker.admin()
    try:
        admin.execute(access_commands("dev-a", Access.QUARANTINED, known=False))
        admin.execute(access_commands("dev-a", Access.DISABLED, known=True))
        assert broker.publish(a, "warden/dev-a/health") == NOT_AUTHORIZED
        admin.execute(access_commands("dev-a", Access.RESTRICTED, known=True))
        assert broker.publish(a, "warden/dev-a/health") == NO_SUBSCRIBERS
        assert broker.publish(a, "warden/dev-a/telemetry") == NOT_AUTHORIZED
    finally:
        admin.close()


def test_a_revoked_certificate_fails_the_handshake_once_the_crl_is_reloaded(broker: Broker) -> None:
    a, b = broker.device("dev-a"), broker.device("dev-b")
    assert broker.publish(a, "warden/dev-a/telemetry") == NO_SUBSCRIBERS
    broker.hub.certificates.revoke(a.serial, reason=RevocationReason.KEY_COMPROMISE, actor="test")
    broker.publish_crl()
    deadline = time.monotonic() + 10
    while broker.publish(a, "warden/dev-a/telemetry") is not None and time.monotonic() < deadline:
        time.sleep(0.2)  # SIGHUP is asynchronous: the broker reloads at its next loop turn
    result = subprocess.run(
        ["mosquitto_pub", *broker.tls_args(a), "-t", "warden/dev-a/telemetry", "-m", "x", "-q", "1"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode != 0
    # The broker refused the certificate, and the CRL it holds is why (openssl finds it revoked there).
    assert "certificate verify failed" in broker.process.log_path.read_text()
    chain = broker.directory / "ca-chain.pem"
    chain.write_bytes(broker.hub.chain_pem())
    verify = subprocess.run(
        ["openssl", "verify", "-crl_check", "-CAfile", str(chain), "-CRLfile", str(broker.config.crlfile), str(a.cert)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert verify.returncode != 0
    assert "certificate revoked" in verify.stdout + verify.stderr
    assert broker.publish(b, "warden/dev-b/telemetry") == NO_SUBSCRIBERS


def test_one_certificate_holds_one_session(broker: Broker) -> None:
    broker.device("dev-a")
    identity = Identity(broker.directory / "dev-a.pem", broker.directory / "dev-a.key", 0)
    events: dict[str, list[object]] = {"first": [], "second": []}
    connected = {name: threading.Event() for name in events}
    dropped = threading.Event()

    def client(name: str, client_id: str) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        c.tls_set(ca_certs=str(broker.config.cafile), certfile=str(identity.cert), keyfile=str(identity.key))
        c.tls_insecure_set(True)  # see the module docstring: the name check is tested separately
        c.reconnect_delay_set(30, 30)

        def on_connect(cl: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
            events[name].append(("connect", str(reason)))
            connected[name].set()

        def on_disconnect(cl: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
            events[name].append(("disconnect", str(reason)))
            if name == "first":
                dropped.set()

        c.on_connect = on_connect
        c.on_disconnect = on_disconnect
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        return c

    # Each asks for a client id of its own; the broker uses the certificate's name instead.
    first = client("first", "one")
    try:
        assert connected["first"].wait(10)
        second = client("second", "two")
        try:
            assert connected["second"].wait(10)
            # The first session ends (Mosquitto 2.0 closes it without a reason code); the second keeps going.
            assert dropped.wait(10), events
            time.sleep(0.5)
            assert second.is_connected()
            assert [e for e in events["second"] if e[0] == "disconnect"] == []
        finally:
            second.loop_stop()
            second.disconnect()
    finally:
        first.loop_stop()
        first.disconnect()


def test_the_broker_presents_its_name_and_requires_a_client_certificate(broker: Broker) -> None:
    a = broker.device("dev-a")
    context = ssl.create_default_context(cafile=str(broker.config.cafile))
    context.load_cert_chain(a.cert, a.key)
    with (
        socket.create_connection(("127.0.0.1", broker.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=BROKER_NAME) as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
        names = peer.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == [BROKER_NAME]
    # No client certificate: the handshake fails, or (TLS 1.3) the first read after it.
    anonymous = ssl.create_default_context(cafile=str(broker.config.cafile))
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as raw:
        assert _handshake_or_read_fails(anonymous, raw)
    # TLS 1.2 is still accepted (the configured minimum).
    tls12 = ssl.create_default_context(cafile=str(broker.config.cafile))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    tls12.load_cert_chain(a.cert, a.key)
    with (
        socket.create_connection(("127.0.0.1", broker.port), timeout=10) as raw,
        tls12.wrap_socket(raw, server_hostname=BROKER_NAME) as tls,
    ):
        assert tls.version() == "TLSv1.2"
        assert tls.cipher()[0].startswith("ECDHE-")


def _handshake_or_read_fails(context: ssl.SSLContext, raw: socket.socket) -> bool:
    try:
        with context.wrap_socket(raw, server_hostname=BROKER_NAME) as tls:
            tls.sendall(b"\x10\x00")
            return tls.recv(16) == b""
    except (ssl.SSLError, OSError):
        return True


def test_the_admin_login_needs_the_password(broker: Broker) -> None:
    with pytest.raises(BrokerError, match="refused the hub's admin login"):
        BrokerAdmin(broker.config.admin_socket, "wrong-password", timeout=5)
    admin = broker.admin()
    try:
        answers = admin.execute([{"command": "listClients"}])
        assert set(answers[0]["data"]["clients"]) == {"warden:admin", "dev-held"}
        with pytest.raises(BrokerError, match="refused deleteRole"):
            admin.execute([{"command": "deleteRole", "rolename": "no-such-role"}])
    finally:
        admin.close()


def test_the_broker_gets_no_secrets_of_the_hub(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    pid = broker.process.pid
    assert pid is not None
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    names = {entry.split(b"=", 1)[0] for entry in environ if entry}
    assert names <= {b"PATH", b"LANG"}


def test_a_broker_that_cannot_start_says_why(tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("listener 1 127.0.0.1\ncertfile /nonexistent.pem\nkeyfile /nonexistent.key\n")
    process = MosquittoProcess(conf, tmp_path / "log")
    with pytest.raises(BrokerError, match="mosquitto exited at start"):
        process.start(host="127.0.0.1", port=free_port(), admin_socket=tmp_path / "sock", timeout=10)
    assert not process.running()


@pytest.mark.parametrize(("client", "protocol", "alert"), REFUSED)
def test_the_broker_refuses_what_the_client_could_speak(
    broker: Broker,
    throwaway: tuple[Path, Path],
    client: list[str],
    protocol: str,
    alert: str,
) -> None:
    """The TLS floor, with openssl: the same client arguments complete a handshake with an openssl server that
    allows them (so the client itself is not what refuses), and fail against the broker."""
    allowed = control(throwaway, client, client)
    assert allowed.established, allowed.output
    assert allowed.protocol == protocol, allowed.output
    device = broker.device("dev-a")
    refused = s_client(
        broker.port, *client, "-CAfile", str(broker.config.cafile), "-cert", str(device.cert), "-key", str(device.key)
    )
    assert not refused.established, refused.output
    assert refused.protocol is None and refused.cipher is None, refused.output


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_the_broker_speaks_tls12_and_tls13_with_aead_only(broker: Broker, version: str) -> None:
    device = broker.device("dev-a")
    shaken = s_client(
        broker.port, version, "-CAfile", str(broker.config.cafile), "-cert", str(device.cert), "-key", str(device.key)
    )
    assert shaken.established, shaken.output
    assert shaken.cipher is not None
    assert "GCM" in shaken.cipher or "CHACHA20" in shaken.cipher, shaken.cipher


def test_the_broker_may_hold_as_many_connections_as_the_system_allows(broker: Broker) -> None:
    pid = broker.process.pid
    assert pid is not None
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if x.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard, line
