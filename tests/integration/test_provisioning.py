"""Provisioning use cases on a real hub (no HTTP): onboarding through enrollment groups, individual certificate
enrollments and one-time tokens, the issuance gate's refusals and security events, re-onboarding, renewal, races
under group commit, and the CSV import/export. Every test runs on SQLite and on the machine's PostgreSQL server."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import make_csr
from tests.hubserver import Issued, ManufacturerCA, csr_der, self_signed
from warden.core import (
    AlreadyExistsError,
    AuthenticationError,
    CSRRejectedError,
    FixedClock,
    IllegalTransitionError,
    InvalidInputError,
    IssuanceRefusedError,
    NotFoundError,
    Token,
    WardenError,
)
from warden.hub import Hub
from warden.monitor import AuditRecord
from warden.pki import BACKDATE, RevocationReason
from warden.provisioning import (
    CONFLICT_EVENT,
    EnrollmentPlan,
    EnrollmentResult,
    EnrollmentStatus,
    token_fingerprint,
)
from warden.registry import CertificateRecord, CertificateStatus, DeviceState

FLEET = "fleet.acme.test"
SOURCE = "192.0.2.7"


# -- fixtures and helpers -----------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return ""


@dataclass
class Env:
    #: the hub under test, on a clock that stands still until advanced
    hub: Hub
    #: a second hub on the same data directory and database (its own caches, the system clock), standing in for
    #: another worker or an operator's CLI
    other: Hub
    clock: FixedClock
    maker: ManufacturerCA
    tmp: Path


@pytest.fixture
def env(database_url: str, hub_factory: Callable[..., Hub], tmp_path: Path) -> Iterator[Env]:
    other = hub_factory(database_url=database_url)
    clock = FixedClock(dt.datetime.now(dt.UTC))
    hub = Hub.open(other.settings, clock=clock)
    try:
        yield Env(hub=hub, other=other, clock=clock, maker=ManufacturerCA(tmp_path / "maker"), tmp=tmp_path)
    finally:
        hub.close()


@pytest.fixture
def gc_hub(database_url: str, hub_factory: Callable[..., Hub]) -> Hub:
    return hub_factory(database_url=database_url, group_commit=True)


def der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def fingerprint(certificate: x509.Certificate) -> str:
    return hashlib.sha256(der(certificate)).hexdigest()


def pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def audit(hub: Hub) -> list[AuditRecord]:
    with hub.db.transaction(readonly=True) as uow:
        return list(uow.audit.records())


def audit_count(hub: Hub) -> int:
    return len(audit(hub))


def records(hub: Hub, action: str, *, target: str | None = None, outcome: str | None = None) -> list[AuditRecord]:
    return [
        r
        for r in audit(hub)
        if r.action == action and (target is None or r.target == target) and (outcome is None or r.outcome == outcome)
    ]


def device_ids(hub: Hub) -> list[str]:
    return [d.id for d in hub.devices.list_devices()]


def device_certificates(hub: Hub, device_id: str | None = None) -> list[CertificateRecord]:
    return [c for c in hub.certificates.find(device_id=device_id) if c.device_id is not None]


def add_group(env: Env, name: str = "line-1", **options: object) -> None:
    env.hub.provisioning.add_group(name, ca_pem=pem(env.maker.certificate), actor="admin", **options)  # type: ignore[arg-type]


def onboard(
    hub: Hub, onboarding: Issued | x509.Certificate, device_id: str, *, key: ec.EllipticCurvePrivateKey | None = None
) -> EnrollmentResult:
    certificate = onboarding.certificate if isinstance(onboarding, Issued) else onboarding
    return hub.provisioning.enroll_with_certificate(der(certificate), csr_der(device_id, key)[0], source=SOURCE)


def with_token(hub: Hub, token: Token | str, device_id: str) -> EnrollmentResult:
    return hub.provisioning.enroll_with_token(str(token), csr_der(device_id)[0], source=SOURCE)


def lifetime(certificate: x509.Certificate) -> dt.timedelta:
    return certificate.not_valid_after_utc - certificate.not_valid_before_utc - BACKDATE


# -- onboarding through an enrollment group -----------------------------------------------------------------------


def test_onboarding_through_a_group(env: Env) -> None:
    add_group(env, tags={"site": "berlin", "line": "1"})
    idevid = env.maker.idevid("dev-1")
    result = onboard(env.hub, idevid, "dev-1")

    assert result.device_id == "dev-1"
    issuing, root = env.hub.ca_info().issuing, env.hub.ca_info().root
    assert result.chain == (issuing, root)
    certificate = result.issued.certificate
    certificate.verify_directly_issued_by(issuing)
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [f"dev-1.{FLEET}"]
    assert lifetime(certificate) == dt.timedelta(days=env.hub.settings.device_validity_days)

    device = env.hub.devices.get_device("dev-1")
    assert device.state is DeviceState.ACTIVE
    assert dict(device.tags) == {"site": "berlin", "line": "1"}
    assert device.onboarding_fingerprint == fingerprint(idevid.certificate)
    [record] = device_certificates(env.hub, "dev-1")
    assert record.serial == certificate.serial_number
    assert record.status is CertificateStatus.GOOD
    assert record.profile == "device"

    actions = [(r.action, r.outcome) for r in audit(env.hub) if r.target == "device:dev-1"]
    assert actions == [
        ("device.add", "success"),
        ("enrollment.enroll", "success"),
    ]
    [onboarded] = records(env.hub, "enrollment.enroll", outcome="success")
    assert onboarded.actor == "device:dev-1"
    assert onboarded.details["enrollment_group"] == "line-1"
    assert onboarded.details["method"] == "certificate"
    assert onboarded.details["source"] == SOURCE
    assert onboarded.details["onboarding"] == fingerprint(idevid.certificate)
    assert onboarded.details["serial"] == record.serial_hex


def test_onboarding_through_an_individual_certificate_enrollment(env: Env) -> None:
    # Self-signed, and its CN is not the device id: the enrollment names the device.
    idevid = self_signed(env.tmp, "factory-unit-77")
    enrollment = env.hub.provisioning.add_certificate_enrollment(
        "dev-2", certificate_pem=idevid.pem, actor="admin", profile="gateway", validity_days=20
    )
    assert env.hub.devices.get_device("dev-2").state is DeviceState.PENDING
    assert enrollment.certificate_fingerprint == fingerprint(idevid.certificate)

    result = onboard(env.hub, idevid, "dev-2")
    assert result.device_id == "dev-2"
    assert result.issued.record.profile == "gateway"
    assert lifetime(result.issued.certificate) == dt.timedelta(days=20)
    device = env.hub.devices.get_device("dev-2")
    assert device.state is DeviceState.ACTIVE
    assert device.onboarding_fingerprint == fingerprint(idevid.certificate)
    [onboarded] = records(env.hub, "enrollment.enroll", outcome="success", target="device:dev-2")
    assert onboarded.details["enrollment"] == enrollment.id
    assert "enrollment_group" not in onboarded.details
    assert device_ids(env.hub) == ["dev-2"]

    # A CSR for the certificate's CN is refused: the device id is the enrollment's.
    with pytest.raises(IssuanceRefusedError):
        onboard(env.hub, idevid, "factory-unit-77")


def test_an_untrusted_or_expired_onboarding_certificate_is_refused(env: Env) -> None:
    add_group(env)
    stranger = ManufacturerCA(env.tmp / "stranger", name="Someone Else CA").idevid("dev-1")
    with pytest.raises(IssuanceRefusedError, match="no enrollment group or individual enrollment"):
        onboard(env.hub, stranger, "dev-1")
    now = dt.datetime.now(dt.UTC)
    expired = env.maker.idevid("dev-1", not_before=now - dt.timedelta(days=10), not_after=now - dt.timedelta(days=1))
    with pytest.raises(IssuanceRefusedError, match="not valid now"):
        onboard(env.hub, expired, "dev-1")
    # An operational certificate of the hub is not an onboarding identity.
    onboard(env.hub, env.maker.idevid("dev-2"), "dev-2")
    operational = device_certificates(env.hub, "dev-2")[0]
    with pytest.raises(IssuanceRefusedError, match="simplereenroll"):
        onboard(env.hub, x509.load_pem_x509_certificate(operational.pem.encode()), "dev-2")
    assert device_ids(env.hub) == ["dev-2"]
    assert len(records(env.hub, "enrollment.enroll", outcome="denied")) == 3


# -- onboarding with a one-time token -----------------------------------------------------------------------------


def test_a_token_onboards_once(env: Env) -> None:
    enrollment, token = env.hub.provisioning.add_token_enrollment("dev-3", actor="admin")
    assert enrollment.token_mac is not None
    assert token.secret not in enrollment.token_mac
    assert env.hub.devices.get_device("dev-3").state is DeviceState.PENDING

    result = with_token(env.hub, token, "dev-3")
    assert result.device_id == "dev-3"
    used = env.hub.provisioning.get_enrollment(token.id)
    assert used.status is EnrollmentStatus.USED
    assert used.used_at == env.clock.now()
    device = env.hub.devices.get_device("dev-3")
    assert device.state is DeviceState.ACTIVE
    assert device.onboarding_fingerprint == token_fingerprint("dev-3")
    [onboarded] = records(env.hub, "enrollment.enroll", outcome="success", target="device:dev-3")
    assert onboarded.details["method"] == "token"
    assert onboarded.details["enrollment"] == token.id

    with pytest.raises(IssuanceRefusedError, match="not valid"):
        with_token(env.hub, token, "dev-3")
    [denied] = records(env.hub, "enrollment.enroll", target="device:dev-3", outcome="denied")
    assert denied.details["why"] == "token used"
    assert len(device_certificates(env.hub, "dev-3")) == 1
    for record in audit(env.hub):
        assert token.secret not in record.details_json


def test_a_wrong_or_unknown_token_is_an_authentication_error(env: Env) -> None:
    _, token = env.hub.provisioning.add_token_enrollment("dev-3", actor="admin")
    before = audit_count(env.hub)
    flipped = token.secret[:-1] + ("A" if token.secret[-1] != "A" else "B")
    with pytest.raises(AuthenticationError):
        with_token(env.hub, Token(token.id, flipped), "dev-3")
    with pytest.raises(AuthenticationError):
        with_token(env.hub, Token("enr_0123456789abcdef", token.secret), "dev-3")
    with pytest.raises(AuthenticationError):
        with_token(env.hub, "not-a-token", "dev-3")
    with pytest.raises(AuthenticationError):
        with_token(env.hub, f"wt_{token.id[4:]}.{token.secret}", "dev-3")  # an API token's shape

    denied = audit(env.hub)[before:]
    assert [(r.actor, r.action, r.target, r.outcome) for r in denied] == [
        (f"token:{token.id}", "enrollment.enroll", "est:simpleenroll", "denied"),
        ("token:enr_0123456789abcdef", "enrollment.enroll", "est:simpleenroll", "denied"),
    ]
    for record in denied:
        assert token.secret not in record.details_json
        assert flipped not in record.details_json
    # The token still works.
    assert env.hub.provisioning.get_enrollment(token.id).status is EnrollmentStatus.ACTIVE
    assert device_certificates(env.hub) == []
    with_token(env.hub, token, "dev-3")


def test_an_expired_or_revoked_token_is_refused(env: Env) -> None:
    _, expiring = env.hub.provisioning.add_token_enrollment("dev-4", actor="admin", expires_in=dt.timedelta(hours=1))
    env.clock.advance(dt.timedelta(hours=1))
    with pytest.raises(IssuanceRefusedError, match="not valid"):
        with_token(env.hub, expiring, "dev-4")
    [denied] = records(env.hub, "enrollment.enroll", target="device:dev-4", outcome="denied")
    assert denied.details["why"] == "token expired"
    assert env.hub.provisioning.get_enrollment(expiring.id).status is EnrollmentStatus.ACTIVE

    _, revoked = env.hub.provisioning.add_token_enrollment("dev-5", actor="admin")
    env.hub.provisioning.revoke_enrollment(revoked.id, actor="admin")
    with pytest.raises(IssuanceRefusedError, match="not valid"):
        with_token(env.hub, revoked, "dev-5")
    [denied] = records(env.hub, "enrollment.enroll", target="device:dev-5", outcome="denied")
    assert denied.details["why"] == "token revoked"
    assert device_certificates(env.hub) == []
    assert {d.id: d.state for d in env.hub.devices.list_devices()} == {
        "dev-4": DeviceState.PENDING,
        "dev-5": DeviceState.PENDING,
    }


# -- the group's state and lists ----------------------------------------------------------------------------------


def test_a_disabled_group_onboards_nobody(env: Env) -> None:
    add_group(env)
    onboard(env.hub, env.maker.idevid("dev-1"), "dev-1")  # the hub's group index is now cached

    # Disabled through another hub object (another worker, the CLI): this hub's cached index still lists the
    # group, so it is the issuance gate, in the issuing transaction, that refuses.
    env.other.provisioning.set_group_enabled("line-1", False, actor="admin")
    with pytest.raises(IssuanceRefusedError, match="disabled"):
        onboard(env.hub, env.maker.idevid("dev-2"), "dev-2")
    [denied] = records(env.hub, "enrollment.enroll", target="device:dev-2", outcome="denied")
    assert denied.details["enrollment_group"] == "line-1"
    assert "disabled" in str(denied.details["reason"])

    # Disabled through this hub: refused before the gate, by the group index.
    env.hub.provisioning.set_group_enabled("line-1", True, actor="admin")
    env.hub.provisioning.set_group_enabled("line-1", False, actor="admin")
    with pytest.raises(IssuanceRefusedError, match="no enrollment group"):
        onboard(env.hub, env.maker.idevid("dev-3"), "dev-3")
    assert records(env.hub, "enrollment.enroll", target="est:simpleenroll", outcome="denied")
    assert device_ids(env.hub) == ["dev-1"]
    assert [c.device_id for c in device_certificates(env.hub)] == ["dev-1"]

    with pytest.raises(IllegalTransitionError):
        env.hub.provisioning.set_group_enabled("line-1", False, actor="admin")
    env.hub.provisioning.set_group_enabled("line-1", True, actor="admin")
    onboard(env.hub, env.maker.idevid("dev-2"), "dev-2")
    assert device_ids(env.hub) == ["dev-1", "dev-2"]


def test_allow_and_deny_lists(env: Env) -> None:
    add_group(env, allow=["dev-a", "dev-b"], deny=["dev-b", "dev-z"])
    onboard(env.hub, env.maker.idevid("dev-a"), "dev-a")
    with pytest.raises(IssuanceRefusedError, match="deny list"):
        onboard(env.hub, env.maker.idevid("dev-b"), "dev-b")
    with pytest.raises(IssuanceRefusedError, match=r"is not on the allow list of enrollment group"):
        onboard(env.hub, env.maker.idevid("dev-c"), "dev-c")
    assert device_ids(env.hub) == ["dev-a"]
    denied = {r.target: r.details["reason"] for r in records(env.hub, "enrollment.enroll", outcome="denied")}
    assert set(denied) == {"device:dev-b", "device:dev-c"}

    with pytest.raises(InvalidInputError):
        add_group(env, "line-3", allow=["Not A Device"])
    with pytest.raises(InvalidInputError):
        add_group(env, "line-3", id_field="mac")
    with pytest.raises(AlreadyExistsError):
        add_group(env, "line-1")


def test_the_id_can_come_from_the_subject_serial_number(env: Env) -> None:
    add_group(env, id_field="serial-number", tags={"model": "s2"})
    idevid = env.maker.idevid("Acme Sensor S2", serial_number="SN-00042", name="s2")
    result = onboard(env.hub, idevid, "sn-00042")  # taken from serialNumber, lower-cased
    assert result.device_id == "sn-00042"
    assert dict(env.hub.devices.get_device("sn-00042").tags) == {"model": "s2"}

    with pytest.raises(IssuanceRefusedError, match="CN=sn-00043"):
        onboard(env.hub, env.maker.idevid("Acme Sensor S2", serial_number="SN-00043", name="s3"), "Acme Sensor S2")
    with pytest.raises(IssuanceRefusedError, match="serial-number"):
        onboard(env.hub, env.maker.idevid("dev-9"), "dev-9")  # no serialNumber at all
    with pytest.raises(IssuanceRefusedError, match="invalid device id"):
        onboard(env.hub, env.maker.idevid("x", serial_number="SN 1/2", name="bad"), "sn 1/2")
    assert device_ids(env.hub) == ["sn-00042"]


# -- onboarding identity conflicts --------------------------------------------------------------------------------


def test_another_idevid_for_an_enrolled_device_is_a_security_event(env: Env) -> None:
    add_group(env)
    first = env.maker.idevid("dev-1", name="first")
    onboard(env.hub, first, "dev-1")
    second = env.maker.idevid("dev-1", name="second")
    with pytest.raises(IssuanceRefusedError, match="bound to another onboarding identity"):
        onboard(env.hub, second, "dev-1")

    [event] = records(env.hub, CONFLICT_EVENT)
    assert (event.actor, event.target, event.outcome) == ("device:dev-1", "device:dev-1", "denied")
    assert event.details["presented"] == fingerprint(second.certificate)
    assert event.details["expected"] == fingerprint(first.certificate)
    [denied] = records(env.hub, "enrollment.enroll", outcome="denied")
    assert denied.details["security_event"] == CONFLICT_EVENT

    # An armed re-onboarding is for the same identity only.
    env.hub.provisioning.rearm("dev-1", actor="admin", reason="lost its key")
    with pytest.raises(IssuanceRefusedError, match="bound to another onboarding identity"):
        onboard(env.hub, second, "dev-1")
    assert len(records(env.hub, CONFLICT_EVENT)) == 2
    assert env.hub.devices.get_device("dev-1").onboarding_fingerprint == fingerprint(first.certificate)
    assert len(device_certificates(env.hub, "dev-1")) == 1


def test_one_idevid_for_two_device_ids_is_a_security_event(env: Env) -> None:
    add_group(env)
    # The IDevID says dev-a, but an individual enrollment binds it to dev-b; the individual enrollment wins.
    idevid = env.maker.idevid("dev-a")
    enrollment = env.hub.provisioning.add_certificate_enrollment("dev-b", certificate_pem=idevid.pem, actor="admin")
    onboard(env.hub, idevid, "dev-b")
    assert env.hub.devices.get_device("dev-b").onboarding_fingerprint == fingerprint(idevid.certificate)

    # With the individual enrollment revoked the group vouches for it as dev-a: the identity is dev-b's.
    env.hub.provisioning.revoke_enrollment(enrollment.id, actor="admin")
    with pytest.raises(IssuanceRefusedError, match="belongs to device 'dev-b'"):
        onboard(env.hub, idevid, "dev-a")
    [event] = records(env.hub, CONFLICT_EVENT)
    assert (event.target, event.outcome) == ("device:dev-a", "denied")
    assert event.details["bound_to"] == "dev-b"
    assert event.details["presented"] == fingerprint(idevid.certificate)
    assert device_ids(env.hub) == ["dev-b"]
    assert [c.device_id for c in device_certificates(env.hub)] == ["dev-b"]

    # Binding the identity to yet another device is refused up front.
    with pytest.raises(AlreadyExistsError, match="bound to device 'dev-b'"):
        env.hub.provisioning.add_certificate_enrollment("dev-c", certificate_pem=idevid.pem, actor="admin")
    assert device_ids(env.hub) == ["dev-b"]


# -- re-onboarding and renewal ------------------------------------------------------------------------------------


def test_an_enrolled_device_onboards_again_only_once_rearmed(env: Env) -> None:
    add_group(env)
    idevid = env.maker.idevid("dev-1")
    first = onboard(env.hub, idevid, "dev-1")
    with pytest.raises(IssuanceRefusedError, match="enrolled already"):
        onboard(env.hub, idevid, "dev-1")
    assert len(device_certificates(env.hub, "dev-1")) == 1

    env.hub.provisioning.rearm("dev-1", actor="admin", reason="flash wiped")
    env.clock.advance(dt.timedelta(minutes=1))
    second = onboard(env.hub, idevid, "dev-1")
    old = env.hub.certificates.get(first.issued.record.serial)
    assert old.status is CertificateStatus.REVOKED
    assert old.revocation_reason == str(RevocationReason.SUPERSEDED)
    assert old.revoked_at == env.clock.now()
    assert env.hub.certificates.get(second.issued.record.serial).status is CertificateStatus.GOOD
    [reonboard] = records(env.hub, "enrollment.reonboard", target="device:dev-1")
    assert reonboard.details["revoked"] == [first.issued.record.serial_hex]
    [revoke] = records(env.hub, "certificate.revoke", target="device:dev-1")
    assert revoke.details == {"serial": first.issued.record.serial_hex, "reason": "superseded"}

    # The re-arming was consumed.
    with pytest.raises(IssuanceRefusedError, match="enrolled already"):
        onboard(env.hub, idevid, "dev-1")
    assert [c.status for c in device_certificates(env.hub, "dev-1")] == [
        CertificateStatus.REVOKED,
        CertificateStatus.GOOD,
    ]


def test_rearming_rules(env: Env) -> None:
    add_group(env)
    with pytest.raises(NotFoundError):
        env.hub.provisioning.rearm("dev-1", actor="admin")
    env.hub.provisioning.add_token_enrollment("dev-2", actor="admin")
    with pytest.raises(IllegalTransitionError, match="has not onboarded"):
        env.hub.provisioning.rearm("dev-2", actor="admin")
    idevid = env.maker.idevid("dev-1")
    onboard(env.hub, idevid, "dev-1")
    with pytest.raises(InvalidInputError):
        env.hub.provisioning.rearm("dev-1", actor="admin", reason="bad\nreason")

    # A re-arming runs out.
    env.hub.provisioning.rearm("dev-1", actor="admin")
    env.clock.advance(dt.timedelta(days=7))
    with pytest.raises(IssuanceRefusedError, match="enrolled already"):
        onboard(env.hub, idevid, "dev-1")


def test_a_token_device_reonboards_with_a_new_token_once_rearmed(env: Env) -> None:
    _, token = env.hub.provisioning.add_token_enrollment("dev-3", actor="admin")
    first = with_token(env.hub, token, "dev-3")
    _, second_token = env.hub.provisioning.add_token_enrollment("dev-3", actor="admin")
    with pytest.raises(IssuanceRefusedError, match="enrolled already"):
        with_token(env.hub, second_token, "dev-3")
    assert env.hub.provisioning.get_enrollment(second_token.id).status is EnrollmentStatus.ACTIVE
    env.hub.provisioning.rearm("dev-3", actor="admin")
    with_token(env.hub, second_token, "dev-3")
    assert env.hub.certificates.get(first.issued.record.serial).status is CertificateStatus.REVOKED
    assert env.hub.provisioning.get_enrollment(second_token.id).status is EnrollmentStatus.USED


def test_renewal_keeps_the_profile_and_validity(env: Env) -> None:
    add_group(env, "gateways", profile="gateway", validity_days=10)
    first = onboard(env.hub, env.maker.idevid("gw-1"), "gw-1")
    assert first.issued.record.profile == "gateway"
    assert lifetime(first.issued.certificate) == dt.timedelta(days=10)

    env.clock.advance(dt.timedelta(days=6))
    renewed = env.hub.provisioning.reenroll(der(first.issued.certificate), csr_der("gw-1")[0], source=SOURCE)
    assert renewed.device_id == "gw-1"
    assert renewed.issued.record.profile == "gateway"
    assert lifetime(renewed.issued.certificate) == dt.timedelta(days=10)
    assert renewed.issued.certificate.not_valid_after_utc == env.clock.now().replace(microsecond=0) + dt.timedelta(
        days=10
    )
    [reenrolled] = records(env.hub, "enrollment.reenroll", outcome="success")
    assert reenrolled.actor == "device:gw-1"
    # A renewal is not an onboarding.
    assert len(records(env.hub, "enrollment.enroll", outcome="success")) == 1

    # ... and the renewed certificate renews in turn, with a new key each time.
    again = env.hub.provisioning.reenroll(der(renewed.issued.certificate), csr_der("gw-1")[0], source=SOURCE)
    assert lifetime(again.issued.certificate) == dt.timedelta(days=10)
    assert len(device_certificates(env.hub, "gw-1")) == 3


def test_renewal_with_a_revoked_expired_or_foreign_certificate_is_refused(env: Env) -> None:
    add_group(env)
    key = ec.generate_private_key(ec.SECP256R1())
    issued = onboard(env.hub, env.maker.idevid("dev-1"), "dev-1", key=key)
    current = der(issued.issued.certificate)

    with pytest.raises(IssuanceRefusedError, match="reuses the current key"):
        env.hub.provisioning.reenroll(current, csr_der("dev-1", key)[0], source=SOURCE)
    with pytest.raises(IssuanceRefusedError, match="onboard with simpleenroll"):
        env.hub.provisioning.reenroll(der(env.maker.idevid("dev-1").certificate), csr_der("dev-1")[0], source=SOURCE)
    with pytest.raises(IssuanceRefusedError, match="CN=dev-1"):
        env.hub.provisioning.reenroll(current, csr_der("dev-2")[0], source=SOURCE)

    env.hub.certificates.revoke(issued.issued.record.serial, reason=RevocationReason.KEY_COMPROMISE, actor="admin")
    with pytest.raises(IssuanceRefusedError, match="revoked"):
        env.hub.provisioning.reenroll(current, csr_der("dev-1")[0], source=SOURCE)
    denied = records(env.hub, "enrollment.reenroll", outcome="denied")
    assert "keyCompromise" in str(denied[-1].details["reason"])
    assert len(device_certificates(env.hub, "dev-1")) == 1

    second = onboard(env.hub, env.maker.idevid("dev-2"), "dev-2")
    env.clock.advance(dt.timedelta(days=env.hub.settings.device_validity_days, seconds=1))
    with pytest.raises(IssuanceRefusedError, match="expired"):
        env.hub.provisioning.reenroll(der(second.issued.certificate), csr_der("dev-2")[0], source=SOURCE)
    assert len(device_certificates(env.hub, "dev-2")) == 1


# -- refusals leave nothing behind --------------------------------------------------------------------------------


def test_a_csr_naming_another_device_is_refused_and_nothing_is_written(env: Env) -> None:
    add_group(env)
    _, token = env.hub.provisioning.add_token_enrollment("dev-3", actor="admin")
    before = audit_count(env.hub)
    with pytest.raises(IssuanceRefusedError, match="CN=dev-1"):
        env.hub.provisioning.enroll_with_certificate(
            der(env.maker.idevid("dev-1").certificate), csr_der("dev-2")[0], source=SOURCE
        )
    san_csr = make_csr(
        common_name="dev-3",
        extensions=[(x509.SubjectAlternativeName([x509.DNSName(f"dev-1.{FLEET}")]), False)],
    )
    with pytest.raises(IssuanceRefusedError, match="DNS name"):
        env.hub.provisioning.enroll_with_token(str(token), san_csr, source=SOURCE)

    assert device_ids(env.hub) == ["dev-3"]
    assert env.hub.devices.get_device("dev-3").onboarding_fingerprint is None
    assert device_certificates(env.hub) == []
    assert env.hub.provisioning.get_enrollment(token.id).status is EnrollmentStatus.ACTIVE
    added = audit(env.hub)[before:]
    assert [(r.action, r.target, r.outcome) for r in added] == [
        ("enrollment.enroll", "device:dev-1", "denied"),
        ("enrollment.enroll", "device:dev-3", "denied"),
    ]


@pytest.mark.parametrize("problem", ["weak-key", "bad-signature", "garbage", "key-reuse"])
def test_a_failed_enrollment_leaves_no_device_certificate_or_used_token(env: Env, problem: str) -> None:
    add_group(env)
    reused = ec.generate_private_key(ec.SECP256R1())
    onboard(env.hub, env.maker.idevid("dev-0"), "dev-0", key=reused)
    _, token = env.hub.provisioning.add_token_enrollment("dev-3", actor="admin")

    def bad_csr(device_id: str) -> bytes:
        if problem == "weak-key":
            return make_csr("rsa1024", common_name=device_id)
        if problem == "bad-signature":
            request = bytearray(csr_der(device_id)[0])
            request[-3] ^= 0x55  # inside the ECDSA signature
            return bytes(request)
        if problem == "garbage":
            return b"\x30\x03\x02\x01\x00"
        return csr_der(device_id, reused)[0]

    expected: type[WardenError] = IssuanceRefusedError if problem == "key-reuse" else CSRRejectedError
    with pytest.raises(expected):
        env.hub.provisioning.enroll_with_certificate(
            der(env.maker.idevid("dev-1").certificate), bad_csr("dev-1"), source=SOURCE
        )
    with pytest.raises(expected):
        env.hub.provisioning.enroll_with_token(str(token), bad_csr("dev-3"), source=SOURCE)

    assert device_ids(env.hub) == ["dev-0", "dev-3"]
    assert [c.device_id for c in device_certificates(env.hub)] == ["dev-0"]
    device = env.hub.devices.get_device("dev-3")
    assert (device.state, device.onboarding_fingerprint) == (DeviceState.PENDING, None)
    assert env.hub.provisioning.get_enrollment(token.id).status is EnrollmentStatus.ACTIVE
    assert records(env.hub, "enrollment.enroll", outcome="success", target="device:dev-1") == []

    # Nothing was burnt: both onboard with a good request.
    onboard(env.hub, env.maker.idevid("dev-1"), "dev-1")
    with_token(env.hub, token, "dev-3")
    assert device_ids(env.hub) == ["dev-0", "dev-1", "dev-3"]


def test_a_device_that_may_not_have_certificates_does_not_onboard(env: Env) -> None:
    add_group(env)
    env.hub.devices.add_device("dev-1", actor="admin")
    env.hub.devices.change_state("dev-1", DeviceState.DECOMMISSIONED, actor="admin")
    with pytest.raises(IssuanceRefusedError, match="decommissioned"):
        onboard(env.hub, env.maker.idevid("dev-1"), "dev-1")
    device = env.hub.devices.get_device("dev-1")
    assert (device.state, device.onboarding_fingerprint) == (DeviceState.DECOMMISSIONED, None)
    assert records(env.hub, "enrollment.enroll", outcome="success") == []


# -- races under group commit -------------------------------------------------------------------------------------


N = 16


def race(calls: Sequence[Callable[[], EnrollmentResult]]) -> tuple[list[EnrollmentResult], list[BaseException]]:
    """Run ``calls`` in as many threads, released together; their results and errors."""
    barrier = threading.Barrier(len(calls))
    results: list[EnrollmentResult] = []
    errors: list[BaseException] = []

    def worker(call: Callable[[], EnrollmentResult]) -> None:
        barrier.wait()
        try:
            results.append(call())
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads)
    return results, errors


def test_racing_uses_of_one_token_issue_once(gc_hub: Hub) -> None:
    _, token = gc_hub.provisioning.add_token_enrollment("dev-1", actor="admin")
    csrs = [csr_der("dev-1")[0] for _ in range(N)]
    results, errors = race(
        [lambda csr=csr: gc_hub.provisioning.enroll_with_token(str(token), csr, source=SOURCE) for csr in csrs]
    )
    assert len(results) == 1
    assert len(errors) == N - 1
    assert all(isinstance(e, IssuanceRefusedError) for e in errors), errors
    assert len(device_certificates(gc_hub, "dev-1")) == 1
    assert gc_hub.provisioning.get_enrollment(token.id).status is EnrollmentStatus.USED
    assert len(records(gc_hub, "enrollment.enroll", outcome="success")) == 1
    assert len(records(gc_hub, "enrollment.enroll", outcome="denied")) == N - 1


def test_racing_onboardings_through_one_group_all_succeed(gc_hub: Hub, tmp_path: Path) -> None:
    maker = ManufacturerCA(tmp_path / "maker")
    gc_hub.provisioning.add_group("line-1", ca_pem=pem(maker.certificate), actor="admin")
    ids = [f"dev-{i:02d}" for i in range(N)]
    idevids = {device_id: maker.idevid(device_id) for device_id in ids}
    results, errors = race([lambda d=device_id: onboard(gc_hub, idevids[d], d) for device_id in ids])
    assert errors == []
    assert sorted(r.device_id for r in results) == ids
    assert device_ids(gc_hub) == ids
    certificates = device_certificates(gc_hub)
    assert sorted(c.device_id or "" for c in certificates) == ids
    assert len({c.key_fingerprint for c in certificates}) == N
    for device in gc_hub.devices.list_devices():
        assert device.state is DeviceState.ACTIVE
        assert device.onboarding_fingerprint == fingerprint(idevids[device.id].certificate)
    assert len(records(gc_hub, "enrollment.enroll", outcome="success")) == N
    with gc_hub.db.transaction(readonly=True) as uow:
        gc_hub.audit.verify(uow)


def test_racing_onboardings_with_one_idevid_make_one_device(gc_hub: Hub, tmp_path: Path) -> None:
    maker = ManufacturerCA(tmp_path / "maker")
    gc_hub.provisioning.add_group("line-1", ca_pem=pem(maker.certificate), actor="admin")
    idevid = maker.idevid("dev-1")
    results, errors = race([lambda: onboard(gc_hub, idevid, "dev-1") for _ in range(N)])
    assert len(results) == 1
    assert len(errors) == N - 1
    assert all(isinstance(e, IssuanceRefusedError) for e in errors), errors
    assert device_ids(gc_hub) == ["dev-1"]
    assert len(device_certificates(gc_hub)) == 1
    assert records(gc_hub, CONFLICT_EVENT) == []


def test_racing_token_uses_through_two_workers_issue_once(database_url: str, hub_factory: Callable[..., Hub]) -> None:
    """Two hub objects with a group committer each, as two ``warden serve`` workers on one database: the gate locks
    the enrollment's row, so on PostgreSQL (READ COMMITTED) too only one transaction sees the token unused."""
    first = hub_factory(database_url=database_url, group_commit=True)
    second = Hub.open(first.settings, group_commit=True)
    try:
        for round_ in range(5):  # a lost race shows in most rounds, not in every one
            device_id = f"dev-{round_}"
            _, token = first.provisioning.add_token_enrollment(device_id, actor="admin")
            csrs = [csr_der(device_id)[0] for _ in range(N)]
            workers = [first, second] * (N // 2)
            results, errors = race(
                [
                    lambda hub=hub, csr=csr, token=token: hub.provisioning.enroll_with_token(
                        str(token), csr, source=SOURCE
                    )
                    for hub, csr in zip(workers, csrs, strict=True)
                ]
            )
            assert all(isinstance(e, IssuanceRefusedError) for e in errors), errors
            assert len(device_certificates(first, device_id)) == 1
            assert len(results) == 1
    finally:
        second.close()


def test_a_renewal_batched_before_a_reonboarding_is_revoked_with_the_rest(gc_hub: Hub, tmp_path: Path) -> None:
    """Group commit: a renewal with the device's old certificate and its re-onboarding land in one batch, the
    renewal first. The re-onboarding must revoke the certificate the renewal got, as it would in separate
    transactions."""
    maker = ManufacturerCA(tmp_path / "maker")
    gc_hub.provisioning.add_group("line-1", ca_pem=pem(maker.certificate), actor="admin")
    idevid = maker.idevid("dev-1")
    first = onboard(gc_hub, idevid, "dev-1")
    gc_hub.provisioning.rearm("dev-1", actor="admin")

    # Hold the committer with a request of its own, queue the renewal and then the re-onboarding behind it, and
    # let go: the two are recorded in one batch, in that order (white box: the hub's committer and its queue).
    committer = gc_hub._committer
    assert committer is not None
    busy, release = threading.Event(), threading.Event()

    def hold(_uow: object, items: Sequence[object]) -> list[None]:
        busy.set()
        release.wait(timeout=60)
        return [None] * len(items)

    outcomes: dict[str, EnrollmentResult] = {}

    def queued(name: str, call: Callable[[], EnrollmentResult], depth: int) -> threading.Thread:
        thread = threading.Thread(target=lambda: outcomes.__setitem__(name, call()))
        thread.start()
        deadline = time.monotonic() + 60
        while committer._queue.qsize() < depth:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        return thread

    holder = threading.Thread(target=committer.run, args=(hold, None))
    holder.start()
    assert busy.wait(timeout=60)
    threads = [
        holder,
        queued(
            "renewal",
            lambda: gc_hub.provisioning.reenroll(der(first.issued.certificate), csr_der("dev-1")[0], source=SOURCE),
            1,
        ),
        queued("reonboarding", lambda: onboard(gc_hub, idevid, "dev-1"), 2),
    ]
    release.set()
    for thread in threads:
        thread.join(timeout=60)
    assert set(outcomes) == {"renewal", "reonboarding"}

    status = {c.serial: (c.status, c.revocation_reason) for c in device_certificates(gc_hub, "dev-1")}
    assert status == {
        first.issued.record.serial: (CertificateStatus.REVOKED, "superseded"),
        outcomes["renewal"].issued.record.serial: (CertificateStatus.REVOKED, "superseded"),
        outcomes["reonboarding"].issued.record.serial: (CertificateStatus.GOOD, None),
    }
    # The renewal revoked the certificate it superseded itself; the re-onboarding revoked what was left.
    [reonboard] = records(gc_hub, "enrollment.reonboard")
    assert reonboard.details["revoked"] == [outcomes["renewal"].issued.record.serial_hex]
    superseded = [r.details["serial"] for r in records(gc_hub, "certificate.revoke")]
    assert first.issued.record.serial_hex in superseded


# -- CSV import and export ----------------------------------------------------------------------------------------


def _csv(rows: list[dict[str, str]]) -> bytes:
    out = io.StringIO()
    fields = ["device_id", "display_name", "tags", "groups", "enrollment", "certificate_pem"]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return out.getvalue().encode("utf-8")


def _rows(env: Env) -> list[dict[str, str]]:
    return [
        {
            "device_id": "csv-1",
            "display_name": "Boiler room, sensor 1",
            "tags": "site=berlin;hw=v2",
            "groups": "sensors;berlin",
            "enrollment": "certificate",
            "certificate_pem": env.maker.idevid("csv-1").pem.decode("ascii"),
        },
        {"device_id": "csv-2", "display_name": "", "tags": "", "groups": "", "enrollment": "token"},
        {"device_id": "csv-3", "display_name": "Ünïcode name", "tags": "site=paris", "groups": "sensors"},
    ]


def test_csv_import_and_export_round_trip(env: Env, hub_factory: Callable[..., Hub]) -> None:
    for name in ("sensors", "berlin"):
        env.hub.devices.add_group(name, actor="admin")
    rows = _rows(env)
    count, tokens = env.hub.provisioning.import_csv(_csv(rows), actor="admin")
    assert count == 3
    assert [device_id for device_id, _ in tokens] == ["csv-2"]

    exported = env.hub.provisioning.export_csv()
    parsed = list(csv.DictReader(io.StringIO(exported)))
    assert [r["device_id"] for r in parsed] == ["csv-1", "csv-2", "csv-3"]
    by_id = {r["device_id"]: r for r in parsed}
    assert by_id["csv-1"]["display_name"] == "Boiler room, sensor 1"
    assert by_id["csv-1"]["tags"] == "hw=v2;site=berlin"
    assert sorted(by_id["csv-1"]["groups"].split(";")) == ["berlin", "sensors"]
    assert by_id["csv-1"]["enrollment"] == "certificate"
    assert by_id["csv-1"]["certificate_pem"] == rows[0]["certificate_pem"]
    assert by_id["csv-2"]["display_name"] == "csv-2"
    assert by_id["csv-2"]["enrollment"] == "token"
    assert by_id["csv-2"]["certificate_pem"] == ""
    assert by_id["csv-3"]["display_name"] == "Ünïcode name"
    assert by_id["csv-3"]["enrollment"] == ""
    assert {r["state"] for r in parsed} == {"pending"}
    assert tokens[0][1].secret not in exported

    # The export imports into another hub and exports the same again (a token row gets a new token).
    copy = hub_factory(name="copy")
    for name in ("sensors", "berlin"):
        copy.devices.add_group(name, actor="admin")
    assert copy.provisioning.import_csv(exported.encode("utf-8"), actor="admin")[0] == 3
    assert copy.provisioning.export_csv() == exported

    # What was imported works: the certificate enrollment and the token onboard their devices.
    idevid_pem = rows[0]["certificate_pem"].encode("ascii")
    onboard(env.hub, x509.load_pem_x509_certificate(idevid_pem), "csv-1")
    with_token(env.hub, tokens[0][1], "csv-2")
    assert {d.id: d.state for d in env.hub.devices.list_devices()} == {
        "csv-1": DeviceState.ACTIVE,
        "csv-2": DeviceState.ACTIVE,
        "csv-3": DeviceState.PENDING,
    }


_BAD_ROWS: dict[str, tuple[dict[str, str], type[WardenError]]] = {
    "bad-id": ({"device_id": "Bad_Id"}, InvalidInputError),
    "reserved-id": ({"device_id": "hub"}, InvalidInputError),
    "bad-tag": ({"device_id": "bad-1", "tags": "no-equals-sign"}, InvalidInputError),
    "unknown-group": ({"device_id": "bad-1", "groups": "nowhere"}, NotFoundError),
    "bad-group-name": ({"device_id": "bad-1", "groups": "Not A Group"}, InvalidInputError),
    "state": ({"device_id": "bad-1", "state": "asleep"}, InvalidInputError),
    "kind": ({"device_id": "bad-1", "enrollment": "password"}, InvalidInputError),
    "pem": ({"device_id": "bad-1", "enrollment": "certificate", "certificate_pem": "garbage"}, InvalidInputError),
    "duplicate": ({"device_id": "csv-1"}, InvalidInputError),
    "existing": ({"device_id": "old-1"}, AlreadyExistsError),
    "display-name": ({"device_id": "bad-1", "display_name": "line\nbreak"}, InvalidInputError),
}


@pytest.mark.parametrize("problem", sorted(_BAD_ROWS))
def test_one_bad_csv_row_refuses_the_whole_file(env: Env, problem: str) -> None:
    env.hub.devices.add_group("sensors", actor="admin")
    env.hub.devices.add_group("berlin", actor="admin")
    env.hub.devices.add_device("old-1", actor="admin")
    bad, error = _BAD_ROWS[problem]
    rows = [*_rows(env), bad]
    out = io.StringIO()
    writer = csv.DictWriter(
        out, fieldnames=["device_id", "display_name", "state", "tags", "groups", "enrollment", "certificate_pem"]
    )
    writer.writeheader()
    writer.writerows(rows)
    devices_before, audit_before = device_ids(env.hub), audit_count(env.hub)
    enrollments_before = env.hub.provisioning.list_enrollments()

    with pytest.raises(error):
        env.hub.provisioning.import_csv(out.getvalue().encode("utf-8"), actor="admin")

    assert device_ids(env.hub) == devices_before
    assert env.hub.provisioning.list_enrollments() == enrollments_before
    assert audit_count(env.hub) == audit_before


def test_an_idevid_enrolled_already_refuses_the_import(env: Env) -> None:
    env.hub.devices.add_group("sensors", actor="admin")
    env.hub.devices.add_group("berlin", actor="admin")
    rows = _rows(env)
    env.hub.provisioning.add_certificate_enrollment(
        "other-1", certificate_pem=rows[0]["certificate_pem"].encode("ascii"), actor="admin"
    )
    with pytest.raises(AlreadyExistsError, match="enrolled already"):
        env.hub.provisioning.import_csv(_csv(rows), actor="admin")
    assert device_ids(env.hub) == ["other-1"]
    twice = [rows[0], {**rows[0], "device_id": "csv-9"}]
    with pytest.raises(AlreadyExistsError):
        env.hub.provisioning.import_csv(_csv(twice), actor="admin")
    assert device_ids(env.hub) == ["other-1"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "header row"),
        (b"name\nx\n", "header row"),
        (b"device_id,colour\nx,red\n", "unknown CSV column"),
        (b"\xff\xfedevice_id\n", "not UTF-8"),
    ],
)
def test_malformed_csv_files_are_refused(env: Env, data: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        env.hub.provisioning.import_csv(data, actor="admin")
    assert device_ids(env.hub) == []


def test_refusals_of_unauthenticated_clients_are_sampled_per_address(env: Env) -> None:
    """Anyone can send an unknown token: past the per-address budget such refusals are counted, not written."""
    from warden.core import AuthenticationError

    budget = 10  # the default of anonymous_audits_per_minute
    csr, _ = csr_der("dev-9")
    for n in range(budget + 3):
        with pytest.raises(AuthenticationError):
            env.hub.provisioning.enroll_with_token(f"enr_{n:016x}.{'A' * 43}", csr, source="203.0.113.7")
    assert len(records(env.hub, "enrollment.enroll", outcome="denied")) == budget
    assert env.hub.provisioning.suppressed_refusals == 3
    # Another address has its own budget.
    with pytest.raises(AuthenticationError):
        env.hub.provisioning.enroll_with_token(f"enr_{99:016x}.{'A' * 43}", csr, source="203.0.113.8")
    assert len(records(env.hub, "enrollment.enroll", outcome="denied")) == budget + 1


def test_only_the_newest_certificate_renews(env: Env) -> None:
    """Once a device has rotated, its older (perhaps stolen) certificate cannot mint another one."""
    add_group(env)
    first = onboard(env.hub, env.maker.idevid("dev-1"), "dev-1").issued.certificate
    env.clock.advance(dt.timedelta(seconds=1))
    second = env.hub.provisioning.reenroll(der(first), csr_der("dev-1")[0], source=SOURCE).issued.certificate
    env.clock.advance(dt.timedelta(seconds=1))
    with pytest.raises(IssuanceRefusedError, match="superseded"):
        env.hub.provisioning.reenroll(der(first), csr_der("dev-1")[0], source=SOURCE)
    third = env.hub.provisioning.reenroll(der(second), csr_der("dev-1")[0], source=SOURCE)
    assert third.issued.record.device_id == "dev-1"
    assert len(records(env.hub, "enrollment.reenroll", outcome="denied")) == 1


def test_a_group_cannot_onboard_a_device_enrolled_individually(env: Env) -> None:
    """A device pinned to one certificate (or given a token) onboards only through that enrollment, even when a
    group trusts another certificate naming it."""
    add_group(env)
    pinned = self_signed(env.tmp, "factory-unit-1")
    env.hub.provisioning.add_certificate_enrollment("dev-1", certificate_pem=pinned.pem, actor="admin")
    with pytest.raises(IssuanceRefusedError, match="individual enrollment"):
        onboard(env.hub, env.maker.idevid("dev-1"), "dev-1")
    assert env.hub.devices.get_device("dev-1").onboarding_fingerprint is None
    assert onboard(env.hub, pinned, "dev-1").device_id == "dev-1"


# -- planning an enrollment on the event loop, without the database -----------------------------------------------


def plan_nowait(env: Env, onboarding: Issued | x509.Certificate, csr: bytes) -> EnrollmentPlan | None:
    certificate = onboarding.certificate if isinstance(onboarding, Issued) else onboarding
    return env.hub.provisioning.plan_with_certificate_nowait(der(certificate), csr, source=SOURCE)


def plan(env: Env, onboarding: Issued | x509.Certificate, csr: bytes) -> EnrollmentPlan:
    certificate = onboarding.certificate if isinstance(onboarding, Issued) else onboarding
    return env.hub.provisioning.plan_with_certificate(der(certificate), csr, source=SOURCE)


def test_planning_without_the_database_needs_a_fresh_trust_view(env: Env) -> None:
    add_group(env, tags={"site": "berlin"})
    env.hub.provisioning.forget_caches()  # as the server does when the trust material changed
    before = audit_count(env.hub)
    idevid = {d: env.maker.idevid(d) for d in ("dev-1", "dev-2", "dev-3")}
    csr = {d: csr_der(d)[0] for d in idevid}

    assert plan_nowait(env, idevid["dev-2"], csr["dev-2"]) is None  # the trust view must be read first
    first = plan(env, idevid["dev-1"], csr["dev-1"])  # reads (and caches) it
    assert first.device_id == "dev-1"
    planned = plan_nowait(env, idevid["dev-2"], csr["dev-2"])
    assert isinstance(planned, EnrollmentPlan)
    assert planned.device_id == "dev-2"
    # Planning wrote nothing.
    assert audit_count(env.hub) == before
    assert device_ids(env.hub) == []

    result = env.hub.provisioning.complete(planned)
    assert result.device_id == "dev-2"
    assert result.chain == (env.hub.ca_info().issuing, env.hub.ca_info().root)
    result.issued.certificate.verify_directly_issued_by(env.hub.ca_info().issuing)
    assert result.issued.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-2"
    device = env.hub.devices.get_device("dev-2")
    assert device.state is DeviceState.ACTIVE
    assert dict(device.tags) == {"site": "berlin"}
    assert device.onboarding_fingerprint == fingerprint(idevid["dev-2"].certificate)
    [onboarded] = records(env.hub, "enrollment.enroll", target="device:dev-2", outcome="success")
    assert onboarded.details["enrollment_group"] == "line-1"
    assert [c.serial for c in device_certificates(env.hub)] == [result.issued.record.serial]

    # The first plan, made by the blocking path, completes as well.
    assert env.hub.provisioning.complete(first).device_id == "dev-1"
    assert device_ids(env.hub) == ["dev-1", "dev-2"]

    # The cached view lasts 2 s of the hub's clock.
    env.clock.advance(dt.timedelta(seconds=1))
    assert plan_nowait(env, idevid["dev-3"], csr["dev-3"]) is not None
    env.clock.advance(dt.timedelta(seconds=1))
    assert plan_nowait(env, idevid["dev-3"], csr["dev-3"]) is None
    plan(env, idevid["dev-3"], csr["dev-3"])
    assert plan_nowait(env, idevid["dev-3"], csr["dev-3"]) is not None
    # A change of the groups through this hub drops the view too.
    add_group(env, "line-2")
    assert plan_nowait(env, idevid["dev-3"], csr["dev-3"]) is None
    assert device_ids(env.hub) == ["dev-1", "dev-2"]


def test_planning_without_the_database_for_an_individual_enrollment(env: Env) -> None:
    pinned = self_signed(env.tmp, "factory-unit-9")
    env.hub.provisioning.add_certificate_enrollment("dev-9", certificate_pem=pinned.pem, actor="admin")
    csr = csr_der("dev-9")[0]
    assert plan_nowait(env, pinned, csr) is None  # adding the enrollment dropped the cached view
    plan(env, pinned, csr)
    planned = plan_nowait(env, pinned, csr)
    assert planned is not None
    assert planned.device_id == "dev-9"
    assert env.hub.provisioning.complete(planned).device_id == "dev-9"
    assert env.hub.devices.get_device("dev-9").state is DeviceState.ACTIVE


_REFUSED_BEFORE_THE_WRITE = ["names-another-device", "untrusted", "expired", "operational", "unreadable-csr"]


@pytest.mark.parametrize("problem", _REFUSED_BEFORE_THE_WRITE)
def test_a_refusal_is_left_to_the_blocking_path_and_audited_once(env: Env, problem: str) -> None:
    add_group(env)
    # Warm the trust view, and onboard dev-0 (its operational certificate is one of the refused requests).
    warm = plan(env, env.maker.idevid("dev-0"), csr_der("dev-0")[0])
    operational = env.hub.provisioning.complete(warm).issued.certificate
    assert plan_nowait(env, env.maker.idevid("dev-1"), csr_der("dev-1")[0]) is not None  # the view is warm

    now = dt.datetime.now(dt.UTC)
    onboarding: x509.Certificate = env.maker.idevid("dev-1").certificate
    csr = csr_der("dev-1")[0]
    expected: type[WardenError] = IssuanceRefusedError
    target = "est:simpleenroll"
    if problem == "names-another-device":
        csr, target = csr_der("dev-2")[0], "device:dev-1"
    elif problem == "untrusted":
        onboarding = ManufacturerCA(env.tmp / "stranger", name="Someone Else CA").idevid("dev-1").certificate
    elif problem == "expired":
        onboarding = env.maker.idevid(
            "dev-1", not_before=now - dt.timedelta(days=10), not_after=now - dt.timedelta(days=1)
        ).certificate
    elif problem == "operational":
        onboarding, csr = operational, csr_der("dev-0")[0]
    else:
        csr, target, expected = b"\x30\x03\x02\x01\x00", "device:dev-1", CSRRejectedError

    before = audit_count(env.hub)
    assert plan_nowait(env, onboarding, csr) is None
    assert plan_nowait(env, onboarding, csr) is None
    assert audit_count(env.hub) == before  # a refusal writes its audit record: not on the event loop

    with pytest.raises(expected):
        plan(env, onboarding, csr)
    added = audit(env.hub)[before:]
    assert [(r.action, r.target, r.outcome) for r in added] == [("enrollment.enroll", target, "denied")]
    assert added[0].details["source"] == SOURCE
    assert device_ids(env.hub) == ["dev-0"]


def test_a_refusal_of_the_issuing_transaction_is_planned_and_refused_by_the_write(env: Env) -> None:
    """The deny list is checked by the gate, with the group's row read in the issuing transaction: planning on the
    loop passes, and the write refuses and audits."""
    add_group(env, deny=["dev-1"])
    plan(env, env.maker.idevid("dev-0"), csr_der("dev-0")[0])  # warms the trust view
    before = audit_count(env.hub)
    planned = plan_nowait(env, env.maker.idevid("dev-1"), csr_der("dev-1")[0])
    assert planned is not None
    assert audit_count(env.hub) == before
    with pytest.raises(IssuanceRefusedError, match="deny list"):
        env.hub.provisioning.complete(planned)
    added = audit(env.hub)[before:]
    assert [(r.action, r.target, r.outcome) for r in added] == [("enrollment.enroll", "device:dev-1", "denied")]
    assert device_ids(env.hub) == []
    assert device_certificates(env.hub) == []
