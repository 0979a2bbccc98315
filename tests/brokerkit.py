"""A real Mosquitto for tests and benchmarks, configured the way the hub configures it (tests start their own broker
on a free port): certificates from a hub, the rendered configuration, the ACL file and the dynamic security state.
``mosquitto_pub`` and ``mosquitto_sub`` are the independent clients.

The broker's certificate names ``broker.<fleet-domain>``, which nothing here resolves: the command-line clients
connect to 127.0.0.1 with ``--insecure`` (the chain is still verified against the hub's CA; only the host name
check is off); the name itself is checked with Python's TLS client in the tests."""

from __future__ import annotations

import getpass
import secrets
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.hubserver import csr_der, free_port
from warden.broker import (
    Access,
    BrokerAdmin,
    MosquittoConfig,
    MosquittoProcess,
    acl_file,
    find_dynsec_plugin,
    initial_state,
    render_config,
)
from warden.hub import Hub
from warden.pki import Profile

FLEET = "fleet.acme.test"
BROKER_NAME = f"broker.{FLEET}"
HUB_CLIENT = f"hub.{FLEET}"


def mosquitto_pub(port: int, cafile: Path, cert: Path, key: Path, topic: str, message: str = "x") -> int | None:
    """The PUBACK reason code ``mosquitto_pub`` reports for one QoS 1 message to the broker on ``port``, or None
    when it got none (the connection was refused). ``--insecure``: see the module docstring."""
    result = subprocess.run(
        [
            *("mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "--cafile", str(cafile)),
            *("--cert", str(cert), "--key", str(key), "--insecure", "-t", topic, "-m", message, "-q", "1", "-d"),
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    for line in result.stdout.splitlines() + result.stderr.splitlines():
        if "received PUBACK" in line and "RC:" in line:
            return int(line.rsplit("RC:", 1)[1].rstrip(")"))
    return None


def mosquitto_pub_lines(
    port: int, cafile: Path, cert: Path, key: Path, topic: str, lines: list[str], *, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Publish each of ``lines`` as one QoS 1 message over one connection (``mosquitto_pub -l``)."""
    return subprocess.run(
        [
            *("mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "--cafile", str(cafile)),
            *("--cert", str(cert), "--key", str(key), "--insecure", "-t", topic, "-q", "1", "-l"),
        ],
        input="".join(f"{line}\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tls_args(port: int, cafile: Path, cert: Path, key: Path) -> list[str]:
    """``mosquitto_pub``/``mosquitto_sub`` arguments for a mutual-TLS connection (``--insecure``: see the module
    docstring)."""
    return [
        "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "--cafile", str(cafile),
        "--cert", str(cert), "--key", str(key), "--insecure",
    ]  # fmt: skip


@dataclass
class Identity:
    cert: Path
    key: Path
    serial: int


@dataclass
class Broker:
    hub: Hub
    directory: Path
    port: int
    process: MosquittoProcess
    config: MosquittoConfig
    admin_password: str

    def device(self, device_id: str) -> Identity:
        """Register ``device_id`` and write its certificate (with the chain) and key."""
        self.hub.devices.add_device(device_id, actor="test")
        csr, key = csr_der(device_id)
        issued = self.hub.certificates.sign(device_id=device_id, csr=csr, actor="test")
        return self._write(device_id, issued.pem, key, issued.record.serial)

    def hub_client(self) -> Identity:
        key = ec.generate_private_key(ec.SECP256R1())
        csr, _ = csr_der("hub", key)
        issued = self.hub.certificates.issue_service(
            names=(HUB_CLIENT,), csr=csr, actor="test", profile=Profile.HUB_CLIENT
        )
        return self._write("hub-client", issued.pem, key, issued.record.serial)

    def _write(self, name: str, pem: bytes, key: ec.EllipticCurvePrivateKey, serial: int) -> Identity:
        cert_path, key_path = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        cert_path.write_bytes(pem + self.hub.chain_pem())
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)
        return Identity(cert_path, key_path, serial)

    def publish_crl(self) -> None:
        crl = self.hub.certificates.issue_crl(actor="test")
        self.config.crlfile.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        self.process.reload()

    def admin(self) -> BrokerAdmin:
        return BrokerAdmin(self.config.admin_socket, self.admin_password)

    def tls_args(self, who: Identity) -> list[str]:
        return tls_args(self.port, self.config.cafile, who.cert, who.key)

    def publish(self, who: Identity, topic: str, message: str = "x") -> int | None:
        """The PUBACK reason code ``mosquitto_pub`` reports for one QoS 1 message, or None when it got none (the
        connection was refused)."""
        return mosquitto_pub(self.port, self.config.cafile, who.cert, who.key, topic, message)

    def subscribe(self, who: Identity, *topics: str) -> Subscription:
        """One ``mosquitto_sub`` session for ``who`` (one certificate holds one session: a second one would take
        this one over)."""
        return Subscription(self.tls_args(who), topics)


class Subscription:
    """A ``mosquitto_sub`` (connecting with ``tls``, see :func:`tls_args`) whose subscriptions have been answered
    when the constructor returns: ``granted`` holds the SUBACK's reason code per topic (the granted QoS, or 135 when
    refused)."""

    def __init__(self, tls: list[str], topics: tuple[str, ...]) -> None:
        args = [arg for topic in topics for arg in ("-t", topic)]
        self.process = subprocess.Popen(
            # Line-buffered: mosquitto_sub's stdio buffers a pipe fully, and its SUBACK would arrive at exit.
            ["stdbuf", "-oL", "mosquitto_sub", *tls, *args, "-q", "1", "-d", "-v"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.granted: list[int] = []
        self._subscribed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._subscribed.wait(15):
            self.close()
            raise AssertionError(f"mosquitto_sub got no SUBACK: {self.lines}")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("Subscribed (mid:"):
                self.granted = [int(code) for code in line.rsplit(":", 1)[1].split(",")]
                self._subscribed.set()

    def messages(self, topic: str, wait: float = 1.5) -> list[str]:
        """The payloads received on ``topic`` so far, after waiting ``wait`` seconds for more."""
        time.sleep(wait)
        return [line.split(" ", 1)[1] for line in list(self.lines) if line.startswith(f"{topic} ")]

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_broker(hub: Hub, directory: Path, exceptions: Mapping[str, Access] | None = None) -> Broker:
    """A Mosquitto configured as the hub configures it, with certificates from ``hub``, in ``directory``
    (created), on a free port; ``exceptions`` are written into the dynamic security state before it starts."""
    directory.mkdir()
    (directory / "admin").mkdir(mode=0o700)
    (directory / "data").mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    csr, _ = csr_der("broker", key)
    issued = hub.certificates.issue_service(names=(BROKER_NAME,), csr=csr, actor="test")
    (directory / "broker.pem").write_bytes(issued.pem + hub.chain_pem())
    (directory / "broker.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / "broker.key").chmod(0o600)
    (directory / "ca.pem").write_bytes(hub.chain_pem())
    crl = hub.certificates.issue_crl(actor="test")
    (directory / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    (directory / "acl").write_text(acl_file(HUB_CLIENT))
    password = secrets.token_urlsafe(24)
    (directory / "dynsec.json").write_text(initial_state(password, dict(exceptions or {})))
    port = free_port()
    config = MosquittoConfig(
        host="127.0.0.1",
        port=port,
        cafile=directory / "ca.pem",
        certfile=directory / "broker.pem",
        keyfile=directory / "broker.key",
        crlfile=directory / "crl.pem",
        acl_file=directory / "acl",
        dynsec_file=directory / "dynsec.json",
        dynsec_plugin=find_dynsec_plugin(),
        admin_socket=directory / "admin" / "mosquitto.sock",
        persistence_dir=directory / "data",
        user=getpass.getuser(),
    )
    (directory / "mosquitto.conf").write_text(render_config(config))
    process = MosquittoProcess(directory / "mosquitto.conf", directory / "mosquitto.log")
    process.start(host="127.0.0.1", port=port, admin_socket=config.admin_socket)
    return Broker(hub, directory, port, process, config, password)
