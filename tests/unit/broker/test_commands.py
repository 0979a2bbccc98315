"""Signed cloud-to-device commands: sign_command and CommandVerifier with a CA hierarchy made at test time
(root -> issuing CA -> command-signing leaf), and every envelope, signer and payload the verifier must refuse."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, ObjectIdentifier
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.agent.certkit import Ca, certificate, make_ca, make_root, new_key, utcnow
from warden.broker import (
    COMMAND_NAMES,
    COMMAND_SIGNING_EKU,
    MAX_COMMAND_BYTES,
    Command,
    CommandRejectedError,
    CommandVerifier,
    sign_command,
)
from warden.core import InvalidInputError
from warden.registry import COMMAND_NAMES as RECORDED_COMMAND_NAMES

DEVICE = "dev-a"
COMMAND_ID = "cmd_0123456789abcdef"


@dataclasses.dataclass(frozen=True)
class Pki:
    now: dt.datetime
    root: Ca
    issuing: Ca
    signer: x509.Certificate
    signer_key: ec.EllipticCurvePrivateKey

    def verifier(
        self, device: str = DEVICE, *, intermediates: Sequence[x509.Certificate] | None = None
    ) -> CommandVerifier:
        return CommandVerifier(
            device, [self.root.certificate], [self.issuing.certificate] if intermediates is None else intermediates
        )

    def leaf(
        self,
        *,
        issuer: Ca | None = None,
        eku: Sequence[ObjectIdentifier] | None = (COMMAND_SIGNING_EKU,),
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A signing certificate (by default a valid command-signing one from the issuing CA) and its key."""
        key = key or new_key()
        cert = certificate(
            subject="Test Command Signer",
            public_key=key.public_key(),
            issuer=issuer or self.issuing,
            not_before=not_before or self.now - dt.timedelta(hours=1),
            not_after=not_after or self.now + dt.timedelta(days=30),
            eku=eku,
        )
        return cert, key


def make_pki() -> Pki:
    now = utcnow()
    root = make_root(now=now)
    issuing = make_ca(root, now=now)
    key = new_key()
    signer = certificate(
        subject="Test Command Signer",
        public_key=key.public_key(),
        issuer=issuing,
        not_before=now - dt.timedelta(hours=1),
        not_after=now + dt.timedelta(days=30),
        eku=[COMMAND_SIGNING_EKU],
    )
    return Pki(now, root, issuing, signer, key)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


# Hypothesis refuses function-scoped fixtures; the property tests share one hierarchy made at import time.
PKI = make_pki()


def command(counter: int = 1, *, name: str = "ping", device: str = DEVICE, **args: Any) -> Command:
    return Command(
        id=COMMAND_ID, device=device, counter=counter, name=name, issued=utcnow(), args=args or {"reason": "test"}
    )


