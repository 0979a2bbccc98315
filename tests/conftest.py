"""Shared fixtures. Each returns a factory or a ready object made at test time: keys, CAs and databases are never
committed, always generated."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from warden.cli import run
from warden.core import load_settings
from warden.hub import Hub, initialise

PG_HOST, PG_PORT = "127.0.0.1", 5432


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No WARDEN_* setting from the shell running the tests leaks in, and whatever a test (or the CLI, which removes
    secrets from its environment) does to them is undone afterwards."""
    for name in list(os.environ):
        if name.startswith("WARDEN_") and name != "WARDEN_REQUIRE_POSTGRES" and name != "WARDEN_TEST_PG_USER":
            monkeypatch.delenv(name)
    # Registered so that monkeypatch restores them even when the CLI pops them.
    monkeypatch.setenv("WARDEN_CA_PASSPHRASE", "")
    monkeypatch.delenv("WARDEN_CA_PASSPHRASE")
    monkeypatch.setenv("WARDEN_PKCS11_PIN", "")
    monkeypatch.delenv("WARDEN_PKCS11_PIN")


@dataclass
class CliResult:
    code: int
    out: str
    err: str


class Cli:
    """Runs ``warden`` in-process against one data directory and captures what it prints."""

    def __init__(self, capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
        self._capsys = capsys
        self.data_dir = data_dir

    def __call__(self, *args: object) -> CliResult:
        self._capsys.readouterr()
        code = run(["--data-dir", str(self.data_dir), *(str(a) for a in args)])
        captured = self._capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    def ok(self, *args: object) -> str:
        result = self(*args)
        assert result.code == 0, f"warden {' '.join(map(str, args))} failed ({result.code}): {result.err}"
        return result.out


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Cli:
    return Cli(capsys, tmp_path / "data")


@pytest.fixture
def initialised_cli(cli: Cli) -> Cli:
    cli.ok("init", "--org", "Acme Test", "--fleet-domain", "fleet.acme.test")
    return cli


KeyKind = str  # "p256" | "p384" | "ed25519" | "rsa2048" | "rsa1024" | "p521" | "p224"


def make_key(kind: KeyKind) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey:
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "p521":
        return ec.generate_private_key(ec.SECP521R1())
    if kind == "p224":
        return ec.generate_private_key(ec.SECP224R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "rsa2048":
        return rsa.generate_private_key(65537, 2048)
    if kind == "rsa1024":
        return rsa.generate_private_key(65537, 1024)
    raise ValueError(kind)


def make_csr(
    kind: KeyKind = "p256",
    *,
    common_name: str = "requested-name",
    extensions: list[tuple[x509.ExtensionType, bool]] | None = None,
    key: object | None = None,
) -> bytes:
    """A PEM CSR made with cryptography (openssl-made CSRs are in the interop tests)."""
    private = key or make_key(kind)
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    for value, critical in extensions or []:
        builder = builder.add_extension(value, critical=critical)
    algorithm = None if isinstance(private, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(private, algorithm)  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def csr_factory() -> Callable[..., bytes]:
    return make_csr


@pytest.fixture
def hub_factory(tmp_path: Path) -> Iterator[Callable[..., Hub]]:
    """Initialise a data directory (optionally on another database URL) and open a hub on it."""
    hubs: list[Hub] = []

    def factory(*, database_url: str = "", name: str = "hub", group_commit: bool = False, **init: str) -> Hub:
        data_dir = tmp_path / name
        with pytest.MonkeyPatch.context() as patch:
            if database_url:
                patch.setenv("WARDEN_DATABASE_URL", database_url)
            initialise(
                data_dir,
                org=init.get("org", "Acme Test"),
                fleet_domain=init.get("fleet_domain", "fleet.acme.test"),
                key_store=init.get("key_store", "file"),
                key_algorithm=init.get("key_algorithm", "P-256"),
                actor="test",
            )
        # The database URL was pinned in the data directory's settings file by init.
        settings = load_settings(data_dir)
        hub = Hub.open(settings, group_commit=group_commit)
        hubs.append(hub)
        return hub

    yield factory
    for hub in hubs:
        hub.close()


def postgres_available() -> bool:
    with contextlib.suppress(OSError), socket.create_connection((PG_HOST, PG_PORT), timeout=1):
        return True
    return False


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the machine's server, dropped afterwards."""
    if not postgres_available():
        if os.environ.get("WARDEN_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required but not reachable on {PG_HOST}:{PG_PORT}")
        pytest.skip(f"PostgreSQL not reachable on {PG_HOST}:{PG_PORT}")
    import psycopg

    name = f"warden_test_{secrets.token_hex(6)}"
    user = os.environ.get("WARDEN_TEST_PG_USER", "postgres")
    with psycopg.connect(f"host={PG_HOST} port={PG_PORT} user={user} dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{user}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with psycopg.connect(f"host={PG_HOST} port={PG_PORT} user={user} dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def openssl(*args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run the openssl binary (a tool we did not write)."""
    assert shutil.which("openssl"), "openssl is not installed"
    return subprocess.run(["openssl", *args], input=input, capture_output=True, check=check, timeout=60)


@pytest.fixture
def hub_server(tmp_path: Path) -> Iterator[object]:
    """A running ``warden serve`` (see tests/hubserver.py) on a fresh data directory."""
    from tests.hubserver import running_hub

    yield from running_hub(tmp_path)
