"""The PKCS#11 key store against a real SoftHSM2 token, plus the RFC 7512 URI parser it is configured with.

Every token test gets its own token directory (``SOFTHSM2_CONF`` set with monkeypatch) and unloads the module
before and after, so no test sees another's keys. Run from the repository root with ``python -m pytest`` (the
helper is imported as ``tests.softhsm``).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID
from pkcs11 import exceptions as p11e
from pkcs11.constants import Attribute, ObjectClass

from tests.softhsm import SKIP_REASON, SOFTHSM_AVAILABLE, SOFTHSM_MODULE, make_softhsm_token, unload_module
from warden.core import InvalidInputError, KeyStoreError, KeyStoreLockedError
from warden.pki._keystore import KeyAlgorithm, KeyStore
from warden.pki._pkcs11 import (
    Pkcs11KeyStore,
    Pkcs11PrivateKey,
    Pkcs11Uri,
    _login_error,
    parse_pkcs11_uri,
)

PIN = "1234"
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SECRET_PIN = "s3cret-PIN-4711"

# -- RFC 7512 URI parsing (no token needed) ------------------------------------------------------------------

GOOD_URIS: list[tuple[str, dict[str, object]]] = [
    (
        f"pkcs11:token=warden?module-path={MODULE}&pin-value=1234",
        {"token": "warden", "module_path": MODULE, "pin_value": "1234"},
    ),
    (
        "pkcs11:token=My%20CA%20Token;serial=0123abcd?module-path=%2Fopt%2Fhsm%2Flib%2Bp11.so",
        {"token": "My CA Token", "serial": "0123abcd", "module_path": "/opt/hsm/lib+p11.so"},
    ),
    ("pkcs11:token=%C3%A9t%C3%A9?module-path=/m.so", {"token": "été"}),
    ("pkcs11:token=a=b&c?module-path=/m.so", {"token": "a=b&c"}),
    ("PKCS11:TOKEN=warden?MODULE-PATH=/m.so", {"token": "warden", "module_path": "/m.so"}),
    ("pkcs11:slot-id=1234567?module-path=/m.so", {"slot_id": 1234567, "token": None}),
    ("pkcs11:serial=ABC?module-path=/m.so&pin-value=p%26w%3Dx", {"serial": "ABC", "pin_value": "p&w=x"}),
    (
        "pkcs11:token=t;object=root;id=%01%02%FF;type=private?module-path=/m.so",
        {"object_label": "root", "object_id": b"\x01\x02\xff", "object_type": "private"},
    ),
    (
        "pkcs11:token=t;manufacturer=SoftHSM%20project;model=SoftHSM%20v2;library-version=2.6?module-path=/m.so",
        {"manufacturer": "SoftHSM project", "model": "SoftHSM v2", "library_version": (2, 6)},
    ),
    ("pkcs11:token=t;library-version=3?module-path=/m.so", {"library_version": (3, 0)}),
    ("pkcs11:token=t;x-vendor=whatever?module-path=/m.so&x-q=1&x-q=2", {"token": "t"}),
    (
        "pkcs11:token=t?module-path=/m.so&pin-source=file:/etc/warden/pin",
        {"pin_file": Path("/etc/warden/pin")},
    ),
    ("pkcs11:token=t?module-path=/m.so&pin-source=file:///etc/pin", {"pin_file": Path("/etc/pin")}),
    ("pkcs11:token=t?module-path=/m.so&module-name=softhsm2", {"module_name": "softhsm2"}),
]


@pytest.mark.parametrize(("uri", "expected"), GOOD_URIS, ids=[u for u, _ in GOOD_URIS])
def test_parse_good_uris(uri: str, expected: dict[str, object]) -> None:
    parsed = parse_pkcs11_uri(uri)
    for name, value in expected.items():
        assert getattr(parsed, name) == value, name


@pytest.mark.parametrize(("uri", "expected"), GOOD_URIS, ids=[u for u, _ in GOOD_URIS])
def test_redacted_form_reparses_to_the_same_uri(uri: str, expected: dict[str, object]) -> None:
    parsed = parse_pkcs11_uri(uri)
    again = parse_pkcs11_uri(parsed.redacted())
    if parsed.pin_value is None:
        assert again == parsed
    else:
        assert again.pin_value == "***"


BAD_URIS: list[tuple[str, str]] = [
    ("http://example.com/", "must start with 'pkcs11:'"),
    ("pkcs12:token=t?module-path=/m.so", "must start with 'pkcs11:'"),
    ("pkcs11:token=a;token=b?module-path=/m.so", "token attribute appears more than once"),
    ("pkcs11:token=a;TOKEN=b?module-path=/m.so", "token attribute appears more than once"),
    ("pkcs11:token=a?module-path=/m.so&module-path=/n.so", "module-path attribute appears more than once"),
    ("pkcs11:token=a;x-v=1;x-v=2?module-path=/m.so", "x-v attribute appears more than once"),
    ("pkcs11:token=warden", "has no module-path"),
    ("pkcs11:token=warden?module-name=softhsm2", "has no module-path"),
    ("pkcs11:token=warden?module-path=libsofthsm2.so", "must be an absolute path"),
    ("pkcs11:model=x;manufacturer=y?module-path=/m.so", "does not say which token"),
    ("pkcs11:token=?module-path=/m.so", "does not say which token"),
    ("pkcs11:token=a%zzb?module-path=/m.so", "'%' without two hex digits"),
    ("pkcs11:token=a%4?module-path=/m.so", "'%' without two hex digits"),
    ("pkcs11:token=%FF%FE?module-path=/m.so", "not UTF-8"),
    ("pkcs11:token=a/b?module-path=/m.so", "must be percent-encoded"),
    ("pkcs11:token=a b?module-path=/m.so", "must be percent-encoded"),
    ("pkcs11:token=a#frag?module-path=/m.so", "must be percent-encoded"),
    ("pkcs11:token=a?module-path=/m.so;x=1", "must be percent-encoded"),
    ("pkcs11:token=a;;model=b?module-path=/m.so", "not name=value"),
    ("pkcs11:token=a;model?module-path=/m.so", "not name=value"),
    ("pkcs11:token=a?module-path=/m.so&", "not name=value"),
    ("pkcs11:slot-id=12a?module-path=/m.so", "slot-id"),
    ("pkcs11:slot-id=%31?module-path=/m.so", "slot-id"),
    ("pkcs11:token=t;library-version=2.x?module-path=/m.so", "library-version"),
    ("pkcs11:token=t;library-version=256?module-path=/m.so", "library-version"),
    ("pkcs11:token=t;type=bogus?module-path=/m.so", "type in the PKCS#11 URI"),
    ("pkcs11:token=t?module-path=/m.so&pin-value=1&pin-source=file:/p", "both pin-value and pin-source"),
    ("pkcs11:token=t?module-path=/m.so&pin-source=|/bin/cat%20/p", "file: paths only"),
    ("pkcs11:token=t?module-path=/m.so&pin-source=/etc/pin", "file: paths only"),
    ("pkcs11:token=t?module-path=/m.so&pin-source=file:pin.txt", "absolute file path"),
    ("pkcs11:token=t?module-path=/m.so&pin-source=file://host/pin", "local file"),
    ("pkcs11:token=" + "a" * 5000 + "?module-path=/m.so", "longer than 4096 characters"),
]


@pytest.mark.parametrize(("uri", "message"), BAD_URIS, ids=[u[:60] for u, _ in BAD_URIS])
def test_parse_bad_uris(uri: str, message: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_pkcs11_uri(uri)
    assert message in info.value.message
    assert "\n" not in info.value.message
    assert info.value.hint


def test_missing_module_path_hint_names_an_example() -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_pkcs11_uri("pkcs11:token=warden")
    assert info.value.hint == "e.g. module-path=/usr/lib/softhsm/libsofthsm2.so"


def test_a_uri_of_exactly_4_kib_is_accepted() -> None:
    prefix = "pkcs11:token="
    suffix = "?module-path=/m.so"
    uri = prefix + "a" * (4096 - len(prefix) - len(suffix)) + suffix
    assert len(uri) == 4096
    assert parse_pkcs11_uri(uri).token is not None


def test_the_pin_is_not_in_repr_str_or_redacted() -> None:
    uri = parse_pkcs11_uri(f"pkcs11:token=warden?module-path={MODULE}&pin-value={SECRET_PIN}")
    assert uri.pin_value == SECRET_PIN
    for text in (repr(uri), str(uri), uri.redacted(), f"{uri}", repr(Pkcs11KeyStore(uri))):
        assert SECRET_PIN not in text
    assert uri.redacted() == f"pkcs11:token=warden?module-path={MODULE}&pin-value=***"
    assert "pin_value" not in repr(uri)


@pytest.mark.parametrize(
    "uri",
    [
        f"pkcs11:token=t?module-path=/m.so&pin-value={SECRET_PIN}%zz",
        f"pkcs11:token=t?module-path=/m.so&pin-value={SECRET_PIN};",
        f"pkcs11:token=t?module-path=/m.so&pin-value={SECRET_PIN}&pin-source=file:/p",
        f"pkcs11:token=t?module-path=/m.so&{SECRET_PIN}",
        f"{SECRET_PIN}:token=t",
    ],
)
def test_parse_errors_never_echo_the_pin(uri: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_pkcs11_uri(uri)
    assert SECRET_PIN not in info.value.diagnostics()


def test_pin_source_file_is_read_and_its_newline_stripped(tmp_path: Path) -> None:
    pin_file = tmp_path / "token.pin"
    pin_file.write_text(SECRET_PIN + "\n")
    uri = parse_pkcs11_uri(f"pkcs11:token=t?module-path=/m.so&pin-source=file:{pin_file}")
    assert uri.read_pin() == SECRET_PIN
    assert SECRET_PIN not in repr(uri) + str(uri)


def test_pin_source_file_over_1_kib_is_refused(tmp_path: Path) -> None:
    pin_file = tmp_path / "token.pin"
    pin_file.write_text("x" * 1025)
    uri = parse_pkcs11_uri(f"pkcs11:token=t?module-path=/m.so&pin-source=file:{pin_file}")
    with pytest.raises(KeyStoreError, match="larger than 1024 bytes"):
        uri.read_pin()


def test_missing_pin_source_file_is_a_key_store_error(tmp_path: Path) -> None:
    uri = parse_pkcs11_uri(f"pkcs11:token=t?module-path=/m.so&pin-source=file:{tmp_path}/nope")
    with pytest.raises(KeyStoreError, match="cannot read the PIN file"):
        uri.read_pin()


def test_locked_pin_maps_to_locked_error_with_so_pin_hint() -> None:
    # SoftHSM 2.6 never locks a user PIN (it takes any number of wrong tries), so the mapping is tested here.
    error = _login_error(p11e.PinLocked(), "labelled 'warden'", final_try=False)
    assert isinstance(error, KeyStoreLockedError)
    assert error.hint is not None
    assert "SO PIN" in error.hint
    final = _login_error(p11e.PinIncorrect(), "labelled 'warden'", final_try=True)
    assert isinstance(final, KeyStoreLockedError)
    assert final.hint is not None
    assert "locks the token" in final.hint


# -- against a SoftHSM2 token --------------------------------------------------------------------------------


@pytest.fixture
def token_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    uri, env = make_softhsm_token(tmp_path, pin=PIN)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    unload_module()
    yield uri
    unload_module()


@pytest.fixture
def store(token_uri: str) -> Iterator[Pkcs11KeyStore]:
    with Pkcs11KeyStore(parse_pkcs11_uri(token_uri)) as key_store:
        yield key_store


def _token_private_key_attributes(token_uri: str, label: str) -> dict[Attribute, object]:
    """Read the private key's attributes through python-pkcs11 directly, in a session of our own."""
    uri = parse_pkcs11_uri(token_uri)
    token = pkcs11.lib(uri.module_path).get_token(token_label=uri.token)
    with token.open(user_pin=PIN) as session:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
        attrs = key.get_attributes(
            [
                Attribute.SENSITIVE,
                Attribute.EXTRACTABLE,
                Attribute.ALWAYS_SENSITIVE,
                Attribute.NEVER_EXTRACTABLE,
                Attribute.TOKEN,
                Attribute.PRIVATE,
                Attribute.SIGN,
                Attribute.DERIVE,
                Attribute.LABEL,
            ]
        )
        with pytest.raises(p11e.AttributeSensitive):
            key[Attribute.VALUE]
        return dict(attrs)


