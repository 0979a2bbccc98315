"""The audit log service: appends in the caller's transaction, signs checkpoints, verifies the whole chain."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from warden.core import AuditIntegrityError, Clock, ConfigurationError, KeyStoreLockedError
from warden.core.files import read_limited, write_file_atomic, write_private_file
from warden.monitor._audit import (
    AuditEvent,
    AuditRecord,
    Checkpoint,
    VerifyReport,
    chain_records,
    sign_checkpoint,
    verify_chain,
)

__all__ = ["AuditLog", "AuditStore", "AuditUnitOfWork", "CheckpointKey", "CheckpointMirror"]

log = logging.getLogger(__name__)

_MAX_MIRROR_BYTES = 256 * 1024 * 1024


class AuditStore(Protocol):
    def lock_head(self) -> tuple[int, str, int]:
        """(seq, hash, last checkpoint seq) of the chain head, locked until the transaction ends."""
        ...

    def read_head(self) -> tuple[int, str, int]: ...

    def append(self, records: Sequence[AuditRecord]) -> None:
        """Insert ``records`` and move the head to the last of them."""
        ...

    def add_checkpoint(self, checkpoint: Checkpoint) -> None: ...

    def checkpoints(self) -> list[Checkpoint]: ...

    def records(
        self, *, since_seq: int = 0, since_time: dt.datetime | None = None, limit: int | None = None
    ) -> Generator[AuditRecord, None, None]: ...


class AuditUnitOfWork(Protocol):
    @property
    def audit(self) -> AuditStore: ...

    def after_commit(self, callback: Callable[[], None]) -> None: ...


class CheckpointMirror:
    """Checkpoints copied to an append-only JSON-lines file outside the database."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, checkpoint: Checkpoint) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        line = json.dumps(checkpoint.to_json(), separators=(",", ":")) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> list[Checkpoint]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size > _MAX_MIRROR_BYTES:
            raise AuditIntegrityError(f"the checkpoint mirror {self.path} is larger than {_MAX_MIRROR_BYTES} bytes")
        result = []
        with self.path.open("r", encoding="ascii") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                if not line.endswith("\n"):
                    # A crash while appending leaves at most one partial last line; it was never acknowledged.
                    log.warning("ignoring a partial last line in %s", self.path)
                    break
                try:
                    result.append(Checkpoint.from_json(json.loads(line)))
                except (json.JSONDecodeError, AuditIntegrityError) as e:
                    raise AuditIntegrityError(f"line {number} of {self.path} is not a checkpoint: {e}") from e
        return result


class CheckpointKey:
    """The Ed25519 key that signs checkpoints: a private key file encrypted with the hub passphrase, and its
    public key beside it. Neither is in the database."""

    def __init__(self, private_path: Path, public_path: Path, passphrase: Callable[[], bytes | None]) -> None:
        self.private_path = private_path
        self.public_path = public_path
        self._passphrase = passphrase
        self._key: ed25519.Ed25519PrivateKey | None = None

    def create(self) -> None:
        key = ed25519.Ed25519PrivateKey.generate()
        passphrase = self._passphrase()
        if not passphrase:
            raise ConfigurationError("no passphrase to protect the audit checkpoint key")
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
        write_private_file(self.private_path, pem)
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        write_file_atomic(self.public_path, public)
        self._key = key

    def private_key(self) -> ed25519.Ed25519PrivateKey | None:
        """The signing key, or None when no passphrase is at hand (checkpoints are then deferred)."""
        if self._key is not None:
            return self._key
        passphrase = self._passphrase()
        if not passphrase or not self.private_path.exists():
            return None
        data = read_limited(self.private_path, 64 * 1024, what="the audit checkpoint key")
        try:
            key = serialization.load_pem_private_key(data, password=passphrase)
        except (ValueError, TypeError) as e:
            raise KeyStoreLockedError(
                "the audit checkpoint key could not be decrypted", hint="wrong WARDEN_CA_PASSPHRASE?"
            ) from e
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ConfigurationError(f"{self.private_path} is not an Ed25519 key")
        self._key = key
        return key

    def public_key(self) -> ed25519.Ed25519PublicKey | None:
        if not self.public_path.exists():
            return None
        data = read_limited(self.public_path, 4096, what="the checkpoint public key")
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as e:
            raise AuditIntegrityError(f"{self.public_path} is not a PEM public key") from e
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise AuditIntegrityError(f"{self.public_path} is not an Ed25519 public key")
        return key


class AuditLog:
    def __init__(self, *, clock: Clock, key: CheckpointKey | None, mirror: CheckpointMirror, every: int) -> None:
        self._clock = clock
        self._key = key
        self._mirror = mirror
        self._every = every

    def append(self, uow: AuditUnitOfWork, *events: AuditEvent) -> list[AuditRecord]:
        """Append ``events`` in the caller's transaction; they commit or vanish with the change they record."""
        seq, digest, last_checkpoint = uow.audit.lock_head()
        now = self._clock.now()
        records = chain_records((seq, digest), events, now)
        uow.audit.append(records)
        if records and records[-1].seq - last_checkpoint >= self._every:
            self._checkpoint(uow, records[-1].seq, records[-1].hash, now, required=False)
        return records

    def checkpoint(self, uow: AuditUnitOfWork) -> Checkpoint:
        """Sign the current head now (``warden audit checkpoint``)."""
        seq, digest, _ = uow.audit.lock_head()
        if seq == 0:
            raise AuditIntegrityError("the audit log is empty: nothing to checkpoint")
        checkpoint = self._checkpoint(uow, seq, digest, self._clock.now(), required=True)
        assert checkpoint is not None
        return checkpoint

    def _checkpoint(
        self, uow: AuditUnitOfWork, seq: int, digest: str, now: dt.datetime, *, required: bool
    ) -> Checkpoint | None:
        key = self._key.private_key() if self._key is not None else None
        if key is None:
            if required:
                raise ConfigurationError("the audit checkpoint key is not available", hint="set WARDEN_CA_PASSPHRASE")
            log.warning("audit checkpoint at record %d deferred: no passphrase for the checkpoint key", seq)
            return None
        existing = {cp.seq: cp for cp in uow.audit.checkpoints()} if required else {}
        if seq in existing:
            return existing[seq]
        checkpoint = sign_checkpoint(key, seq=seq, digest=digest, now=now)
        uow.audit.add_checkpoint(checkpoint)
        uow.after_commit(lambda: self._mirror.append(checkpoint))
        return checkpoint

    def verify(self, uow: AuditUnitOfWork) -> VerifyReport:
        seq, digest, _ = uow.audit.read_head()
        records = uow.audit.records()
        try:
            return verify_chain(
                records,
                head=(seq, digest),
                checkpoints=uow.audit.checkpoints(),
                mirrored=self._mirror.read(),
                public_key=self._key.public_key() if self._key is not None else None,
            )
        finally:
            records.close()
