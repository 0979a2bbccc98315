"""Parsing and checking of PKCS#10 certificate signing requests.

Invariants: a :class:`CertificateSigningRequest` returned from :func:`parse_csr` has a verified self-signature
(proof of possession) and a key of an accepted type. Nothing else in the request is trusted or copied: the subject,
SANs and extensions of an issued certificate come from the profile and the registry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtensionOID

from warden.core import DEFAULT_LIMITS, CSRRejectedError, Limits

__all__ = ["CertificateSigningRequest", "PublicKey", "check_csr_size", "parse_csr", "public_key_fingerprint"]

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

_ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)
_ACCEPTED_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


@dataclass(frozen=True, slots=True)
class CertificateSigningRequest:
    """A CSR whose signature has been verified and whose key Warden accepts."""

    csr: x509.CertificateSigningRequest
    public_key: PublicKey
    #: lower-case hex SHA-256 of the DER SubjectPublicKeyInfo
    key_fingerprint: str
    #: what the request asked for and Warden ignored (recorded in the audit details)
    ignored_requests: tuple[str, ...]

    @property
    def key_description(self) -> str:
        key = self.public_key
        if isinstance(key, ec.EllipticCurvePublicKey):
            return {"secp256r1": "EC P-256", "secp384r1": "EC P-384"}[key.curve.name]
        if isinstance(key, rsa.RSAPublicKey):
            return f"RSA-{key.key_size}"
        return "Ed25519"


def public_key_fingerprint(key: PublicKey) -> str:
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def check_csr_size(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> None:
    """Refuse what cannot be a CSR by its size alone: not bytes, empty, or over the limit."""
    if not isinstance(data, bytes | bytearray):
        raise CSRRejectedError("a CSR must be bytes")
    if len(data) == 0:
        raise CSRRejectedError("the CSR is empty", hint="pass a PKCS#10 request in PEM or DER")
    if len(data) > limits.max_csr_bytes:
        raise CSRRejectedError(
            f"the CSR is {len(data)} bytes, more than the limit of {limits.max_csr_bytes}",
            hint="a PKCS#10 request is normally under 2 KiB",
        )


def parse_csr(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> CertificateSigningRequest:
    """Parse a PEM or DER CSR, verify its signature and key; raise :class:`CSRRejectedError` on anything else."""
    check_csr_size(data, limits=limits)
    data = bytes(data)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(data.strip())
        else:
            csr = x509.load_der_x509_csr(data)
    except (ValueError, x509.InvalidVersion, UnsupportedAlgorithm) as e:
        raise CSRRejectedError(
            "the CSR could not be parsed", hint="pass a complete PKCS#10 request in PEM or DER"
        ) from e
    key = _check_key(csr, limits)
    _check_signature(csr)
    return CertificateSigningRequest(
        csr=csr, public_key=key, key_fingerprint=public_key_fingerprint(key), ignored_requests=_ignored(csr)
    )


def _check_key(csr: x509.CertificateSigningRequest, limits: Limits) -> PublicKey:
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CSRRejectedError("the CSR's public key is of an unsupported type", hint=_KEY_HINT) from e
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ACCEPTED_CURVES):
            raise CSRRejectedError(f"the CSR uses the unsupported curve {key.curve.name}", hint=_KEY_HINT)
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < limits.min_rsa_bits:
            raise CSRRejectedError(
                f"the CSR's RSA key has {key.key_size} bits, fewer than {limits.min_rsa_bits}", hint=_KEY_HINT
            )
        if key.key_size > limits.max_rsa_bits:
            raise CSRRejectedError(
                f"the CSR's RSA key has {key.key_size} bits, more than {limits.max_rsa_bits}", hint=_KEY_HINT
            )
        if key.public_numbers().e != 65537:
            raise CSRRejectedError("the CSR's RSA key does not use the public exponent 65537", hint=_KEY_HINT)
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise CSRRejectedError(f"the CSR's {type(key).__name__} key is not accepted", hint=_KEY_HINT)


_KEY_HINT = "use EC P-256 or P-384, Ed25519, or RSA of 2048 bits or more"


def _check_signature(csr: x509.CertificateSigningRequest) -> None:
    try:
        algorithm = csr.signature_hash_algorithm
    except UnsupportedAlgorithm as e:
        raise CSRRejectedError("the CSR's signature algorithm is not supported", hint=_KEY_HINT) from e
    if algorithm is not None and not isinstance(algorithm, _ACCEPTED_HASHES):
        raise CSRRejectedError(
            f"the CSR is signed with {algorithm.name}, which is not accepted",
            hint="sign it with SHA-256 or better",
        )
    if algorithm is None and not isinstance(csr.public_key(), ed25519.Ed25519PublicKey):
        raise CSRRejectedError("the CSR's signature algorithm is not supported", hint=_KEY_HINT)
    try:
        valid = csr.is_signature_valid
    except Exception as e:  # a mismatching key/algorithm pair raises rather than returning False
        raise CSRRejectedError("the CSR's signature could not be checked") from e
    if not valid:
        raise CSRRejectedError(
            "the CSR's signature does not verify (no proof of possession of the private key)",
            hint="create the request again with the device's own key",
        )


def _ignored(csr: x509.CertificateSigningRequest) -> tuple[str, ...]:
    ignored: list[str] = []
    try:
        extensions = csr.extensions
    except Exception:  # malformed or duplicate requested extensions: nothing of them is used anyway
        return ("malformed-extensions",)
    for extension in extensions:
        if extension.oid == ExtensionOID.BASIC_CONSTRAINTS and extension.value.ca:
            ignored.append("CA:TRUE")
        elif extension.oid == ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
            ignored.append("subjectAltName")
        else:
            ignored.append(extension.oid.dotted_string)
    return tuple(ignored)