@pytest.mark.parametrize(("algorithm", "curve"), [(KeyAlgorithm.P256, ec.SECP256R1), (KeyAlgorithm.P384, ec.SECP384R1)])
@pytest.mark.parametrize(
    "hash_algorithm", [hashes.SHA256(), hashes.SHA384(), hashes.SHA512()], ids=lambda h: str(h.name)
)
@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_generate_sign_verify(
    store: Pkcs11KeyStore,
    algorithm: KeyAlgorithm,
    curve: type[ec.EllipticCurve],
    hash_algorithm: hashes.HashAlgorithm,
) -> None:
    key = store.generate("root", algorithm)
    assert isinstance(key, Pkcs11PrivateKey)
    assert isinstance(key.curve, curve)
    assert key.key_size == curve().key_size
    assert store.exists("root")
    data = b"warden signs this"
    signature = key.sign(data, ec.ECDSA(hash_algorithm))
    key.public_key().verify(signature, data, ec.ECDSA(hash_algorithm))

    digest = hashes.Hash(hash_algorithm)
    digest.update(data)
    prehashed = key.sign(digest.finalize(), ec.ECDSA(Prehashed(hash_algorithm)))
    key.public_key().verify(prehashed, data, ec.ECDSA(hash_algorithm))


@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_a_new_key_store_loads_the_same_key(token_uri: str, store: Pkcs11KeyStore) -> None:
    generated = store.generate("issuing", KeyAlgorithm.P384)
    store.close()
    with Pkcs11KeyStore(parse_pkcs11_uri(token_uri)) as other:
        loaded = other.load("issuing")
        assert loaded.public_key() == generated.public_key()
        signature = loaded.sign(b"x", ec.ECDSA(hashes.SHA384()))
        generated.public_key().verify(signature, b"x", ec.ECDSA(hashes.SHA384()))
        assert other.exists("issuing")
        assert not other.exists("nope")


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_certificate_signed_by_the_token_verifies_with_openssl(
    store: Pkcs11KeyStore, tmp_path: Path, algorithm: KeyAlgorithm
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH")
    store.generate("root", algorithm)
    ca_key = store.load("root")  # the loaded key, as the CA uses it after a restart
    now = datetime.now(UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Warden Test Root CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_key.public_key().verify(ca_cert.signature, ca_cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    device_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-1")]))
        .issuer_name(ca_name)
        .public_key(device_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = tmp_path / "ca.pem"
    leaf_pem = tmp_path / "leaf.pem"
    ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    leaf_pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    for target in (ca_pem, leaf_pem):
        result = subprocess.run(
            ["openssl", "verify", "-x509_strict", "-CAfile", str(ca_pem), str(target)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip().endswith(": OK")


@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_the_key_on_the_token_is_sensitive_and_non_extractable(token_uri: str, store: Pkcs11KeyStore) -> None:
    store.generate("root", KeyAlgorithm.P256)
    # Our own session logs in too; close the store's first, since a second C_Login in one process is refused.
    store.close()
    attrs = _token_private_key_attributes(token_uri, "root")
    assert attrs[Attribute.EXTRACTABLE] is False
    assert attrs[Attribute.SENSITIVE] is True
    assert attrs[Attribute.NEVER_EXTRACTABLE] is True
    assert attrs[Attribute.ALWAYS_SENSITIVE] is True
    assert attrs[Attribute.TOKEN] is True
    assert attrs[Attribute.PRIVATE] is True
    assert attrs[Attribute.SIGN] is True
    assert attrs[Attribute.DERIVE] is False
    assert attrs[Attribute.LABEL] == "root"


@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_the_key_refuses_to_leave_the_token(store: Pkcs11KeyStore) -> None:
    key = store.generate("root", KeyAlgorithm.P256)
    with pytest.raises(KeyStoreError, match="non-extractable"):
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(KeyStoreError, match="non-extractable"):
        key.private_numbers()
    with pytest.raises(KeyStoreError, match="signing only"):
        key.exchange(ec.ECDH(), ec.generate_private_key(ec.SECP256R1()).public_key())


@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_weak_or_deterministic_signatures_are_refused(store: Pkcs11KeyStore) -> None:
    key = store.generate("root", KeyAlgorithm.P256)
    with pytest.raises(KeyStoreError, match="refusing to sign with sha1"):
        key.sign(b"x", ec.ECDSA(hashes.SHA1()))  # noqa: S303
    with pytest.raises(KeyStoreError, match="shorter than 256 bits"):
        key.sign(b"\0" * 20, ec.ECDSA(Prehashed(hashes.SHA1())))  # noqa: S303
    with pytest.raises(KeyStoreError, match="prehashed digest must be 32 bytes"):
        key.sign(b"\0" * 31, ec.ECDSA(Prehashed(hashes.SHA256())))
    with pytest.raises(KeyStoreError, match="deterministically"):
        key.sign(b"x", ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_wrong_pin_is_a_locked_error_without_the_pin(token_uri: str) -> None:
    with (
        Pkcs11KeyStore(parse_pkcs11_uri(token_uri), pin=SECRET_PIN) as key_store,
        pytest.raises(KeyStoreLockedError) as info,
    ):
        key_store.exists("root")
    assert info.value.message == "wrong PIN for the PKCS#11 token labelled 'warden'"
    assert SECRET_PIN not in info.value.diagnostics()
    assert isinstance(info.value.__cause__, p11e.PinIncorrect)


@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_explicit_pin_overrides_the_uri(token_uri: str, tmp_path: Path) -> None:
    wrong = token_uri.replace(f"pin-value={PIN}", "pin-value=0000")
    with Pkcs11KeyStore(parse_pkcs11_uri(wrong), pin=PIN) as key_store:
        assert not key_store.exists("root")
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    from_file = token_uri.replace(f"pin-value={PIN}", f"pin-source=file:{pin_file}")
    with Pkcs11KeyStore(parse_pkcs11_uri(from_file)) as key_store:
        assert not key_store.exists("root")


@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_no_pin_at_all_is_a_locked_error(token_uri: str) -> None:
    no_pin = token_uri.replace(f"&pin-value={PIN}", "")
    with (
        Pkcs11KeyStore(parse_pkcs11_uri(no_pin)) as key_store,
        pytest.raises(KeyStoreLockedError, match="no PIN"),
    ):
        key_store.exists("root")


@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_unknown_token_label(token_uri: str) -> None:
    uri = parse_pkcs11_uri(token_uri.replace("token=warden", "token=nope"))
    with Pkcs11KeyStore(uri) as key_store, pytest.raises(KeyStoreError) as info:
        key_store.load("root")
    assert info.value.message == "no PKCS#11 token labelled 'nope'"
    assert info.value.hint is not None
    assert not isinstance(info.value, KeyStoreLockedError)


@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_token_found_by_serial_and_slot_id(token_uri: str) -> None:
    uri = parse_pkcs11_uri(token_uri)
    token = pkcs11.lib(uri.module_path).get_token(token_label="warden")
    serial = token.serial.decode()
    slot_id = token.slot.slot_id
    for other in (
        f"serial={serial}",
        f"slot-id={slot_id}",
        f"token=warden;serial={serial};slot-id={slot_id}",
    ):
        with Pkcs11KeyStore(parse_pkcs11_uri(token_uri.replace("token=warden", other))) as key_store:
            assert not key_store.exists("root")
    with (
        Pkcs11KeyStore(parse_pkcs11_uri(token_uri.replace("token=warden", "token=warden;serial=0"))) as key_store,
        pytest.raises(KeyStoreError, match="no PKCS#11 token labelled 'warden'"),
    ):
        key_store.exists("root")


@pytest.mark.parametrize("path", ["/nonexistent/libpkcs11.so", "/etc/hostname"])
@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_module_that_cannot_be_loaded(token_uri: str, path: str) -> None:
    uri = parse_pkcs11_uri(token_uri.replace(SOFTHSM_MODULE, path))
    with Pkcs11KeyStore(uri) as key_store, pytest.raises(KeyStoreError) as info:
        key_store.exists("root")
    assert path in info.value.message
    assert PIN not in info.value.diagnostics()


@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_generating_an_existing_label_is_refused(store: Pkcs11KeyStore) -> None:
    first = store.generate("root", KeyAlgorithm.P256)
    with pytest.raises(KeyStoreError, match="already exists"):
        store.generate("root", KeyAlgorithm.P384)
    assert store.load("root").public_key() == first.public_key()


@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_delete_removes_both_halves(token_uri: str, store: Pkcs11KeyStore) -> None:
    key = store.generate("root", KeyAlgorithm.P256)
    store.generate("issuing", KeyAlgorithm.P256)
    store.delete("root")
    assert not store.exists("root")
    assert store.exists("issuing")
    with pytest.raises(KeyStoreError, match="is not on the PKCS#11 token"):
        store.load("root")
    with pytest.raises(KeyStoreError, match="no longer on the PKCS#11 token"):
        key.sign(b"x", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(KeyStoreError, match="is not on the PKCS#11 token"):
        store.delete("root")
    store.close()
    uri = parse_pkcs11_uri(token_uri)
    token = pkcs11.lib(uri.module_path).get_token(token_label="warden")
    with token.open(user_pin=PIN) as session:
        assert list(session.get_objects({Attribute.LABEL: "root"})) == []
    # Generating under the freed label works again.
    assert store.generate("root", KeyAlgorithm.P384).key_size == 384


@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_invalid_labels_are_refused(store: Pkcs11KeyStore) -> None:
    for method in (store.exists, store.load, store.delete, store.describe):
        with pytest.raises(InvalidInputError):
            method("Root Key")


@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_describe_and_kind(store: Pkcs11KeyStore) -> None:
    key_store: KeyStore = store  # checked by mypy: Pkcs11KeyStore satisfies the protocol
    assert key_store.kind == "pkcs11"
    text = key_store.describe("root")
    assert "'root'" in text
    assert "labelled 'warden'" in text
    assert SOFTHSM_MODULE in text
    assert PIN not in text.replace(SOFTHSM_MODULE, "")


@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_concurrent_signing_shares_one_session(store: Pkcs11KeyStore) -> None:
    key = store.generate("root", KeyAlgorithm.P256)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(10):
                data = f"{n}-{i}".encode()
                key.public_key().verify(key.sign(data, ec.ECDSA(hashes.SHA256())), data, ec.ECDSA(hashes.SHA256()))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_the_session_is_reopened_after_the_module_is_reinitialised(store: Pkcs11KeyStore) -> None:
    key = store.generate("root", KeyAlgorithm.P256)
    key.sign(b"before", ec.ECDSA(hashes.SHA256()))
    pkcs11.lib(SOFTHSM_MODULE).reinitialize()  # every session handle is now invalid
    signature = key.sign(b"after", ec.ECDSA(hashes.SHA256()))
    key.public_key().verify(signature, b"after", ec.ECDSA(hashes.SHA256()))
    unload_module()  # and the module object itself is gone
    assert store.exists("root")


@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_closing_one_key_store_does_not_log_out_another(token_uri: str) -> None:
    # PKCS#11 logins are per process and token: C_Logout from one store's session would log out the other.
    first = Pkcs11KeyStore(parse_pkcs11_uri(token_uri))
    second = Pkcs11KeyStore(parse_pkcs11_uri(token_uri))
    try:
        first.generate("root", KeyAlgorithm.P256)
        key = second.load("root")
        first.close()
        assert second.exists("root")
        signature = key.sign(b"x", ec.ECDSA(hashes.SHA256()))
        key.public_key().verify(signature, b"x", ec.ECDSA(hashes.SHA256()))
        first.close()  # closing twice is harmless
        assert first.exists("root")  # and a closed store attaches again
    finally:
        first.close()
        second.close()


@pytest.mark.softhsm
@pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)
def test_a_lone_public_half_is_not_reported_as_no_key(token_uri: str, store: Pkcs11KeyStore) -> None:
    store.generate("root", KeyAlgorithm.P256)
    store.close()
    uri = parse_pkcs11_uri(token_uri)
    token = pkcs11.lib(uri.module_path).get_token(token_label="warden")
    with token.open(rw=True, user_pin=PIN) as session:
        session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="root").destroy()
    with pytest.raises(KeyStoreError, match="only the public half"):
        store.exists("root")
    with pytest.raises(KeyStoreError, match="already exists"):
        store.generate("root", KeyAlgorithm.P256)


def test_uri_dataclass_is_frozen() -> None:
    uri = parse_pkcs11_uri("pkcs11:token=t?module-path=/m.so")
    assert isinstance(uri, Pkcs11Uri)
    with pytest.raises(AttributeError):
        uri.token = "other"  # type: ignore[misc]
