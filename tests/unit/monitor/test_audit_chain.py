"""The hash chain and its checkpoints, on records in memory: every kind of tampering is caught and located."""

import dataclasses
import datetime as dt

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from warden.core import AuditIntegrityError
from warden.monitor import GENESIS_HASH, AuditEvent, AuditRecord, Checkpoint, chain_records, record_hash, verify_chain
from warden.monitor._audit import sign_checkpoint

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
KEY = ed25519.Ed25519PrivateKey.generate()


def build(n: int) -> list[AuditRecord]:
    events = [AuditEvent("tester", "device.add", f"device:d{i}", details={"i": i}) for i in range(n)]
    return chain_records((0, GENESIS_HASH), events, NOW)


def head(records: list[AuditRecord]) -> tuple[int, str]:
    return (records[-1].seq, records[-1].hash) if records else (0, GENESIS_HASH)


def checkpoint(records: list[AuditRecord], seq: int) -> Checkpoint:
    return sign_checkpoint(KEY, seq=seq, digest=records[seq - 1].hash, now=NOW)


def verify(records: list[AuditRecord], **kwargs: object) -> object:
    options: dict[str, object] = {
        "head": head(records),
        "checkpoints": [],
        "mirrored": [],
        "public_key": KEY.public_key(),
    }
    options.update(kwargs)
    return verify_chain(records, **options)  # type: ignore[arg-type]


def recompute(records: list[AuditRecord]) -> list[AuditRecord]:
    """What an attacker with database access does after an edit: recompute every hash from scratch."""
    result: list[AuditRecord] = []
    prev = GENESIS_HASH
    for i, r in enumerate(records, start=1):
        digest = record_hash(
            prev_hash=prev,
            seq=i,
            time=r.time,
            actor=r.actor,
            action=r.action,
            target=r.target,
            outcome=r.outcome,
            details=r.details,
        )
        result.append(dataclasses.replace(r, seq=i, prev_hash=prev, hash=digest))
        prev = digest
    return result


def test_intact_chain_verifies() -> None:
    records = build(10)
    report = verify(records, checkpoints=[checkpoint(records, 5)])
    assert report.records == 10  # type: ignore[attr-defined]
    assert report.last_checkpoint_seq == 5  # type: ignore[attr-defined]


def test_empty_chain_verifies() -> None:
    assert verify([]).records == 0  # type: ignore[attr-defined]


def _edit(records: list[AuditRecord]) -> list[AuditRecord]:
    records[3] = dataclasses.replace(records[3], actor="mallory")
    return records


def _delete(records: list[AuditRecord]) -> list[AuditRecord]:
    del records[3]
    return records


def _insert(records: list[AuditRecord]) -> list[AuditRecord]:
    records.insert(3, dataclasses.replace(records[3]))
    return records


def _reorder(records: list[AuditRecord]) -> list[AuditRecord]:
    records[3], records[4] = records[4], records[3]
    return records


def _edit_details(records: list[AuditRecord]) -> list[AuditRecord]:
    records[3] = dataclasses.replace(records[3], details={"i": 999})
    return records


TAMPERING = [
    ("edited actor", _edit, 4),
    ("edited details", _edit_details, 4),
    ("deleted record", _delete, 4),
    ("inserted copy", _insert, 5),
    ("reordered", _reorder, 4),
]


@pytest.mark.parametrize(("tamper", "first_bad"), [(t, s) for _, t, s in TAMPERING], ids=[n for n, _, _ in TAMPERING])
def test_tampering_names_first_bad_record(tamper, first_bad: int) -> None:  # type: ignore[no-untyped-def]
    original = build(10)
    records = tamper(list(original))
    with pytest.raises(AuditIntegrityError) as info:
        verify(records, head=head(original))
    assert info.value.context["first_bad_seq"] == first_bad


def test_truncated_tail_detected_by_head() -> None:
    records = build(10)
    with pytest.raises(AuditIntegrityError, match="truncated") as info:
        verify(records[:7], head=head(records))
    assert info.value.context["first_bad_seq"] == 8


def test_truncated_tail_with_rewritten_head_detected_by_checkpoint() -> None:
    records = build(10)
    cp = checkpoint(records, 9)
    with pytest.raises(AuditIntegrityError, match="past the end"):
        verify(records[:7], head=head(records[:7]), checkpoints=[cp], mirrored=[cp])


def test_recomputed_chain_detected_by_checkpoint() -> None:
    records = build(10)
    cp3, cp8 = checkpoint(records, 3), checkpoint(records, 8)
    forged = recompute(_edit(list(records)))
    with pytest.raises(AuditIntegrityError, match="recomputed") as info:
        verify(forged, checkpoints=[cp3, cp8], mirrored=[cp3, cp8])
    # Record 4 was edited: the last good checkpoint is at 3, so the search starts at 4.
    assert info.value.context["first_bad_seq"] == 4


def test_checkpoint_deleted_from_database_detected_by_mirror() -> None:
    records = build(10)
    cp = checkpoint(records, 8)
    forged = recompute(_edit(list(records)))
    with pytest.raises(AuditIntegrityError, match="missing from the database"):
        verify(forged, checkpoints=[], mirrored=[cp])


def test_forged_checkpoint_signature_detected() -> None:
    records = build(10)
    other = ed25519.Ed25519PrivateKey.generate()
    forged = sign_checkpoint(other, seq=5, digest=records[4].hash, now=NOW)
    with pytest.raises(AuditIntegrityError, match="invalid signature"):
        verify(records, checkpoints=[forged])


def test_secrets_never_enter_details() -> None:
    with pytest.raises(ValueError, match="secrets"):
        AuditEvent("a", "b", "c", details={"Passphrase": "x"})
    with pytest.raises(ValueError, match="outcome"):
        AuditEvent("a", "b", "c", outcome="maybe")


def test_hash_covers_every_field() -> None:
    base = build(1)[0]
    fields = {
        "actor": "x",
        "action": "x",
        "target": "x",
        "outcome": "failure",
        "details": {"i": 1},
        "seq": 2,
        "time": NOW + dt.timedelta(microseconds=1),
        "prev_hash": "1" * 64,
    }
    for name, value in fields.items():
        changed = dataclasses.replace(base, **{name: value})
        digest = record_hash(
            prev_hash=changed.prev_hash,
            seq=changed.seq,
            time=changed.time,
            actor=changed.actor,
            action=changed.action,
            target=changed.target,
            outcome=changed.outcome,
            details=changed.details,
        )
        assert digest != base.hash, name