def signed(pki: Pki, cmd: Command | None = None) -> bytes:
    return sign_command(pki.signer_key, pki.signer, cmd or command())


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def envelope(
    payload: dict[str, Any] | bytes,
    *,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    signer: x509.Certificate,
    **overrides: Any,
) -> bytes:
    """An envelope over any payload (also ones sign_command would not make), signed with ``key``."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(raw, padding.PKCS1v15(), hashes.SHA256())
    else:
        signature = key.sign(raw, ec.ECDSA(hashes.SHA256()))
    data: dict[str, Any] = {
        "v": 1,
        "payload": b64url(raw),
        "sig": b64url(signature),
        "signer": base64.b64encode(signer.public_bytes(serialization.Encoding.DER)).decode("ascii"),
    }
    data.update(overrides)
    return json.dumps(data).encode()


def payload(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": COMMAND_ID,
        "device": DEVICE,
        "counter": 1,
        "name": "ping",
        "args": {},
        "issued": "2026-11-25T10:00:00Z",
    }
    base.update(fields)
    return base


def rejected(verifier: CommandVerifier, data: bytes, *, last_counter: int = 0, now: dt.datetime) -> str:
    with pytest.raises(CommandRejectedError) as info:
        verifier.verify(data, last_counter=last_counter, now=now)
    return info.value.message


# --- the round trip -----------------------------------------------------------------------------------------------


def test_a_signed_command_verifies_and_comes_back_whole(pki: Pki) -> None:
    sent = command(7, name="report-health", full=True, checks=["disk", "clock"])
    received = pki.verifier().verify(signed(pki, sent), last_counter=6, now=pki.now)
    assert received == sent
    assert received.issued.tzinfo is not None
    assert received.issued.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize("name", sorted(COMMAND_NAMES))
def test_every_known_command_name_round_trips(pki: Pki, name: str) -> None:
    assert pki.verifier().verify(signed(pki, command(name=name)), last_counter=0, now=pki.now).name == name


def test_the_envelope_is_the_documented_shape(pki: Pki) -> None:
    sent = command(3)
    data = json.loads(signed(pki, sent))
    assert set(data) == {"v", "payload", "sig", "signer"}
    assert data["v"] == 1
    assert "=" not in data["payload"]
    assert "=" not in data["sig"]
    assert x509.load_der_x509_certificate(base64.b64decode(data["signer"])) == pki.signer
    inner = json.loads(base64.urlsafe_b64decode(data["payload"] + "=" * (-len(data["payload"]) % 4)))
    assert inner == {
        "id": COMMAND_ID,
        "device": DEVICE,
        "counter": 3,
        "name": "ping",
        "args": {"reason": "test"},
        "issued": sent.issued.isoformat().replace("+00:00", "Z"),
    }


def test_the_issue_time_is_sent_in_utc(pki: Pki) -> None:
    plus_two = dt.timezone(dt.timedelta(hours=2))
    issued = dt.datetime(2026, 11, 25, 12, 0, 0, tzinfo=plus_two)
    sent = dataclasses.replace(command(), issued=issued)
    received = pki.verifier().verify(signed(pki, sent), last_counter=0, now=pki.now)
    assert received.issued == issued
    assert received.issued.utcoffset() == dt.timedelta(0)
    assert received.issued.hour == 10


def test_a_signer_issued_directly_by_the_root_is_accepted(pki: Pki) -> None:
    cert, key = pki.leaf(issuer=pki.root)
    data = sign_command(key, cert, command())
    assert pki.verifier(intermediates=[]).verify(data, last_counter=0, now=pki.now).counter == 1


def test_the_chain_is_found_among_unrelated_intermediates(pki: Pki) -> None:
    other = make_ca(make_root("Other Root"), "Other CA")
    verifier = pki.verifier(intermediates=[other.certificate, pki.root.certificate, pki.issuing.certificate])
    assert verifier.verify(signed(pki), last_counter=0, now=pki.now).counter == 1


@pytest.mark.parametrize(("depth", "accepted"), [(4, True), (5, False)])
def test_the_chain_may_hold_at_most_four_cas_below_the_root(depth: int, accepted: bool) -> None:
    now = utcnow()
    root = make_root(now=now)
    cas = [make_ca(root, "CA 1", now=now)]
    for level in range(2, depth + 1):
        cas.append(make_ca(cas[-1], f"CA {level}", now=now))
    key = new_key()
    cert = certificate(
        subject="Signer",
        public_key=key.public_key(),
        issuer=cas[-1],
        not_before=now - dt.timedelta(hours=1),
        not_after=now + dt.timedelta(days=1),
        eku=[COMMAND_SIGNING_EKU],
    )
    verifier = CommandVerifier(DEVICE, [root.certificate], [ca.certificate for ca in reversed(cas)])
    data = sign_command(key, cert, command())
    if accepted:
        assert verifier.verify(data, last_counter=0, now=now).counter == 1
    else:
        assert "does not chain" in rejected(verifier, data, now=now)


# --- sign_command refuses what it must not send -------------------------------------------------------------------


def test_sign_command_refuses_an_unknown_command(pki: Pki) -> None:
    with pytest.raises(InvalidInputError, match="unknown command 'reboot'") as info:
        signed(pki, command(name="reboot"))
    assert info.value.hint == "one of " + ", ".join(sorted(COMMAND_NAMES))


def test_sign_command_refuses_an_envelope_over_the_limit(pki: Pki) -> None:
    with pytest.raises(InvalidInputError, match=f"more than {MAX_COMMAND_BYTES}"):
        signed(pki, command(blob="x" * MAX_COMMAND_BYTES))


# --- replay, device, tampering ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("counter", "last"), [(5, 5), (4, 5), (1, 1_000_000)])
def test_a_counter_not_above_the_last_accepted_is_refused(pki: Pki, counter: int, last: int) -> None:
    message = rejected(pki.verifier(), signed(pki, command(counter)), last_counter=last, now=pki.now)
    assert message == f"replayed or stale command: counter {counter}, last accepted {last}"


def test_the_same_envelope_is_refused_once_its_counter_was_accepted(pki: Pki) -> None:
    data = signed(pki, command(9))
    verifier = pki.verifier()
    accepted = verifier.verify(data, last_counter=8, now=pki.now)
    assert "replayed" in rejected(verifier, data, last_counter=accepted.counter, now=pki.now)


def test_a_command_for_another_device_is_refused(pki: Pki) -> None:
    message = rejected(pki.verifier(), signed(pki, command(device="dev-b")), now=pki.now)
    assert message == "the command is for 'dev-b', not for this device"


def test_a_tampered_payload_is_refused(pki: Pki) -> None:
    data = json.loads(signed(pki, command(1)))
    raw = base64.urlsafe_b64decode(data["payload"] + "=" * (-len(data["payload"]) % 4))
    data["payload"] = b64url(raw.replace(b'"counter":1', b'"counter":2'))
    assert rejected(pki.verifier(), json.dumps(data).encode(), now=pki.now) == "the command's signature does not verify"


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_tampered_signature_is_refused(pki: Pki, where: str) -> None:
    data = json.loads(signed(pki))
    sig = bytearray(base64.urlsafe_b64decode(data["sig"] + "=" * (-len(data["sig"]) % 4)))
    index = {"first": 0, "middle": len(sig) // 2, "last": len(sig) - 1}[where]
    sig[index] ^= 0x01
    data["sig"] = b64url(bytes(sig))
    assert rejected(pki.verifier(), json.dumps(data).encode(), now=pki.now) == "the command's signature does not verify"


def test_a_signature_by_another_key_is_refused(pki: Pki) -> None:
    data = envelope(payload(), key=new_key(), signer=pki.signer)
    assert rejected(pki.verifier(), data, now=pki.now) == "the command's signature does not verify"


def test_a_signature_of_another_command_is_refused(pki: Pki) -> None:
    first, second = json.loads(signed(pki, command(1))), json.loads(signed(pki, command(2)))
    second["sig"] = first["sig"]
    assert rejected(pki.verifier(), json.dumps(second).encode(), now=pki.now) == (
        "the command's signature does not verify"
    )


# --- the signer ---------------------------------------------------------------------------------------------------

NOT_COMMAND_SIGNING = "the command's signer is not a command-signing certificate"
NO_CHAIN = "the command's signer does not chain to the pinned hub root"


@pytest.mark.parametrize(
    "eku",
    [
        pytest.param(None, id="no extended key usage"),
        pytest.param([ExtendedKeyUsageOID.CLIENT_AUTH], id="client auth only"),
        pytest.param([ExtendedKeyUsageOID.CODE_SIGNING], id="code signing only"),
        pytest.param([ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], id="anyExtendedKeyUsage alone"),
        pytest.param([COMMAND_SIGNING_EKU, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], id="with anyExtendedKeyUsage"),
    ],
)
def test_a_signer_without_exactly_the_command_signing_usage_is_refused(
    pki: Pki, eku: list[ObjectIdentifier] | None
) -> None:
    cert, key = pki.leaf(eku=eku)
    assert rejected(pki.verifier(), sign_command(key, cert, command()), now=pki.now) == NOT_COMMAND_SIGNING


def test_the_command_signing_usage_among_others_is_accepted(pki: Pki) -> None:
    cert, key = pki.leaf(eku=[ExtendedKeyUsageOID.CLIENT_AUTH, COMMAND_SIGNING_EKU])
    assert pki.verifier().verify(sign_command(key, cert, command()), last_counter=0, now=pki.now).counter == 1


def test_a_signer_from_another_hierarchy_is_refused(pki: Pki) -> None:
    other_root = make_root("Other Root")
    other_ca = make_ca(other_root, "Other CA")
    cert, key = pki.leaf(issuer=other_ca)
    data = sign_command(key, cert, command())
    assert rejected(pki.verifier(), data, now=pki.now) == NO_CHAIN
    # Handing the verifier the other CA does not help: its root is not pinned.
    verifier = pki.verifier(intermediates=[pki.issuing.certificate, other_ca.certificate, other_root.certificate])
    assert rejected(verifier, data, now=pki.now) == NO_CHAIN


def test_a_ca_that_copies_the_issuing_cas_name_is_refused(pki: Pki) -> None:
    """Names alone chain nothing: the impostor has the issuing CA's subject but not its key."""
    impostor = Ca(pki.issuing.certificate, new_key())
    cert, key = pki.leaf(issuer=impostor)
    assert cert.issuer == pki.issuing.certificate.subject
    assert rejected(pki.verifier(), sign_command(key, cert, command()), now=pki.now) == NO_CHAIN


