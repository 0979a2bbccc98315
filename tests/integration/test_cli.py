"""The ``warden`` command end to end (in-process), and above all its bad-input paths: one clear line, a non-zero
exit, and nothing written: no certificate record, no output file, no audit record claiming success."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import Cli, make_csr, openssl


def snapshot(cli: Cli) -> tuple[str, str, str]:
    """What must not change when a command fails."""
    return (
        cli.ok("cert", "list", "--json"),
        cli.ok("audit", "list", "--json"),
        cli.ok("device", "list", "--json"),
    )


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_walkthrough(initialised_cli: Cli, tmp_path: Path) -> None:
    cli = initialised_cli
    cli.ok("group", "add", "sensors", "--description", "temperature sensors")
    cli.ok("device", "add", "dev-1", "--name", "Boiler room", "--group", "sensors", "--tag", "site=berlin")
    cli.ok("device", "add", "dev-2", "--group", "sensors", "--tag", "site=paris")
    listed = json.loads(cli.ok("device", "list", "--tag", "site=berlin", "--json"))
    assert [d["id"] for d in listed] == ["dev-1"]
    assert json.loads(cli.ok("group", "show", "sensors", "--json"))["members"] == 2

    out = tmp_path / "dev-1.pem"
    text = cli.ok("cert", "sign", "--device", "dev-1", "--csr", write(tmp_path / "c", make_csr()), "--out", out)
    assert "issued certificate" in text
    cert = x509.load_pem_x509_certificate(out.read_bytes())
    assert cert.subject.rfc4514_string().startswith("CN=dev-1")
    shown = json.loads(cli.ok("device", "show", "dev-1", "--json"))
    assert shown["state"] == "active"
    assert int(shown["certificates"][0]["serial"], 16) == cert.serial_number

    cli.ok(
        "cert",
        "renew",
        "--device",
        "dev-1",
        "--csr",
        write(tmp_path / "c2", make_csr()),
        "--out",
        tmp_path / "renewed.pem",
        "--revoke-superseded",
    )
    statuses = sorted(c["status"] for c in json.loads(cli.ok("cert", "list", "--device", "dev-1", "--json")))
    assert statuses == ["good", "revoked"]

    cli.ok("device", "disable", "dev-1", "--reason", "maintenance")
    cli.ok("device", "enable", "dev-1")
    cli.ok("device", "quarantine", "dev-1", "--reason", "odd traffic")
    assert json.loads(cli.ok("device", "list", "--state", "quarantined", "--json"))[0]["id"] == "dev-1"
    cli.ok("device", "decommission", "dev-1")
    assert {c["status"] for c in json.loads(cli.ok("cert", "list", "--device", "dev-1", "--json"))} == {"revoked"}

    cli.ok("crl", "--out", tmp_path / "crl.der", "--der")
    crl = x509.load_der_x509_crl((tmp_path / "crl.der").read_bytes())
    assert len(crl) == 2
    cli.ok("audit", "checkpoint")
    assert "audit log OK" in cli.ok("audit", "verify")
    actions = [r["action"] for r in json.loads(cli.ok("audit", "list", "--json"))]
    assert actions.count("certificate.revoke") == 2
    assert json.loads(cli.ok("audit", "verify", "--json"))["ok"] is True
    assert len(json.loads(cli.ok("audit", "list", "--since", "1h", "--json"))) == len(actions)


def _tampered() -> bytes:
    """A CSR whose signed part was changed after signing: its signature no longer verifies."""
    der = bytearray(x509.load_pem_x509_csr(make_csr()).public_bytes(serialization.Encoding.DER))
    index = bytes(der).index(b"requested-name")
    der[index] ^= 0x01
    return bytes(der)


BAD_CSRS = [
    ("empty", b"", "empty"),
    ("garbage", b"hello", "could not be parsed"),
    ("truncated", make_csr()[:300], "could not be parsed"),
    ("oversized", b"-----BEGIN CERTIFICATE REQUEST-----\n" + b"A" * 17_000, "larger than the limit"),
    ("rsa-1024", make_csr("rsa1024"), "fewer than 2048"),
    ("p-521", make_csr("p521"), "unsupported curve"),
    ("bad signature", _tampered(), "does not verify"),
]


@pytest.mark.parametrize(("data", "message"), [(d, m) for _, d, m in BAD_CSRS], ids=[n for n, _, _ in BAD_CSRS])
def test_bad_csr_writes_nothing(initialised_cli: Cli, tmp_path: Path, data: bytes, message: str) -> None:
    cli = initialised_cli
    cli.ok("device", "add", "dev-1")
    before = snapshot(cli)
    out = tmp_path / "out.pem"
    result = cli("cert", "sign", "--device", "dev-1", "--csr", write(tmp_path / "bad.csr", data), "--out", out)
    assert result.code != 0
    assert result.err.startswith("error: ")
    assert result.err.count("\n") == 1, result.err
    assert message in result.err
    assert not out.exists()
    after = snapshot(cli)
    assert (after[0], after[2]) == (before[0], before[2])
    # The refusal itself is audited, as denied, with its reason; nothing else was recorded.
    new_records = json.loads(after[1])[len(json.loads(before[1])) :]
    assert [(r["action"], r["outcome"]) for r in new_records] in ([], [("certificate.issue", "denied")])
    if new_records:
        assert message in new_records[0]["details"]["reason"]


REFUSALS = [
    ("unknown device", ["cert", "sign", "--device", "nope"], "no device with id 'nope'", 4),
    ("invalid device id", ["device", "add", "Bad_ID"], "invalid device id", 2),
    ("reserved id", ["device", "add", "hub"], "reserved", 2),
    ("duplicate id", ["device", "add", "dev-1"], "exists already", 5),
    ("unknown group", ["device", "add", "dev-9", "--group", "nope"], "no group named", 4),
    ("illegal transition", ["device", "quarantine", "dev-1"], "cannot go from pending to quarantined", 6),
    ("unknown state", ["device", "list", "--state", "sleeping"], "unknown state", 2),
    ("bad tag", ["device", "add", "dev-9", "--tag", "novalue"], "invalid tag", 2),
    ("bad serial", ["cert", "revoke", "xyz", "--reason", "keyCompromise"], "invalid serial", 2),
    ("unknown serial", ["cert", "revoke", "ABCD", "--reason", "keyCompromise"], "no certificate with serial", 4),
    ("certificate hold", ["cert", "revoke", "ABCD", "--reason", "certificateHold"], "not supported", 2),
    ("unknown reason", ["cert", "revoke", "ABCD", "--reason", "bored"], "unknown revocation reason", 2),
    ("renew pending", ["cert", "renew", "--device", "dev-1"], "only active devices renew", 6),
    (
        "service name for device",
        ["cert", "sign", "--name", "x.example.com", "--profile", "device"],
        "not for services",
        2,
    ),
    ("both device and name", ["cert", "sign", "--device", "dev-1", "--name", "x.example.com"], "either", 2),
]


@pytest.mark.parametrize(
    ("args", "message", "code"), [(a, m, c) for _, a, m, c in REFUSALS], ids=[n for n, _, _, _ in REFUSALS]
)
def test_refusals_write_nothing(initialised_cli: Cli, tmp_path: Path, args: list[str], message: str, code: int) -> None:
    cli = initialised_cli
    cli.ok("device", "add", "dev-1")
    csr = write(tmp_path / "ok.csr", make_csr())
    if args[:2] in (["cert", "sign"], ["cert", "renew"]):
        args = [*args, "--csr", str(csr), "--out", str(tmp_path / "out.pem")]
    before = snapshot(cli)
    result = cli(*args)
    assert (result.code, message in result.err) == (code, True), result.err
    assert result.err.count("\n") == 1
    assert not (tmp_path / "out.pem").exists()
    after = snapshot(cli)
    assert after[0] == before[0]
    assert after[2] == before[2]
    # A refusal of a known device's request is audited as denied; nothing else failing leaves an audit record.
    new = json.loads(after[1])[len(json.loads(before[1])) :]
    expected = [("certificate.renew", "denied")] if args[:2] == ["cert", "renew"] else []
    assert [(r["action"], r["outcome"]) for r in new] == expected


@pytest.mark.parametrize("state", ["disable", "quarantine", "decommission"])
def test_no_certificates_for_inactive_devices(initialised_cli: Cli, tmp_path: Path, state: str) -> None:
    cli = initialised_cli
    cli.ok("device", "add", "dev-1")
    cli.ok("cert", "sign", "--device", "dev-1", "--csr", write(tmp_path / "a", make_csr()), "--out", tmp_path / "a.pem")
    cli.ok("device", state, "dev-1")
    before = cli.ok("cert", "list", "--json")
    result = cli(
        "cert", "sign", "--device", "dev-1", "--csr", write(tmp_path / "b", make_csr()), "--out", tmp_path / "b.pem"
    )
    assert result.code == 6
    assert "certificates are issued to pending and active devices" in result.err
    assert not (tmp_path / "b.pem").exists()
    assert cli.ok("cert", "list", "--json") == before
    last = json.loads(cli.ok("audit", "list", "--json"))[-1]
    assert (last["action"], last["outcome"]) == ("certificate.issue", "denied")


def test_not_initialised(cli: Cli) -> None:
    result = cli("device", "list")
    assert result.code == 3
    assert "not an initialised Warden data directory" in result.err
    assert "warden init" in result.err
    assert not cli.data_dir.exists()


def test_init_twice_is_refused(initialised_cli: Cli) -> None:
    result = initialised_cli("init", "--org", "Other", "--fleet-domain", "other.example.com")
    assert result.code == 5
    assert "initialised already" in result.err


def test_init_bad_input_leaves_nothing(cli: Cli) -> None:
    for args, message in [
        (["--fleet-domain", "not a domain"], "invalid DNS name"),
        (["--fleet-domain", "fleet.example.com", "--key-algorithm", "P-521"], "unknown key algorithm"),
        (["--fleet-domain", "fleet.example.com", "--key-store", "vault"], "unknown key store"),
    ]:
        result = cli("init", "--org", "Acme", *args)
        assert result.code == 2, result.err
        assert message in result.err
        assert not cli.data_dir.exists()


def test_passphrase_file_mode_and_wrong_passphrase(
    initialised_cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = initialised_cli
    passphrase = cli.data_dir / "keys" / "ca-passphrase"
    assert stat.S_IMODE(passphrase.stat().st_mode) == 0o600
    key_files = sorted((cli.data_dir / "keys").glob("*.pem"))
    assert [k.name for k in key_files] == [
        "audit-checkpoint.key.pem",
        "issuing-ca.key.pem",
        "ocsp-signer.key.pem",
        "root-ca.key.pem",
    ]
    for key in key_files:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    cli.ok("device", "add", "dev-1")
    monkeypatch.setenv("WARDEN_CA_PASSPHRASE", "definitely-wrong")
    before = snapshot(cli)
    monkeypatch.setenv("WARDEN_CA_PASSPHRASE", "definitely-wrong")
    result = cli(
        "cert", "sign", "--device", "dev-1", "--csr", write(tmp_path / "c", make_csr()), "--out", tmp_path / "o.pem"
    )
    assert result.code == 7
    assert "could not be decrypted" in result.err
    assert "definitely-wrong" not in result.err
    assert not (tmp_path / "o.pem").exists()
    assert snapshot(cli) == before

    passphrase.chmod(0o644)
    result = cli("cert", "sign", "--device", "dev-1", "--csr", tmp_path / "c", "--out", tmp_path / "o.pem")
    assert result.code == 3
    assert "readable by others" in result.err


def test_child_processes_do_not_inherit_the_passphrase(initialised_cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    passphrase = (initialised_cli.data_dir / "keys" / "ca-passphrase").read_text().strip()
    monkeypatch.setenv("WARDEN_CA_PASSPHRASE", passphrase)
    monkeypatch.setenv("WARDEN_PKCS11_PIN", "1234")
    initialised_cli.ok("ca", "show")
    assert "WARDEN_CA_PASSPHRASE" not in os.environ
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.environ))"], capture_output=True, text=True, check=True
    )
    assert "WARDEN_CA_PASSPHRASE" not in child.stdout
    assert "WARDEN_PKCS11_PIN" not in child.stdout


def test_export_root_then_keep_issuing(initialised_cli: Cli, tmp_path: Path) -> None:
    cli = initialised_cli
    out = tmp_path / "root-offline.pem"
    cli.ok("ca", "export-root", "--out", out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    bundle = out.read_bytes()
    assert b"BEGIN CERTIFICATE" in bundle
    assert b"BEGIN ENCRYPTED PRIVATE KEY" in bundle
    assert not (cli.data_dir / "keys" / "root-ca.key.pem").exists()
    assert json.loads(cli.ok("ca", "show", "--json"))["root"]["key_on_hub"] is False
    # The exported key decrypts with the hub passphrase and matches the root certificate.
    passphrase = (cli.data_dir / "keys" / "ca-passphrase").read_text().strip()
    key = openssl("pkey", "-in", str(out), "-passin", f"pass:{passphrase}", "-pubout").stdout
    root_pub = openssl("x509", "-in", str(cli.data_dir / "ca" / "root-ca.pem"), "-noout", "-pubkey").stdout
    assert key == root_pub
    again = cli("ca", "export-root", "--out", tmp_path / "again.pem")
    assert again.code != 0
    assert "already been exported" in again.err
    cli.ok("device", "add", "dev-1")
    cli.ok("cert", "sign", "--device", "dev-1", "--csr", write(tmp_path / "c", make_csr()), "--out", tmp_path / "d.pem")
    cli.ok("crl", "--out", tmp_path / "crl.pem")
    cli.ok("ca", "export-chain", "--out", tmp_path / "chain.pem")
    verified = openssl(
        "verify",
        "-CAfile",
        str(tmp_path / "chain.pem"),
        "-crl_check",
        "-CRLfile",
        str(tmp_path / "crl.pem"),
        str(tmp_path / "d.pem"),
    )
    assert b"OK" in verified.stdout


def test_service_certificates(initialised_cli: Cli, tmp_path: Path) -> None:
    cli = initialised_cli
    out = tmp_path / "hub.pem"
    cli.ok(
        "cert",
        "sign",
        "--name",
        "hub.fleet.acme.test",
        "--name",
        "mqtt.fleet.acme.test",
        "--profile",
        "service",
        "--csr",
        write(tmp_path / "c", make_csr()),
        "--out",
        out,
    )
    cert = x509.load_pem_x509_certificate(out.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert sans == ["hub.fleet.acme.test", "mqtt.fleet.acme.test"]
    listed = json.loads(cli.ok("cert", "list", "--json"))
    assert {c["profile"] for c in listed} == {"service", "ocsp-signer"}


def test_help_everywhere(cli: Cli) -> None:
    for group in ["ca", "group", "device", "cert", "ocsp", "audit", "db"]:
        result = cli(group, "--help")
        assert result.code == 0
        assert "Usage" in result.out


def test_public_url_is_pinned_at_init(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WARDEN_PUBLIC_URL", raising=False)
    cli.ok("init", "--org", "Acme", "--fleet-domain", "fleet.acme.test", "--public-url", "https://hub.fleet.acme.test/")
    assert 'public_url = "https://hub.fleet.acme.test"' in (cli.data_dir / "warden.toml").read_text()
    cli.ok("device", "add", "dev-1")
    out = tmp_path / "d.pem"
    cli.ok("cert", "sign", "--device", "dev-1", "--csr", write(tmp_path / "c", make_csr()), "--out", out)
    cert = x509.load_pem_x509_certificate(out.read_bytes())
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert cdp[0].full_name == [x509.UniformResourceIdentifier("https://hub.fleet.acme.test/pki/crl")]


def test_init_flags_win_over_the_environment(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARDEN_KEY_STORE", "vault")
    cli.ok("init", "--org", "Acme", "--fleet-domain", "fleet.acme.test", "--key-store", "file")
    assert 'key_store = "file"' in (cli.data_dir / "warden.toml").read_text()
    assert (cli.data_dir / "keys" / "issuing-ca.key.pem").exists()


def test_init_refuses_a_bad_public_url(cli: Cli) -> None:
    result = cli("init", "--org", "Acme", "--fleet-domain", "fleet.acme.test", "--public-url", "ftp://hub")
    assert result.code == 2
    assert "--public-url" in result.err
    assert not cli.data_dir.exists()
