"""The EST wire format, the enrollment group CA bundle check and the bearer-token primitives: pure functions, no hub.

Only :class:`WardenError` subclasses may escape from what parses client input (the API maps those to problems;
anything else would be a 500)."""

from __future__ import annotations

import base64
import datetime as dt
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.hubserver import ManufacturerCA, csr_der
from warden.core import (
    DEFAULT_LIMITS,
    AuthenticationError,
    CSRRejectedError,
    InvalidInputError,
    SystemRandom,
    Token,
    WardenError,
    new_token,
    split_token,
    token_mac,
    verify_mac,
)
from warden.provisioning import certs_only, csr_identity_mismatch, decode_csr_body, load_ca_bundle, max_body_bytes

FLEET = "fleet.acme.test"


def _csr(
    names: list[tuple[x509.ObjectIdentifier, str]] | None = None,
    *,
    dns: list[str] | None = None,
    pem: bool = False,
) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(oid, value) for oid, value in (names or [])]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    if dns is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns]), critical=False)
    request = builder.sign(key, hashes.SHA256())
    return request.public_bytes(serialization.Encoding.PEM if pem else serialization.Encoding.DER)


_DER = csr_der("dev-1")[0]


# -- decode_csr_body ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(base64.b64encode, id="one-line"),
        pytest.param(base64.encodebytes, id="76-char-lines"),
        pytest.param(lambda d: base64.encodebytes(d).replace(b"\n", b"\r\n"), id="crlf-lines"),
        pytest.param(
            lambda d: b"  \r\n" + b" \t".join(base64.b64encode(d)[i : i + 10] for i in range(0, 400, 10)),
            id="spaces-and-tabs",
        ),
    ],
)
def test_base64_bodies_decode_to_the_der(encode: object) -> None:
    body = encode(_DER)  # type: ignore[operator]
    assert decode_csr_body(body) == _DER


def test_a_pem_body_is_passed_through_stripped() -> None:
    pem = x509.load_der_x509_csr(_DER).public_bytes(serialization.Encoding.PEM)
    assert decode_csr_body(b"\r\n  " + pem + b"\n\n") == pem.strip()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty"),
        (b" \r\n\t ", "empty"),
        (b"!!! not base64 !!!", "not base64"),
        (b"MIIB=AAA", "not base64"),
        (b"MII", "not base64"),  # bad padding
        (b"\xff\xfe\x00", "not base64"),
        (b"====", "not base64"),
        (b"-_-_", "not base64"),  # the URL-safe alphabet is not EST's
    ],
)
def test_bad_bodies_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(CSRRejectedError, match=message):
        decode_csr_body(body)


def test_an_oversized_body_is_refused_before_decoding() -> None:
    limit = max_body_bytes()
    with pytest.raises(CSRRejectedError, match=f"larger than {limit}"):
        decode_csr_body(b"A" * (limit + 1))
    with pytest.raises(CSRRejectedError, match="larger"):
        decode_csr_body(b" " * (limit + 1))  # whitespace counts: nothing is decoded first


def test_the_largest_csr_fits_the_body_limit_even_with_crlf_lines() -> None:
    largest = b"\x30" * DEFAULT_LIMITS.max_csr_bytes
    body = base64.encodebytes(largest).replace(b"\n", b"\r\n")
    assert len(body) <= max_body_bytes()
    assert decode_csr_body(body) == largest


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bodies_raise_only_our_error(body: bytes) -> None:
    try:
        decoded = decode_csr_body(body)
    except WardenError as e:
        assert isinstance(e, CSRRejectedError)
    else:
        assert decoded


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/= \t\r\n-", max_size=600))
def test_base64_like_bodies_raise_only_our_error(text: str) -> None:
    try:
        decoded = decode_csr_body(text.encode("ascii"))
    except WardenError as e:
        assert isinstance(e, CSRRejectedError)
    else:
        assert decoded


# -- certs_only ---------------------------------------------------------------------------------------------------