def test_a_self_signed_signer_is_refused(pki: Pki) -> None:
    key = new_key()
    cert = certificate(
        subject="Test Root",  # even with the root's name
        public_key=key.public_key(),
        issuer=None,
        signing_key=key,
        not_before=pki.now - dt.timedelta(hours=1),
        not_after=pki.now + dt.timedelta(days=1),
        ca=True,
        eku=[COMMAND_SIGNING_EKU],
    )
    verifier = pki.verifier(intermediates=[pki.issuing.certificate, cert])
    # A CA certificate never signs commands, whatever it chains to.
    assert rejected(verifier, sign_command(key, cert, command()), now=pki.now) == (
        "the command's signer is a CA certificate, not a command-signing one"
    )


@pytest.mark.parametrize("basic_constraints", [False, None], ids=["ca false", "no basic constraints"])
def test_a_chain_through_a_non_ca_certificate_is_refused(pki: Pki, basic_constraints: bool | None) -> None:
    not_a_ca = make_ca(pki.issuing, "Not A CA", ca=basic_constraints)
    cert, key = pki.leaf(issuer=not_a_ca)
    verifier = pki.verifier(intermediates=[pki.issuing.certificate, not_a_ca.certificate])
    assert rejected(verifier, sign_command(key, cert, command()), now=pki.now) == NO_CHAIN


