"""``warden-agent`` with its keys in a PKCS#11 token (SoftHSM2): the IDevID's key and every operational key live in
the token and never leave it; the agent onboards with the IDevID over mutual TLS, connects to the broker, and renews
onto a fresh token key on its own. The agent runs as a separate process, as on a device."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.agentkit import write_config
from tests.hubserver import HubServer, ManufacturerCA, start_hub
from tests.integration._interop import eventually
from tests.softhsm import SKIP_REASON, SOFTHSM_AVAILABLE, SOFTHSM_MODULE, make_softhsm_token, unload_module
from warden.agent import read_status
from warden.agent._p11tls import engine_available

pytestmark = pytest.mark.skipif(
    not SOFTHSM_AVAILABLE or not engine_available(), reason=SKIP_REASON + " and libengine-pkcs11-openssl"
)
PIN = "4711"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    server = start_hub(tmp_path, broker=True, extra_env={"WARDEN_DEVICE_VALIDITY_MINUTES": "2"})
    try:
        yield server
    finally:
        server.stop()


def _token_key_idevid(maker: ManufacturerCA, device_id: str, env: dict[str, str], directory: Path) -> Path:
    """An IDevID whose key is generated in the token (label ``idevid``), signed by the maker's CA."""
    from warden.pki import KeyAlgorithm, Pkcs11KeyStore, parse_pkcs11_uri

    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ.update(env)
    unload_module()
    try:
        store = Pkcs11KeyStore(parse_pkcs11_uri(f"pkcs11:token=device?module-path={SOFTHSM_MODULE}&pin-value={PIN}"))
        key = store.generate("idevid", KeyAlgorithm.P256)
        public = key.public_key()
        store.close()
    finally:
        unload_module()
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(maker.certificate.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(maker.key, hashes.SHA256())
    )
    path = directory / "idevid.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


def _token_objects(env: dict[str, str]) -> list[dict[str, object]]:
    """The private keys in the token with their extractability, read in a separate process."""
    code = (
        "import json, pkcs11\n"
        "from pkcs11.constants import Attribute, ObjectClass\n"
        f"lib = pkcs11.lib({SOFTHSM_MODULE!r})\n"
        "token = lib.get_token(token_label='device')\n"
        f"with token.open(user_pin={PIN!r}) as s:\n"
        "    keys = list(s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))\n"
        "    print(json.dumps([{'label': k.label, 'extractable': bool(k[Attribute.EXTRACTABLE]),"
        " 'sensitive': bool(k[Attribute.SENSITIVE])} for k in keys]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def test_agent_with_a_token_onboards_connects_and_renews(hub: HubServer, tmp_path: Path) -> None:
    _, env = make_softhsm_token(tmp_path / "hsm", label="device", pin=PIN)
    maker = ManufacturerCA(tmp_path / "maker")
    hub.warden("enrollment", "group", "add", "acme-hsm", "--ca", str(maker.path))
    home = tmp_path / "hsm-1"
    home.mkdir()
    idevid_cert = _token_key_idevid(maker, "hsm-1", env, home)
    pin_file = home / "token.pin"
    pin_file.write_text(PIN)
    pin_file.chmod(0o600)

    class _Idevid:  # what write_config needs of an IDevID
        cert_path = idevid_cert
        key_path = Path("unused")

    keystore = f'[keystore]\nkind = "pkcs11"\nmodule = "{SOFTHSM_MODULE}"\ntoken = "device"\npin_file = "{pin_file}"'
    config = write_config(
        hub,
        home,
        "hsm-1",
        idevid=_Idevid,  # type: ignore[arg-type]
        keystore=keystore,
        extra="renew_at = 0.12\njitter_fraction = 0",
    )
    log = (home / "agent.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "warden.agent", "run", "--config", str(config)],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    state = home / "state"
    try:

        def status() -> dict[str, object]:
            if process.poll() is not None:
                raise AssertionError((home / "agent.log").read_text())
            return read_status(state) or {}

        first = eventually(
            lambda: status().get("certificate") if status().get("broker", {}).get("connected") else None,  # type: ignore[union-attr]
            within=60,
            what="onboarded with the token's IDevID key and connected",
        )
        assert status()["keystore"] == {"kind": "pkcs11", "hardware_backed": True}
        eventually(
            lambda: status()["broker"]["delivered"] >= 3,  # type: ignore[index]
            what="messages acknowledged by the broker",
        )
        renewed = eventually(
            lambda: status()["certificate"] if status()["renewal"]["renewals"] >= 1 else None,  # type: ignore[index]
            within=150,
            what="a renewal onto a fresh token key",
        )
        assert renewed["serial"] != first["serial"]  # type: ignore[index]
        eventually(
            lambda: status()["broker"]["connected"] and status()["broker"]["refused"] == 0,  # type: ignore[index]
            what="reconnected with the renewed certificate",
        )
        # Nothing but token keys: no key file anywhere in the agent's state directory.
        assert not list(state.rglob("*.key"))
        objects = _token_objects(env)
        labels = {str(o["label"]) for o in objects}
        assert "idevid" in labels
        current = json.loads((state / "identity" / "current.json").read_text())["label"]
        assert current in labels
        assert len([label for label in labels if label.startswith("op-")]) == 1, labels
        assert all(o["extractable"] is False and o["sensitive"] is True for o in objects)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, (home / "agent.log").read_text()
    assert PIN not in (home / "agent.log").read_text()
