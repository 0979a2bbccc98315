"""The audit log's hash chain and its signed checkpoints. Pure: storage and time come in.

Invariants:
- Record ``n`` (``seq`` 1, 2, ...) holds the SHA-256 of record ``n-1`` (64 zeros for the first) and its own hash
  over a canonical JSON encoding of every field, so editing, deleting, inserting or reordering any record breaks
  the chain at that record.
- A head row (last seq and hash) is updated in the same transaction as every append; a tail truncated without it
  shows as a head that points past the last record.
- A checkpoint is a signature, by a key that is not stored in the database, over (seq, hash) of a record. A chain
  recomputed from scratch after an edit no longer matches the checkpoints signed before the edit; checkpoints are
  also mirrored to a file outside the database, so deleting them from the database is detected too.
- Details never hold secrets: keys that name one are refused.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from warden.core import AuditIntegrityError, utc

__all__ = [
    "GENESIS_HASH",
    "AuditEvent",
    "AuditRecord",
    "Checkpoint",
    "VerifyReport",
    "canonical_details",
    "chain_records",
    "checkpoint_payload",
    "record_hash",
    "sign_checkpoint",
    "verify_chain",
]

GENESIS_HASH = "0" * 64
_SECRET_KEYS = frozenset({"passphrase", "password", "pin", "secret", "token", "private_key", "key_pem", "seed"})


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """What happened, before it is given a place in the chain."""

    actor: str
    action: str
    target: str
    outcome: str = "success"
    details: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = _SECRET_KEYS.intersection(k.lower() for k in self.details)
        if bad:
            # A programming error, never user input: secrets must not reach the audit log.
            raise ValueError(f"audit details must not hold secrets (keys {sorted(bad)})")
        if self.outcome not in ("success", "failure", "denied"):
            raise ValueError(f"unknown audit outcome {self.outcome!r}")


@dataclass(frozen=True, slots=True)
class AuditRecord:
    seq: int
    time: dt.datetime
    actor: str
    action: str
    target: str
    outcome: str
    details: Mapping[str, object]
    prev_hash: str
    hash: str
    #: the canonical JSON text of ``details`` that was hashed (what storage keeps)
    details_json: str = field(default="", compare=False, repr=False)

    def to_json(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "time": _time_text(self.time),
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "outcome": self.outcome,
            "details": dict(self.details),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    hash: str
    time: dt.datetime
    #: hex Ed25519 signature over :func:`checkpoint_payload`
    signature: str
    #: SHA-256 of the raw public key, hex, first 16 characters
    key_id: str

    def to_json(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "hash": self.hash,
            "time": _time_text(self.time),
            "signature": self.signature,
            "key_id": self.key_id,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Checkpoint:
        try:
            return cls(
                seq=int(str(data["seq"])),
                hash=str(data["hash"]),
                time=utc(dt.datetime.fromisoformat(str(data["time"]))),
                signature=str(data["signature"]),
                key_id=str(data["key_id"]),
            )
        except (KeyError, ValueError) as e:
            raise AuditIntegrityError(f"malformed checkpoint entry: {e}") from e


def _time_text(value: dt.datetime) -> str:
    return utc(value).isoformat(timespec="microseconds")


def canonical_details(details: Mapping[str, object]) -> str:
    return json.dumps(details, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def record_hash(
    *,
    prev_hash: str,
    seq: int,
    time: dt.datetime,
    actor: str,
    action: str,
    target: str,
    outcome: str,
    details: Mapping[str, object],
) -> str:
    return _hash(prev_hash, seq, time, actor, action, target, outcome, canonical_details(details))


def _hash(
    prev_hash: str, seq: int, time: dt.datetime, actor: str, action: str, target: str, outcome: str, details_json: str
) -> str:
    body = json.dumps(
        [seq, _time_text(time), actor, action, target, outcome, details_json, prev_hash],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def chain_records(head: tuple[int, str], events: Sequence[AuditEvent], now: dt.datetime) -> list[AuditRecord]:
    """Give ``events`` the next places after ``head`` = (seq, hash)."""
    seq, prev = head
    records: list[AuditRecord] = []
    for event in events:
        seq += 1
        text = canonical_details(event.details)
        # Parse the text back, so the record holds exactly what storage will give back (tuples become lists).
        details = json.loads(text)
        digest = _hash(prev, seq, now, event.actor, event.action, event.target, event.outcome, text)
        records.append(
            AuditRecord(seq, now, event.actor, event.action, event.target, event.outcome, details, prev, digest, text)
        )
        prev = digest
    return records


def checkpoint_payload(seq: int, digest: str) -> bytes:
    return b"warden-audit-checkpoint-v1\x00" + f"{seq}:{digest}".encode("ascii")


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_checkpoint(key: ed25519.Ed25519PrivateKey, *, seq: int, digest: str, now: dt.datetime) -> Checkpoint:
    signature = key.sign(checkpoint_payload(seq, digest)).hex()
    return Checkpoint(seq=seq, hash=digest, time=now, signature=signature, key_id=key_id(key.public_key()))


@dataclass(frozen=True, slots=True)
class VerifyReport:
    records: int
    head_seq: int
    checkpoints: int
    last_checkpoint_seq: int


def _fail(message: str, *, seq: int | None, hint: str | None = None) -> AuditIntegrityError:
    return AuditIntegrityError(message, hint=hint, first_bad_seq=seq)


def verify_chain(
    records: Iterable[AuditRecord],
    *,
    head: tuple[int, str],
    checkpoints: Sequence[Checkpoint],
    mirrored: Sequence[Checkpoint],
    public_key: ed25519.Ed25519PublicKey | None,
) -> VerifyReport:
    """Check the whole chain; raise :class:`AuditIntegrityError` naming the first bad record."""
    by_seq = {cp.seq: cp for cp in checkpoints}
    for cp in mirrored:
        stored = by_seq.get(cp.seq)
        if stored is None or stored.hash != cp.hash or stored.signature != cp.signature:
            raise _fail(
                f"the checkpoint at record {cp.seq} is missing from the database or differs from the mirror",
                seq=cp.seq,
                hint="records or checkpoints were deleted or rewritten",
            )
    if checkpoints:
        if public_key is None:
            raise _fail("checkpoints exist but the checkpoint public key is missing", seq=None)
        for cp in checkpoints:
            try:
                public_key.verify(bytes.fromhex(cp.signature), checkpoint_payload(cp.seq, cp.hash))
            except (InvalidSignature, ValueError):
                raise _fail(f"the checkpoint at record {cp.seq} has an invalid signature", seq=cp.seq) from None

    expected_seq, prev = 1, GENESIS_HASH
    last_good_checkpoint = 0
    count = 0
    for record in records:
        if record.seq != expected_seq:
            what = "missing" if record.seq > expected_seq else "duplicated or out of order"
            raise _fail(f"audit record {expected_seq} is {what} (found {record.seq} next)", seq=expected_seq)
        if record.prev_hash != prev:
            raise _fail(f"audit record {record.seq} does not link to the record before it", seq=record.seq)
        digest = record_hash(
            prev_hash=record.prev_hash,
            seq=record.seq,
            time=record.time,
            actor=record.actor,
            action=record.action,
            target=record.target,
            outcome=record.outcome,
            details=record.details,
        )
        if digest != record.hash:
            raise _fail(f"audit record {record.seq} was altered (its hash does not match)", seq=record.seq)
        signed = by_seq.get(record.seq)
        if signed is not None:
            if signed.hash != record.hash:
                raise _fail(
                    f"records {last_good_checkpoint + 1} to {record.seq} do not match the checkpoint signed "
                    f"at record {record.seq}: the chain was recomputed after an edit in that range",
                    seq=last_good_checkpoint + 1,
                )
            last_good_checkpoint = record.seq
        prev = record.hash
        expected_seq += 1
        count += 1
    head_seq, head_hash = head
    if head_seq != count or (count and head_hash != prev) or (not count and head_hash != GENESIS_HASH):
        raise _fail(
            f"the chain ends at record {count} but its head says {head_seq}: the tail was truncated or rewritten",
            seq=count + 1,
        )
    beyond = [cp.seq for cp in checkpoints if cp.seq > count]
    if beyond:
        raise _fail(
            f"a checkpoint was signed at record {min(beyond)}, past the end of the chain ({count}): "
            "the tail was truncated",
            seq=count + 1,
        )
    return VerifyReport(
        records=count,
        head_seq=head_seq,
        checkpoints=len(checkpoints),
        last_checkpoint_seq=last_good_checkpoint,
    )
