"""What provisioning needs from storage, as protocols; ``warden.store`` implements them."""

from __future__ import annotations

import datetime as dt
from contextlib import AbstractContextManager
from typing import Protocol

from warden.provisioning._model import EnrollmentGroup, EnrollmentStatus, IndividualEnrollment, Reonboarding
from warden.registry import RegistryUnitOfWork

__all__ = [
    "EnrollmentGroupStore",
    "EnrollmentStore",
    "ProvisioningTransactions",
    "ProvisioningUnitOfWork",
    "ReonboardingStore",
]


class EnrollmentGroupStore(Protocol):
    def insert(self, group: EnrollmentGroup) -> None:
        """Raises AlreadyExistsError for a taken name."""
        ...

    def get(self, name: str) -> EnrollmentGroup | None: ...
    def find(self, *, enabled: bool | None = None) -> list[EnrollmentGroup]: ...
    def set_enabled(self, name: str, enabled: bool, now: dt.datetime) -> None: ...
    def set_flood_limit(self, name: str, limit: int | None, now: dt.datetime) -> None: ...
    def version(self) -> str:
        """Changes whenever any group is added or changed (a cheap fingerprint for caches)."""
        ...


class EnrollmentStore(Protocol):
    def insert(self, enrollment: IndividualEnrollment) -> None: ...
    def get(self, enrollment_id: str, *, lock: bool = False) -> IndividualEnrollment | None:
        """The enrollment; ``lock`` holds its row until the transaction ends (concurrent writers wait)."""
        ...

    def by_certificate(self, fingerprint: str) -> IndividualEnrollment | None:
        """The active certificate enrollment for this onboarding certificate fingerprint, if any."""
        ...

    def active_for_device(self, device_id: str) -> list[IndividualEnrollment]: ...
    def active_claims(self, device_id: str, fingerprint: str) -> list[IndividualEnrollment]:
        """In one query: the active enrollments of ``device_id`` and the active certificate enrollment of the
        onboarding certificate ``fingerprint``."""
        ...

    def find(
        self,
        *,
        device_id: str | None = None,
        status: EnrollmentStatus | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[IndividualEnrollment]:
        """Ordered by id; ``after`` is an exclusive cursor on the id."""
        ...

    def set_status(self, enrollment_id: str, status: EnrollmentStatus, now: dt.datetime) -> None:
        """``used`` sets ``used_at``, ``revoked`` sets ``revoked_at``."""
        ...

    def certificates_version(self) -> str:
        """Changes whenever an active certificate enrollment is added or leaves ``active``."""
        ...

    def active_certificates(self) -> list[str]:
        """PEM of every active certificate enrollment (for the TLS trust store)."""
        ...


class ReonboardingStore(Protocol):
    def put(self, entry: Reonboarding) -> None:
        """Insert or replace the device's entry."""
        ...

    def get(self, device_id: str) -> Reonboarding | None: ...
    def delete(self, device_id: str) -> None: ...


class ProvisioningUnitOfWork(RegistryUnitOfWork, Protocol):
    @property
    def enrollment_groups(self) -> EnrollmentGroupStore: ...
    @property
    def enrollments(self) -> EnrollmentStore: ...
    @property
    def reonboarding(self) -> ReonboardingStore: ...


class ProvisioningTransactions(Protocol):
    def __call__(self, *, readonly: bool = False) -> AbstractContextManager[ProvisioningUnitOfWork]: ...