def test_a_chain_through_an_expired_ca_is_refused(pki: Pki) -> None:
    expired = make_ca(
        pki.root, "Expired CA", not_before=pki.now - dt.timedelta(days=30), not_after=pki.now - dt.timedelta(days=1)
    )
    cert, key = pki.leaf(issuer=expired)
    verifier = pki.verifier(intermediates=[expired.certificate])
    assert rejected(verifier, sign_command(key, cert, command()), now=pki.now) == NO_CHAIN


def test_a_chain_through_a_ca_not_yet_valid_is_refused(pki: Pki) -> None:
    future = make_ca(
        pki.root, "Future CA", not_before=pki.now + dt.timedelta(days=1), not_after=pki.now + dt.timedelta(days=30)
    )
    cert, key = pki.leaf(issuer=future)
    verifier = pki.verifier(intermediates=[future.certificate])
    assert rejected(verifier, sign_command(key, cert, command()), now=pki.now) == NO_CHAIN


def test_a_signer_with_an_rsa_key_is_refused(pki: Pki) -> None:
    rsa_key = rsa.generate_private_key(65537, 2048)
    cert = certificate(
        subject="RSA Signer",
        public_key=rsa_key.public_key(),
        issuer=pki.issuing,
        not_before=pki.now - dt.timedelta(hours=1),
        not_after=pki.now + dt.timedelta(days=1),
        eku=[COMMAND_SIGNING_EKU],
    )
    data = envelope(payload(), key=rsa_key, signer=cert)
    assert rejected(pki.verifier(), data, now=pki.now) == "the command's signer has no EC key"


