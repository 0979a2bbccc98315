"""What the registry needs from storage and from the CA, as protocols. ``warden.store`` and the hub implement them;
tests may pass in-memory fakes for pure logic."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from warden.monitor import AuditStore
from warden.pki import CertificateAuthority
from warden.registry._model import (
    CertificateRecord,
    CertificateStatus,
    Device,
    DeviceGroup,
    DeviceState,
    PublishedCrl,
    Restriction,
)

__all__ = [
    "CAProvider",
    "CertificateStore",
    "CounterStore",
    "CrlStore",
    "DeviceStore",
    "GroupStore",
    "RegistryUnitOfWork",
    "RestrictionStore",
    "Transactions",
    "Writer",
]

ItemT = TypeVar("ItemT")
R = TypeVar("R")


class DeviceStore(Protocol):
    def insert(self, device: Device, *, known_absent: bool = False) -> None:
        """Add ``device``; a device with its id exists already: AlreadyExistsError. ``known_absent``: the caller's
        transaction has just found no such device, so the store need not look first."""
        ...

    def get(self, device_id: str, *, lock: bool = False) -> Device | None:
        """The device; ``lock`` holds its row until the transaction ends (concurrent writers wait)."""
        ...

    def states(self, device_ids: Iterable[str]) -> dict[str, DeviceState]: ...
    def find(
        self,
        *,
        state: DeviceState | None = None,
        group: str | None = None,
        tags: Mapping[str, str] | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[Device]: ...
    def set_state(self, device_id: str, state: DeviceState, now: dt.datetime) -> None: ...
    def set_states(self, device_ids: Iterable[str], state: DeviceState, now: dt.datetime) -> None: ...
    def set_onboarding_fingerprint(self, device_id: str, fingerprint: str | None, now: dt.datetime) -> None: ...
    def identity(self, device_id: str, *, lock: bool = False) -> tuple[DeviceState, str | None] | None:
        """The device's state and onboarding fingerprint (cheap: no tags or groups); ``lock`` as in :meth:`get`."""
        ...

    def holder_of(self, fingerprint: str) -> str | None:
        """The id of the device bound to this onboarding fingerprint, if any."""
        ...

    def identity_and_holder(
        self, device_id: str, fingerprint: str, *, lock: bool = False
    ) -> tuple[tuple[DeviceState, str | None] | None, str | None]:
        """:meth:`identity` of ``device_id`` and :meth:`holder_of` ``fingerprint`` in one query; ``lock`` holds
        both rows."""
        ...

    def by_onboarding(self, fingerprint: str) -> Device | None:
        """The device bound to this onboarding identity fingerprint, if any."""
        ...

    def set_enrollment_group(self, device_id: str, group: str | None, now: dt.datetime) -> None:
        """Record the enrollment group the device (last) onboarded through."""
        ...


class GroupStore(Protocol):
    def insert(self, group: DeviceGroup) -> None: ...
    def get(self, name: str) -> DeviceGroup | None: ...
    def existing(self, names: Iterable[str]) -> set[str]: ...
    def find(self) -> list[DeviceGroup]: ...
    def member_count(self, name: str) -> int: ...


class CertificateStore(Protocol):
    def insert_many(self, records: Sequence[CertificateRecord]) -> None: ...
    def key_uses(self, key_fingerprints: Iterable[str]) -> dict[str, list[tuple[str, CertificateStatus]]]:
        """For each key fingerprint: (owner, status) of every certificate issued for that key, where the owner is
        ``device:<id>`` or ``service:<common name>``."""
        ...

    def get(self, serial: int) -> CertificateRecord | None: ...
    def find(
        self, *, device_id: str | None = None, status: CertificateStatus | None = None
    ) -> list[CertificateRecord]: ...
    def page(
        self,
        *,
        device_id: str | None = None,
        status: CertificateStatus | None = None,
        limit: int,
        after: str | None = None,
    ) -> list[CertificateRecord]:
        """Up to ``limit`` records ordered by their serial's hex text; ``after`` is an exclusive cursor on it."""
        ...

    def revoke(self, serial: int, *, revoked_at: dt.datetime, reason: str) -> None: ...
    def revocation_summary(self, *, not_expired_at: dt.datetime) -> tuple[int, dt.datetime | None]:
        """How many unexpired certificates are revoked, and the latest revocation time among them."""
        ...

    def revoked(self, *, not_expired_at: dt.datetime | None = None) -> Iterator[tuple[int, dt.datetime, str]]: ...


class CrlStore(Protocol):
    def publish(self, crl: PublishedCrl) -> None:
        """Record a newly issued CRL (its number is unique and higher than every earlier one)."""
        ...

    def latest(self) -> PublishedCrl | None: ...
    def latest_number(self) -> int | None:
        """The newest CRL's number without loading it (a cheap change check for caches)."""
        ...


class RestrictionStore(Protocol):
    def put(self, restriction: Restriction) -> None:
        """Insert the device's restriction, or replace the one it has."""
        ...

    def get(self, device_id: str) -> Restriction | None: ...
    def delete(self, device_id: str) -> None: ...
    def find(self) -> list[Restriction]:
        """Every restriction, ordered by device id."""
        ...

    def expired(self, now: dt.datetime) -> list[Restriction]:
        """The restrictions whose ``until`` is at or before ``now``."""
        ...


class CounterStore(Protocol):
    def next(self, name: str) -> int: ...


class RegistryUnitOfWork(Protocol):
    @property
    def devices(self) -> DeviceStore: ...
    @property
    def groups(self) -> GroupStore: ...
    @property
    def certificates(self) -> CertificateStore: ...
    @property
    def counters(self) -> CounterStore: ...
    @property
    def crls(self) -> CrlStore: ...
    @property
    def restrictions(self) -> RestrictionStore: ...
    @property
    def audit(self) -> AuditStore: ...
    def after_commit(self, callback: Callable[[], None]) -> None: ...


class Transactions(Protocol):
    def __call__(self, *, readonly: bool = False) -> AbstractContextManager[RegistryUnitOfWork]: ...


class Writer(Protocol):
    """Records ``item`` with ``fn`` in a write transaction and returns ``fn``'s result for it once that transaction
    has committed. ``fn`` takes a batch: a writer may hand it many items that arrived together (group commit), and
    must hand each failing batch's items to it again one by one, so one bad item fails alone."""

    def __call__(self, fn: Callable[[RegistryUnitOfWork, Sequence[ItemT]], Sequence[R]], item: ItemT) -> R: ...


class CAProvider(Protocol):
    def authority(self) -> CertificateAuthority:
        """The issuing CA, with its key loaded from the key store."""
        ...

    def ocsp_signer(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
        """The delegated OCSP signer's certificate and its key, or None when there is no usable pair."""
        ...

    def new_ocsp_signer_key(self) -> ec.EllipticCurvePrivateKey:
        """Replace the OCSP signer's key by a new one (the old one is destroyed) and return it."""
        ...

    def store_ocsp_signer(self, certificate: x509.Certificate) -> None: ...
