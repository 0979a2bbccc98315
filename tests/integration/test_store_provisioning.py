"""Storage of provisioning (enrollment groups, enrollments, re-onboarding), API tokens and published CRLs, and the
leader locks, against real databases: SQLite (WAL) and the machine's PostgreSQL server (a fresh database per test)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from warden.core import AlreadyExistsError
from warden.policy import ApiToken, Role
from warden.policy._ports import PolicyUnitOfWork
from warden.provisioning import (
    EnrollmentGroup,
    EnrollmentKind,
    EnrollmentStatus,
    IdField,
    IndividualEnrollment,
    Reonboarding,
)
from warden.provisioning._ports import ProvisioningUnitOfWork
from warden.registry import Device, DeviceState, PublishedCrl
from warden.store import Database, UnitOfWork

T0 = dt.datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)


def _as_provisioning(uow: UnitOfWork) -> ProvisioningUnitOfWork:
    """Static check (mypy): the unit of work implements provisioning's and the policy context's protocols."""
    return uow


def _as_policy(uow: UnitOfWork) -> PolicyUnitOfWork:
    return uow


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return f"sqlite:///{tmp_path / 'warden.db'}"


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.migrate()
    yield database
    database.dispose()


def _add_devices(db: Database, *ids: str) -> None:
    with db.transaction() as uow:
        for device_id in ids:
            uow.devices.insert(Device(device_id, device_id, DeviceState.PENDING, T0, T0))


def _group(name: str = "acme-line-1", **changes: object) -> EnrollmentGroup:
    values: dict[str, object] = {
        "name": name,
        "ca_pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        "ca_fingerprints": ("bb" * 32, "aa" * 32),
        "id_field": IdField.SERIAL_NUMBER,
        "profile": "device",
        "validity_days": 90,
        "tags": {"site": "berlin", "line": "1"},
        "enabled": True,
        "allow": frozenset({"d-2", "d-1"}),
        "deny": frozenset({"d-9"}),
        "created_at": T0,
        "updated_at": T0,
    }
    values.update(changes)
    return EnrollmentGroup(**values)  # type: ignore[arg-type]


def _enrollment(enrollment_id: str, device_id: str, **changes: object) -> IndividualEnrollment:
    values: dict[str, object] = {
        "id": enrollment_id,
        "device_id": device_id,
        "kind": EnrollmentKind.CERTIFICATE,
        "status": EnrollmentStatus.ACTIVE,
        "profile": "device",
        "validity_days": None,
        "created_at": T0,
        "certificate_fingerprint": enrollment_id.ljust(64, "0"),
        "certificate_pem": f"PEM {enrollment_id}",
    }
    values.update(changes)
    return IndividualEnrollment(**values)  # type: ignore[arg-type]


def _token(enrollment_id: str, device_id: str) -> IndividualEnrollment:
    return _enrollment(
        enrollment_id,
        device_id,
        kind=EnrollmentKind.TOKEN,
        certificate_fingerprint=None,
        certificate_pem=None,
        token_mac="ab" * 32,
        expires_at=T0 + dt.timedelta(hours=1),
    )


# -- devices ------------------------------------------------------------------------------------------------------


def test_device_by_onboarding_fingerprint(db: Database) -> None:
    _add_devices(db, "d-1", "d-2")
    with db.transaction() as uow:
        uow.devices.set_onboarding_fingerprint("d-2", "cd" * 32, T0)
    with db.transaction(readonly=True) as uow:
        found = uow.devices.by_onboarding("cd" * 32)
        assert found is not None
        assert found.id == "d-2"
        assert found.onboarding_fingerprint == "cd" * 32
        assert uow.devices.by_onboarding("ef" * 32) is None


# -- CRLs ---------------------------------------------------------------------------------------------------------


def test_crls_latest_is_the_highest_number(db: Database) -> None:
    with db.transaction(readonly=True) as uow:
        assert uow.crls.latest() is None
        assert uow.crls.latest_number() is None
    crls = {
        n: PublishedCrl(n, T0 + dt.timedelta(hours=n), T0 + dt.timedelta(days=n), bytes([n, 0, 255]), n * 3)
        for n in (2, 10, 3)
    }
    for crl in crls.values():
        with db.transaction() as uow:
            uow.crls.publish(crl)
    with db.transaction(readonly=True) as uow:
        assert uow.crls.latest() == crls[10]
        assert uow.crls.latest_number() == 10
    with pytest.raises(AlreadyExistsError), db.transaction() as uow:
        uow.crls.publish(crls[3])


# -- enrollment groups --------------------------------------------------------------------------------------------


def test_enrollment_group_round_trip(db: Database) -> None:
    group = _group()
    with db.transaction() as uow:
        uow.enrollment_groups.insert(group)
        uow.enrollment_groups.insert(_group("other", enabled=False, validity_days=None, allow=frozenset(), tags={}))
    with db.transaction(readonly=True) as uow:
        assert uow.enrollment_groups.get("acme-line-1") == group
        assert uow.enrollment_groups.get("nope") is None
        assert [g.name for g in uow.enrollment_groups.find()] == ["acme-line-1", "other"]
        assert [g.name for g in uow.enrollment_groups.find(enabled=True)] == ["acme-line-1"]
        assert [g.name for g in uow.enrollment_groups.find(enabled=False)] == ["other"]
        other = uow.enrollment_groups.get("other")
    assert other is not None
    assert other.validity_days is None
    assert other.allow == frozenset()
    assert other.enabled is False
    with pytest.raises(AlreadyExistsError, match="exists already"), db.transaction() as uow:
        uow.enrollment_groups.insert(_group())


def test_enrollment_group_version_changes_on_add_and_enable(db: Database) -> None:
    def version() -> str:
        with db.transaction(readonly=True) as uow:
            return uow.enrollment_groups.version()

    seen = [version()]
    with db.transaction() as uow:
        uow.enrollment_groups.insert(_group())
    seen.append(version())
    later = T0 + dt.timedelta(minutes=5)
    with db.transaction() as uow:
        uow.enrollment_groups.set_enabled("acme-line-1", False, later)
    seen.append(version())
    with db.transaction() as uow:
        uow.enrollment_groups.set_enabled("acme-line-1", True, later)
    seen.append(version())
    assert len(set(seen)) == 4
    with db.transaction(readonly=True) as uow:
        group = uow.enrollment_groups.get("acme-line-1")
    assert group is not None
    assert group.enabled is True
    assert group.updated_at == later

    # Nothing changed (an unknown group, a rolled-back insert): the version stays.
    with db.transaction() as uow:
        uow.enrollment_groups.set_enabled("nope", False, later)

    def insert_then_fail() -> None:
        with db.transaction() as uow:
            uow.enrollment_groups.insert(_group("rolled-back"))
            raise RuntimeError("abort")

    with pytest.raises(RuntimeError, match="abort"):
        insert_then_fail()
    assert version() == seen[-1]


# -- individual enrollments ---------------------------------------------------------------------------------------


def test_enrollment_round_trip_and_duplicates(db: Database) -> None:
    _add_devices(db, "d-1")
    certificate = _enrollment("e-1", "d-1", validity_days=30)
    token = _token("e-2", "d-1")
    with db.transaction() as uow:
        uow.enrollments.insert(certificate)
        uow.enrollments.insert(token)
    with db.transaction(readonly=True) as uow:
        assert uow.enrollments.get("e-1") == certificate
        stored_token = uow.enrollments.get("e-2")
        assert stored_token == token
        assert uow.enrollments.get("e-3") is None
    assert stored_token is not None
    assert stored_token.token_mac == "ab" * 32
    with pytest.raises(AlreadyExistsError), db.transaction() as uow:
        uow.enrollments.insert(_enrollment("e-1", "d-1"))


def test_enrollment_find_paginates_by_id(db: Database) -> None:
    _add_devices(db, "d-1", "d-2")
    ids = [f"e-{i:02d}" for i in range(7)]
    with db.transaction() as uow:
        for i, enrollment_id in enumerate(reversed(ids)):
            uow.enrollments.insert(_enrollment(enrollment_id, "d-1" if i % 2 else "d-2"))
        uow.enrollments.set_status("e-03", EnrollmentStatus.REVOKED, T0)
    pages: list[list[str]] = []
    after: str | None = None
    while True:
        with db.transaction(readonly=True) as uow:
            page = [e.id for e in uow.enrollments.find(limit=3, after=after)]
        if not page:
            break
        pages.append(page)
        after = page[-1]
    assert pages == [ids[0:3], ids[3:6], ids[6:]]
    with db.transaction(readonly=True) as uow:
        d1 = [e.id for e in uow.enrollments.find(device_id="d-1")]
        assert d1 == sorted(d1)
        assert len(d1) == 3
        assert [e.id for e in uow.enrollments.find(status=EnrollmentStatus.REVOKED)] == ["e-03"]
        assert [e.id for e in uow.enrollments.find(status=EnrollmentStatus.ACTIVE, after="e-02", limit=2)] == [
            "e-04",
            "e-05",
        ]


def test_enrollment_status_and_active_queries(db: Database) -> None:
    _add_devices(db, "d-1", "d-2")
    with db.transaction() as uow:
        uow.enrollments.insert(_enrollment("e-1", "d-1"))
        uow.enrollments.insert(_enrollment("e-2", "d-1", certificate_fingerprint="ff" * 32, certificate_pem="PEM ff"))
        uow.enrollments.insert(_token("e-3", "d-1"))
        uow.enrollments.insert(_enrollment("e-4", "d-2"))
    fingerprint = "e-1".ljust(64, "0")
    with db.transaction(readonly=True) as uow:
        found = uow.enrollments.by_certificate(fingerprint)
        assert found is not None
        assert found.id == "e-1"
        assert [e.id for e in uow.enrollments.active_for_device("d-1")] == ["e-1", "e-2", "e-3"]
        assert uow.enrollments.active_certificates() == ["PEM e-1", "PEM ff", "PEM e-4"]

    used_at, revoked_at = T0 + dt.timedelta(minutes=1), T0 + dt.timedelta(minutes=2)
    with db.transaction() as uow:
        uow.enrollments.set_status("e-1", EnrollmentStatus.USED, used_at)
        uow.enrollments.set_status("e-3", EnrollmentStatus.REVOKED, revoked_at)
    with db.transaction(readonly=True) as uow:
        e1, e3 = uow.enrollments.get("e-1"), uow.enrollments.get("e-3")
        assert e1 is not None
        assert (e1.status, e1.used_at, e1.revoked_at) == (EnrollmentStatus.USED, used_at, None)
        assert e3 is not None
        assert (e3.status, e3.used_at, e3.revoked_at) == (EnrollmentStatus.REVOKED, None, revoked_at)
        # Only active certificate enrollments are found by fingerprint.
        assert uow.enrollments.by_certificate(fingerprint) is None
        assert [e.id for e in uow.enrollments.active_for_device("d-1")] == ["e-2"]
        assert uow.enrollments.active_certificates() == ["PEM ff", "PEM e-4"]

    # A new enrollment for the same onboarding certificate is found once the old one is no longer active.
    with db.transaction() as uow:
        uow.enrollments.insert(_enrollment("e-5", "d-1", certificate_fingerprint=fingerprint))
    with db.transaction(readonly=True) as uow:
        again = uow.enrollments.by_certificate(fingerprint)
    assert again is not None
    assert again.id == "e-5"


def test_certificates_version_tracks_certificate_enrollments_only(db: Database) -> None:
    _add_devices(db, "d-1")

    def version() -> str:
        with db.transaction(readonly=True) as uow:
            return uow.enrollments.certificates_version()

    start = version()
    with db.transaction() as uow:
        uow.enrollments.insert(_token("t-1", "d-1"))
    with db.transaction() as uow:
        uow.enrollments.set_status("t-1", EnrollmentStatus.USED, T0)
    assert version() == start

    with db.transaction() as uow:
        uow.enrollments.insert(_enrollment("e-1", "d-1"))
    added = version()
    assert added != start
    with db.transaction() as uow:
        uow.enrollments.set_status("e-1", EnrollmentStatus.REVOKED, T0)
    revoked = version()
    assert revoked not in (start, added)
    with db.transaction() as uow:  # no change, no new version
        uow.enrollments.set_status("e-1", EnrollmentStatus.REVOKED, T0)
        uow.enrollments.set_status("nope", EnrollmentStatus.REVOKED, T0)
    assert version() == revoked


# -- re-onboarding ------------------------------------------------------------------------------------------------


def test_reonboarding_put_replaces_and_delete_removes(db: Database) -> None:
    _add_devices(db, "d-1")
    first = Reonboarding("d-1", T0, "token:abc", T0 + dt.timedelta(hours=1), "identity lost")
    second = Reonboarding("d-1", T0 + dt.timedelta(minutes=3), "token:def", T0 + dt.timedelta(hours=2), "again")
    with db.transaction() as uow:
        assert uow.reonboarding.get("d-1") is None
        uow.reonboarding.put(first)
    with db.transaction() as uow:
        assert uow.reonboarding.get("d-1") == first
        uow.reonboarding.put(second)
    with db.transaction() as uow:
        assert uow.reonboarding.get("d-1") == second
        uow.reonboarding.delete("d-1")
        uow.reonboarding.delete("d-1")
    with db.transaction(readonly=True) as uow:
        assert uow.reonboarding.get("d-1") is None


# -- API tokens ---------------------------------------------------------------------------------------------------


def test_api_tokens(db: Database) -> None:
    admin = ApiToken("tok-b", "ci", Role.SECURITY_ADMIN, T0, T0 + dt.timedelta(days=30), "cli:root")
    viewer = ApiToken("tok-a", "dashboard", Role.VIEWER, T0 + dt.timedelta(seconds=1), T0 + dt.timedelta(days=1), "t")
    with db.transaction() as uow:
        uow.tokens.insert(admin, "11" * 32)
        uow.tokens.insert(viewer, "22" * 32)
    with db.transaction(readonly=True) as uow:
        assert uow.tokens.get("tok-b") == (admin, "11" * 32)
        assert uow.tokens.get("nope") is None
        assert uow.tokens.find() == [admin, viewer]
    with pytest.raises(AlreadyExistsError), db.transaction() as uow:
        uow.tokens.insert(admin, "33" * 32)

    revoked_at = T0 + dt.timedelta(hours=1)
    with db.transaction() as uow:
        uow.tokens.revoke("tok-b", revoked_at)
    with db.transaction() as uow:
        uow.tokens.revoke("tok-b", revoked_at + dt.timedelta(hours=1))  # keeps the first revocation time
    with db.transaction(readonly=True) as uow:
        stored = uow.tokens.get("tok-b")
    assert stored is not None
    assert stored[0].revoked_at == revoked_at
    assert not stored[0].usable(revoked_at)


# -- migrations ---------------------------------------------------------------------------------------------------


def test_schema_can_be_removed_and_recreated(db: Database) -> None:
    db.drop_schema()
    assert db.current_revision() is None
    db.migrate()
    with db.transaction(readonly=True) as uow:
        assert uow.enrollment_groups.version() == "0"
        assert uow.enrollments.certificates_version() == "0"
        assert uow.crls.latest_number() is None


# -- leader locks -------------------------------------------------------------------------------------------------


def test_leader_lock_is_exclusive_until_released(db: Database) -> None:
    first = db.try_leader_lock("crl-publisher")
    assert first is not None
    assert first.held
    assert db.try_leader_lock("crl-publisher") is None
    other = db.try_leader_lock("expiry-sweeper")
    assert other is not None
    first.release()
    first.release()
    assert not first.held
    second = db.try_leader_lock("crl-publisher")
    assert second is not None
    with second:
        assert second.held
        assert db.try_leader_lock("crl-publisher") is None
    assert not second.held
    assert db.try_leader_lock("crl-publisher") is not None
    other.release()


@pytest.mark.postgres
def test_advisory_lock_excludes_other_processes(postgres_url: str) -> None:
    one, two = Database(postgres_url), Database(postgres_url)
    try:
        one.migrate()
        lock = one.try_leader_lock("crl-publisher")
        assert lock is not None
        assert lock.held
        assert two.try_leader_lock("crl-publisher") is None
        assert two.try_leader_lock("crl-publisher") is None
        lock.release()
        taken = two.try_leader_lock("crl-publisher")
        assert taken is not None
        assert one.try_leader_lock("crl-publisher") is None

        # The holder's connection dies (server restart, network): the lock is gone, and it says so.
        with one.engine.connect() as connection:
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks "
                    "WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid() "
                    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                )
            )
        assert not taken.held
        regained = one.try_leader_lock("crl-publisher")
        assert regained is not None
        assert regained.held
    finally:
        one.dispose()
        two.dispose()


@pytest.mark.postgres
def test_dispose_releases_advisory_locks(postgres_url: str) -> None:
    one, two = Database(postgres_url), Database(postgres_url)
    try:
        assert one.try_leader_lock("sweeper") is not None
        assert two.try_leader_lock("sweeper") is None
        one.dispose()
        assert two.try_leader_lock("sweeper") is not None
    finally:
        one.dispose()
        two.dispose()