# --- time: the signer's validity, with ten minutes of tolerance for drifting device clocks ------------------------

TOLERANCE = dt.timedelta(minutes=10)
SECOND = dt.timedelta(seconds=1)


def test_an_expired_signer_is_refused(pki: Pki) -> None:
    cert, key = pki.leaf(not_before=pki.now - dt.timedelta(days=30), not_after=pki.now - dt.timedelta(days=1))
    data = sign_command(key, cert, command())
    assert rejected(pki.verifier(), data, now=pki.now) == "the command's signer certificate is not valid now"


def test_a_signer_not_yet_valid_is_refused(pki: Pki) -> None:
    cert, key = pki.leaf(not_before=pki.now + dt.timedelta(days=1), not_after=pki.now + dt.timedelta(days=30))
    data = sign_command(key, cert, command())
    assert rejected(pki.verifier(), data, now=pki.now) == "the command's signer certificate is not valid now"


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [
        pytest.param(TOLERANCE, True, id="at the tolerance"),
        pytest.param(TOLERANCE + SECOND, False, id="a second beyond"),
        pytest.param(TOLERANCE - SECOND, True, id="a second within"),
    ],
)
def test_the_clock_tolerance_after_expiry(pki: Pki, offset: dt.timedelta, accepted: bool) -> None:
    cert, key = pki.leaf(not_before=pki.now - dt.timedelta(days=1), not_after=pki.now)
    data = sign_command(key, cert, command())
    now = cert.not_valid_after_utc + offset
    if accepted:
        assert pki.verifier().verify(data, last_counter=0, now=now).counter == 1
    else:
        assert rejected(pki.verifier(), data, now=now) == "the command's signer certificate is not valid now"


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [
        pytest.param(TOLERANCE, True, id="at the tolerance"),
        pytest.param(TOLERANCE + SECOND, False, id="a second beyond"),
    ],
)
def test_the_clock_tolerance_before_validity(pki: Pki, offset: dt.timedelta, accepted: bool) -> None:
    cert, key = pki.leaf(not_before=pki.now + dt.timedelta(hours=1), not_after=pki.now + dt.timedelta(days=1))
    data = sign_command(key, cert, command())
    now = cert.not_valid_before_utc - offset
    if accepted:
        assert pki.verifier().verify(data, last_counter=0, now=now).counter == 1
    else:
        assert rejected(pki.verifier(), data, now=now) == "the command's signer certificate is not valid now"


# --- the envelope -------------------------------------------------------------------------------------------------


