"""The whole PKI flow with every CA key in a SoftHSM2 token (non-extractable), checked with openssl."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cli, openssl
from tests.softhsm import SKIP_REASON, SOFTHSM_AVAILABLE, make_softhsm_token, unload_module

pytestmark = [pytest.mark.softhsm, pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)]
PIN = "4711"


@pytest.fixture
def token_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    uri, env = make_softhsm_token(tmp_path, label="warden-ca", pin=PIN)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    unload_module()
    yield uri
    unload_module()


def openssl_p256_csr(tmp_path: Path, name: str) -> Path:
    """A P-256 key and CSR made by openssl, as a device would make them."""
    csr = tmp_path / f"{name}.csr"
    openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        str(tmp_path / f"{name}.key"),
        "-subj",
        f"/CN={name}",
        "-out",
        str(csr),
    )
    return csr


class TokenCli:
    """Runs the CLI with the PIN in the environment each time (the CLI removes it from its own environment)."""

    def __init__(self, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
        self.cli, self.monkeypatch = cli, monkeypatch

    def __call__(self, *args: object, pin: str = PIN) -> str:
        self.monkeypatch.setenv("WARDEN_PKCS11_PIN", pin)
        return self.cli.ok(*args)


def test_pki_flow_with_ca_keys_in_softhsm(
    cli: Cli, token_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = TokenCli(cli, monkeypatch)
    cli.ok("init", "--org", "Acme HSM", "--fleet-domain", "fleet.acme.test", "--key-store", token_uri)
    settings_text = (cli.data_dir / "warden.toml").read_text()
    assert "pkcs11:token=warden-ca" in settings_text
    assert PIN not in settings_text, "the PIN must never be written to the settings file"
    assert not list((cli.data_dir / "keys").glob("*-ca.key.pem")), "no CA key file may exist with a token"
    assert json.loads(run("ca", "show", "--json"))["key_store"] == "pkcs11"

    csr = openssl_p256_csr(tmp_path, "dev")
    run("device", "add", "dev-1")
    run("cert", "sign", "--device", "dev-1", "--csr", csr, "--out", tmp_path / "dev.pem")
    chain = cli.data_dir / "ca" / "chain.pem"
    assert openssl("verify", "-CAfile", str(chain), str(tmp_path / "dev.pem")).returncode == 0

    serial = json.loads(run("cert", "list", "--device", "dev-1", "--json"))[0]["serial"]
    run("cert", "revoke", serial, "--reason", "keyCompromise")
    run("crl", "--out", tmp_path / "crl.pem")
    revoked = openssl(
        "verify",
        "-CAfile",
        str(chain),
        "-crl_check",
        "-CRLfile",
        str(tmp_path / "crl.pem"),
        str(tmp_path / "dev.pem"),
        check=False,
    )
    assert revoked.returncode != 0
    assert b"certificate revoked" in revoked.stdout + revoked.stderr

    issuer = cli.data_dir / "ca" / "issuing-ca.pem"
    openssl(
        "ocsp",
        "-sha256",
        "-issuer",
        str(issuer),
        "-cert",
        str(tmp_path / "dev.pem"),
        "-reqout",
        str(tmp_path / "req.der"),
    )
    run("ocsp", "respond", "--request", tmp_path / "req.der", "--out", tmp_path / "resp.der")
    checked = openssl(
        "ocsp",
        "-respin",
        str(tmp_path / "resp.der"),
        "-reqin",
        str(tmp_path / "req.der"),
        "-issuer",
        str(issuer),
        "-VAfile",
        str(cli.data_dir / "ca" / "ocsp-signer.pem"),
        "-CAfile",
        str(chain),
        "-resp_text",
    )
    assert b"Response verify OK" in checked.stderr + checked.stdout
    assert b"Cert Status: revoked" in checked.stdout
    assert "audit log OK" in run("audit", "verify")


def test_root_cannot_be_exported_from_a_token(
    cli: Cli, token_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli.ok("init", "--org", "Acme HSM", "--fleet-domain", "fleet.acme.test", "--key-store", token_uri)
    monkeypatch.setenv("WARDEN_PKCS11_PIN", PIN)
    result = cli("ca", "export-root", "--out", tmp_path / "root.pem")
    assert result.code != 0
    assert "cannot be exported" in result.err
    assert not (tmp_path / "root.pem").exists()


def test_wrong_pin_is_a_clear_error(cli: Cli, token_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli.ok("init", "--org", "Acme HSM", "--fleet-domain", "fleet.acme.test", "--key-store", token_uri)
    monkeypatch.setenv("WARDEN_PKCS11_PIN", PIN)
    cli.ok("device", "add", "dev-1")
    before = cli.ok("audit", "list", "--json")
    monkeypatch.setenv("WARDEN_PKCS11_PIN", "0000")
    csr = openssl_p256_csr(tmp_path, "other")
    result = cli("cert", "sign", "--device", "dev-1", "--csr", csr, "--out", tmp_path / "dev.pem")
    assert result.code == 7
    assert result.err.startswith("error: ")
    assert result.err.count("\n") == 1
    assert "0000" not in result.err
    assert not (tmp_path / "dev.pem").exists()
    monkeypatch.setenv("WARDEN_PKCS11_PIN", PIN)
    assert cli.ok("audit", "list", "--json") == before


def test_missing_token_is_a_clear_error(cli: Cli, token_uri: str) -> None:
    wrong = token_uri.replace("token=warden-ca", "token=no-such-token")
    result = cli("init", "--org", "Acme", "--fleet-domain", "fleet.acme.test", "--key-store", wrong)
    assert result.code == 7
    assert "no-such-token" in result.err
    assert PIN not in result.err
    assert not cli.data_dir.exists(), "a failed init must leave nothing behind"
