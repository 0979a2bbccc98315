"""The registry, the audit log and the CA use cases against real databases: SQLite (WAL) and the machine's
PostgreSQL server (a fresh database per test)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from tests.conftest import make_csr
from warden.core import (
    AlreadyExistsError,
    AuditIntegrityError,
    IllegalTransitionError,
    IssuanceRefusedError,
    NotFoundError,
)
from warden.hub import Hub
from warden.pki import RevocationReason
from warden.registry import CertificateStatus, DeviceState
from warden.store import SCHEMA_REVISION
from warden.store._tables import metadata


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def hub(request: pytest.FixtureRequest, hub_factory: Callable[..., Hub]) -> Iterator[Hub]:
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        yield hub_factory(database_url=url)
    else:
        yield hub_factory()


def audit_actions(hub: Hub) -> list[tuple[str, str, str]]:
    with hub.db.transaction(readonly=True) as uow:
        return [(r.action, r.target, r.outcome) for r in uow.audit.records()]


def test_migrated_schema_matches_tables(hub: Hub) -> None:
    with hub.db.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), metadata)
    assert diff == []


def test_schema_revision_is_alembics_head(hub: Hub) -> None:
    assert hub.db.head_revision() == SCHEMA_REVISION
    assert hub.db.current_revision() == SCHEMA_REVISION
    assert hub.db.revision() == SCHEMA_REVISION


def test_devices_groups_and_filters(hub: Hub) -> None:
    hub.devices.add_group("sensors", actor="t", description="temperature sensors")
    hub.devices.add_group("berlin", actor="t")
    hub.devices.add_device("s-1", actor="t", groups=["sensors", "berlin"], tags={"site": "berlin", "hw": "v2"})
    hub.devices.add_device("s-2", actor="t", groups=["sensors"], tags={"site": "paris"})
    hub.devices.add_device("g-1", actor="t", display_name="Gateway 1")
    assert [d.id for d in hub.devices.list_devices(group="sensors")] == ["s-1", "s-2"]
    assert [d.id for d in hub.devices.list_devices(tags={"site": "berlin"})] == ["s-1"]
    assert [d.id for d in hub.devices.list_devices(tags={"site": "berlin", "hw": "v1"})] == []
    assert [d.id for d in hub.devices.list_devices(state=DeviceState.PENDING, limit=2)] == ["g-1", "s-1"]
    assert [d.id for d in hub.devices.list_devices(after="g-1")] == ["s-1", "s-2"]
    device = hub.devices.get_device("s-1")
    assert device.groups == ("berlin", "sensors")
    assert dict(device.tags) == {"hw": "v2", "site": "berlin"}
    assert device.display_name == "s-1"
    assert hub.devices.get_group("sensors")[1] == 2


def test_bad_registrations_leave_nothing(hub: Hub) -> None:
    hub.devices.add_device("d-1", actor="t")
    before = audit_actions(hub)
    with pytest.raises(AlreadyExistsError):
        hub.devices.add_device("d-1", actor="t")
    with pytest.raises(NotFoundError, match="no group named 'nope'"):
        hub.devices.add_device("d-2", actor="t", groups=["nope"])
    with pytest.raises(AlreadyExistsError):
        hub.devices.add_group("g", actor="t") and hub.devices.add_group("g", actor="t")
    assert [d.id for d in hub.devices.list_devices()] == ["d-1"]
    assert audit_actions(hub) == [*before, ("group.add", "group:g", "success")]


def test_state_machine_is_enforced_and_audited(hub: Hub) -> None:
    hub.devices.add_device("d-1", actor="t")
    with pytest.raises(IllegalTransitionError):
        hub.devices.change_state("d-1", DeviceState.DISABLED, actor="t")
    hub.certificates.sign(device_id="d-1", csr=make_csr(), actor="t")
    assert hub.devices.get_device("d-1").state is DeviceState.ACTIVE
    hub.devices.change_state("d-1", DeviceState.QUARANTINED, actor="t", reason="suspicious")
    with pytest.raises(IllegalTransitionError):
        hub.devices.change_state("d-1", DeviceState.DISABLED, actor="t")
    with pytest.raises(IssuanceRefusedError, match="quarantined"):
        hub.certificates.sign(device_id="d-1", csr=make_csr(), actor="t")
    hub.devices.change_state("d-1", DeviceState.ACTIVE, actor="t")
    hub.devices.change_state("d-1", DeviceState.DECOMMISSIONED, actor="t", reason="end of life")
    with pytest.raises(IllegalTransitionError):
        hub.devices.change_state("d-1", DeviceState.ACTIVE, actor="t")
    certs = hub.certificates.find(device_id="d-1")
    assert [c.status for c in certs] == [CertificateStatus.REVOKED]
    assert certs[0].revocation_reason == "cessationOfOperation"
    device_actions = [a for a in audit_actions(hub) if a[1] == "device:d-1"]
    assert device_actions == [
        ("device.add", "device:d-1", "success"),
        ("certificate.issue", "device:d-1", "success"),
        ("device.state", "device:d-1", "success"),
        ("device.state", "device:d-1", "success"),
        ("certificate.issue", "device:d-1", "denied"),
        ("device.state", "device:d-1", "success"),
        ("device.state", "device:d-1", "success"),
        ("certificate.revoke", "device:d-1", "success"),
    ]


def test_renewal_rekeys_and_can_supersede(hub: Hub) -> None:
    hub.devices.add_device("d-1", actor="t")
    with pytest.raises(IssuanceRefusedError, match="only active devices renew"):
        hub.certificates.renew(device_id="d-1", csr=make_csr(), actor="t")
    csr = make_csr()
    first = hub.certificates.sign(device_id="d-1", csr=csr, actor="t")
    with pytest.raises(IssuanceRefusedError, match="re-key"):
        hub.certificates.renew(device_id="d-1", csr=csr, actor="t")
    second = hub.certificates.renew(device_id="d-1", csr=make_csr(), actor="t", revoke_superseded=True)
    assert second.record.serial != first.record.serial
    statuses = {c.serial: (c.status, c.revocation_reason) for c in hub.certificates.find(device_id="d-1")}
    assert statuses[first.record.serial] == (CertificateStatus.REVOKED, "superseded")
    assert statuses[second.record.serial] == (CertificateStatus.GOOD, None)
    # A revoked certificate's key is never certified again, even where same-key renewal is allowed.
    with pytest.raises(IssuanceRefusedError, match="revoked certificate"):
        hub.certificates.renew(device_id="d-1", csr=csr, actor="t")


def test_revocation_and_crl_numbers(hub: Hub) -> None:
    hub.devices.add_device("d-1", actor="t")
    issued = hub.certificates.sign(device_id="d-1", csr=make_csr(), actor="t")
    hub.certificates.revoke(issued.record.serial, reason=RevocationReason.KEY_COMPROMISE, actor="t")
    with pytest.raises(IllegalTransitionError, match="already revoked"):
        hub.certificates.revoke(issued.record.serial, reason=RevocationReason.KEY_COMPROMISE, actor="t")
    with pytest.raises(NotFoundError):
        hub.certificates.revoke(12345, reason=RevocationReason.KEY_COMPROMISE, actor="t")
    first = hub.certificates.issue_crl(actor="t")
    second = hub.certificates.issue_crl(actor="t")
    revoked = first.get_revoked_certificate_by_serial_number(issued.record.serial)
    assert revoked is not None
    numbers = [_crl_number(c) for c in (first, second)]
    assert numbers[1] == numbers[0] + 1


def _crl_number(crl: object) -> int:
    from cryptography import x509

    assert isinstance(crl, x509.CertificateRevocationList)
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_concurrent_writers_never_fork_the_chain(hub: Hub) -> None:
    errors: list[BaseException] = []
    crl_numbers: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        try:
            for i in range(12):
                hub.devices.add_device(f"w{n}-{i}", actor=f"worker-{n}")
            crl = hub.certificates.issue_crl(actor=f"worker-{n}")
            with lock:
                crl_numbers.append(_crl_number(crl))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with hub.db.transaction(readonly=True) as uow:
        report = hub.audit.verify(uow)
        seqs = [r.seq for r in uow.audit.records()]
    assert seqs == list(range(1, len(seqs) + 1))
    assert report.records == len(seqs) >= 6 * 13
    assert sorted(crl_numbers) == list(range(min(crl_numbers), min(crl_numbers) + 6))


def test_tampering_in_the_database_is_detected(hub: Hub) -> None:
    for i in range(5):
        hub.devices.add_device(f"d-{i}", actor="t")
    with hub.db.transaction() as uow:
        hub.audit.checkpoint(uow)
    with hub.db.engine.begin() as connection:
        connection.execute(text("UPDATE audit_log SET actor = 'mallory' WHERE seq = 4"))
    with pytest.raises(AuditIntegrityError, match="record 4 was altered"), hub.db.transaction(readonly=True) as uow:
        hub.audit.verify(uow)


def test_automatic_checkpoints(hub_factory: Callable[..., Hub], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARDEN_AUDIT_CHECKPOINT_EVERY", "5")
    hub = hub_factory()
    for i in range(12):
        hub.devices.add_device(f"d-{i}", actor="t")
    with hub.db.transaction(readonly=True) as uow:
        checkpoints = uow.audit.checkpoints()
        report = hub.audit.verify(uow)
    assert len(checkpoints) >= 2
    assert report.last_checkpoint_seq == checkpoints[-1].seq
    mirrored = (hub.settings.data_dir / "audit" / "checkpoints.jsonl").read_text().splitlines()
    assert len(mirrored) == len(checkpoints)


def test_issued_records_read_back_exactly(hub: Hub) -> None:
    hub.devices.add_device("d-1", actor="t")
    issued = hub.certificates.sign(device_id="d-1", csr=make_csr(), actor="t")
    assert hub.certificates.get(issued.record.serial) == issued.record
    with hub.db.transaction(readonly=True) as uow:
        last = list(uow.audit.records())[-2]
        report = hub.audit.verify(uow)
    assert last.details["serial"] == issued.record.serial_hex
    assert report.records >= 2
