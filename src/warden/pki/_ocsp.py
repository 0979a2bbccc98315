"""OCSP responses (RFC 6960), signed by a delegated responder certificate. Pure: status lookup and time come in.

Invariants: a response is only ever about a certificate of *our* issuing CA (the request's issuer name and key
hashes are checked); anything else is answered ``unauthorized``. A serial we never issued is ``unknown``.
The request's nonce, when present, is echoed.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from warden.core import DEFAULT_LIMITS, Limits, OCSPRequestError
from warden.pki._authority import BACKDATE, hash_for
from warden.pki._crl import reason_flag
from warden.pki._profiles import RevocationReason

__all__ = ["CertificateStatus", "OCSPAnswer", "OCSPResponder", "StatusLookup", "parse_ocsp_request"]

_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


class CertificateStatus(enum.StrEnum):
    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class OCSPAnswer:
    status: CertificateStatus
    revoked_at: dt.datetime | None = None
    reason: RevocationReason | None = None


#: serial -> answer; ``None`` for a serial the CA never issued
StatusLookup = Callable[[int], OCSPAnswer | None]


def parse_ocsp_request(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> ocsp.OCSPRequest:
    if len(data) > limits.max_ocsp_request_bytes:
        raise OCSPRequestError(f"the OCSP request is larger than {limits.max_ocsp_request_bytes} bytes")
    if not data:
        raise OCSPRequestError("the OCSP request is empty")
    try:
        return ocsp.load_der_ocsp_request(bytes(data))
    except (ValueError, NotImplementedError) as e:
        raise OCSPRequestError(
            "the OCSP request could not be parsed",
            hint="send one DER OCSPRequest for one certificate (openssl ocsp -reqout)",
        ) from e


class OCSPResponder:
    def __init__(
        self,
        *,
        issuer: x509.Certificate,
        responder_certificate: x509.Certificate,
        responder_key: ec.EllipticCurvePrivateKey,
        validity: dt.timedelta,
    ) -> None:
        self._issuer = issuer
        self._cert = responder_certificate
        self._key = responder_key
        self._validity = validity
        self._issuer_name_der = issuer.subject.public_bytes()
        # The CertID key hash covers the subjectPublicKey BIT STRING's contents: for EC, the uncompressed point.
        self._issuer_key_bits = issuer.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    def _is_our_issuer(self, request: ocsp.OCSPRequest) -> bool:
        name = request.hash_algorithm.name
        return (
            hashlib.new(name, self._issuer_name_der).digest() == request.issuer_name_hash
            and hashlib.new(name, self._issuer_key_bits).digest() == request.issuer_key_hash
        )

    def respond(self, request: ocsp.OCSPRequest, lookup: StatusLookup, *, now: dt.datetime) -> bytes:
        """A DER OCSPResponse for ``request``."""
        if request.hash_algorithm.name not in _HASHES:
            return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        if not self._is_our_issuer(request):
            return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
        answer = lookup(request.serial_number) or OCSPAnswer(CertificateStatus.UNKNOWN)
        status = {
            CertificateStatus.GOOD: ocsp.OCSPCertStatus.GOOD,
            CertificateStatus.REVOKED: ocsp.OCSPCertStatus.REVOKED,
            CertificateStatus.UNKNOWN: ocsp.OCSPCertStatus.UNKNOWN,
        }[answer.status]
        revoked_at = answer.revoked_at.replace(microsecond=0) if answer.revoked_at else None
        builder = (
            ocsp.OCSPResponseBuilder()
            .add_response_by_hash(
                issuer_name_hash=request.issuer_name_hash,
                issuer_key_hash=request.issuer_key_hash,
                serial_number=request.serial_number,
                algorithm=_HASHES[request.hash_algorithm.name](),
                cert_status=status,
                this_update=(now - BACKDATE).replace(microsecond=0),
                next_update=(now + self._validity).replace(microsecond=0),
                revocation_time=revoked_at if status is ocsp.OCSPCertStatus.REVOKED else None,
                revocation_reason=(
                    reason_flag(answer.reason)
                    if status is ocsp.OCSPCertStatus.REVOKED and answer.reason is not None
                    else None
                ),
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, self._cert)
            .certificates([self._cert])
        )
        try:
            nonce = request.extensions.get_extension_for_class(x509.OCSPNonce).value
        except x509.ExtensionNotFound:
            nonce = None
        if nonce is not None:
            builder = builder.add_extension(nonce, critical=False)
        response = builder.sign(self._key, hash_for(self._key))
        return response.public_bytes(serialization.Encoding.DER)


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(serialization.Encoding.DER)
