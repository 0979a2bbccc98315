from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import make_csr, openssl
from warden.core import CSRRejectedError, WardenError
from warden.pki import parse_csr


@pytest.mark.parametrize(
    ("kind", "description"),
    [("p256", "EC P-256"), ("p384", "EC P-384"), ("ed25519", "Ed25519"), ("rsa2048", "RSA-2048")],
)
def test_accepted_keys(kind: str, description: str) -> None:
    request = parse_csr(make_csr(kind))
    assert request.key_description == description
    assert len(request.key_fingerprint) == 64


@pytest.mark.parametrize(
    ("kind", "message"),
    [("rsa1024", "fewer than 2048"), ("p521", "unsupported curve"), ("p224", "unsupported curve")],
)
def test_refused_keys(kind: str, message: str) -> None:
    with pytest.raises(CSRRejectedError, match=message):
        parse_csr(make_csr(kind))


def test_der_is_accepted() -> None:
    pem = make_csr("p256")
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    assert parse_csr(der).key_description == "EC P-256"


def _tampered_signature() -> bytes:
    der = bytearray(x509.load_pem_x509_csr(make_csr("p256")).public_bytes(serialization.Encoding.DER))
    # Flip a bit in the subject's CN ("requested-name" is in the signed part): the signature no longer matches.
    index = bytes(der).index(b"requested-name")
    der[index] ^= 0x01
    return bytes(der)


BAD_INPUT = [
    ("empty", b"", "empty"),
    ("garbage", b"not a csr at all", "could not be parsed"),
    ("truncated pem", make_csr("p256")[:200], "could not be parsed"),
    (
        "truncated der",
        x509.load_pem_x509_csr(make_csr("p256")).public_bytes(serialization.Encoding.DER)[:-10],
        "could not be parsed",
    ),
    ("oversized", b"-----BEGIN CERTIFICATE REQUEST-----\n" + b"A" * 17_000, "limit of 16384"),
    ("bad signature", _tampered_signature(), "does not verify"),
]


@pytest.mark.parametrize(("data", "message"), [(d, m) for _, d, m in BAD_INPUT], ids=[n for n, _, _ in BAD_INPUT])
def test_bad_input_is_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(CSRRejectedError, match=message) as info:
        parse_csr(data)
    assert info.value.diagnostics()


def test_sha1_signature_refused(tmp_path: Path) -> None:
    # cryptography will not sign with SHA-1 any more; openssl still can, as an old device might.
    key = tmp_path / "k.pem"
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key))
    csr = openssl("req", "-new", "-key", str(key), "-sha1", "-subj", "/CN=x").stdout
    with pytest.raises(CSRRejectedError, match="sha1"):
        parse_csr(csr)


def test_requested_ca_and_sans_are_noted_as_ignored() -> None:
    pem = make_csr(
        "p256",
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (x509.SubjectAlternativeName([x509.DNSName("evil.example.com")]), False),
        ],
    )
    request = parse_csr(pem)
    assert request.ignored_requests == ("CA:TRUE", "subjectAltName")


def test_rsa_exponent_must_be_65537() -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=3, key_size=2048)
    with pytest.raises(CSRRejectedError, match="65537"):
        parse_csr(make_csr(key=key))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_raise_only_our_error(data: bytes) -> None:
    try:
        parse_csr(data)
    except CSRRejectedError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_csrs_raise_only_our_error(data: st.DataObject) -> None:
    der = bytearray(x509.load_pem_x509_csr(_P256_CSR).public_bytes(serialization.Encoding.DER))
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(der) - 1))
        der[position] = data.draw(st.integers(0, 255))
    try:
        request = parse_csr(bytes(der))
    except WardenError as e:
        assert isinstance(e, CSRRejectedError)
    else:
        # A mutation outside the signed part or the signature may still verify; then the key must be one we accept.
        assert isinstance(request.public_key, ec.EllipticCurvePublicKey)


_P256_CSR = make_csr("p256")
