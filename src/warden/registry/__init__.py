"""The device registry: devices, device groups, certificate records, the device state machine, and the
certificate use cases (issue, renew, revoke, CRL, OCSP) that tie the PKI to them."""

from warden.registry._certificates import (
    Admitted,
    CertificateService,
    IssuancePolicy,
    IssuedCertificate,
    IssueHooks,
    IssuePlan,
    Refusal,
    parse_reason,
)
from warden.registry._devices import DeviceService
from warden.registry._model import (
    CertificateRecord,
    CertificateStatus,
    Device,
    DeviceGroup,
    DeviceState,
    PublishedCrl,
    check_transition,
    format_serial,
)
from warden.registry._ports import (
    CAProvider,
    CertificateStore,
    CounterStore,
    CrlStore,
    DeviceStore,
    GroupStore,
    RegistryUnitOfWork,
    Transactions,
    Writer,
)

__all__ = [
    "CAProvider",
    "CertificateRecord",
    "CertificateService",
    "CertificateStatus",
    "CertificateStore",
    "CounterStore",
    "CrlStore",
    "Device",
    "DeviceGroup",
    "DeviceService",
    "DeviceState",
    "DeviceStore",
    "GroupStore",
    "IssuancePolicy",
    "Admitted",
    "IssueHooks",
    "IssuePlan",
    "IssuedCertificate",
    "PublishedCrl",
    "Refusal",
    "RegistryUnitOfWork",
    "Transactions",
    "Writer",
    "check_transition",
    "format_serial",
    "parse_reason",
]
