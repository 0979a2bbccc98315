"""The CA hierarchy and certificate issuance. Pure: keys, time and serial numbers come in as arguments.

Invariants:
- The root CA has ``pathLenConstraint = 1`` and signs only the issuing CA; the issuing CA has
  ``pathLenConstraint = 0`` and signs every end-entity certificate and the CRL.
- An end-entity certificate's subject, SANs and extensions come from its profile and the identity the caller
  (the registry) vouches for, never from the CSR.
- ``notBefore`` is back-dated by :data:`BACKDATE` so that a peer whose clock runs a little behind accepts it;
  ``notAfter`` never outlives the issuing CA.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from warden.core import InvalidInputError, PKIError, validate_device_id, validate_dns_name
from warden.pki._csr import CertificateSigningRequest, PublicKey
from warden.pki._profiles import PROFILES, Profile

__all__ = [
    "BACKDATE",
    "CertificateAuthority",
    "IssuedIdentity",
    "build_issuing_ca",
    "build_root_ca",
    "hash_for",
    "new_serial",
]

BACKDATE = dt.timedelta(minutes=5)


def hash_for(key: ec.EllipticCurvePrivateKey) -> hashes.SHA256 | hashes.SHA384:
    """SHA-384 with a P-384 key, SHA-256 otherwise (RFC 5480 section 4)."""
    return hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()


def new_serial(random_bytes: bytes) -> int:
    """A positive serial from 16 CSPRNG bytes (128 bits of entropy; RFC 5280 allows up to 20 octets)."""
    if len(random_bytes) != 16:
        raise ValueError("a serial needs exactly 16 random bytes")
    serial = int.from_bytes(random_bytes, "big")
    # Zero is not a legal serial; the chance is 2**-128, and a fixed non-zero stand-in keeps this function total.
    return serial or 1


def _name(common_name: str, org: str) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if org:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attributes)


def build_root_ca(
    *, key: ec.EllipticCurvePrivateKey, org: str, now: dt.datetime, days: int, serial: int
) -> x509.Certificate:
    public = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    name = _name(f"{org} Warden Root CA", org)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hash_for(key))
    )


def build_issuing_ca(
    *,
    key: ec.EllipticCurvePrivateKey,
    root: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    org: str,
    now: dt.datetime,
    days: int,
    serial: int,
) -> x509.Certificate:
    public = key.public_key()
    not_after = min(now + dt.timedelta(days=days), root.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(f"{org} Warden Issuing CA", org))
        .issuer_name(root.subject)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(_aki(root), critical=False)
        .sign(root_key, hash_for(root_key))
    )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


@dataclass(frozen=True, slots=True)
class IssuedIdentity:
    """Who a certificate names: the CN and the DNS SANs. Build it with the class methods, which validate."""

    common_name: str
    dns_names: tuple[str, ...]

    @classmethod
    def for_device(cls, device_id: str, fleet_domain: str) -> IssuedIdentity:
        validate_device_id(device_id)
        return cls(device_id, (f"{device_id}.{fleet_domain}",))

    @classmethod
    def for_service(cls, names: tuple[str, ...]) -> IssuedIdentity:
        if not names or len(names) > 20:
            raise InvalidInputError("a service certificate needs 1 to 20 DNS names")
        for name in names:
            validate_dns_name(name)
        if len(set(names)) != len(names):
            raise InvalidInputError("a DNS name is given twice")
        return cls(names[0], tuple(names))


class CertificateAuthority:
    """The issuing CA: signs end-entity certificates from verified CSRs."""

    def __init__(
        self,
        *,
        certificate: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        org: str,
        crl_url: str = "",
        ocsp_url: str = "",
    ) -> None:
        self.certificate = certificate
        self.key = key
        self.org = org
        self._crl_url = crl_url
        self._ocsp_url = ocsp_url
        self._aki = _aki(certificate)
        self._hash = hash_for(key)

    def issue(
        self,
        *,
        csr: CertificateSigningRequest,
        profile: Profile,
        identity: IssuedIdentity,
        serial: int,
        now: dt.datetime,
        validity: dt.timedelta,
    ) -> x509.Certificate:
        spec = PROFILES[profile]
        not_after = min(now + validity, self.certificate.not_valid_after_utc)
        if not_after <= now:
            raise PKIError("the issuing CA has expired", hint="roll the CA over")
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(identity.common_name, self.org))
            .issuer_name(self.certificate.subject)
            .public_key(csr.public_key)
            .serial_number(serial)
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_end_entity_key_usage(csr.public_key, profile), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(spec.extended_key_usage)), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in identity.dns_names]), False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key), critical=False)
            .add_extension(self._aki, critical=False)
        )
        if spec.ocsp_no_check:
            builder = builder.add_extension(x509.OCSPNoCheck(), critical=False)
        elif self._crl_url:
            point = x509.DistributionPoint([x509.UniformResourceIdentifier(self._crl_url)], None, None, None)
            builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
        if self._ocsp_url and not spec.ocsp_no_check:
            access = x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(self._ocsp_url)
            )
            builder = builder.add_extension(x509.AuthorityInformationAccess([access]), critical=False)
        return builder.sign(self.key, self._hash)


def _end_entity_key_usage(key: PublicKey, profile: Profile) -> x509.KeyUsage:
    # RSA server keys may still be used for RSA key transport in TLS 1.2; every other use is a signature.
    key_encipherment = isinstance(key, rsa.RSAPublicKey) and profile is Profile.SERVICE
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
