"""Onboarding: enrollment groups, individual enrollments, EST, and the issuance gate."""

from warden.provisioning._attest import certificate_fingerprint, load_ca_bundle
from warden.provisioning._est import (
    CERTS_ONLY_MEDIA_TYPE,
    CSR_MEDIA_TYPE,
    certs_only,
    csr_identity_mismatch,
    decode_csr_body,
    max_body_bytes,
)
from warden.provisioning._model import (
    EnrollmentGroup,
    EnrollmentKind,
    EnrollmentStatus,
    IdField,
    IndividualEnrollment,
    Reonboarding,
)
from warden.provisioning._ports import (
    EnrollmentGroupStore,
    EnrollmentStore,
    ProvisioningTransactions,
    ProvisioningUnitOfWork,
    ReonboardingStore,
)
from warden.provisioning._service import (
    CONFLICT_EVENT,
    EnrollmentPlan,
    EnrollmentResult,
    ProvisioningService,
    TrustMaterial,
    token_fingerprint,
)

__all__ = [
    "CERTS_ONLY_MEDIA_TYPE",
    "CONFLICT_EVENT",
    "CSR_MEDIA_TYPE",
    "EnrollmentGroup",
    "EnrollmentGroupStore",
    "EnrollmentKind",
    "EnrollmentPlan",
    "EnrollmentResult",
    "EnrollmentStatus",
    "EnrollmentStore",
    "IdField",
    "IndividualEnrollment",
    "ProvisioningService",
    "ProvisioningTransactions",
    "ProvisioningUnitOfWork",
    "Reonboarding",
    "ReonboardingStore",
    "TrustMaterial",
    "certificate_fingerprint",
    "certs_only",
    "csr_identity_mismatch",
    "decode_csr_body",
    "load_ca_bundle",
    "max_body_bytes",
    "token_fingerprint",
]
