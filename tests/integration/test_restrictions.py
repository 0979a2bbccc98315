"""Restrictions and flood limits in the hub itself (no broker running, so the broker is told nothing and the registry
alone is checked): restricting for flooding is recorded and audited once, a device's state wins over a restriction,
the cool-down lifts it, an operator lifts it from the CLI, and an enrollment group's flood limit reaches the devices
that onboarded through it. tests/integration/test_hub_ingest.py does the same against a running broker."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import Cli
from tests.hubserver import ManufacturerCA, csr_der
from warden.broker import Access, Flood
from warden.core import FixedClock, IllegalTransitionError, InvalidInputError, NotFoundError, load_settings
from warden.hub import Hub, initialise
from warden.registry import DeviceState


def floods(*devices: str) -> list[Flood]:
    return [Flood(d, rate=61.5, limit=50.0, window=10.0, messages=615) for d in devices]


def audit_actions(hub: Hub, action: str) -> list[dict[str, object]]:
    with hub.db.transaction(readonly=True) as uow:
        return [r.to_json() for r in uow.audit.records() if r.action == action]


def test_flooding_devices_are_restricted_once_and_audited(hub_factory: Callable[..., Hub]) -> None:
    hub = hub_factory()
    for device in ("dev-a", "dev-b"):
        hub.devices.add_device(device, actor="test")
    assert hub.restrict_for_flooding(floods("dev-a", "dev-b", "ghost")) == 2
    assert hub.restrict_for_flooding(floods("dev-a")) == 0  # restricted already: no second record
    restriction = hub.devices.get_restriction("dev-a")
    assert restriction is not None
    assert (restriction.reason, restriction.actor) == ("flooding", "hub:ingest")
    assert restriction.details == {"rate": 61.5, "limit": 50.0, "window_seconds": 10.0, "messages": 615}
    assert restriction.until == restriction.since + dt.timedelta(seconds=hub.settings.ingest_flood_cooldown_seconds)
    records = audit_actions(hub, "device.restricted")
    assert [r["target"] for r in records] == ["device:dev-a", "device:dev-b"]
    details = records[0]["details"]
    assert isinstance(details, dict)
    assert (details["rate"], details["limit"], details["window_seconds"]) == (61.5, 50.0, 10.0)


def test_a_stricter_state_wins_over_a_restriction(hub_factory: Callable[..., Hub]) -> None:
    hub = hub_factory()
    for device in ("dev-a", "dev-b", "dev-c"):
        hub.devices.add_device(device, actor="test")
        hub.devices.change_state(device, DeviceState.ACTIVE, actor="test")
    hub.devices.change_state("dev-b", DeviceState.QUARANTINED, actor="test")
    hub.devices.change_state("dev-c", DeviceState.DISABLED, actor="test")
    hub.restrict_for_flooding(floods("dev-a", "dev-b", "dev-c"))
    assert hub.broker_exceptions() == {
        "dev-a": Access.RESTRICTED,
        "dev-b": Access.QUARANTINED,
        "dev-c": Access.DISABLED,
    }
    # Released from quarantine, the device keeps its restriction.
    hub.devices.change_state("dev-b", DeviceState.ACTIVE, actor="test")
    assert hub.broker_exceptions()["dev-b"] is Access.RESTRICTED
    assert hub.devices.access_view("dev-b") == (DeviceState.ACTIVE, True)


def test_the_cool_down_lifts_a_restriction(tmp_path: Path) -> None:
    initialise(tmp_path / "hub", org="Acme Test", fleet_domain="fleet.acme.test", actor="test")
    clock = FixedClock(dt.datetime(2030, 1, 2, tzinfo=dt.UTC))
    settings = load_settings(tmp_path / "hub", ingest_flood_cooldown_seconds=600)
    with Hub.open(settings, clock=clock) as hub:
        hub.devices.add_device("dev-a", actor="test")
        hub.restrict_for_flooding(floods("dev-a"))
        clock.advance(dt.timedelta(seconds=599))
        assert hub.lift_expired_restrictions() == []
        clock.advance(dt.timedelta(seconds=1))
        assert "dev-a unrestricted (cool-down over)" in hub.run_jobs()
        assert hub.devices.get_restriction("dev-a") is None
        lifted = audit_actions(hub, "device.unrestricted")
        assert [(r["actor"], r["details"]["reason"]) for r in lifted] == [("hub", "cool-down over")]  # type: ignore[index]


def test_without_a_cool_down_only_an_operator_lifts_it(tmp_path: Path) -> None:
    initialise(tmp_path / "hub", org="Acme Test", fleet_domain="fleet.acme.test", actor="test")
    clock = FixedClock(dt.datetime(2030, 1, 2, tzinfo=dt.UTC))
    with Hub.open(load_settings(tmp_path / "hub", ingest_flood_cooldown_seconds=0), clock=clock) as hub:
        hub.devices.add_device("dev-a", actor="test")
        hub.restrict_for_flooding(floods("dev-a"))
        restriction = hub.devices.get_restriction("dev-a")
        assert restriction is not None
        assert restriction.until is None
        clock.advance(dt.timedelta(days=365))
        assert hub.lift_expired_restrictions() == []


def test_the_cli_shows_and_lifts_a_restriction(initialised_cli: Cli) -> None:
    cli = initialised_cli
    cli.ok("device", "add", "dev-a")
    with Hub.open(load_settings(cli.data_dir)) as hub:
        hub.restrict_for_flooding(floods("dev-a"))
    shown = json.loads(cli.ok("device", "show", "dev-a", "--json"))
    assert shown["restriction"]["reason"] == "flooding"
    assert shown["restriction"]["details"]["rate"] == 61.5
    assert (shown["activity"], shown["last_seen"]) == (None, None)
    text = cli.ok("device", "show", "dev-a")
    assert "RESTRICTED (flooding: limit 50.0, messages 615, rate 61.5, window_seconds 10.0) until 20" in text
    assert "warden device unrestrict dev-a" in text
    assert "last seen: never" in text
    status = json.loads(cli.ok("ingest", "status", "--json"))
    assert status["restricted_now"] == ["dev-a"]
    assert status["processed"] == 0
    assert "restricted now 1: dev-a" in cli.ok("ingest", "status")
    assert (
        cli.ok("device", "unrestrict", "dev-a", "--reason", "fixed").strip() == "device dev-a is no longer restricted"
    )
    again = cli("device", "unrestrict", "dev-a")
    assert again.code != 0
    assert "is not restricted" in again.err
    assert json.loads(cli.ok("device", "show", "dev-a", "--json"))["restriction"] is None
    with Hub.open(load_settings(cli.data_dir)) as hub:
        lifted = audit_actions(hub, "device.unrestricted")
    assert [r["details"]["reason"] for r in lifted] == ["fixed"]  # type: ignore[index]


def test_a_group_flood_limit_reaches_the_devices_enrolled_through_it(
    hub_factory: Callable[..., Hub], tmp_path: Path
) -> None:
    hub = hub_factory()
    maker = ManufacturerCA(tmp_path / "maker")
    hub.provisioning.add_group("line-1", ca_pem=maker.path.read_bytes(), actor="test", flood_limit=5)
    hub.provisioning.add_group("line-2", ca_pem=ManufacturerCA(tmp_path / "other").path.read_bytes(), actor="test")
    idevid = maker.idevid("dev-g")
    csr, _ = csr_der("dev-g")
    der = idevid.certificate.public_bytes(serialization.Encoding.DER)
    hub.provisioning.enroll_with_certificate(der, csr, source="127.0.0.1")
    hub.devices.add_device("dev-h", actor="test")
    assert hub.devices.get_device("dev-g").enrollment_group == "line-1"
    with hub.db.transaction(readonly=True) as uow:
        assert uow.ingest.device_limits(["dev-g", "dev-h"]) == {"dev-g": 5.0, "dev-h": None}
    group = hub.provisioning.set_group_flood_limit("line-1", 80, actor="test")
    assert group.flood_limit == 80
    with hub.db.transaction(readonly=True) as uow:
        assert uow.ingest.device_limits(["dev-g"]) == {"dev-g": 80.0}
    hub.provisioning.set_group_flood_limit("line-1", None, actor="test")
    assert hub.provisioning.get_group("line-1").flood_limit is None
    changes = audit_actions(hub, "enrollment-group.flood-limit")
    assert [r["details"] for r in changes] == [{"from": 5, "to": 80}, {"from": 80, "to": None}]
    for bad in (0, -1, 1_000_001, True):
        with pytest.raises(InvalidInputError):
            hub.provisioning.set_group_flood_limit("line-1", bad, actor="test")


def test_flood_limits_from_the_cli(initialised_cli: Cli, tmp_path: Path) -> None:
    cli = initialised_cli
    maker = ManufacturerCA(tmp_path / "maker")
    added = json.loads(
        cli.ok("enrollment", "group", "add", "line-1", "--ca", maker.path, "--flood-limit", "20", "--json")
    )
    assert added["flood_limit"] == 20
    assert cli.ok("enrollment", "group", "flood-limit", "line-1", "300").strip().endswith("flood limit 300 messages/s")
    assert json.loads(cli.ok("enrollment", "group", "show", "line-1", "--json"))["flood_limit"] == 300
    assert "the hub's default" in cli.ok("enrollment", "group", "flood-limit", "line-1", "default")
    for bad in ("0", "lots", "-5", "99999999"):
        result = cli("enrollment", "group", "flood-limit", "line-1", bad)
        assert result.code != 0, bad
    refused = cli("enrollment", "group", "add", "line-2", "--ca", maker.path, "--flood-limit", "0")
    assert refused.code != 0


def test_unrestricting_an_unknown_device_or_one_not_restricted_is_refused(hub_factory: Callable[..., Hub]) -> None:
    hub = hub_factory()
    hub.devices.add_device("dev-a", actor="test")
    with pytest.raises(IllegalTransitionError):
        hub.unrestrict_device("dev-a", actor="test")
    with pytest.raises(NotFoundError):
        hub.unrestrict_device("ghost", actor="test")
