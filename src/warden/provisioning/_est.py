"""The EST wire format (RFC 7030 with the RFC 8951 clarifications): base64 bodies, PKCS#7 certs-only responses.

Invariants: request bodies are base64 whatever ``Content-Transfer-Encoding`` says (RFC 8951 section 3.2); a PEM CSR
is accepted too, since some clients send one. Decoding is bounded: nothing larger than the CSR limit (base64-expanded)
is decoded at all.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from warden.core import DEFAULT_LIMITS, CSRRejectedError, Limits

__all__ = [
    "CERTS_ONLY_MEDIA_TYPE",
    "CSR_MEDIA_TYPE",
    "certs_only",
    "csr_identity_mismatch",
    "decode_csr_body",
    "max_body_bytes",
]

CSR_MEDIA_TYPE = "application/pkcs10"
CERTS_ONLY_MEDIA_TYPE = "application/pkcs7-mime; smime-type=certs-only"
_WHITESPACE = bytes.maketrans(b"", b"")


def max_body_bytes(limits: Limits = DEFAULT_LIMITS) -> int:
    """The largest EST request body accepted: a maximal CSR in base64 with line breaks, plus slack."""
    return limits.max_csr_bytes * 4 // 3 + limits.max_csr_bytes // 38 + 1024


def decode_csr_body(body: bytes, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The CSR (DER, or PEM when a client sent PEM) in an EST request body."""
    if len(body) > max_body_bytes(limits):
        raise CSRRejectedError(f"the request body is larger than {max_body_bytes(limits)} bytes")
    stripped = body.strip()
    if not stripped:
        raise CSRRejectedError("the request body is empty", hint="send a base64 PKCS#10 request (RFC 7030)")
    if stripped.startswith(b"-----BEGIN"):
        return stripped
    compact = stripped.translate(_WHITESPACE, b" \t\r\n")
    try:
        der = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise CSRRejectedError("the request body is not base64", hint="EST bodies are base64 DER (RFC 8951)") from None
    if not der:
        raise CSRRejectedError("the request body is empty", hint="send a base64 PKCS#10 request (RFC 7030)")
    return der


def certs_only(certificates: Sequence[x509.Certificate]) -> bytes:
    """A base64 PKCS#7 certs-only body (RFC 7030 section 4.1.3), with 76-character lines."""
    der = pkcs7.serialize_certificates(list(certificates), serialization.Encoding.DER)
    return base64.encodebytes(der)


def csr_identity_mismatch(csr: bytes, device_id: str, fleet_domain: str) -> str | None:
    """Why the CSR names someone other than ``device_id``, or None. The CSR's subject CN must be the device id and
    any DNS SAN its fleet name; nothing else is copied from a CSR into a certificate, but a request that names
    another device is refused rather than silently corrected (RFC 7030 section 4.2.2)."""
    try:
        request = x509.load_pem_x509_csr(csr) if csr.lstrip().startswith(b"-----BEGIN") else x509.load_der_x509_csr(csr)
        names = [a.value for a in request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    except (ValueError, x509.InvalidVersion):
        raise CSRRejectedError("the CSR could not be parsed", hint="send a DER PKCS#10 request in base64") from None
    if names != [device_id]:
        shown = ", ".join(repr(str(n))[:70] for n in names) or "no common name"
        return f"the CSR's subject names {shown}; it must be CN={device_id}"
    try:
        san = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise CSRRejectedError("the CSR's extensions could not be parsed") from None
    expected = f"{device_id}.{fleet_domain}"
    for name in san.get_values_for_type(x509.DNSName):
        if name != expected:
            return f"the CSR asks for the DNS name {name[:80]!r}; this device's name is {expected!r}"
    return None