def test_an_envelope_over_the_limit_is_refused_before_parsing(pki: Pki) -> None:
    data = signed(pki)
    padded = data + b" " * (MAX_COMMAND_BYTES - len(data))
    assert pki.verifier().verify(padded, last_counter=0, now=pki.now).counter == 1  # exactly the limit
    message = rejected(pki.verifier(), padded + b" ", now=pki.now)
    assert message == f"the command has {MAX_COMMAND_BYTES + 1} bytes, more than {MAX_COMMAND_BYTES}"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not json", id="text"),
        pytest.param(b'{"v": 1,', id="truncated"),
        pytest.param(b"\xff\xfe\x00{", id="not utf-8"),
        pytest.param(b'{"v": NaN', id="bad literal"),
    ],
)
def test_an_envelope_that_is_not_json_is_refused(pki: Pki, data: bytes) -> None:
    assert rejected(pki.verifier(), data, now=pki.now) == "the command is not JSON"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"[]", id="array"),
        pytest.param(b'"text"', id="string"),
        pytest.param(b"1", id="number"),
        pytest.param(b"null", id="null"),
        pytest.param(b"{}", id="no version"),
        pytest.param(b'{"v": 2}', id="version 2"),
        pytest.param(b'{"v": 0}', id="version 0"),
        pytest.param(b'{"v": "1"}', id="version as a string"),
        pytest.param(b'{"v": null}', id="version null"),
    ],
)
def test_anything_but_a_version_1_envelope_is_refused(pki: Pki, data: bytes) -> None:
    assert rejected(pki.verifier(), data, now=pki.now) == "the command is not a version 1 envelope"


def test_a_valid_command_in_another_version_is_refused(pki: Pki) -> None:
    data = json.loads(signed(pki))
    data["v"] = 2
    assert rejected(pki.verifier(), json.dumps(data).encode(), now=pki.now) == "the command is not a version 1 envelope"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        pytest.param("payload", None, "the command's payload is missing or too long", id="payload missing"),
        pytest.param("payload", 17, "the command's payload is missing or too long", id="payload a number"),
        pytest.param("payload", "abcde", "the command's payload is not base64url", id="payload of 5 characters"),
        pytest.param("payload", "é", "the command's payload is not base64url", id="payload not ascii"),
        pytest.param("sig", None, "the command's signature is missing or too long", id="signature missing"),
        pytest.param("sig", ["AA"], "the command's signature is missing or too long", id="signature a list"),
        pytest.param("sig", "a", "the command's signature is not base64url", id="signature of 1 character"),
        pytest.param("signer", None, "the command's signer certificate is unreadable", id="signer missing"),
        pytest.param("signer", "not base64!", "the command's signer certificate is unreadable", id="signer not b64"),
        pytest.param("signer", "AAAA", "the command's signer certificate is unreadable", id="signer not der"),
        pytest.param("signer", 12, "the command's signer certificate is unreadable", id="signer a number"),
    ],
)
def test_unreadable_envelope_fields_are_refused(pki: Pki, field: str, value: object, expected: str) -> None:
    data = json.loads(signed(pki))
    if value is None:
        del data[field]
    else:
        data[field] = value
    assert rejected(pki.verifier(), json.dumps(data).encode(), now=pki.now) == expected


def test_a_signer_certificate_in_base64url_is_refused(pki: Pki) -> None:
    """The signer is standard base64 (validated): the URL alphabet's - and _ are not accepted there."""
    data = json.loads(signed(pki))
    der = pki.signer.public_bytes(serialization.Encoding.DER)
    urlsafe = base64.urlsafe_b64encode(der).decode("ascii")
    assert urlsafe != data["signer"], "this signer's encoding happens to need neither + nor /"
    data["signer"] = urlsafe
    assert rejected(pki.verifier(), json.dumps(data).encode(), now=pki.now) == (
        "the command's signer certificate is unreadable"
    )


