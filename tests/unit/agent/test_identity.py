"""The device's operational identity on disk (IdentityStore) and the check of what the hub issued (check_issued):
a commit is the one moment a new identity takes effect, a renewal that never completed leaves no key behind, and
only a leaf for our key and our device id, chaining to the pinned root, is taken."""

from __future__ import annotations

import datetime as dt
import json
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from tests.unit.agent.certkit import CLIENT_AUTH, Ca, certificate, make_ca, make_root, new_key, pem, utcnow
from warden.agent import FileDeviceKeys, Identity, IdentityStore
from warden.agent._identity import check_issued, load_pem_bundle
from warden.core import KeyStoreError, WardenError

DEVICE = "dev-1"


class Pki:
    def __init__(self) -> None:
        self.now = utcnow()
        self.root = make_root(now=self.now)
        self.issuing = make_ca(self.root, now=self.now)

    def leaf(
        self,
        key: ec.EllipticCurvePrivateKey,
        *,
        device: str = DEVICE,
        issuer: Ca | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> x509.Certificate:
        return certificate(
            subject=device,
            public_key=key.public_key(),
            issuer=issuer or self.issuing,
            not_before=not_before or self.now - dt.timedelta(hours=1),
            not_after=not_after or self.now + dt.timedelta(days=30),
            eku=[CLIENT_AUTH],
            dns_names=[f"{device}.fleet.test"],
        )


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture
def keys(tmp_path: Path) -> FileDeviceKeys:
    return FileDeviceKeys(tmp_path / "state" / "keys")


@pytest.fixture
def store(tmp_path: Path, keys: FileDeviceKeys) -> IdentityStore:
    return IdentityStore(tmp_path / "state", keys)


def enroll(store: IdentityStore, keys: FileDeviceKeys, pki: Pki, label: str) -> Identity:
    """What the agent does: record the pending label, make the key, commit the issued chain."""
    store.begin(label)
    key = keys.generate(label)
    return store.commit(label, [pki.leaf(key), pki.issuing.certificate])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- IdentityStore ------------------------------------------------------------------------------------------------


def test_a_fresh_state_directory_has_no_identity(store: IdentityStore) -> None:
    assert store.current() is None
    store.abandon_pending()  # nothing pending: nothing happens
    assert store.current() is None


def test_begin_records_the_pending_label(store: IdentityStore) -> None:
    store.begin("op-1")
    pending = store.directory / "pending.json"
    assert json.loads(pending.read_bytes()) == {"label": "op-1"}
    assert mode(pending) == 0o600
    assert mode(store.directory) & 0o077 == 0
    assert store.current() is None  # pending is not current


def test_commit_makes_the_identity_current(store: IdentityStore, keys: FileDeviceKeys, pki: Pki) -> None:
    before = time.time()
    store.begin("op-1")
    key = keys.generate("op-1")
    leaf = pki.leaf(key)
    committed = store.commit("op-1", [leaf, pki.issuing.certificate])
    after = time.time()

    assert committed.label == "op-1"
    assert committed.certificate == leaf
    assert committed.chain == store.directory / "op-1.pem"
    assert before <= committed.received <= after
    assert committed.serial == f"{leaf.serial_number:X}".zfill(
        len(f"{leaf.serial_number:X}") + len(f"{leaf.serial_number:X}") % 2
    )
    assert committed.not_before == leaf.not_valid_before_utc.timestamp()
    assert committed.not_after == leaf.not_valid_after_utc.timestamp()

    assert committed.chain.read_bytes() == pem(leaf, pki.issuing.certificate)
    assert load_pem_bundle(committed.chain, "the chain") == [leaf, pki.issuing.certificate]
    assert mode(store.directory / "current.json") == 0o600
    assert not (store.directory / "pending.json").exists()
    assert json.loads((store.directory / "current.json").read_bytes()) == {
        "label": "op-1",
        "chain": "op-1.pem",
        "received": committed.received,
    }
    assert store.current() == committed


def test_a_new_commit_deletes_the_previous_key_and_chain(store: IdentityStore, keys: FileDeviceKeys, pki: Pki) -> None:
    first = enroll(store, keys, pki, "op-1")
    second = enroll(store, keys, pki, "op-2")
    assert store.current() == second
    assert not keys.exists("op-1")
    assert not first.chain.exists()
    assert keys.exists("op-2")
    assert second.chain.exists()
    assert sorted(p.name for p in store.directory.iterdir()) == ["current.json", "op-2.pem"]


def test_committing_the_current_label_again_keeps_its_key(store: IdentityStore, keys: FileDeviceKeys, pki: Pki) -> None:
    first = enroll(store, keys, pki, "op-1")
    again = store.commit("op-1", [first.certificate, pki.issuing.certificate])
    assert keys.exists("op-1")
    assert again.chain.exists()
    assert store.current() == again


def test_a_leaf_committed_after_its_expiry_counts_as_received_at_its_end(
    store: IdentityStore, keys: FileDeviceKeys, pki: Pki
) -> None:
    store.begin("op-1")
    key = keys.generate("op-1")
    leaf = pki.leaf(key, not_before=pki.now - dt.timedelta(days=2), not_after=pki.now - dt.timedelta(days=1))
    assert store.commit("op-1", [leaf]).received == leaf.not_valid_after_utc.timestamp()


def test_abandon_pending_deletes_the_orphaned_key(store: IdentityStore, keys: FileDeviceKeys, pki: Pki) -> None:
    current = enroll(store, keys, pki, "op-1")
    # A renewal that crashed after making its key (and even a chain file) but before the commit:
    store.begin("op-2")
    keys.generate("op-2")
    (store.directory / "op-2.pem").write_bytes(pem(pki.issuing.certificate))
    restarted = IdentityStore(store.directory.parent, keys)
    restarted.abandon_pending()
    assert not keys.exists("op-2")
    assert not (store.directory / "op-2.pem").exists()
    assert not (store.directory / "pending.json").exists()
    assert keys.exists("op-1")
    assert restarted.current() == current


def test_abandon_pending_never_deletes_the_current_key(store: IdentityStore, keys: FileDeviceKeys, pki: Pki) -> None:
    current = enroll(store, keys, pki, "op-1")
    store.begin("op-1")  # pending names the current label (a commit was interrupted after current.json)
    store.abandon_pending()
    assert keys.exists("op-1")
    assert current.chain.exists()
    assert not (store.directory / "pending.json").exists()
    assert store.current() == current


def test_abandon_pending_before_any_identity(store: IdentityStore, keys: FileDeviceKeys) -> None:
    store.begin("op-1")
    keys.generate("op-1")
    store.abandon_pending()
    assert not keys.exists("op-1")
    assert store.current() is None


@pytest.mark.parametrize("content", [b"", b"not json", b"[]", b'{"other": 1}', b"{"])
def test_a_damaged_pending_record_is_removed_and_deletes_nothing(
    store: IdentityStore, keys: FileDeviceKeys, pki: Pki, content: bytes
) -> None:
    current = enroll(store, keys, pki, "op-1")
    keys.generate("op-2")
    (store.directory / "pending.json").write_bytes(content)
    store.abandon_pending()
    assert not (store.directory / "pending.json").exists()
    assert keys.exists("op-1")
    assert keys.exists("op-2")  # without a readable label nothing is guessed at
    assert store.current() == current


@pytest.mark.parametrize(
    "content",
    [b"", b"not json", b"[]", b'{"chain": "op-1.pem"}', b'{"label": "op-1"}', b'{"label": "op-1", "chain": "x", '],
)
def test_a_damaged_current_record_is_an_error_that_says_re_onboard(
    store: IdentityStore, keys: FileDeviceKeys, pki: Pki, content: bytes
) -> None:
    enroll(store, keys, pki, "op-1")
    (store.directory / "current.json").write_bytes(content)
    with pytest.raises(WardenError, match=r"identity record .* is unreadable") as info:
        store.current()
    assert info.value.hint == "re-onboard the device"


def test_a_current_identity_whose_key_is_gone_is_an_error(store: IdentityStore, keys: FileDeviceKeys, pki: Pki) -> None:
    enroll(store, keys, pki, "op-1")
    keys.delete("op-1")
    with pytest.raises(KeyStoreError, match="the key 'op-1' of the current certificate is missing"):
        store.current()


def test_a_current_identity_whose_chain_is_gone_is_an_error(
    store: IdentityStore, keys: FileDeviceKeys, pki: Pki
) -> None:
    identity = enroll(store, keys, pki, "op-1")
    identity.chain.unlink()
    with pytest.raises(WardenError, match="cannot read the operational certificate"):
        store.current()
    identity.chain.write_bytes(b"not a certificate")
    with pytest.raises(WardenError, match="holds no PEM certificate"):
        store.current()


def test_a_record_without_received_time_falls_back_to_not_before(
    store: IdentityStore, keys: FileDeviceKeys, pki: Pki
) -> None:
    identity = enroll(store, keys, pki, "op-1")
    (store.directory / "current.json").write_text(json.dumps({"label": "op-1", "chain": "op-1.pem"}))
    loaded = store.current()
    assert loaded is not None
    assert loaded.received == identity.not_before


# --- check_issued -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "order",
    [
        pytest.param(("leaf", "issuing"), id="leaf first"),
        pytest.param(("issuing", "leaf"), id="leaf last"),
        pytest.param(("root", "issuing", "leaf"), id="with the root"),
        pytest.param(("issuing", "root", "leaf"), id="root in the middle"),
    ],
)
def test_check_issued_puts_the_leaf_first_and_leaves_the_root_out(pki: Pki, order: tuple[str, ...]) -> None:
    key = new_key()
    leaf = pki.leaf(key)
    certs = {"leaf": leaf, "issuing": pki.issuing.certificate, "root": pki.root.certificate}
    chain = check_issued([certs[name] for name in order], key, DEVICE, [pki.root.certificate])
    assert chain == [leaf, pki.issuing.certificate]