def test_certs_only_round_trips_through_a_pkcs7_reader(tmp_path: Path) -> None:
    manufacturer = ManufacturerCA(tmp_path)
    leaf = manufacturer.idevid("dev-1").certificate
    body = certs_only([leaf, manufacturer.certificate])
    lines = body.splitlines()
    assert body.endswith(b"\n")
    assert all(len(line) <= 76 for line in lines)
    assert len(lines) > 1
    decoded = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
    assert sorted(c.fingerprint(hashes.SHA256()) for c in decoded) == sorted(
        c.fingerprint(hashes.SHA256()) for c in (leaf, manufacturer.certificate)
    )
    single = pkcs7.load_der_pkcs7_certificates(base64.b64decode(certs_only([leaf])))
    assert single == [leaf]


# -- csr_identity_mismatch ----------------------------------------------------------------------------------------


def test_a_csr_naming_the_device_matches() -> None:
    assert csr_identity_mismatch(_DER, "dev-1", FLEET) is None
    assert csr_identity_mismatch(_csr([(NameOID.COMMON_NAME, "dev-1")], pem=True), "dev-1", FLEET) is None
    matching_san = _csr([(NameOID.COMMON_NAME, "dev-1")], dns=[f"dev-1.{FLEET}"])
    assert csr_identity_mismatch(matching_san, "dev-1", FLEET) is None


def test_a_csr_naming_another_device_by_cn_is_a_mismatch() -> None:
    reason = csr_identity_mismatch(_DER, "dev-2", FLEET)
    assert reason is not None
    assert "'dev-1'" in reason
    assert "CN=dev-2" in reason


def test_a_csr_without_a_cn_or_with_two_is_a_mismatch() -> None:
    none = csr_identity_mismatch(_csr([(NameOID.ORGANIZATION_NAME, "Acme")]), "dev-1", FLEET)
    assert none is not None
    assert "no common name" in none
    assert csr_identity_mismatch(_csr([]), "dev-1", FLEET) is not None
    two = _csr([(NameOID.COMMON_NAME, "dev-1"), (NameOID.COMMON_NAME, "dev-2")])
    assert csr_identity_mismatch(two, "dev-1", FLEET) is not None


@pytest.mark.parametrize(
    "dns",
    [
        [f"dev-2.{FLEET}"],
        [f"dev-1.{FLEET}", f"dev-2.{FLEET}"],
        [f"hub.{FLEET}"],
        ["dev-1.other.example"],
        ["dev-1"],
    ],
)
def test_a_san_naming_anything_but_the_devices_name_is_a_mismatch(dns: list[str]) -> None:
    reason = csr_identity_mismatch(_csr([(NameOID.COMMON_NAME, "dev-1")], dns=dns), "dev-1", FLEET)
    assert reason is not None
    assert "DNS name" in reason


@pytest.mark.parametrize("csr", [b"garbage", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", _DER[:-20], b"\x30\x00"])
def test_an_unparseable_csr_is_refused(csr: bytes) -> None:
    with pytest.raises(CSRRejectedError, match="could not be parsed"):
        csr_identity_mismatch(csr, "dev-1", FLEET)


def test_a_csr_with_an_unknown_version_is_refused() -> None:
    der = bytearray(_DER)
    index = bytes(der).index(b"\x02\x01\x00")  # CertificationRequestInfo.version INTEGER 0
    der[index + 2] = 5
    with pytest.raises(CSRRejectedError, match="could not be parsed"):
        csr_identity_mismatch(bytes(der), "dev-1", FLEET)


def test_a_csr_with_duplicate_extensions_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"dev-1.{FLEET}")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
        .sign(key, hashes.SHA256())
    )
    der = bytearray(request.public_bytes(serialization.Encoding.DER))
    index = bytes(der).index(b"\x06\x03\x55\x1d\x13")  # basicConstraints' OID, made a second subjectAltName's
    der[index + 4] = 0x11
    with pytest.raises(CSRRejectedError, match="extensions"):
        csr_identity_mismatch(bytes(der), "dev-1", FLEET)


