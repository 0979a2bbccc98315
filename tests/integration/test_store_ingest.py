"""Storage of the ingest (device activity, totals), restrictions, a device's enrollment group and a group's flood
limit, against real databases: SQLite (WAL) and the machine's PostgreSQL server (a fresh database per test)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from warden.broker import DeviceActivity, IngestStats, IngestUnitOfWork, MetricSummary
from warden.provisioning import EnrollmentGroup, IdField
from warden.registry import Device, DeviceState, RegistryUnitOfWork, Restriction
from warden.store import Database, UnitOfWork

T0 = dt.datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)


def _as_ingest(uow: UnitOfWork) -> IngestUnitOfWork:
    """Static check (mypy): the unit of work implements the broker's ingest protocol and the registry's."""
    return uow


def _as_registry(uow: UnitOfWork) -> RegistryUnitOfWork:
    return uow


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url: str = request.getfixturevalue("postgres_url") if request.param == "postgres" else f"sqlite:///{tmp_path}/w.db"
    database = Database(url)
    database.migrate()
    yield database
    database.dispose()


def _group(name: str, flood_limit: int | None) -> EnrollmentGroup:
    return EnrollmentGroup(
        name=name,
        ca_pem="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        ca_fingerprints=("aa" * 32,),
        id_field=IdField.CN,
        profile="device",
        validity_days=None,
        tags={},
        enabled=True,
        allow=frozenset(),
        deny=frozenset(),
        created_at=T0,
        updated_at=T0,
        flood_limit=flood_limit,
    )


def test_device_limits_follow_the_enrollment_group_a_device_onboarded_through(db: Database) -> None:
    with db.transaction() as uow:
        uow.enrollment_groups.insert(_group("line-1", 5))
        uow.enrollment_groups.insert(_group("line-2", None))
        uow.devices.insert(Device("dev-a", "dev-a", DeviceState.ACTIVE, T0, T0, enrollment_group="line-1"))
        uow.devices.insert(Device("dev-b", "dev-b", DeviceState.ACTIVE, T0, T0, enrollment_group="line-2"))
        uow.devices.insert(Device("dev-c", "dev-c", DeviceState.ACTIVE, T0, T0))
        uow.devices.insert(Device("dev-d", "dev-d", DeviceState.PENDING, T0, T0))
        uow.devices.set_enrollment_group("dev-d", "line-1", T0)
    with db.transaction(readonly=True) as uow:
        assert uow.ingest.device_limits(["dev-a", "dev-b", "dev-c", "dev-d", "ghost"]) == {
            "dev-a": 5.0,
            "dev-b": None,
            "dev-c": None,
            "dev-d": 5.0,
        }
        assert uow.devices.get("dev-d") is not None
        assert uow.devices.get("dev-d").enrollment_group == "line-1"  # type: ignore[union-attr]
        many = [f"x-{i}" for i in range(1200)]
        assert uow.ingest.device_limits(many) == {}  # chunked IN lists
    with db.transaction() as uow:
        uow.enrollment_groups.set_flood_limit("line-2", 200, T0)
        assert uow.enrollment_groups.get("line-2").flood_limit == 200  # type: ignore[union-attr]
        assert uow.ingest.device_limits(["dev-b"]) == {"dev-b": 200.0}


def test_activity_round_trips_and_is_replaced(db: Database) -> None:
    with db.transaction() as uow:
        uow.devices.insert(Device("dev-a", "dev-a", DeviceState.ACTIVE, T0, T0))
        uow.devices.insert(Device("dev-b", "dev-b", DeviceState.ACTIVE, T0, T0))
    first = DeviceActivity(
        device_id="dev-a",
        first_seen=T0,
        last_seen=T0,
        telemetry=3,
        seq=2**62,
        seq_time=T0,
        metrics={"temperature": MetricSummary(3, 20.5, -1.25, 1e300)},
        health_status="degraded",
        health_checks={"disk": "full"},
        health_at=T0,
        malformed=1,
        last_malformed_reason="malformed telemetry message: seq: Field required",
        last_malformed_at=T0,
    )
    bare = DeviceActivity(device_id="dev-b", first_seen=T0, last_seen=T0, last_event_type="x.y", last_event_at=T0)
    with db.transaction() as uow:
        uow.ingest.save_activity([first, bare], [])
    with db.transaction(readonly=True) as uow:
        assert uow.ingest.activity(["dev-a", "dev-b", "dev-c"]) == {"dev-a": first, "dev-b": bare}
        assert uow.ingest.sequence_heads(10) == {"dev-a": (2**62, T0)}
    later = T0 + dt.timedelta(hours=1)
    changed = DeviceActivity(device_id="dev-a", first_seen=T0, last_seen=later, telemetry=4, duplicates=2)
    with db.transaction() as uow:
        uow.ingest.save_activity([], [changed])
    with db.transaction(readonly=True) as uow:
        assert uow.ingest.activity(["dev-a"])["dev-a"] == changed


def test_totals_add_up_batch_after_batch(db: Database) -> None:
    with db.transaction(readonly=True) as uow:
        assert uow.ingest.stats() == IngestStats()
    batches = [(100, T0), (700, T0 + dt.timedelta(seconds=1)), (50, T0 + dt.timedelta(seconds=2))]
    for size, at in batches:
        with db.transaction() as uow:
            uow.ingest.add_stats(
                IngestStats(
                    processed=size,
                    accepted=size - 3,
                    malformed=1,
                    duplicates=1,
                    unknown=1,
                    restricted=1,
                    flushes=1,
                    largest_batch=size,
                    last_batch=size,
                    last_flush_at=at,
                )
            )
    with db.transaction(readonly=True) as uow:
        stats = uow.ingest.stats()
    assert (stats.processed, stats.accepted, stats.malformed, stats.duplicates, stats.unknown) == (850, 841, 3, 3, 3)
    assert (stats.restricted, stats.flushes, stats.largest_batch, stats.last_batch) == (3, 3, 700, 50)
    assert stats.last_flush_at == batches[-1][1]


def test_restrictions_are_stored_found_and_expire(db: Database) -> None:
    with db.transaction() as uow:
        for device in ("dev-a", "dev-b", "dev-c"):
            uow.devices.insert(Device(device, device, DeviceState.ACTIVE, T0, T0))
    soon = Restriction("dev-a", T0, "flooding", "hub:ingest", T0 + dt.timedelta(minutes=15), {"rate": 61.5})
    forever = Restriction("dev-b", T0, "flooding", "hub:ingest")
    with db.transaction() as uow:
        uow.restrictions.put(soon)
        uow.restrictions.put(forever)
    with db.transaction(readonly=True) as uow:
        assert uow.restrictions.find() == [soon, forever]
        assert uow.restrictions.get("dev-c") is None
        assert uow.restrictions.expired(T0 + dt.timedelta(minutes=14)) == []
        assert uow.restrictions.expired(T0 + dt.timedelta(minutes=15)) == [soon]
    replaced = Restriction("dev-a", T0, "by hand", "cli:root")
    with db.transaction() as uow:
        uow.restrictions.put(replaced)
        uow.restrictions.delete("dev-b")
    with db.transaction(readonly=True) as uow:
        assert uow.restrictions.find() == [replaced]


def test_the_ingest_schema_can_be_removed_and_recreated(db: Database) -> None:
    with db.transaction() as uow:
        uow.devices.insert(Device("dev-a", "dev-a", DeviceState.ACTIVE, T0, T0, enrollment_group="g"))
    db.drop_schema()
    assert db.current_revision() is None
    db.migrate()
    with db.transaction(readonly=True) as uow:
        assert uow.ingest.stats() == IngestStats()
        assert uow.restrictions.find() == []