@pytest.mark.parametrize("opening", [b"[", b'{"a":'])
def test_a_deeply_nested_envelope_is_refused_as_not_json(pki: Pki, opening: bytes) -> None:
    """Anyone who gets into the broker can publish this; it must come out as a rejection the agent reports."""
    data = opening * (MAX_COMMAND_BYTES // len(opening))
    assert rejected(pki.verifier(), data, now=pki.now) == "the command is not JSON"


@pytest.mark.parametrize("extension", [ExtensionOID.EXTENDED_KEY_USAGE, ExtensionOID.BASIC_CONSTRAINTS])
def test_a_signer_with_a_malformed_extension_is_refused(pki: Pki, extension: ObjectIdentifier) -> None:
    """The signer certificate is the sender's to choose: an attacker's self-signed one with a garbled extension must
    be rejected like any other unacceptable signer."""
    key = new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(pki.signer.subject)
        .issuer_name(pki.issuing.certificate.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(pki.now - dt.timedelta(hours=1))
        .not_valid_after(pki.now + dt.timedelta(days=1))
        .add_extension(x509.UnrecognizedExtension(extension, b"\x30\x03garbage"), critical=False)
    )
    cert = builder.sign(key, hashes.SHA256())
    data = envelope(payload(), key=key, signer=cert)
    assert "signer" in rejected(pki.verifier(), data, now=pki.now)


# --- the signed payload -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b"not json", "the command's payload is not JSON", id="not json"),
        pytest.param(b"\xff\xfe", "the command's payload is not JSON", id="not utf-8"),
        pytest.param(b"[1, 2]", "the command's payload is not an object", id="array"),
        pytest.param(b'"ping"', "the command's payload is not an object", id="string"),
    ],
)
def test_a_signed_payload_that_is_not_an_object_is_refused(pki: Pki, raw: bytes, expected: str) -> None:
    data = envelope(raw, key=pki.signer_key, signer=pki.signer)
    assert rejected(pki.verifier(), data, now=pki.now) == expected


INVALID_ID = "the command has no valid id"
LACKS = "the command lacks its device, name or arguments"
BAD_COUNTER = "the command's counter is not a positive integer"
BAD_TIME = "the command's issue time is unreadable"
MISSING = object()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({"id": MISSING}, INVALID_ID, id="id missing"),
        pytest.param({"id": None}, INVALID_ID, id="id null"),
        pytest.param({"id": 7}, INVALID_ID, id="id a number"),
        pytest.param({"id": "cmd_0123"}, INVALID_ID, id="id too short"),
        pytest.param({"id": "cmd_" + "a" * 33}, INVALID_ID, id="id too long"),
        pytest.param({"id": "cmd_0123456789ABCDEF"}, INVALID_ID, id="id upper case"),
        pytest.param({"id": "job_0123456789abcdef"}, INVALID_ID, id="id other prefix"),
        pytest.param({"id": COMMAND_ID + "\n"}, INVALID_ID, id="id with a newline"),
        pytest.param({"device": MISSING}, LACKS, id="device missing"),
        pytest.param({"device": None}, LACKS, id="device null"),
        pytest.param({"device": ["dev-a"]}, LACKS, id="device a list"),
        pytest.param({"name": MISSING}, LACKS, id="name missing"),
        pytest.param({"name": 1}, LACKS, id="name a number"),
        pytest.param({"args": []}, LACKS, id="args a list"),
        pytest.param({"args": "x"}, LACKS, id="args a string"),
        pytest.param({"args": None}, LACKS, id="args null"),
        pytest.param({"counter": MISSING}, BAD_COUNTER, id="counter missing"),
        pytest.param({"counter": None}, BAD_COUNTER, id="counter null"),
        pytest.param({"counter": "7"}, BAD_COUNTER, id="counter a string"),
        pytest.param({"counter": 7.0}, BAD_COUNTER, id="counter a float"),
        pytest.param({"counter": True}, BAD_COUNTER, id="counter true"),
        pytest.param({"counter": False}, BAD_COUNTER, id="counter false"),
        pytest.param({"counter": 0}, BAD_COUNTER, id="counter zero"),
        pytest.param({"counter": -1}, BAD_COUNTER, id="counter negative"),
        pytest.param({"counter": 2**63}, BAD_COUNTER, id="counter 2**63"),
        pytest.param({"issued": MISSING}, BAD_TIME, id="issued missing"),
        pytest.param({"issued": None}, BAD_TIME, id="issued null"),
        pytest.param({"issued": "yesterday"}, BAD_TIME, id="issued text"),
        pytest.param({"issued": 1764064800}, BAD_TIME, id="issued a number"),
    ],
)
def test_a_signed_payload_with_bad_fields_is_refused(pki: Pki, fields: dict[str, Any], expected: str) -> None:
    content = payload()
    for name, value in fields.items():
        if value is MISSING:
            content.pop(name)
        else:
            content[name] = value
    data = envelope(content, key=pki.signer_key, signer=pki.signer)
    assert rejected(pki.verifier(), data, now=pki.now) == expected


