"""Warden's PKI: the CA hierarchy, key stores, certificate profiles, issuance from CSRs, CRLs and OCSP.

The PKI knows nothing of devices or storage: identities, serial numbers, time and revocation status come in as
arguments. The registry's services own the use cases (issue, renew, revoke) and call in here.
"""

from warden.pki._authority import (
    BACKDATE,
    CertificateAuthority,
    IssuedIdentity,
    build_issuing_ca,
    build_root_ca,
    hash_for,
    new_serial,
)
from warden.pki._castore import (
    ISSUING_KEY,
    OCSP_SIGNER_KEY,
    ROOT_KEY,
    CAFiles,
    Hierarchy,
    create_hierarchy,
    key_csr,
)
from warden.pki._crl import RevokedEntry, build_crl
from warden.pki._csr import (
    CertificateSigningRequest,
    PublicKey,
    check_csr_size,
    parse_csr,
    public_key_fingerprint,
)
from warden.pki._keystore import FileKeyStore, KeyAlgorithm, KeyStore, load_encrypted_key
from warden.pki._ocsp import CertificateStatus, OCSPAnswer, OCSPResponder, StatusLookup, parse_ocsp_request
from warden.pki._pkcs11 import Pkcs11KeyStore, Pkcs11PrivateKey, Pkcs11Uri, parse_pkcs11_uri
from warden.pki._profiles import PROFILES, Profile, ProfileSpec, RevocationReason

__all__ = [
    "BACKDATE",
    "ISSUING_KEY",
    "OCSP_SIGNER_KEY",
    "PROFILES",
    "ROOT_KEY",
    "CAFiles",
    "CertificateAuthority",
    "CertificateSigningRequest",
    "CertificateStatus",
    "FileKeyStore",
    "Hierarchy",
    "IssuedIdentity",
    "KeyAlgorithm",
    "KeyStore",
    "OCSPAnswer",
    "OCSPResponder",
    "Pkcs11KeyStore",
    "Pkcs11PrivateKey",
    "Pkcs11Uri",
    "Profile",
    "ProfileSpec",
    "PublicKey",
    "RevocationReason",
    "RevokedEntry",
    "StatusLookup",
    "build_crl",
    "build_issuing_ca",
    "build_root_ca",
    "check_csr_size",
    "create_hierarchy",
    "hash_for",
    "key_csr",
    "load_encrypted_key",
    "new_serial",
    "parse_csr",
    "parse_ocsp_request",
    "parse_pkcs11_uri",
    "public_key_fingerprint",
]
