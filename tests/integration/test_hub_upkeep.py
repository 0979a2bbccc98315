"""The hub keeps itself alive: its service, hub-client and OCSP-signer certificates renew in the last third of their
lives and the CRL is re-issued half-way to its nextUpdate; with several workers (PostgreSQL only) exactly one
runs these jobs, in the worker holding the leader lock."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.hubserver import HUB_NAME, start_hub
from warden.core import ConfigurationError, FixedClock, load_settings
from warden.hub import HUB_CLIENT_CERT_FILE, SERVICE_CERT_FILE, Hub, initialise


def _leaf(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def test_run_jobs_renews_what_is_due_and_nothing_else(tmp_path: Path) -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    clock = FixedClock(start)
    data_dir = tmp_path / "hub"
    initialise(data_dir, org="Acme", fleet_domain="fleet.acme.test", actor="test", clock=clock)
    with Hub.open(load_settings(data_dir), clock=clock) as hub:
        first = hub.run_jobs()
        # init published no CRL and made the OCSP signer; the first run adds the CRL and the two TLS identities.
        assert first[0].startswith("crl ") and "service" in first and "hub-client" in first
        service = _leaf(data_dir / SERVICE_CERT_FILE)
        assert service.subject.rfc4514_string().startswith(f"CN={HUB_NAME},")
        assert hub.run_jobs() == []  # nothing due

        # Half of the CRL's 7 days: a new CRL, nothing else yet.
        clock.advance(dt.timedelta(days=3, hours=13))
        done = hub.run_jobs()
        assert len(done) == 1 and done[0].startswith("crl ")
        crl = hub.certificates.current_crl()
        assert crl is not None and crl.next_update > clock.now() + dt.timedelta(days=6)

        # Past two thirds of the 30-day hub-client, OCSP-signer and 90-day service certificates' lives.
        clock.advance(dt.timedelta(days=17))
        done = hub.run_jobs()
        assert "hub-client" in done and "ocsp-signer" in done and "service" not in done
        clock.advance(dt.timedelta(days=41))
        done = hub.run_jobs()
        assert "service" in done
        renewed = _leaf(data_dir / SERVICE_CERT_FILE)
        assert renewed.serial_number != service.serial_number
        assert renewed.public_key() != service.public_key()  # a fresh key, not the old one re-certified
        assert renewed.not_valid_after_utc > clock.now() + dt.timedelta(days=80)
        client = _leaf(data_dir / HUB_CLIENT_CERT_FILE)
        assert client.not_valid_after_utc > clock.now()
        with hub.db.transaction(readonly=True) as uow:
            actions = [r.action for r in uow.audit.records()]
        assert actions.count("crl.issue") >= 3


def test_service_certificate_follows_configured_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "hub"
    initialise(data_dir, org="Acme", fleet_domain="fleet.acme.test", actor="test")
    with Hub.open(load_settings(data_dir)) as hub:
        hub.run_jobs()
    monkeypatch.setenv("WARDEN_HUB_NAMES", "hub.example.net, Warden.Example.net")
    with Hub.open(load_settings(data_dir)) as hub:
        assert "service" in hub.run_jobs()
    names = _leaf(data_dir / SERVICE_CERT_FILE).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == [HUB_NAME, "hub.example.net", "warden.example.net"]


def test_several_workers_need_postgresql(tmp_path: Path) -> None:
    from warden.api import serve

    data_dir = tmp_path / "hub"
    initialise(data_dir, org="Acme", fleet_domain="fleet.acme.test", actor="test")
    with pytest.raises(ConfigurationError, match="PostgreSQL"):
        serve(load_settings(data_dir), host="127.0.0.1", port=0, workers=2, announce=lambda _line: None)


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in metrics"
    return float(match.group(1))


@pytest.mark.postgres
@pytest.mark.slow
def test_one_leader_among_workers_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    """Three workers share one port and one database: each answers, exactly one holds the leader lock, and the CRL
    is published by one worker only (the audit log shows no duplicate CRL issuance per run)."""
    server = start_hub(tmp_path, database_url=postgres_url, workers=3)
    try:
        token = server.token("viewer")
        leaders: dict[int, float] = {}
        deadline = time.monotonic() + 60
        # Connections are spread over the workers by the kernel; ask until every worker (by pid) has answered.
        while len(leaders) < 3 and time.monotonic() < deadline:
            with server.client() as client:
                response = client.get("/metrics", headers={"authorization": f"Bearer {token}"})
            assert response.status_code == 200
            leaders[int(_metric(response.text, "warden_worker_pid"))] = _metric(response.text, "warden_leader")
            time.sleep(0.05)
        assert len(leaders) == 3, f"only {len(leaders)} workers answered"
        # The leader is elected on the first job round; wait until every worker has had one.
        deadline = time.monotonic() + 30
        while sum(leaders.values()) != 1 and time.monotonic() < deadline:
            with server.client() as client:
                response = client.get("/metrics", headers={"authorization": f"Bearer {token}"})
            leaders[int(_metric(response.text, "warden_worker_pid"))] = _metric(response.text, "warden_leader")
        assert sum(leaders.values()) == 1, leaders
        audit = json.loads(server.warden("audit", "list", "--json").stdout)
        crl_numbers = [r["details"]["number"] for r in audit if r["action"] == "crl.issue"]
        assert len(crl_numbers) == len(set(crl_numbers))
    finally:
        server.stop()


def test_crl_job_publishes_after_a_revocation_and_an_expiry(tmp_path: Path) -> None:
    from tests.conftest import make_csr
    from warden.pki import RevocationReason

    clock = FixedClock(dt.datetime(2026, 3, 1, tzinfo=dt.UTC))
    data_dir = tmp_path / "hub"
    initialise(data_dir, org="Acme", fleet_domain="fleet.acme.test", actor="test", clock=clock)
    with Hub.open(load_settings(data_dir), clock=clock) as hub:
        hub.devices.add_device("pump-1", actor="test")
        issued = hub.certificates.sign(device_id="pump-1", csr=make_csr("p256"), actor="test")
        assert hub.crl_job()  # the first CRL
        assert hub.crl_job() == []
        clock.advance(dt.timedelta(seconds=1))
        hub.certificates.revoke(issued.record.serial, reason=RevocationReason.KEY_COMPROMISE, actor="test")
        assert hub.crl_job(), "a revocation must be published at once"
        crl = x509.load_der_x509_crl(hub.certificates.current_crl().der)  # type: ignore[union-attr]
        assert crl.get_revoked_certificate_by_serial_number(issued.record.serial) is not None
        assert hub.crl_job() == []
        # The revoked certificate expires (30 days): the next CRL drops it.
        clock.advance(dt.timedelta(days=31))
        assert hub.crl_job()
        crl = x509.load_der_x509_crl(hub.certificates.current_crl().der)  # type: ignore[union-attr]
        assert crl.get_revoked_certificate_by_serial_number(issued.record.serial) is None


def test_operator_provided_service_certificate_is_served_and_never_replaced(tmp_path: Path) -> None:
    """With WARDEN_SERVICE_CERT_FILE/KEY_FILE the hub serves that chain and its jobs leave it alone."""
    import socket
    import ssl

    from tests.hubserver import ManufacturerCA

    other_ca = ManufacturerCA(tmp_path / "corp", name="Corp Web CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HUB_NAME)]))
        .issuer_name(other_ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HUB_NAME)]), critical=False)
        .sign(other_ca.key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "web.pem", tmp_path / "web.key"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = start_hub(
        tmp_path,
        extra_env={"WARDEN_SERVICE_CERT_FILE": str(cert_file), "WARDEN_SERVICE_KEY_FILE": str(key_file)},
        trust=other_ca.path,
    )
    try:
        context = ssl.create_default_context(cafile=str(other_ca.path))
        with (
            socket.create_connection(("127.0.0.1", server.port)) as raw,
            context.wrap_socket(raw, server_hostname=HUB_NAME) as tls,
        ):
            served = tls.getpeercert(binary_form=True)
        assert served == leaf.public_bytes(serialization.Encoding.DER)
        assert not (server.data_dir / SERVICE_CERT_FILE).exists()
    finally:
        server.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_get_a_passphrase_given_only_in_the_environment(
    tmp_path: Path, workers: int, request: pytest.FixtureRequest
) -> None:
    """The CLI removes WARDEN_CA_PASSPHRASE from its environment once read; the workers must still sign (they
    receive the settings object, not the environment)."""
    import base64

    from tests.hubserver import csr_der

    database_url = request.getfixturevalue("postgres_url") if workers > 1 else ""
    server = start_hub(
        tmp_path, database_url=database_url, workers=workers, extra_env={"WARDEN_CA_PASSPHRASE": "correct horse 42"}
    )
    try:
        assert not (server.data_dir / "keys" / "ca-passphrase").exists()
        token = json.loads(server.warden("enrollment", "add", "dev-1", "--token", "--json").stdout)["token"]
        with server.client() as client:
            response = client.post(
                "/.well-known/est/simpleenroll",
                content=base64.encodebytes(csr_der("dev-1")[0]),
                headers={"content-type": "application/pkcs10", "authorization": f"Bearer {token}"},
            )
        assert response.status_code == 200, response.text
    finally:
        server.stop()


def test_a_key_without_its_certificate_gets_a_new_pair(tmp_path: Path) -> None:
    """A crash between writing the service key and its certificate leaves a pair no listener can load."""
    data_dir = tmp_path / "hub"
    initialise(data_dir, org="Acme", fleet_domain="fleet.acme.test", actor="test")
    with Hub.open(load_settings(data_dir)) as hub:
        hub.run_jobs()
        before = _leaf(data_dir / SERVICE_CERT_FILE)
        stray = ec.generate_private_key(ec.SECP256R1())
        (data_dir / "keys" / "service.key.pem").write_bytes(
            stray.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        assert "service" in hub.run_jobs()
        after = _leaf(data_dir / SERVICE_CERT_FILE)
        assert after.serial_number != before.serial_number
        assert hub.run_jobs() == []
