"""Issuance from a CSR: the profile, not the CSR, decides what the certificate says."""

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from tests.conftest import make_csr
from warden.core import COMMAND_SIGNING_EKU_OID, InvalidInputError
from warden.pki import (
    BACKDATE,
    CertificateAuthority,
    IssuedIdentity,
    Profile,
    build_issuing_ca,
    build_root_ca,
    new_serial,
    parse_csr,
)

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def authority() -> CertificateAuthority:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = build_root_ca(key=root_key, org="Acme", now=NOW, days=3650, serial=new_serial(b"\x01" * 16))
    key = ec.generate_private_key(ec.SECP256R1())
    issuing = build_issuing_ca(
        key=key, root=root, root_key=root_key, org="Acme", now=NOW, days=1000, serial=new_serial(b"\x02" * 16)
    )
    return CertificateAuthority(certificate=issuing, key=key, org="Acme")


def issue(authority: CertificateAuthority, profile: Profile, identity: IssuedIdentity, csr: bytes) -> x509.Certificate:
    return authority.issue(
        csr=parse_csr(csr),
        profile=profile,
        identity=identity,
        serial=new_serial(b"\x42" * 16),
        now=NOW,
        validity=dt.timedelta(days=30),
    )


EKU = {
    Profile.DEVICE: ExtendedKeyUsageOID.CLIENT_AUTH,
    Profile.GATEWAY: ExtendedKeyUsageOID.CLIENT_AUTH,
    Profile.SERVICE: ExtendedKeyUsageOID.SERVER_AUTH,
    Profile.HUB_CLIENT: ExtendedKeyUsageOID.CLIENT_AUTH,
    Profile.OCSP_SIGNER: ExtendedKeyUsageOID.OCSP_SIGNING,
    # Warden's own command-signing usage: agents accept a command's signer only with it (warden.broker._commands)
    Profile.COMMAND_SIGNER: x509.ObjectIdentifier(COMMAND_SIGNING_EKU_OID),
}


@pytest.mark.parametrize("profile", list(Profile))
def test_profile_decides_extensions(authority: CertificateAuthority, profile: Profile) -> None:
    identity = (
        IssuedIdentity.for_device("dev-1", "fleet.example.com")
        if profile in (Profile.DEVICE, Profile.GATEWAY)
        else IssuedIdentity.for_service(("hub.fleet.example.com",))
    )
    hostile = make_csr(
        "p256",
        common_name="admin",
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (x509.SubjectAlternativeName([x509.DNSName("evil.example.com")]), False),
        ],
    )
    cert = issue(authority, profile, identity, hostile)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [EKU[profile]]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert sans == list(identity.dns_names)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity.common_name
    key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert key_usage.critical and key_usage.value.digital_signature and not key_usage.value.key_cert_sign
    has_nocheck = any(e.oid == ExtensionOID.OCSP_NO_CHECK for e in cert.extensions)
    assert has_nocheck is (profile is Profile.OCSP_SIGNER)


def test_validity_is_backdated_and_bounded(authority: CertificateAuthority) -> None:
    cert = issue(authority, Profile.DEVICE, IssuedIdentity.for_device("dev-1", "f.example.com"), make_csr())
    assert cert.not_valid_before_utc == NOW - BACKDATE
    assert cert.not_valid_after_utc == NOW + dt.timedelta(days=30)
    long = authority.issue(
        csr=parse_csr(make_csr()),
        profile=Profile.DEVICE,
        identity=IssuedIdentity.for_device("dev-1", "f.example.com"),
        serial=5,
        now=NOW,
        validity=dt.timedelta(days=100_000),
    )
    assert long.not_valid_after_utc == authority.certificate.not_valid_after_utc


def test_key_identifiers_chain(authority: CertificateAuthority) -> None:
    cert = issue(authority, Profile.DEVICE, IssuedIdentity.for_device("dev-1", "f.example.com"), make_csr())
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = authority.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)


def test_ca_path_lengths(authority: CertificateAuthority) -> None:
    assert authority.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0


def test_urls_when_configured() -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = build_root_ca(key=root_key, org="Acme", now=NOW, days=3650, serial=1)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 1
    ca = CertificateAuthority(
        certificate=root,
        key=root_key,
        org="Acme",
        crl_url="https://h.example.com/pki/crl",
        ocsp_url="https://h.example.com/pki/ocsp",
    )
    cert = issue(ca, Profile.DEVICE, IssuedIdentity.for_device("dev-1", "f.example.com"), make_csr())
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert cdp[0].full_name == [x509.UniformResourceIdentifier("https://h.example.com/pki/crl")]
    aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert aia[0].access_location == x509.UniformResourceIdentifier("https://h.example.com/pki/ocsp")


def test_serials_are_128_bit_and_positive() -> None:
    assert new_serial(b"\xff" * 16) == 2**128 - 1
    assert new_serial(b"\x00" * 16) == 1
    with pytest.raises(ValueError, match="16 random bytes"):
        new_serial(b"\x00" * 8)


@pytest.mark.parametrize(
    ("names", "message"),
    [((), "1 to 20"), (("hub",), "invalid DNS name"), (("a.example.com", "a.example.com"), "twice")],
)
def test_service_identity_validation(names: tuple[str, ...], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        IssuedIdentity.for_service(names)