def test_the_largest_counter_is_accepted(pki: Pki) -> None:
    data = envelope(payload(counter=2**63 - 1), key=pki.signer_key, signer=pki.signer)
    assert pki.verifier().verify(data, last_counter=2**63 - 2, now=pki.now).counter == 2**63 - 1


def test_missing_args_default_to_empty(pki: Pki) -> None:
    content = payload()
    del content["args"]
    data = envelope(content, key=pki.signer_key, signer=pki.signer)
    assert pki.verifier().verify(data, last_counter=0, now=pki.now).args == {}


def test_an_unknown_command_is_refused_even_when_signed(pki: Pki) -> None:
    data = envelope(payload(name="reboot"), key=pki.signer_key, signer=pki.signer)
    assert rejected(pki.verifier(), data, now=pki.now) == "unknown command 'reboot'"


def test_the_device_is_checked_before_the_counter(pki: Pki) -> None:
    """A command for another device says so, whatever its counter: the agent's report must name the real problem."""
    data = signed(pki, command(1, device="dev-b"))
    assert "not for this device" in rejected(pki.verifier(), data, last_counter=5, now=pki.now)


# --- properties ---------------------------------------------------------------------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    counter=st.integers(1, 2**63 - 1),
    last=st.integers(0, 2**63 - 1),
    name=st.sampled_from(sorted(COMMAND_NAMES)),
    id_hex=st.from_regex(r"[0-9a-f]{16,32}", fullmatch=True),
    args=st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=4),
)
def test_a_command_is_accepted_exactly_when_its_counter_is_above_the_last(
    counter: int, last: int, name: str, id_hex: str, args: dict[str, Any]
) -> None:
    sent = Command(id="cmd_" + id_hex, device=DEVICE, counter=counter, name=name, issued=PKI.now, args=args)
    data = sign_command(PKI.signer_key, PKI.signer, sent)
    if counter > last:
        assert PKI.verifier().verify(data, last_counter=last, now=PKI.now) == sent
    else:
        assert "replayed or stale" in rejected(PKI.verifier(), data, last_counter=last, now=PKI.now)


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from(["payload", "sig"]), position=st.integers(0, 10_000), replacement=st.characters())
def test_an_altered_payload_or_signature_is_refused_or_means_the_same(
    field: str, position: int, replacement: str
) -> None:
    """One character of the payload or signature replaced: the verifier either refuses the command (with a
    CommandRejectedError, nothing else) or - when base64's spare bits or ignored characters absorb the change -
    returns exactly the command that was signed."""
    sent = dataclasses.replace(command(3), issued=PKI.now)
    data = json.loads(sign_command(PKI.signer_key, PKI.signer, sent))
    text: str = data[field]
    index = position % len(text)
    data[field] = text[:index] + replacement + text[index + 1 :]
    try:
        received = PKI.verifier().verify(json.dumps(data).encode(), last_counter=0, now=PKI.now)
    except CommandRejectedError:
        return
    assert received == sent


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512) | JSON_VALUES.map(lambda value: json.dumps(value).encode()))
def test_arbitrary_input_is_only_ever_rejected(data: bytes) -> None:
    with pytest.raises(CommandRejectedError):
        PKI.verifier().verify(data, last_counter=0, now=PKI.now)


def test_the_registry_and_the_agent_know_the_same_commands() -> None:
    # The registry records what operators may send; the broker module's list is what agents execute.
    assert RECORDED_COMMAND_NAMES == COMMAND_NAMES
