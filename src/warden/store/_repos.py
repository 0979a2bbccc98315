"""Repositories: the storage protocols of the registry, the monitor, provisioning, the policy context and the
broker's ingest, implemented on SQLAlchemy Core."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Row, and_, bindparam, case, delete, func, insert, or_, select, update

from warden.broker import DeviceActivity, IngestStats, metrics_from_json, metrics_json
from warden.core import AlreadyExistsError, StorageError
from warden.monitor import GENESIS_HASH, AuditRecord, Checkpoint, canonical_details
from warden.policy import ApiToken, Role
from warden.provisioning import (
    EnrollmentGroup,
    EnrollmentKind,
    EnrollmentStatus,
    IdField,
    IndividualEnrollment,
    Reonboarding,
)
from warden.registry import (
    CertificateRecord,
    CertificateStatus,
    CommandState,
    Device,
    DeviceCommand,
    DeviceGroup,
    DeviceState,
    PublishedCrl,
    Restriction,
    format_serial,
)
from warden.store._tables import (
    api_tokens,
    audit_checkpoints,
    audit_head,
    audit_log,
    certificates,
    counters,
    crls,
    device_activity,
    device_commands,
    device_group_members,
    device_groups,
    device_restrictions,
    device_tags,
    devices,
    enrollment_groups,
    enrollments,
    ingest_stats,
    reonboarding,
    sqlite_time,
)

__all__ = ["UnitOfWork"]

# Statements on the issuing path are built once: SQLAlchemy memoises a statement's cache key on the statement
# object, so re-using it skips the construction and cache-key work that otherwise dominates a small transaction.
_DEVICE_STATES = select(devices.c.id, devices.c.state).where(devices.c.id.in_(bindparam("ids", expanding=True)))
_SET_DEVICE_STATES = (
    update(devices)
    .where(devices.c.id.in_(bindparam("ids", expanding=True)))
    .values(state=bindparam("new_state"), updated_at=bindparam("now"))
)
_INSERT_CERTIFICATE = insert(certificates)
_SQLITE_INSERT_CERTIFICATE = (
    "INSERT INTO certificates (serial, device_id, common_name, profile, not_before, not_after, fingerprint, "
    "key_fingerprint, status, issued_at, revoked_at, revocation_reason, pem) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQLITE_INSERT_AUDIT = (
    "INSERT INTO audit_log (seq, time, actor, action, target, outcome, details, prev_hash, hash) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_KEY_USES = select(
    certificates.c.key_fingerprint, certificates.c.device_id, certificates.c.common_name, certificates.c.status
).where(certificates.c.key_fingerprint.in_(bindparam("keys", expanding=True)))
_INSERT_AUDIT = insert(audit_log)
# The enrollment path's lookups, prebuilt for the same reason.
_COUNTER = select(counters.c.value).where(counters.c.name == bindparam("name"))
_DEVICE_EXISTS = select(devices.c.id).where(devices.c.id == bindparam("id"))
_INSERT_DEVICE = insert(devices)
_DEVICE_IDENTITY = select(devices.c.state, devices.c.onboarding_fingerprint).where(devices.c.id == bindparam("id"))
_DEVICE_IDENTITY_LOCKED = _DEVICE_IDENTITY.with_for_update()
_DEVICE_BY_ONBOARDING = select(devices.c.id).where(devices.c.onboarding_fingerprint == bindparam("fp"))
_DEVICE_IDENTITY_AND_HOLDER = select(devices.c.id, devices.c.state, devices.c.onboarding_fingerprint).where(
    or_(devices.c.id == bindparam("id"), devices.c.onboarding_fingerprint == bindparam("fp"))
)
_DEVICE_IDENTITY_AND_HOLDER_LOCKED = _DEVICE_IDENTITY_AND_HOLDER.with_for_update()
_CERTIFICATE_BY_SERIAL = select(certificates).where(certificates.c.serial == bindparam("serial"))
_ENROLLMENT = select(enrollments).where(enrollments.c.id == bindparam("id"))
_ENROLLMENT_LOCKED = _ENROLLMENT.with_for_update()
_ENROLLMENT_BY_CERTIFICATE = (
    select(enrollments)
    .where(
        enrollments.c.certificate_fingerprint == bindparam("fp"),
        enrollments.c.kind == str(EnrollmentKind.CERTIFICATE),
        enrollments.c.status == str(EnrollmentStatus.ACTIVE),
    )
    .order_by(enrollments.c.id)
    .limit(1)
)
_ACTIVE_CLAIMS = (
    select(enrollments)
    .where(
        enrollments.c.status == str(EnrollmentStatus.ACTIVE),
        or_(
            enrollments.c.device_id == bindparam("id"),
            and_(
                enrollments.c.certificate_fingerprint == bindparam("fp"),
                enrollments.c.kind == str(EnrollmentKind.CERTIFICATE),
            ),
        ),
    )
    .order_by(enrollments.c.id)
)
_ACTIVE_ENROLLMENTS_OF_DEVICE = (
    select(enrollments)
    .where(enrollments.c.device_id == bindparam("id"), enrollments.c.status == str(EnrollmentStatus.ACTIVE))
    .order_by(enrollments.c.id)
)
_REONBOARDING = select(reonboarding).where(reonboarding.c.device_id == bindparam("id"))
_HEAD = select(audit_head.c.seq, audit_head.c.hash, audit_head.c.last_checkpoint_seq).where(audit_head.c.id == 1)
_HEAD_FOR_UPDATE = _HEAD.with_for_update()
_MOVE_HEAD = update(audit_head).where(audit_head.c.id == 1).values(seq=bindparam("new_seq"), hash=bindparam("new_hash"))


class UnitOfWork:
    """One transaction's view of every repository."""

    def __init__(self, connection: Connection, *, is_sqlite: bool) -> None:
        self.connection = connection
        #: run by :meth:`Database.transaction` once this unit of work has committed
        self.callbacks: list[Callable[[], None]] = []
        self.devices = DeviceRepository(connection)
        self.groups = GroupRepository(connection)
        self.certificates = CertificateRepository(connection, is_sqlite=is_sqlite)
        self.audit = AuditRepository(connection, is_sqlite=is_sqlite)
        self.counters = CounterRepository(connection, lock=not is_sqlite)
        self.crls = CrlRepository(connection)
        self.enrollment_groups = EnrollmentGroupRepository(connection, self.counters)
        self.enrollments = EnrollmentRepository(connection, self.counters)
        self.reonboarding = ReonboardingRepository(connection)
        self.tokens = TokenRepository(connection)
        self.restrictions = RestrictionRepository(connection)
        self.ingest = IngestRepository(connection, is_sqlite=is_sqlite)
        self.commands = CommandRepository(connection)

    def after_commit(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        head = self.audit.cached_head
        registered = len(self.callbacks)
        try:
            with self.connection.begin_nested():
                yield
        except BaseException:
            # What the savepoint did is gone: forget the head its audit appends moved, and the follow-ups it
            # registered (a checkpoint mirrored for a checkpoint that was rolled back would fail verification).
            self.audit.cached_head = head
            del self.callbacks[registered:]
            raise


class DeviceRepository:
    def __init__(self, connection: Connection) -> None:
        self._c = connection

    def _exists(self, device_id: str) -> bool:
        return self._c.execute(_DEVICE_EXISTS, {"id": device_id}).first() is not None

    def insert(self, device: Device, *, known_absent: bool = False) -> None:
        if not known_absent and self._exists(device.id):
            raise AlreadyExistsError(f"device {device.id!r} exists already", hint="choose another id")
        self._c.execute(
            _INSERT_DEVICE,
            {
                "id": device.id,
                "display_name": device.display_name,
                "state": str(device.state),
                "onboarding_fingerprint": device.onboarding_fingerprint,
                "created_at": device.created_at,
                "updated_at": device.updated_at,
                "enrollment_group": device.enrollment_group,
            },
        )
        if device.groups:
            self._c.execute(
                insert(device_group_members),
                [{"device_id": device.id, "group_name": g} for g in device.groups],
            )
        if device.tags:
            self._c.execute(
                insert(device_tags),
                [{"device_id": device.id, "key": k, "value": v} for k, v in device.tags.items()],
            )

    def get(self, device_id: str, *, lock: bool = False) -> Device | None:
        query = select(devices).where(devices.c.id == device_id)
        if lock:
            query = query.with_for_update()  # PostgreSQL; SQLite's writers are serialised by BEGIN IMMEDIATE
        row = self._c.execute(query).first()
        if row is None:
            return None
        return self._hydrate([row])[0]

    def states(self, device_ids: Iterable[str]) -> dict[str, DeviceState]:
        ids = list(device_ids)
        result: dict[str, DeviceState] = {}
        for start in range(0, len(ids), 500):
            rows = self._c.execute(_DEVICE_STATES, {"ids": ids[start : start + 500]})
            result.update((row.id, DeviceState(row.state)) for row in rows)
        return result

    def find(
        self,
        *,
        state: DeviceState | None = None,
        group: str | None = None,
        tags: Mapping[str, str] | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[Device]:
        query = select(devices).order_by(devices.c.id)
        if state is not None:
            query = query.where(devices.c.state == str(state))
        if group is not None:
            query = query.where(
                devices.c.id.in_(
                    select(device_group_members.c.device_id).where(device_group_members.c.group_name == group)
                )
            )
        for key, value in (tags or {}).items():
            query = query.where(
                devices.c.id.in_(
                    select(device_tags.c.device_id).where(and_(device_tags.c.key == key, device_tags.c.value == value))
                )
            )
        if after is not None:
            query = query.where(devices.c.id > after)
        if limit is not None:
            query = query.limit(limit)
        return self._hydrate(self._c.execute(query).all())

    def _hydrate(self, rows: Sequence[Row[Any]]) -> list[Device]:
        ids = [row.id for row in rows]
        groups: dict[str, list[str]] = {i: [] for i in ids}
        tags: dict[str, dict[str, str]] = {i: {} for i in ids}
        for chunk_start in range(0, len(ids), 500):
            chunk = ids[chunk_start : chunk_start + 500]
            for m in self._c.execute(
                select(device_group_members)
                .where(device_group_members.c.device_id.in_(chunk))
                .order_by(device_group_members.c.group_name)
            ):
                groups[m.device_id].append(m.group_name)
            for t in self._c.execute(
                select(device_tags).where(device_tags.c.device_id.in_(chunk)).order_by(device_tags.c.key)
            ):
                tags[t.device_id][t.key] = t.value
        return [
            Device(
                id=row.id,
                display_name=row.display_name,
                state=DeviceState(row.state),
                created_at=row.created_at,
                updated_at=row.updated_at,
                tags=tags[row.id],
                groups=tuple(groups[row.id]),
                onboarding_fingerprint=row.onboarding_fingerprint,
                enrollment_group=row.enrollment_group,
            )
            for row in rows
        ]

    def set_state(self, device_id: str, state: DeviceState, now: dt.datetime) -> None:
        self._c.execute(update(devices).where(devices.c.id == device_id).values(state=str(state), updated_at=now))

    def set_states(self, device_ids: Iterable[str], state: DeviceState, now: dt.datetime) -> None:
        ids = list(device_ids)
        for start in range(0, len(ids), 500):
            self._c.execute(_SET_DEVICE_STATES, {"ids": ids[start : start + 500], "new_state": str(state), "now": now})

    def set_onboarding_fingerprint(self, device_id: str, fingerprint: str | None, now: dt.datetime) -> None:
        self._c.execute(
            update(devices).where(devices.c.id == device_id).values(onboarding_fingerprint=fingerprint, updated_at=now)
        )

    def set_enrollment_group(self, device_id: str, group: str | None, now: dt.datetime) -> None:
        self._c.execute(update(devices).where(devices.c.id == device_id).values(enrollment_group=group, updated_at=now))

    def identity(self, device_id: str, *, lock: bool = False) -> tuple[DeviceState, str | None] | None:
        row = self._c.execute(_DEVICE_IDENTITY_LOCKED if lock else _DEVICE_IDENTITY, {"id": device_id}).first()
        return (DeviceState(row.state), row.onboarding_fingerprint) if row is not None else None

    def holder_of(self, fingerprint: str) -> str | None:
        row = self._c.execute(_DEVICE_BY_ONBOARDING, {"fp": fingerprint}).first()
        return str(row.id) if row is not None else None

    def identity_and_holder(
        self, device_id: str, fingerprint: str, *, lock: bool = False
    ) -> tuple[tuple[DeviceState, str | None] | None, str | None]:
        statement = _DEVICE_IDENTITY_AND_HOLDER_LOCKED if lock else _DEVICE_IDENTITY_AND_HOLDER
        identity: tuple[DeviceState, str | None] | None = None
        holder: str | None = None
        for row in self._c.execute(statement, {"id": device_id, "fp": fingerprint}):
            if row.id == device_id:
                identity = (DeviceState(row.state), row.onboarding_fingerprint)
            if row.onboarding_fingerprint == fingerprint:
                holder = str(row.id)
        return identity, holder

    def by_onboarding(self, fingerprint: str) -> Device | None:
        row = self._c.execute(select(devices).where(devices.c.onboarding_fingerprint == fingerprint)).first()
        return self._hydrate([row])[0] if row is not None else None

    def count(self) -> int:
        return int(self._c.execute(select(func.count()).select_from(devices)).scalar_one())


class GroupRepository:
    def __init__(self, connection: Connection) -> None:
        self._c = connection

    def insert(self, group: DeviceGroup) -> None:
        if self.get(group.name) is not None:
            raise AlreadyExistsError(f"group {group.name!r} exists already")
        self._c.execute(
            insert(device_groups).values(
                name=group.name,
                description=group.description,
                settings=json.dumps(dict(group.settings), sort_keys=True),
                created_at=group.created_at,
            )
        )

    def get(self, name: str) -> DeviceGroup | None:
        row = self._c.execute(select(device_groups).where(device_groups.c.name == name)).first()
        return _group(row) if row is not None else None

    def existing(self, names: Iterable[str]) -> set[str]:
        names = list(names)
        if not names:
            return set()
        rows = self._c.execute(select(device_groups.c.name).where(device_groups.c.name.in_(names)))
        return {r.name for r in rows}

    def find(self) -> list[DeviceGroup]:
        return [_group(r) for r in self._c.execute(select(device_groups).order_by(device_groups.c.name))]

    def member_count(self, name: str) -> int:
        query = select(func.count()).where(device_group_members.c.group_name == name)
        return int(self._c.execute(query).scalar_one())


def _group(row: Row[Any]) -> DeviceGroup:
    return DeviceGroup(
        name=row.name,
        description=row.description,
        settings=json.loads(row.settings),
        created_at=row.created_at,
    )


class CertificateRepository:
    def __init__(self, connection: Connection, *, is_sqlite: bool) -> None:
        self._c = connection
        self._sqlite = is_sqlite

    def insert_many(self, records: Sequence[CertificateRecord]) -> None:
        if not records:
            return
        if self._sqlite:
            # The issuing hot path: straight to the driver's executemany, skipping SQLAlchemy's per-row processing.
            self._c.exec_driver_sql(
                _SQLITE_INSERT_CERTIFICATE,
                [
                    (
                        format_serial(r.serial),
                        r.device_id,
                        r.common_name,
                        r.profile,
                        sqlite_time(r.not_before),
                        sqlite_time(r.not_after),
                        r.fingerprint,
                        r.key_fingerprint,
                        str(r.status),
                        sqlite_time(r.issued_at),
                        sqlite_time(r.revoked_at) if r.revoked_at else None,
                        r.revocation_reason,
                        r.pem,
                    )
                    for r in records
                ],
            )
            return
        self._c.execute(
            _INSERT_CERTIFICATE,
            [
                {
                    "serial": format_serial(record.serial),
                    "device_id": record.device_id,
                    "common_name": record.common_name,
                    "profile": record.profile,
                    "not_before": record.not_before,
                    "not_after": record.not_after,
                    "fingerprint": record.fingerprint,
                    "key_fingerprint": record.key_fingerprint,
                    "status": str(record.status),
                    "issued_at": record.issued_at,
                    "revoked_at": record.revoked_at,
                    "revocation_reason": record.revocation_reason,
                    "pem": record.pem,
                }
                for record in records
            ],
        )

    def key_uses(self, key_fingerprints: Iterable[str]) -> dict[str, list[tuple[str, CertificateStatus]]]:
        keys = list(key_fingerprints)
        result: dict[str, list[tuple[str, CertificateStatus]]] = {k: [] for k in keys}
        for start in range(0, len(keys), 500):
            for row in self._c.execute(_KEY_USES, {"keys": keys[start : start + 500]}):
                owner = f"device:{row.device_id}" if row.device_id else f"service:{row.common_name}"
                result[row.key_fingerprint].append((owner, CertificateStatus(row.status)))
        return result

    def get(self, serial: int) -> CertificateRecord | None:
        row = self._c.execute(_CERTIFICATE_BY_SERIAL, {"serial": format_serial(serial)}).first()
        return _certificate(row) if row is not None else None

    def find(self, *, device_id: str | None = None, status: CertificateStatus | None = None) -> list[CertificateRecord]:
        query = select(certificates).order_by(certificates.c.issued_at, certificates.c.serial)
        if device_id is not None:
            query = query.where(certificates.c.device_id == device_id)
        if status is not None:
            query = query.where(certificates.c.status == str(status))
        return [_certificate(r) for r in self._c.execute(query)]

    def page(
        self,
        *,
        device_id: str | None = None,
        status: CertificateStatus | None = None,
        limit: int,
        after: str | None = None,
    ) -> list[CertificateRecord]:
        query = select(certificates).order_by(certificates.c.serial).limit(limit)
        if device_id is not None:
            query = query.where(certificates.c.device_id == device_id)
        if status is not None:
            query = query.where(certificates.c.status == str(status))
        if after is not None:
            query = query.where(certificates.c.serial > after)
        return [_certificate(r) for r in self._c.execute(query)]

    def revoke(self, serial: int, *, revoked_at: dt.datetime, reason: str) -> None:
        self._c.execute(
            update(certificates)
            .where(certificates.c.serial == format_serial(serial))
            .values(status=str(CertificateStatus.REVOKED), revoked_at=revoked_at, revocation_reason=reason)
        )

    def revoked(self, *, not_expired_at: dt.datetime | None = None) -> Iterator[tuple[int, dt.datetime, str]]:
        """(serial, revocation time, reason) of every revoked certificate, streamed."""
        query = select(certificates.c.serial, certificates.c.revoked_at, certificates.c.revocation_reason).where(
            certificates.c.status == str(CertificateStatus.REVOKED)
        )
        if not_expired_at is not None:
            query = query.where(certificates.c.not_after > not_expired_at)
        for serial, revoked_at, reason in self._c.execute(query.execution_options(yield_per=10_000)):
            yield int(serial, 16), revoked_at, reason

    def revocation_summary(self, *, not_expired_at: dt.datetime) -> tuple[int, dt.datetime | None]:
        row = self._c.execute(
            select(func.count(), func.max(certificates.c.revoked_at)).where(
                certificates.c.status == str(CertificateStatus.REVOKED), certificates.c.not_after > not_expired_at
            )
        ).one()
        latest = row[1]
        if isinstance(latest, str):  # SQLite returns the aggregate's raw text
            latest = dt.datetime.fromisoformat(latest)
        if latest is not None and latest.tzinfo is None:
            latest = latest.replace(tzinfo=dt.UTC)
        return int(row[0]), latest

    def count(self) -> int:
        return int(self._c.execute(select(func.count()).select_from(certificates)).scalar_one())


def _certificate(row: Row[Any]) -> CertificateRecord:
    return CertificateRecord(
        serial=int(row.serial, 16),
        device_id=row.device_id,
        common_name=row.common_name,
        profile=row.profile,
        not_before=row.not_before,
        not_after=row.not_after,
        fingerprint=row.fingerprint,
        key_fingerprint=row.key_fingerprint,
        status=CertificateStatus(row.status),
        issued_at=row.issued_at,
        pem=row.pem,
        revoked_at=row.revoked_at,
        revocation_reason=row.revocation_reason,
    )


class AuditRepository:
    def __init__(self, connection: Connection, *, is_sqlite: bool) -> None:
        self._c = connection
        self._sqlite = is_sqlite
        # SQLite serialises writers with BEGIN IMMEDIATE; PostgreSQL needs the head row locked.
        self._lock = not is_sqlite
        #: the head as this transaction last moved it, so batched appends read it once
        self.cached_head: tuple[int, str, int] | None = None

    def _select_head(self, *, lock: bool) -> tuple[int, str, int]:
        row = self._c.execute(_HEAD_FOR_UPDATE if lock else _HEAD).first()
        if row is None:
            raise StorageError("the audit head row is missing", hint="the database was not migrated by Warden")
        return (int(row.seq), row.hash, int(row.last_checkpoint_seq))

    def lock_head(self) -> tuple[int, str, int]:
        if self.cached_head is None:
            self.cached_head = self._select_head(lock=self._lock)
        return self.cached_head

    def read_head(self) -> tuple[int, str, int]:
        row = self._c.execute(
            select(audit_head.c.seq, audit_head.c.hash, audit_head.c.last_checkpoint_seq).where(audit_head.c.id == 1)
        ).first()
        return (int(row.seq), row.hash, int(row.last_checkpoint_seq)) if row else (0, GENESIS_HASH, 0)

    def append(self, records: Sequence[AuditRecord]) -> None:
        if not records:
            return
        _, _, last_checkpoint = self.lock_head()
        if self._sqlite:  # the driver's executemany, as for certificates
            self._c.exec_driver_sql(
                _SQLITE_INSERT_AUDIT,
                [
                    (
                        r.seq,
                        sqlite_time(r.time),
                        r.actor,
                        r.action,
                        r.target,
                        r.outcome,
                        r.details_json or canonical_details(r.details),
                        r.prev_hash,
                        r.hash,
                    )
                    for r in records
                ],
            )
        else:
            self._c.execute(
                _INSERT_AUDIT,
                [
                    {
                        "seq": r.seq,
                        "time": r.time,
                        "actor": r.actor,
                        "action": r.action,
                        "target": r.target,
                        "outcome": r.outcome,
                        "details": r.details_json or canonical_details(r.details),
                        "prev_hash": r.prev_hash,
                        "hash": r.hash,
                    }
                    for r in records
                ],
            )
        last = records[-1]
        self._c.execute(_MOVE_HEAD, {"new_seq": last.seq, "new_hash": last.hash})
        self.cached_head = (last.seq, last.hash, last_checkpoint)

    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        self._c.execute(
            insert(audit_checkpoints).values(
                seq=checkpoint.seq,
                hash=checkpoint.hash,
                time=checkpoint.time,
                signature=checkpoint.signature,
                key_id=checkpoint.key_id,
            )
        )
        seq, digest, last = self.lock_head()
        new_last = max(last, checkpoint.seq)
        self._c.execute(update(audit_head).where(audit_head.c.id == 1).values(last_checkpoint_seq=new_last))
        self.cached_head = (seq, digest, new_last)

    def checkpoints(self) -> list[Checkpoint]:
        rows = self._c.execute(select(audit_checkpoints).order_by(audit_checkpoints.c.seq))
        return [Checkpoint(r.seq, r.hash, r.time, r.signature, r.key_id) for r in rows]

    def records(
        self, *, since_seq: int = 0, since_time: dt.datetime | None = None, limit: int | None = None
    ) -> Generator[AuditRecord, None, None]:
        query = select(audit_log).where(audit_log.c.seq > since_seq).order_by(audit_log.c.seq)
        if since_time is not None:
            query = query.where(audit_log.c.time >= since_time)
        if limit is not None:
            query = query.limit(limit)
        result = self._c.execute(query.execution_options(yield_per=5_000))
        try:
            yield from (self._record(r) for r in result)
        finally:
            # A reader that stops early (verification failed) must not leave a server-side cursor open.
            result.close()

    @staticmethod
    def _record(r: Row[Any]) -> AuditRecord:
        return AuditRecord(
            seq=int(r.seq),
            time=r.time,
            actor=r.actor,
            action=r.action,
            target=r.target,
            outcome=r.outcome,
            details=json.loads(r.details),
            prev_hash=r.prev_hash,
            hash=r.hash,
        )


class CounterRepository:
    def __init__(self, connection: Connection, *, lock: bool) -> None:
        self._c = connection
        self._lock = lock

    def next(self, name: str) -> int:
        """Allocate the next value of counter ``name`` (1, 2, ...) under a row lock."""
        query = select(counters.c.value).where(counters.c.name == name)
        if self._lock:
            query = query.with_for_update()
        current = self._c.execute(query).scalar()
        if current is None:
            raise StorageError(f"the counter {name!r} is missing", hint="the database was not migrated by Warden")
        value = int(current) + 1
        self._c.execute(update(counters).where(counters.c.name == name).values(value=value))
        return value

    def read(self, name: str) -> int:
        """The current value of counter ``name``, without allocating (and without a lock)."""
        current = self._c.execute(_COUNTER, {"name": name}).scalar()
        if current is None:
            raise StorageError(f"the counter {name!r} is missing", hint="the database was not migrated by Warden")
        return int(current)


class CrlRepository:
    def __init__(self, connection: Connection) -> None:
        self._c = connection

    def publish(self, crl: PublishedCrl) -> None:
        self._c.execute(
            insert(crls).values(
                number=crl.number,
                this_update=crl.this_update,
                next_update=crl.next_update,
                der=crl.der,
                entries=crl.entries,
            )
        )

    def latest(self) -> PublishedCrl | None:
        row = self._c.execute(select(crls).order_by(crls.c.number.desc()).limit(1)).first()
        if row is None:
            return None
        return PublishedCrl(
            number=int(row.number),
            this_update=row.this_update,
            next_update=row.next_update,
            der=bytes(row.der),
            entries=int(row.entries),
        )

    def latest_number(self) -> int | None:
        number = self._c.execute(select(func.max(crls.c.number))).scalar()
        return int(number) if number is not None else None


# Change counters (rows of ``counters``): bumped in the transaction that makes the change, so a cache that compares
# them sees every committed change and nothing that was rolled back.
_GROUPS_VERSION = "enrollment_groups"
_CERTIFICATES_VERSION = "enrollment_certificates"


class EnrollmentGroupRepository:
    def __init__(self, connection: Connection, counters_: CounterRepository) -> None:
        self._c = connection
        self._counters = counters_

    def insert(self, group: EnrollmentGroup) -> None:
        if self._c.execute(select(enrollment_groups.c.name).where(enrollment_groups.c.name == group.name)).first():
            raise AlreadyExistsError(f"enrollment group {group.name!r} exists already", hint="choose another name")
        self._c.execute(
            insert(enrollment_groups).values(
                name=group.name,
                ca_pem=group.ca_pem,
                ca_fingerprints=json.dumps(list(group.ca_fingerprints)),
                id_field=str(group.id_field),
                profile=group.profile,
                validity_days=group.validity_days,
                tags=json.dumps(dict(group.tags), sort_keys=True),
                enabled=group.enabled,
                allow_list=json.dumps(sorted(group.allow)),
                deny_list=json.dumps(sorted(group.deny)),
                created_at=group.created_at,
                updated_at=group.updated_at,
                flood_limit=group.flood_limit,
            )
        )
        self._counters.next(_GROUPS_VERSION)

    def get(self, name: str) -> EnrollmentGroup | None:
        row = self._c.execute(select(enrollment_groups).where(enrollment_groups.c.name == name)).first()
        return _enrollment_group(row) if row is not None else None

    def find(self, *, enabled: bool | None = None) -> list[EnrollmentGroup]:
        query = select(enrollment_groups).order_by(enrollment_groups.c.name)
        if enabled is not None:
            query = query.where(enrollment_groups.c.enabled == enabled)
        return [_enrollment_group(r) for r in self._c.execute(query)]

    def set_enabled(self, name: str, enabled: bool, now: dt.datetime) -> None:
        result = self._c.execute(
            update(enrollment_groups).where(enrollment_groups.c.name == name).values(enabled=enabled, updated_at=now)
        )
        if result.rowcount:
            self._counters.next(_GROUPS_VERSION)

    def set_flood_limit(self, name: str, limit: int | None, now: dt.datetime) -> None:
        result = self._c.execute(
            update(enrollment_groups).where(enrollment_groups.c.name == name).values(flood_limit=limit, updated_at=now)
        )
        if result.rowcount:
            self._counters.next(_GROUPS_VERSION)

    def version(self) -> str:
        return str(self._counters.read(_GROUPS_VERSION))


def _enrollment_group(row: Row[Any]) -> EnrollmentGroup:
    return EnrollmentGroup(
        name=row.name,
        ca_pem=row.ca_pem,
        ca_fingerprints=tuple(json.loads(row.ca_fingerprints)),
        id_field=IdField(row.id_field),
        profile=row.profile,
        validity_days=row.validity_days,
        tags=json.loads(row.tags),
        enabled=bool(row.enabled),
        allow=frozenset(json.loads(row.allow_list)),
        deny=frozenset(json.loads(row.deny_list)),
        created_at=row.created_at,
        updated_at=row.updated_at,
        flood_limit=row.flood_limit,
    )


class EnrollmentRepository:
    def __init__(self, connection: Connection, counters_: CounterRepository) -> None:
        self._c = connection
        self._counters = counters_

    def insert(self, enrollment: IndividualEnrollment) -> None:
        if self._c.execute(select(enrollments.c.id).where(enrollments.c.id == enrollment.id)).first():
            raise AlreadyExistsError(f"enrollment {enrollment.id!r} exists already")
        self._c.execute(
            insert(enrollments).values(
                id=enrollment.id,
                device_id=enrollment.device_id,
                kind=str(enrollment.kind),
                status=str(enrollment.status),
                profile=enrollment.profile,
                validity_days=enrollment.validity_days,
                certificate_fingerprint=enrollment.certificate_fingerprint,
                certificate_pem=enrollment.certificate_pem,
                token_mac=enrollment.token_mac,
                created_at=enrollment.created_at,
                expires_at=enrollment.expires_at,
                used_at=enrollment.used_at,
                revoked_at=enrollment.revoked_at,
            )
        )
        if enrollment.kind is EnrollmentKind.CERTIFICATE:
            self._counters.next(_CERTIFICATES_VERSION)

    def get(self, enrollment_id: str, *, lock: bool = False) -> IndividualEnrollment | None:
        # Locked on PostgreSQL; SQLite's writers are serialised by BEGIN IMMEDIATE.
        row = self._c.execute(_ENROLLMENT_LOCKED if lock else _ENROLLMENT, {"id": enrollment_id}).first()
        return _enrollment(row) if row is not None else None

    def by_certificate(self, fingerprint: str) -> IndividualEnrollment | None:
        row = self._c.execute(_ENROLLMENT_BY_CERTIFICATE, {"fp": fingerprint}).first()
        return _enrollment(row) if row is not None else None

    def active_for_device(self, device_id: str) -> list[IndividualEnrollment]:
        return [_enrollment(r) for r in self._c.execute(_ACTIVE_ENROLLMENTS_OF_DEVICE, {"id": device_id})]

    def active_claims(self, device_id: str, fingerprint: str) -> list[IndividualEnrollment]:
        return [_enrollment(r) for r in self._c.execute(_ACTIVE_CLAIMS, {"id": device_id, "fp": fingerprint})]

    def find(
        self,
        *,
        device_id: str | None = None,
        status: EnrollmentStatus | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[IndividualEnrollment]:
        query = select(enrollments).order_by(enrollments.c.id)
        if device_id is not None:
            query = query.where(enrollments.c.device_id == device_id)
        if status is not None:
            query = query.where(enrollments.c.status == str(status))
        if after is not None:
            query = query.where(enrollments.c.id > after)
        if limit is not None:
            query = query.limit(limit)
        return [_enrollment(r) for r in self._c.execute(query)]

    def set_status(self, enrollment_id: str, status: EnrollmentStatus, now: dt.datetime) -> None:
        row = self._c.execute(
            select(enrollments.c.kind, enrollments.c.status).where(enrollments.c.id == enrollment_id)
        ).first()
        if row is None:
            return
        values: dict[str, Any] = {"status": str(status)}
        if status is EnrollmentStatus.USED:
            values["used_at"] = now
        elif status is EnrollmentStatus.REVOKED:
            values["revoked_at"] = now
        self._c.execute(update(enrollments).where(enrollments.c.id == enrollment_id).values(**values))
        if row.kind == str(EnrollmentKind.CERTIFICATE) and row.status != str(status):
            self._counters.next(_CERTIFICATES_VERSION)

    def certificates_version(self) -> str:
        return str(self._counters.read(_CERTIFICATES_VERSION))

    def active_certificates(self) -> list[str]:
        rows = self._c.execute(
            select(enrollments.c.certificate_pem)
            .where(
                enrollments.c.kind == str(EnrollmentKind.CERTIFICATE),
                enrollments.c.status == str(EnrollmentStatus.ACTIVE),
                enrollments.c.certificate_pem.is_not(None),
            )
            .order_by(enrollments.c.id)
        )
        return [r.certificate_pem for r in rows]


def _enrollment(row: Row[Any]) -> IndividualEnrollment:
    return IndividualEnrollment(
        id=row.id,
        device_id=row.device_id,
        kind=EnrollmentKind(row.kind),
        status=EnrollmentStatus(row.status),
        profile=row.profile,
        validity_days=row.validity_days,
        created_at=row.created_at,
        certificate_fingerprint=row.certificate_fingerprint,
        certificate_pem=row.certificate_pem,
        token_mac=row.token_mac,
        expires_at=row.expires_at,
        used_at=row.used_at,
        revoked_at=row.revoked_at,
    )


class ReonboardingRepository:
    def __init__(self, connection: Connection) -> None:
        self._c = connection

    def put(self, entry: Reonboarding) -> None:
        values = {
            "armed_at": entry.armed_at,
            "expires_at": entry.expires_at,
            "armed_by": entry.armed_by,
            "reason": entry.reason,
        }
        # Update, else insert: portable (no dialect upsert). Concurrent first puts for one device collide on the
        # primary key, and the loser's transaction fails rather than overwriting silently.
        result = self._c.execute(update(reonboarding).where(reonboarding.c.device_id == entry.device_id).values(values))
        if not result.rowcount:
            self._c.execute(insert(reonboarding).values(device_id=entry.device_id, **values))

    def get(self, device_id: str) -> Reonboarding | None:
        row = self._c.execute(_REONBOARDING, {"id": device_id}).first()
        if row is None:
            return None
        return Reonboarding(
            device_id=row.device_id,
            armed_at=row.armed_at,
            armed_by=row.armed_by,
            expires_at=row.expires_at,
            reason=row.reason,
        )

    def delete(self, device_id: str) -> None:
        self._c.execute(delete(reonboarding).where(reonboarding.c.device_id == device_id))


class TokenRepository:
    def __init__(self, connection: Connection) -> None:
        self._c = connection

    def insert(self, token: ApiToken, mac: str) -> None:
        if self._c.execute(select(api_tokens.c.id).where(api_tokens.c.id == token.id)).first():
            raise AlreadyExistsError(f"API token {token.id!r} exists already")
        self._c.execute(
            insert(api_tokens).values(
                id=token.id,
                name=token.name,
                role=str(token.role),
                mac=mac,
                created_at=token.created_at,
                expires_at=token.expires_at,
                revoked_at=token.revoked_at,
                created_by=token.created_by,
            )
        )

    def get(self, token_id: str) -> tuple[ApiToken, str] | None:
        row = self._c.execute(select(api_tokens).where(api_tokens.c.id == token_id)).first()
        return (_token(row), row.mac) if row is not None else None

    def find(self) -> list[ApiToken]:
        query = select(api_tokens).order_by(api_tokens.c.created_at, api_tokens.c.id)
        return [_token(r) for r in self._c.execute(query)]

    def revoke(self, token_id: str, now: dt.datetime) -> None:
        # A token revoked twice keeps its first revocation time.
        self._c.execute(
            update(api_tokens)
            .where(api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )


def _token(row: Row[Any]) -> ApiToken:
    return ApiToken(
        id=row.id,
        name=row.name,
        role=Role(row.role),
        created_at=row.created_at,
        expires_at=row.expires_at,
        created_by=row.created_by,
        revoked_at=row.revoked_at,
    )


class RestrictionRepository:
    def __init__(self, connection: Connection) -> None:
        self._c = connection

    def put(self, restriction: Restriction) -> None:
        values = {
            "since": restriction.since,
            "until": restriction.until,
            "reason": restriction.reason,
            "actor": restriction.actor,
            "details": json.dumps(dict(restriction.details), sort_keys=True),
        }
        # Update, else insert (as ReonboardingRepository.put).
        result = self._c.execute(
            update(device_restrictions).where(device_restrictions.c.device_id == restriction.device_id).values(values)
        )
        if not result.rowcount:
            self._c.execute(insert(device_restrictions).values(device_id=restriction.device_id, **values))

    def get(self, device_id: str) -> Restriction | None:
        row = self._c.execute(select(device_restrictions).where(device_restrictions.c.device_id == device_id)).first()
        return _restriction(row) if row is not None else None

    def delete(self, device_id: str) -> None:
        self._c.execute(delete(device_restrictions).where(device_restrictions.c.device_id == device_id))

    def find(self) -> list[Restriction]:
        query = select(device_restrictions).order_by(device_restrictions.c.device_id)
        return [_restriction(r) for r in self._c.execute(query)]

    def expired(self, now: dt.datetime) -> list[Restriction]:
        query = (
            select(device_restrictions)
            .where(device_restrictions.c.until.is_not(None), device_restrictions.c.until <= now)
            .order_by(device_restrictions.c.device_id)
        )
        return [_restriction(r) for r in self._c.execute(query)]


def _restriction(row: Row[Any]) -> Restriction:
    return Restriction(
        device_id=row.device_id,
        since=row.since,
        until=row.until,
        reason=row.reason,
        actor=row.actor,
        details=json.loads(row.details),
    )


# The ingest's statements, built once (the recorder runs them every flush).
_DEVICE_LIMITS = (
    select(devices.c.id, enrollment_groups.c.flood_limit)
    .select_from(devices.outerjoin(enrollment_groups, enrollment_groups.c.name == devices.c.enrollment_group))
    .where(devices.c.id.in_(bindparam("ids", expanding=True)))
)
_ACTIVITY = select(device_activity).where(device_activity.c.device_id.in_(bindparam("ids", expanding=True)))
# Written with the driver's executemany: the recorder writes every active device's row every second, and
# SQLAlchemy's per-value parameter processing cost more than the writing (times are converted here instead).
_ACTIVITY_COLUMNS = [c.name for c in device_activity.columns if c.name != "device_id"]


def _activity_sql(mark: str) -> tuple[str, str]:
    # Built from the table's own column names and the driver's parameter mark: nothing of any input.
    columns = ", ".join(["device_id", *_ACTIVITY_COLUMNS])
    marks = ", ".join([mark] * (len(_ACTIVITY_COLUMNS) + 1))
    sets = ", ".join(f"{name} = {mark}" for name in _ACTIVITY_COLUMNS)
    return (
        f"INSERT INTO device_activity ({columns}) VALUES ({marks})",  # noqa: S608
        f"UPDATE device_activity SET {sets} WHERE device_id = {mark}",  # noqa: S608
    )


_ACTIVITY_SQL = {True: _activity_sql("?"), False: _activity_sql("%s")}  # sqlite3's and psycopg's parameter styles
_STAT_SUMS = ("processed", "accepted", "malformed", "duplicates", "unknown", "invalid_topic", "overflow", "restricted")
_ADD_STATS = (
    update(ingest_stats)
    .where(ingest_stats.c.id == 1)
    .values(
        {name: ingest_stats.c[name] + bindparam(f"add_{name}") for name in (*_STAT_SUMS, "flushes")}
        | {
            "largest_batch": case(
                (ingest_stats.c.largest_batch < bindparam("batch"), bindparam("batch")),
                else_=ingest_stats.c.largest_batch,
            ),
            "last_batch": bindparam("batch"),
            "last_flush_at": bindparam("at"),
        }
    )
)
_CHUNK = 500


class IngestRepository:
    """The broker's ingest store (``warden.broker.IngestStore``): device activity and the ingest's totals."""

    def __init__(self, connection: Connection, *, is_sqlite: bool) -> None:
        self._c = connection
        self._is_sqlite = is_sqlite

    def device_limits(self, device_ids: Collection[str]) -> dict[str, float | None]:
        ids = list(device_ids)
        found: dict[str, float | None] = {}
        for start in range(0, len(ids), _CHUNK):
            for row in self._c.execute(_DEVICE_LIMITS, {"ids": ids[start : start + _CHUNK]}):
                found[row.id] = float(row.flood_limit) if row.flood_limit is not None else None
        return found

    def activity(self, device_ids: Collection[str]) -> dict[str, DeviceActivity]:
        ids = list(device_ids)
        found: dict[str, DeviceActivity] = {}
        for start in range(0, len(ids), _CHUNK):
            for row in self._c.execute(_ACTIVITY, {"ids": ids[start : start + _CHUNK]}):
                found[row.device_id] = _activity(row)
        return found

    def save_activity(self, inserted: Sequence[DeviceActivity], updated: Sequence[DeviceActivity]) -> None:
        insert_sql, update_sql = _ACTIVITY_SQL[self._is_sqlite]
        convert = sqlite_time if self._is_sqlite else _naive_utc
        converted: dict[dt.datetime, object] = {}  # most rows of a batch share their times (the batch's own)

        def time(value: dt.datetime) -> object:
            found = converted.get(value)
            if found is None:
                found = converted[value] = convert(value)
            return found

        if inserted:
            rows = [(a.device_id, *_activity_row(a, time)) for a in inserted]
            self._c.exec_driver_sql(insert_sql, rows)
        if updated:
            rows = [(*_activity_row(a, time), a.device_id) for a in updated]
            self._c.exec_driver_sql(update_sql, rows)

    def add_stats(self, delta: IngestStats) -> None:
        values: dict[str, object] = {f"add_{name}": getattr(delta, name) for name in _STAT_SUMS}
        values.update(add_flushes=delta.flushes, batch=delta.last_batch, at=delta.last_flush_at)
        result = self._c.execute(_ADD_STATS, values)
        if not result.rowcount:
            raise StorageError("the ingest totals row is missing", hint="the database was not migrated by Warden")

    def stats(self) -> IngestStats:
        row = self._c.execute(select(ingest_stats).where(ingest_stats.c.id == 1)).first()
        if row is None:
            raise StorageError("the ingest totals row is missing", hint="the database was not migrated by Warden")
        return IngestStats(
            **{name: int(row._mapping[name]) for name in (*_STAT_SUMS, "flushes", "largest_batch", "last_batch")},
            last_flush_at=row.last_flush_at,
        )

    def sequence_heads(self, limit: int) -> dict[str, tuple[int, dt.datetime | None]]:
        query = (
            select(device_activity.c.device_id, device_activity.c.seq, device_activity.c.seq_time)
            .where(device_activity.c.seq.is_not(None))
            .order_by(device_activity.c.last_seen.desc())
            .limit(limit)
        )
        return {row.device_id: (int(row.seq), row.seq_time) for row in self._c.execute(query)}


def _naive_utc(value: dt.datetime) -> dt.datetime:
    """An aware datetime as ``UTCDateTime`` stores it on PostgreSQL (naive UTC), for statements sent to the driver."""
    if value.tzinfo is None:
        raise ValueError("naive datetimes are not stored: pass an aware UTC datetime")
    return value.astimezone(dt.UTC).replace(tzinfo=None)


def _activity_row(activity: DeviceActivity, time: Callable[[dt.datetime], object]) -> tuple[object, ...]:
    """The row's values in ``_ACTIVITY_COLUMNS`` order (times converted by ``time``)."""
    values: dict[str, object] = {
        "first_seen": activity.first_seen,
        "last_seen": activity.last_seen,
        "telemetry": activity.telemetry,
        "health": activity.health,
        "events": activity.events,
        "duplicates": activity.duplicates,
        "malformed": activity.malformed,
        "last_malformed_reason": activity.last_malformed_reason,
        "last_malformed_at": activity.last_malformed_at,
        "seq": activity.seq,
        "seq_time": activity.seq_time,
        "metrics": metrics_json(activity.metrics),
        "health_status": activity.health_status,
        "health_checks": json.dumps(dict(activity.health_checks), sort_keys=True)
        if activity.health_status is not None
        else None,
        "health_at": activity.health_at,
        "last_event_type": activity.last_event_type,
        "last_event_at": activity.last_event_at,
    }
    return tuple(time(v) if isinstance(v := values[name], dt.datetime) else v for name in _ACTIVITY_COLUMNS)


def _activity(row: Row[Any]) -> DeviceActivity:
    return DeviceActivity(
        device_id=row.device_id,
        first_seen=row.first_seen,
        last_seen=row.last_seen,
        telemetry=int(row.telemetry),
        health=int(row.health),
        events=int(row.events),
        duplicates=int(row.duplicates),
        malformed=int(row.malformed),
        last_malformed_reason=row.last_malformed_reason,
        last_malformed_at=row.last_malformed_at,
        seq=int(row.seq) if row.seq is not None else None,
        seq_time=row.seq_time,
        metrics=metrics_from_json(row.metrics),
        health_status=row.health_status,
        health_checks=json.loads(row.health_checks) if row.health_checks else {},
        health_at=row.health_at,
        last_event_type=row.last_event_type,
        last_event_at=row.last_event_at,
    )


class CommandRepository:
    def __init__(self, connection: Connection) -> None:
        self._c = connection

    def insert(self, command: DeviceCommand) -> None:
        self._c.execute(
            insert(device_commands).values(
                id=command.id,
                device_id=command.device_id,
                counter=command.counter,
                name=command.name,
                args=json.dumps(dict(command.args), sort_keys=True),
                actor=command.actor,
                state=str(command.state),
                created_at=command.created_at,
                sent_at=command.sent_at,
                result=command.result,
                result_at=command.result_at,
            )
        )

    def last_counter(self, device_id: str) -> int:
        query = select(func.max(device_commands.c.counter)).where(device_commands.c.device_id == device_id)
        return int(self._c.execute(query).scalar() or 0)

    def get(self, command_id: str) -> DeviceCommand | None:
        row = self._c.execute(select(device_commands).where(device_commands.c.id == command_id)).first()
        return _command(row) if row is not None else None

    def find(self, device_id: str, *, limit: int) -> list[DeviceCommand]:
        query = (
            select(device_commands)
            .where(device_commands.c.device_id == device_id)
            .order_by(device_commands.c.counter.desc())
            .limit(limit)
        )
        return [_command(r) for r in self._c.execute(query)]

    def pending(self, *, limit: int) -> list[DeviceCommand]:
        query = (
            select(device_commands)
            .where(device_commands.c.state == str(CommandState.PENDING))
            # counter order within a device: the agent refuses a counter below one it accepted
            .order_by(device_commands.c.device_id, device_commands.c.counter)
            .limit(limit)
        )
        return [_command(r) for r in self._c.execute(query)]

    def mark_sent(self, command_ids: Iterable[str], at: dt.datetime) -> None:
        ids = list(command_ids)
        if ids:
            self._c.execute(
                update(device_commands)
                .where(device_commands.c.id.in_(ids), device_commands.c.state == str(CommandState.PENDING))
                .values(state=str(CommandState.SENT), sent_at=at)
            )

    def close(self, command_id: str, state: CommandState, result: str, at: dt.datetime) -> bool:
        open_states = (str(CommandState.PENDING), str(CommandState.SENT))
        done = self._c.execute(
            update(device_commands)
            .where(device_commands.c.id == command_id, device_commands.c.state.in_(open_states))
            .values(state=str(state), result=result, result_at=at)
        )
        return bool(done.rowcount)


def _command(row: Row[Any]) -> DeviceCommand:
    return DeviceCommand(
        id=row.id,
        device_id=row.device_id,
        counter=int(row.counter),
        name=row.name,
        actor=row.actor,
        created_at=row.created_at,
        state=CommandState(row.state),
        args=json.loads(row.args),
        sent_at=row.sent_at,
        result=row.result,
        result_at=row.result_at,
    )