_SAN_CSR = _csr([(NameOID.COMMON_NAME, "dev-1")], dns=[f"dev-1.{FLEET}"])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_csrs_raise_only_our_error(data: st.DataObject) -> None:
    der = bytearray(_SAN_CSR)
    for _ in range(data.draw(st.integers(1, 6))):
        der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
    try:
        csr_identity_mismatch(bytes(der), "dev-1", FLEET)
    except WardenError as e:
        assert isinstance(e, CSRRejectedError)


# -- load_ca_bundle -----------------------------------------------------------------------------------------------


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _self_signed(*, ca: bool | None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Not A CA")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    return builder.sign(key, hashes.SHA256())


def test_a_ca_bundle_of_cas_loads(tmp_path: Path) -> None:
    first, second = ManufacturerCA(tmp_path / "a"), ManufacturerCA(tmp_path / "b", name="Acme Root")
    loaded = load_ca_bundle(_pem(first.certificate) + _pem(second.certificate))
    assert loaded == [first.certificate, second.certificate]


@pytest.mark.parametrize("ca", [False, None], ids=["ca-false", "no-basic-constraints"])
def test_a_non_ca_is_refused(tmp_path: Path, ca: bool | None) -> None:
    manufacturer = ManufacturerCA(tmp_path)
    bundle = _pem(manufacturer.certificate) + _pem(_self_signed(ca=ca))
    with pytest.raises(InvalidInputError, match="is not a CA certificate"):
        load_ca_bundle(bundle)


def test_a_device_certificate_is_not_a_ca(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="is not a CA certificate"):
        load_ca_bundle(ManufacturerCA(tmp_path).idevid("dev-1").pem)


def test_too_many_cas_are_refused(tmp_path: Path) -> None:
    pem = _pem(ManufacturerCA(tmp_path).certificate)
    assert len(load_ca_bundle(pem * DEFAULT_LIMITS.max_ca_bundle_certs)) == DEFAULT_LIMITS.max_ca_bundle_certs
    with pytest.raises(InvalidInputError, match=f"1 to {DEFAULT_LIMITS.max_ca_bundle_certs} certificates"):
        load_ca_bundle(pem * (DEFAULT_LIMITS.max_ca_bundle_certs + 1))


@pytest.mark.parametrize(
    "bundle",
    [
        b"",
        b"garbage",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\n" + b"A" * 100,
    ],
)
def test_garbage_bundles_are_refused(bundle: bytes) -> None:
    with pytest.raises(InvalidInputError):
        load_ca_bundle(bundle)


def test_an_oversized_bundle_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="larger than"):
        load_ca_bundle(b"A" * (DEFAULT_LIMITS.max_pem_file_bytes + 1))


# -- core tokens --------------------------------------------------------------------------------------------------


class _CountingRandom:
    """Deterministic 'randomness': 0x00, 0x01, 0x02, ..."""

    def __init__(self) -> None:
        self._next = 0

    def token_bytes(self, n: int) -> bytes:
        out = bytes((self._next + i) % 256 for i in range(n))
        self._next += n
        return out


KEY = bytes(range(32))
_MALFORMED_MESSAGE = "malformed token"


def test_new_token_format() -> None:
    token = new_token("enr", _CountingRandom())
    assert token.id == "enr_0001020304050607"
    assert token.secret == base64.urlsafe_b64encode(bytes(range(8, 40))).rstrip(b"=").decode("ascii")
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token.secret)
    assert str(token) == f"{token.id}.{token.secret}"
    for _ in range(20):
        fresh = new_token("wt", SystemRandom())
        assert re.fullmatch(r"wt_[0-9a-f]{16}", fresh.id)
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", fresh.secret)
        assert split_token(str(fresh), prefix="wt") == fresh


