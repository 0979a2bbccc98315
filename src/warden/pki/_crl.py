"""CRL generation (RFC 5280 section 5). Pure: the revoked list, the number and the time come in.

The whole revoked list is handed to the builder in one pass: adding entries one by one copies the list each time
and grows quadratically (100,000 entries: 9 s instead of well under 1 s).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from warden.pki._authority import BACKDATE, hash_for
from warden.pki._profiles import RevocationReason

__all__ = ["RevokedEntry", "build_crl"]

_FLAGS = {
    RevocationReason.KEY_COMPROMISE: x509.ReasonFlags.key_compromise,
    RevocationReason.CA_COMPROMISE: x509.ReasonFlags.ca_compromise,
    RevocationReason.AFFILIATION_CHANGED: x509.ReasonFlags.affiliation_changed,
    RevocationReason.SUPERSEDED: x509.ReasonFlags.superseded,
    RevocationReason.CESSATION_OF_OPERATION: x509.ReasonFlags.cessation_of_operation,
    RevocationReason.PRIVILEGE_WITHDRAWN: x509.ReasonFlags.privilege_withdrawn,
    RevocationReason.AA_COMPROMISE: x509.ReasonFlags.aa_compromise,
}


def reason_flag(reason: RevocationReason) -> x509.ReasonFlags | None:
    """The CRL/OCSP reason, or None for ``unspecified`` (RFC 5280 5.3.1: the code SHOULD then be absent)."""
    return _FLAGS.get(reason)


@dataclass(frozen=True, slots=True)
class RevokedEntry:
    serial: int
    revoked_at: dt.datetime
    reason: RevocationReason


def build_crl(
    *,
    issuer: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    revoked: Iterable[RevokedEntry],
    number: int,
    now: dt.datetime,
    validity: dt.timedelta,
) -> x509.CertificateRevocationList:
    entries: list[x509.RevokedCertificate] = []
    for entry in revoked:
        builder = x509.RevokedCertificateBuilder(
            serial_number=entry.serial, revocation_date=entry.revoked_at.replace(microsecond=0)
        )
        flag = reason_flag(entry.reason)
        if flag is not None:
            builder = builder.add_extension(x509.CRLReason(flag), critical=False)
        entries.append(builder.build())
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    crl = x509.CertificateRevocationListBuilder(
        issuer_name=issuer.subject,
        last_update=now - BACKDATE,
        next_update=min(now + validity, issuer.not_valid_after_utc),
        extensions=[
            x509.Extension(
                x509.AuthorityKeyIdentifier.oid,
                False,
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            ),
            x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(number)),
        ],
        revoked_certificates=entries,
    )
    return crl.sign(key, hash_for(key))
