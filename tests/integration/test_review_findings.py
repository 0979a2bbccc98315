"""Regressions for defects found in review: each would have let a key, a certificate or a record slip through."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Cli, make_csr, make_key
from warden.core import InvalidInputError, IssuanceRefusedError
from warden.hub import Hub
from warden.pki import RevocationReason


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_refused_init_keeps_the_existing_keys(initialised_cli: Cli) -> None:
    cli = initialised_cli
    keys = sorted(p.name for p in (cli.data_dir / "keys").iterdir())
    (cli.data_dir / "warden.toml").unlink()
    (cli.data_dir / "warden.db").unlink()
    result = cli("init", "--org", "Again", "--fleet-domain", "fleet.acme.test")
    assert result.code != 0
    assert "already holds a key" in result.err
    assert sorted(p.name for p in (cli.data_dir / "keys").iterdir()) == keys


def test_keys_are_never_certified_twice(hub_factory: Callable[..., Hub]) -> None:
    hub = hub_factory()
    for device in ("d-1", "d-2"):
        hub.devices.add_device(device, actor="t")
    key = make_key("p256")
    first = hub.certificates.sign(device_id="d-1", csr=make_csr(key=key), actor="t")
    with pytest.raises(IssuanceRefusedError, match="another device or service"):
        hub.certificates.sign(device_id="d-2", csr=make_csr(key=key), actor="t")
    with pytest.raises(IssuanceRefusedError, match="re-key"):
        hub.certificates.sign(device_id="d-1", csr=make_csr(key=key), actor="t")
    hub.certificates.revoke(first.record.serial, reason=RevocationReason.KEY_COMPROMISE, actor="t")
    with pytest.raises(IssuanceRefusedError, match="revoked certificate"):
        hub.certificates.sign(device_id="d-1", csr=make_csr(key=key), actor="t")
    assert [c.serial for c in hub.certificates.find(device_id="d-2")] == []


def test_same_key_twice_in_one_batch(hub_factory: Callable[..., Hub]) -> None:
    from warden.pki import IssuedIdentity, Profile
    from warden.registry._certificates import _PendingIssue

    hub = hub_factory()
    for i in range(4):
        hub.devices.add_device(f"d-{i}", actor="t")
    csr = make_csr(key=make_key("p256"))
    batch = [
        _PendingIssue(
            csr,
            Profile.DEVICE,
            IssuedIdentity.for_device(f"d-{i}", "fleet.acme.test"),
            f"d-{i}",
            "t",
            "certificate.issue",
            False,
            False,
        )
        for i in range(4)
    ]
    # One batch, as group commit hands it over: only the first request may have the key.
    with hub.db.transaction() as uow:
        results = hub.certificates._issue_batch(uow, batch)
    assert not isinstance(results[0], Exception)
    assert all(isinstance(r, IssuanceRefusedError) for r in results[1:])
    assert len(hub.certificates.find()) == 2  # the OCSP signer and the one device certificate


def test_revoked_ocsp_signer_is_replaced_with_a_new_key(initialised_cli: Cli, tmp_path: Path) -> None:
    cli = initialised_cli
    signer = json.loads(cli.ok("cert", "list", "--json"))[0]
    assert signer["profile"] == "ocsp-signer"
    cli.ok("cert", "revoke", signer["serial"], "--reason", "keyCompromise")
    old_pem = (cli.data_dir / "ca" / "ocsp-signer.pem").read_bytes()
    from cryptography import x509

    from tests.conftest import openssl

    cli.ok("device", "add", "dev-1")
    cli.ok("cert", "sign", "--device", "dev-1", "--csr", write(tmp_path / "c", make_csr()), "--out", tmp_path / "d")
    issuer = cli.data_dir / "ca" / "issuing-ca.pem"
    openssl("ocsp", "-sha256", "-issuer", str(issuer), "-cert", str(tmp_path / "d"), "-reqout", str(tmp_path / "q"))
    cli.ok("ocsp", "respond", "--request", tmp_path / "q", "--out", tmp_path / "r")
    new = x509.load_pem_x509_certificate((cli.data_dir / "ca" / "ocsp-signer.pem").read_bytes())
    old = x509.load_pem_x509_certificate(old_pem)
    assert new.serial_number != old.serial_number
    assert new.public_key() != old.public_key()
    from cryptography.x509 import ocsp

    response = ocsp.load_der_ocsp_response((tmp_path / "r").read_bytes())
    assert response.certificates[0].serial_number == new.serial_number


def test_unwritable_output_records_nothing(initialised_cli: Cli, tmp_path: Path) -> None:
    cli = initialised_cli
    cli.ok("device", "add", "dev-1")
    before = (cli.ok("cert", "list", "--json"), cli.ok("audit", "list", "--json"))
    result = cli(
        "cert",
        "sign",
        "--device",
        "dev-1",
        "--csr",
        write(tmp_path / "c", make_csr()),
        "--out",
        tmp_path / "missing" / "cert.pem",
    )
    assert result.code == 2
    assert "directory does not exist" in result.err
    assert (cli.ok("cert", "list", "--json"), cli.ok("audit", "list", "--json")) == before
    assert json.loads(cli.ok("device", "show", "dev-1", "--json"))["state"] == "pending"


def test_service_certificates_cannot_take_a_device_name(hub_factory: Callable[..., Hub]) -> None:
    hub = hub_factory()
    with pytest.raises(InvalidInputError, match="a device's name"):
        hub.certificates.issue_service(names=("sensor-1.fleet.acme.test",), csr=make_csr(), actor="t")
    issued = hub.certificates.issue_service(names=("hub.fleet.acme.test",), csr=make_csr(), actor="t")
    assert issued.record.common_name == "hub.fleet.acme.test"


def test_settings_file_is_private(initialised_cli: Cli) -> None:
    assert (initialised_cli.data_dir / "warden.toml").stat().st_mode & 0o077 == 0


def test_bad_database_url_is_one_line(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARDEN_DATABASE_URL", "not a url at all")
    result = cli("init", "--org", "Acme", "--fleet-domain", "fleet.acme.test")
    assert result.code == 3
    assert "database URL" in result.err
    assert result.err.count("\n") == 1
    assert not cli.data_dir.exists()


@pytest.mark.postgres
def test_failed_init_on_postgresql_leaves_no_schema(
    cli: Cli, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WARDEN_DATABASE_URL", postgres_url)
    failed = cli(
        "init",
        "--org",
        "Acme",
        "--fleet-domain",
        "fleet.acme.test",
        "--key-store",
        "pkcs11:token=nothing?module-path=/nonexistent/libpkcs11.so",
    )
    assert failed.code != 0
    assert not cli.data_dir.exists()
    # The same database takes a new init: the failed one left no schema behind.
    cli.ok("init", "--org", "Acme", "--fleet-domain", "fleet.acme.test")
    assert "audit log OK" in cli.ok("audit", "verify")


def test_renewal_in_the_same_batch_supersedes_what_the_batch_issued(hub_factory: Callable[..., Hub]) -> None:
    from warden.pki import IssuedIdentity, Profile
    from warden.registry import CertificateStatus
    from warden.registry._certificates import _PendingIssue

    hub = hub_factory()
    hub.devices.add_device("d-1", actor="t")
    hub.certificates.sign(device_id="d-1", csr=make_csr(), actor="t")
    # Two requests for one device recorded in one batch, as group commit would: an issuance, then a renewal.

    identity = IssuedIdentity.for_device("d-1", "fleet.acme.test")
    first = _PendingIssue(make_csr(), Profile.DEVICE, identity, "d-1", "t", "certificate.issue", False, False)
    renewal = _PendingIssue(make_csr(), Profile.DEVICE, identity, "d-1", "t", "certificate.renew", True, True)
    with hub.db.transaction() as uow:
        results = hub.certificates._issue_batch(uow, [first, renewal])
    assert not any(isinstance(r, Exception) for r in results)
    statuses = [c.status for c in hub.certificates.find(device_id="d-1")]
    assert statuses.count(CertificateStatus.GOOD) == 1
    assert statuses.count(CertificateStatus.REVOKED) == 2
