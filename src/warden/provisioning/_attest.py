"""Onboarding attestation: which enrollment group, if any, vouches for an onboarding certificate (IDevID).

The TLS handshake has already verified the client's chain against the listener's trust store; Python hands the
application the leaf only. Attestation therefore re-checks the leaf here against the *current* enabled groups: its
issuer must be one of a group's CA certificates and its signature must verify under that CA's key, and it must be
inside its validity period. A group disabled a moment ago vouches for nothing even if the trust store has not been
rebuilt yet.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from warden.core import DEFAULT_LIMITS, InvalidInputError, Limits, validate_device_id
from warden.provisioning._model import EnrollmentGroup, IdField

__all__ = [
    "GroupIndex",
    "OnboardingCertificate",
    "certificate_fingerprint",
    "load_ca_bundle",
    "parse_client_certificate",
]


def certificate_fingerprint(certificate: x509.Certificate) -> str:
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass(frozen=True, slots=True)
class OnboardingCertificate:
    certificate: x509.Certificate
    #: SHA-256 of the DER certificate: the onboarding identity
    fingerprint: str

    def device_id(self, field: IdField) -> str:
        """The device id the certificate carries in ``field``, validated; InvalidInputError when it has none."""
        oid = NameOID.COMMON_NAME if field is IdField.CN else NameOID.SERIAL_NUMBER
        values = [a.value for a in self.certificate.subject.get_attributes_for_oid(oid)]
        if len(values) != 1 or not isinstance(values[0], str):
            raise InvalidInputError(f"the onboarding certificate has no single subject {field} to take the id from")
        device_id = values[0].strip().lower()
        validate_device_id(device_id)
        return device_id

    def is_current(self, now: dt.datetime) -> bool:
        return self.certificate.not_valid_before_utc <= now < self.certificate.not_valid_after_utc


def parse_client_certificate(der: bytes) -> OnboardingCertificate:
    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError:
        raise InvalidInputError("the client certificate could not be parsed") from None
    return OnboardingCertificate(certificate, hashlib.sha256(der).hexdigest())


def load_ca_bundle(pem: bytes, *, limits: Limits = DEFAULT_LIMITS) -> list[x509.Certificate]:
    """The CA certificates of a PEM bundle for an enrollment group: 1 to ``max_ca_bundle_certs`` certificates, each
    a CA (basicConstraints cA=TRUE) that can sign certificates."""
    if len(pem) > limits.max_pem_file_bytes:
        raise InvalidInputError(f"the CA bundle is larger than {limits.max_pem_file_bytes} bytes")
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise InvalidInputError(
            "the CA bundle is not PEM certificates", hint="pass the manufacturer CA in PEM"
        ) from None
    if not certificates or len(certificates) > limits.max_ca_bundle_certs:
        raise InvalidInputError(f"a CA bundle holds 1 to {limits.max_ca_bundle_certs} certificates")
    for certificate in certificates:
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        except ValueError:
            raise InvalidInputError("a certificate in the CA bundle has malformed extensions") from None
        if constraints is None or not constraints.ca:
            raise InvalidInputError(
                f"{certificate.subject.rfc4514_string()[:80]!r} is not a CA certificate",
                hint="an enrollment group trusts the CA that signs the onboarding certificates",
            )
    return certificates


class GroupIndex:
    """The enabled enrollment groups, indexed by the subject of each of their CA certificates."""

    def __init__(self, groups: Iterable[EnrollmentGroup]) -> None:
        self._by_issuer: dict[bytes, list[tuple[EnrollmentGroup, x509.Certificate]]] = {}
        self.groups: tuple[EnrollmentGroup, ...] = tuple(g for g in groups if g.enabled)
        for group in self.groups:
            for ca in x509.load_pem_x509_certificates(group.ca_pem.encode("ascii")):
                self._by_issuer.setdefault(ca.subject.public_bytes(), []).append((group, ca))

    def match(self, leaf: x509.Certificate) -> Sequence[EnrollmentGroup]:
        """Every enabled group one of whose CAs directly issued ``leaf`` (signature checked)."""
        found: list[EnrollmentGroup] = []
        for group, ca in self._by_issuer.get(leaf.issuer.public_bytes(), ()):
            try:
                leaf.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            found.append(group)
        return found