def test_check_issued_accepts_a_leaf_under_the_root_itself(pki: Pki) -> None:
    key = new_key()
    leaf = pki.leaf(key, issuer=pki.root)
    assert check_issued([leaf], key, DEVICE, [pki.root.certificate]) == [leaf]


def test_check_issued_refuses_a_leaf_for_another_key(pki: Pki) -> None:
    issued = [pki.leaf(new_key()), pki.issuing.certificate]
    with pytest.raises(WardenError, match="holds no certificate for the key the agent sent"):
        check_issued(issued, new_key(), DEVICE, [pki.root.certificate])


def test_check_issued_refuses_two_leaves_for_the_key(pki: Pki) -> None:
    key = new_key()
    with pytest.raises(WardenError, match="holds no certificate for the key the agent sent"):
        check_issued([pki.leaf(key), pki.leaf(key), pki.issuing.certificate], key, DEVICE, [pki.root.certificate])


def test_check_issued_refuses_a_leaf_for_another_device(pki: Pki) -> None:
    key = new_key()
    with pytest.raises(WardenError) as info:
        check_issued([pki.leaf(key, device="dev-2"), pki.issuing.certificate], key, DEVICE, [pki.root.certificate])
    assert info.value.message == "the hub issued a certificate for ['dev-2'], not for 'dev-1'"