@pytest.mark.parametrize("prefix", ["", "e", "enrol", "EN", "e1", "en_"])
def test_new_token_refuses_bad_prefixes(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        new_token(prefix, _CountingRandom())


def test_repr_hides_the_secret() -> None:
    token = new_token("enr", SystemRandom())
    assert token.secret not in repr(token)
    assert token.id in repr(token)
    assert "hidden" in repr(token)
    assert token.secret not in repr([token])
    assert token.secret not in f"{token!r}"


_GOOD = new_token("enr", _CountingRandom())


@pytest.mark.parametrize(
    "text",
    [
        "",
        ".",
        _GOOD.id,
        _GOOD.secret,
        f"{_GOOD.id}.",
        f".{_GOOD.secret}",
        f"{_GOOD.id}.{_GOOD.secret}.",
        f"{_GOOD.id}.{_GOOD.secret}.x",
        f"{_GOOD.id}.{_GOOD.secret[:-1]}",
        f"{_GOOD.id}.{_GOOD.secret}A",
        f"{_GOOD.id}.{_GOOD.secret[:-1]}=",
        f"{_GOOD.id}.{_GOOD.secret[:-1]}+",
        f"{_GOOD.id.upper()}.{_GOOD.secret}",
        f"wt_{_GOOD.id[4:]}.{_GOOD.secret}",
        f"enr_{_GOOD.id[4:-1]}.{_GOOD.secret}",
        f"enr_{_GOOD.id[4:-1]}g.{_GOOD.secret}",
        f" {_GOOD}",
        f"{_GOOD}\n",
        f"{_GOOD.id}.{_GOOD.secret[:-1]}\u00e9",
        "enr_" + "\u0660" * 16 + f".{_GOOD.secret}",  # Arabic-Indic digits are digits, but not hex
        "x" * 500 + "." + "y",
    ],
)
def test_split_token_refuses_malformed_tokens_without_echoing_them(text: str) -> None:
    with pytest.raises(AuthenticationError) as caught:
        split_token(text, prefix="enr")
    error = caught.value
    assert error.message == _MALFORMED_MESSAGE
    assert error.hint == "a token looks like <id>.<secret>"
    assert dict(error.context) == {}
    if len(text.strip()) > 2:  # not '.' or a single letter that the fixed message happens to contain
        assert text not in str(error)
        assert text not in error.diagnostics()


def test_split_token_parses_its_own_output() -> None:
    assert split_token(str(_GOOD), prefix="enr") == _GOOD
    with pytest.raises(AuthenticationError):
        split_token(str(_GOOD), prefix="wt")


def test_token_mac_binds_key_id_and_secret() -> None:
    mac = token_mac(KEY, _GOOD)
    assert re.fullmatch(r"[0-9a-f]{64}", mac)
    assert token_mac(KEY, _GOOD) == mac
    assert _GOOD.secret not in mac
    assert verify_mac(KEY, _GOOD, mac)
    assert not verify_mac(bytes(32), _GOOD, mac)
    other_secret = Token(_GOOD.id, _GOOD.secret[:-1] + ("A" if _GOOD.secret[-1] != "A" else "B"))
    assert not verify_mac(KEY, other_secret, mac)
    other_id = Token("enr_ffffffffffffffff", _GOOD.secret)
    assert not verify_mac(KEY, other_id, mac)
    assert not verify_mac(KEY, _GOOD, mac.upper())
    assert not verify_mac(KEY, _GOOD, "")


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.builds(
            lambda i, s: f"{i}.{s}",
            st.from_regex(r"[a-z]{2,5}_[0-9a-fA-F]{15,17}", fullmatch=True),
            st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-+/=.\n", max_size=50),
        ),
    )
)
def test_split_token_raises_only_authentication_errors(text: str) -> None:
    try:
        token = split_token(text, prefix="enr")
    except WardenError as e:
        assert isinstance(e, AuthenticationError)
        assert e.message == _MALFORMED_MESSAGE
    else:
        assert str(token) == text
        assert verify_mac(KEY, token, token_mac(KEY, token))
