"""Certificate profiles: what each kind of certificate Warden issues may do.

The profile, never the CSR, decides the subject, the SANs and every extension.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from warden.core import COMMAND_SIGNING_EKU_OID

__all__ = ["PROFILES", "Profile", "ProfileSpec", "RevocationReason"]


class Profile(enum.StrEnum):
    DEVICE = "device"
    GATEWAY = "gateway"
    SERVICE = "service"
    HUB_CLIENT = "hub-client"
    OCSP_SIGNER = "ocsp-signer"
    COMMAND_SIGNER = "command-signer"


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    profile: Profile
    extended_key_usage: tuple[ObjectIdentifier, ...]
    #: True for device and gateway certificates: CN = device id, SAN = <device-id>.<fleet-domain>
    for_device: bool
    #: name of the Settings field holding the default validity in days
    validity_setting: str
    ocsp_no_check: bool = False


PROFILES: dict[Profile, ProfileSpec] = {
    Profile.DEVICE: ProfileSpec(Profile.DEVICE, (ExtendedKeyUsageOID.CLIENT_AUTH,), True, "device_validity_days"),
    Profile.GATEWAY: ProfileSpec(Profile.GATEWAY, (ExtendedKeyUsageOID.CLIENT_AUTH,), True, "gateway_validity_days"),
    Profile.SERVICE: ProfileSpec(Profile.SERVICE, (ExtendedKeyUsageOID.SERVER_AUTH,), False, "service_validity_days"),
    Profile.HUB_CLIENT: ProfileSpec(
        Profile.HUB_CLIENT, (ExtendedKeyUsageOID.CLIENT_AUTH,), False, "hub_client_validity_days"
    ),
    Profile.OCSP_SIGNER: ProfileSpec(
        Profile.OCSP_SIGNER,
        (ExtendedKeyUsageOID.OCSP_SIGNING,),
        False,
        "ocsp_signer_validity_days",
        ocsp_no_check=True,
    ),
    # signs cloud-to-device commands (warden.broker._commands); agents accept no other key usage for that
    Profile.COMMAND_SIGNER: ProfileSpec(
        Profile.COMMAND_SIGNER, (ObjectIdentifier(COMMAND_SIGNING_EKU_OID),), False, "command_signer_validity_days"
    ),
}


class RevocationReason(enum.StrEnum):
    """RFC 5280 CRLReason values Warden accepts. ``certificateHold`` is refused: use ``device disable`` instead,
    which is reversible without un-revoking anything; ``removeFromCRL`` only exists in delta CRLs."""

    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "keyCompromise"
    CA_COMPROMISE = "cACompromise"
    AFFILIATION_CHANGED = "affiliationChanged"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessationOfOperation"
    PRIVILEGE_WITHDRAWN = "privilegeWithdrawn"
    AA_COMPROMISE = "aACompromise"

    @property
    def code(self) -> int:
        return _REASON_CODES[self]


_REASON_CODES = {
    RevocationReason.UNSPECIFIED: 0,
    RevocationReason.KEY_COMPROMISE: 1,
    RevocationReason.CA_COMPROMISE: 2,
    RevocationReason.AFFILIATION_CHANGED: 3,
    RevocationReason.SUPERSEDED: 4,
    RevocationReason.CESSATION_OF_OPERATION: 5,
    RevocationReason.PRIVILEGE_WITHDRAWN: 9,
    RevocationReason.AA_COMPROMISE: 10,
}
