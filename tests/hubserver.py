"""A real hub for integration tests: ``warden serve`` in its own process on a free loopback port, over HTTPS, with
helpers to make manufacturer CAs and onboarding certificates (IDevIDs) and to talk to the hub with our own client
and with curl/openssl. Everything is generated at test time."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

FLEET = "fleet.acme.test"
HUB_NAME = f"hub.{FLEET}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class Issued:
    """A certificate and its key, also written to ``<dir>/<name>.pem`` and ``<name>.key`` for curl/openssl."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path

    @property
    def pem(self) -> bytes:
        return _pem(self.certificate)


def _write(directory: Path, name: str, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(_pem(certificate))
    key_path.write_bytes(_key_pem(key))
    key_path.chmod(0o600)
    return Issued(certificate, key, cert_path, key_path)


@dataclass
class ManufacturerCA:
    """A stand-in for a device maker's CA that signs IDevIDs."""

    directory: Path
    name: str = "Acme Devices Manufacturing CA"
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    certificate: x509.Certificate = field(init=False)
    path: Path = field(init=False)

    def __post_init__(self) -> None:
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
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
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"{self.name.replace(' ', '-').lower()}.pem"
        self.path.write_bytes(_pem(self.certificate))

    def idevid(
        self,
        device_id: str,
        *,
        serial_number: str | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        name: str | None = None,
    ) -> Issued:
        """An onboarding certificate with CN=``device_id`` (and a subject serialNumber when given)."""
        now = dt.datetime.now(dt.UTC)
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, device_id)]
        if serial_number is not None:
            attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number))
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - dt.timedelta(days=1))
            .not_valid_after(not_after or now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return _write(self.directory, name or f"idevid-{device_id}", certificate, key)


def self_signed(directory: Path, common_name: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _write(directory, f"self-signed-{common_name}", certificate, key)


def csr_der(device_id: str, key: ec.EllipticCurvePrivateKey | None = None) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.DER), key


@dataclass
class HubServer:
    """A running ``warden serve``. ``url`` uses the hub's DNS name; connections go to 127.0.0.1 (see ``client``)."""

    data_dir: Path
    port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log_path: Path
    #: the CA that verifies the hub's TLS certificate, when it is not the hub's own root (operator-provided)
    trust: Path | None = None
    #: the embedded broker's port (0: started without a broker)
    broker_port: int = 0

    @property
    def url(self) -> str:
        return f"https://{HUB_NAME}:{self.port}"

    @property
    def root_path(self) -> Path:
        return self.data_dir / "ca" / "root-ca.pem"

    @property
    def chain_path(self) -> Path:
        return self.data_dir / "ca" / "chain.pem"

    def curl_resolve(self) -> list[str]:
        """curl arguments that map the hub's name to loopback and trust its root."""
        return ["--resolve", f"{HUB_NAME}:{self.port}:127.0.0.1", "--cacert", str(self.root_path)]

    def ssl_context(self, client: Issued | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.trust or self.root_path))
        if client is not None:
            context.load_cert_chain(client.cert_path, client.key_path)
        return context

    def client(self, client: Issued | None = None, **kwargs: object) -> httpx.Client:
        """An httpx client that verifies the hub's certificate by name while connecting to loopback."""
        transport = httpx.HTTPTransport(verify=self.ssl_context(client))
        return httpx.Client(
            base_url=self.url,
            transport=_LoopbackTransport(transport, self.port),
            timeout=30,
            **kwargs,  # type: ignore[arg-type]
        )

    def warden(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the ``warden`` CLI against this hub's data directory in a subprocess."""
        result = subprocess.run(
            [sys.executable, "-m", "warden.cli", "--data-dir", str(self.data_dir), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"warden {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def token(self, role: str) -> str:
        return str(json.loads(self.warden("token", "create", "--role", role, "--json").stdout)["token"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class _LoopbackTransport(httpx.BaseTransport):
    """Sends requests for the hub's name to 127.0.0.1, keeping the name for TLS (SNI and certificate check)."""

    def __init__(self, inner: httpx.HTTPTransport, port: int) -> None:
        self._inner = inner
        self._port = port

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.extensions["sni_hostname"] = HUB_NAME
        request.url = request.url.copy_with(host="127.0.0.1")
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


def start_hub(
    base: Path,
    *,
    extra_env: dict[str, str] | None = None,
    database_url: str = "",
    workers: int = 1,
    init: bool = True,
    trust: Path | None = None,
    broker: bool = False,
) -> HubServer:
    """Initialise a data directory (unless ``init`` is False) and start ``warden serve`` on a free port; returns
    once ``/healthz`` answers. ``broker``: with its embedded Mosquitto on another free port (``broker_port``),
    else without one."""
    data_dir = base / "hub"
    port = free_port()
    broker_port = free_port() if broker else 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARDEN_")}
    env.update(
        {
            "WARDEN_JOBS_INTERVAL_SECONDS": "1",
            # The tests check that each refusal is audited; the sampling itself is tested on its own.
            "WARDEN_ANONYMOUS_AUDITS_PER_MINUTE": "100000",
            "WARDEN_LOG_LEVEL": "info",
            "PYTHONUNBUFFERED": "1",
            "WARDEN_BROKER": "local" if broker else "off",
        }
    )
    if broker:
        env["WARDEN_BROKER_PORT"] = str(broker_port)
    if database_url:
        env["WARDEN_DATABASE_URL"] = database_url
    env.update(extra_env or {})
    if init:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "warden.cli",
                "--data-dir",
                str(data_dir),
                "init",
                "--org",
                "Acme Test",
                "--fleet-domain",
                FLEET,
                "--public-url",
                f"https://{HUB_NAME}:{port}",
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
    log_path = base / f"serve-{port}.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "warden.cli",
            "--data-dir",
            str(data_dir),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    log_file.close()
    server = HubServer(
        data_dir=data_dir, port=port, env=env, process=process, log_path=log_path, trust=trust, broker_port=broker_port
    )
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise AssertionError(f"warden serve exited with {process.returncode}:\n{server.log()}")
        try:
            with server.client() as client:
                if client.get("/healthz").status_code == 200:
                    return server
        except (httpx.TransportError, ssl.SSLError, OSError):
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"warden serve did not come up:\n{server.log()}")
        time.sleep(0.1)


def enroll_with_token(hub: HubServer, device_id: str, work: Path) -> tuple[Path, Path, int]:
    """Onboard ``device_id`` with a one-time token over EST, as a device does; its certificate (with the issuing CA)
    and key files, and the certificate's serial."""
    token = json.loads(hub.warden("enrollment", "add", device_id, "--token", "--json").stdout)["token"]
    csr, key = csr_der(device_id)
    with hub.client() as client:
        answer = client.post(
            "/.well-known/est/simpleenroll",
            content=base64.b64encode(csr),
            headers={"Content-Type": "application/pkcs10", "Authorization": f"Bearer {token}"},
        )
        assert answer.status_code == 200, answer.text
        cacerts = client.get("/.well-known/est/cacerts")
    leaf = pkcs7.load_der_pkcs7_certificates(base64.b64decode(answer.content))[0]
    issuing = pkcs7.load_der_pkcs7_certificates(base64.b64decode(cacerts.content))[0]
    cert_path, key_path = work / f"{device_id}.pem", work / f"{device_id}.key"
    cert_path.write_bytes(_pem(leaf) + _pem(issuing))
    key_path.write_bytes(_key_pem(key))
    key_path.chmod(0o600)
    return cert_path, key_path, leaf.serial_number


def running_hub(base: Path, **kwargs: object) -> Iterator[HubServer]:
    server = start_hub(base, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