def test_check_issued_refuses_a_leaf_without_a_common_name(pki: Pki) -> None:
    key = new_key()
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(pki.issuing.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(pki.now - dt.timedelta(hours=1))
        .not_valid_after(pki.now + dt.timedelta(days=1))
        .sign(pki.issuing.key, hashes.SHA256())
    )
    with pytest.raises(WardenError, match=r"issued a certificate for \[\], not for 'dev-1'"):
        check_issued([leaf], key, DEVICE, [pki.root.certificate])


def test_check_issued_refuses_a_chain_to_another_root(pki: Pki) -> None:
    other_root = make_root("Other Root")
    other_ca = make_ca(other_root, "Test Issuing CA")  # even with our issuing CA's name
    key = new_key()
    issued = [pki.leaf(key, issuer=other_ca), other_ca.certificate, other_root.certificate]
    with pytest.raises(WardenError, match="does not chain to the pinned hub root"):
        check_issued(issued, key, DEVICE, [pki.root.certificate])


def test_check_issued_refuses_a_chain_without_its_intermediate(pki: Pki) -> None:
    key = new_key()
    with pytest.raises(WardenError, match="does not chain to the pinned hub root"):
        check_issued([pki.leaf(key)], key, DEVICE, [pki.root.certificate])


def test_check_issued_refuses_an_expired_leaf(pki: Pki) -> None:
    key = new_key()
    leaf = pki.leaf(key, not_before=pki.now - dt.timedelta(days=3), not_after=pki.now - dt.timedelta(days=1))
    with pytest.raises(WardenError, match="does not chain to the pinned hub root"):
        check_issued([leaf, pki.issuing.certificate], key, DEVICE, [pki.root.certificate])
