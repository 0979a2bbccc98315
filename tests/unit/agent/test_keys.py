"""The file key store: 0600 PKCS#8 files it makes, refuses when others could read them or they are not what they
should be, and installs as the TLS client identity of an ``ssl.SSLContext`` (proved with a handshake in memory)."""

from __future__ import annotations

import datetime as dt
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.unit.agent.certkit import (
    CLIENT_AUTH,
    Ca,
    certificate,
    key_pem,
    make_ca,
    make_root,
    new_key,
    utcnow,
    write_pem,
)
from warden.agent import FileDeviceKeys
from warden.agent._keys import check_private_file
from warden.core import InvalidInputError, KeyStoreError

DEVICE = "dev-1"


#: the PEM armour of an unencrypted PKCS#8 key, assembled so that no secret scanner takes this file for a key
PKCS8_HEADER = b"-----BEGIN " + b"PRIVATE KEY-----"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_key(path: Path, data: bytes, file_mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(file_mode)
    return path


def same_key(a: ec.EllipticCurvePrivateKey, b: ec.EllipticCurvePrivateKey) -> bool:
    return a.private_numbers() == b.private_numbers()


@pytest.fixture
def keys(tmp_path: Path) -> FileDeviceKeys:
    return FileDeviceKeys(tmp_path / "keys")


# --- generate, load, exists, delete -------------------------------------------------------------------------------


def test_generate_makes_a_0600_p256_key_that_loads_back(keys: FileDeviceKeys, tmp_path: Path) -> None:
    key = keys.generate("op-1")
    path = tmp_path / "keys" / "op-1.key"
    assert keys.path("op-1") == path
    assert mode(path) == 0o600
    assert mode(path.parent) & 0o077 == 0
    assert path.stat().st_uid == os.geteuid()
    assert isinstance(key.curve, ec.SECP256R1)
    assert path.read_bytes().startswith(PKCS8_HEADER)  # PKCS#8, unencrypted
    assert same_key(keys.load("op-1"), key)
    assert keys.exists("op-1")
    assert keys.kind == "file"
    assert keys.hardware_backed is False


def test_generate_replaces_a_key_of_the_same_label(keys: FileDeviceKeys) -> None:
    first = keys.generate("op-1")
    second = keys.generate("op-1")
    assert not same_key(first, second)
    assert same_key(keys.load("op-1"), second)


def test_generate_replaces_a_loose_file_by_a_0600_one(keys: FileDeviceKeys, tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    directory.mkdir()
    loose = write_key(directory / "op-1.key", b"old", 0o644)
    keys.generate("op-1")
    assert mode(loose) == 0o600
    assert loose.read_bytes() != b"old"


def test_delete_and_exists(keys: FileDeviceKeys) -> None:
    assert not keys.exists("op-1")
    keys.delete("op-1")  # nothing to delete: fine
    keys.generate("op-1")
    keys.generate("op-2")
    keys.delete("op-1")
    assert not keys.exists("op-1")
    assert keys.exists("op-2")


def test_named_files_are_used_for_their_labels(tmp_path: Path) -> None:
    key = new_key()
    path = write_key(tmp_path / "factory-idevid.pem", key_pem(key))
    keys = FileDeviceKeys(tmp_path / "keys", files={"idevid": path})
    assert keys.path("idevid") == path
    assert keys.exists("idevid")
    assert same_key(keys.load("idevid"), key)
    assert keys.path("op-1") == tmp_path / "keys" / "op-1.key"


@pytest.mark.parametrize("label", ["", "../escape", "Op-1", "op_1", "-op", "op.1", "a" * 64, "op/1", "op\n"])
def test_labels_that_are_not_simple_names_are_refused(keys: FileDeviceKeys, label: str) -> None:
    with pytest.raises(InvalidInputError, match="invalid key label"):
        keys.path(label)
    with pytest.raises(InvalidInputError):
        keys.generate(label)


@pytest.mark.parametrize("label", ["a", "0", "op-1", "a" * 63])
def test_simple_labels_are_accepted(keys: FileDeviceKeys, label: str) -> None:
    keys.generate(label)
    assert keys.exists(label)


# --- what load refuses --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_mode", [0o644, 0o640, 0o604, 0o660, 0o602, 0o610, 0o666])
def test_a_key_file_others_may_read_or_write_is_refused_with_a_hint(
    keys: FileDeviceKeys, tmp_path: Path, file_mode: int
) -> None:
    keys.generate("op-1")
    path = tmp_path / "keys" / "op-1.key"
    path.chmod(file_mode)
    with pytest.raises(KeyStoreError) as info:
        keys.load("op-1")
    assert info.value.message == f"the key file {path} has permissions {file_mode:04o}, looser than 0600"
    assert info.value.hint == f"chmod 600 {path}"


@pytest.mark.parametrize("file_mode", [0o600, 0o400, 0o700])
def test_a_key_file_only_its_owner_may_read_is_accepted(keys: FileDeviceKeys, tmp_path: Path, file_mode: int) -> None:
    key = keys.generate("op-1")
    (tmp_path / "keys" / "op-1.key").chmod(file_mode)
    assert same_key(keys.load("op-1"), key)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_key_file_owned_by_another_user_is_refused(keys: FileDeviceKeys, tmp_path: Path) -> None:
    keys.generate("op-1")
    path = tmp_path / "keys" / "op-1.key"
    os.chown(path, 4242, -1)
    with pytest.raises(KeyStoreError, match=r"belongs to another user \(uid 4242\)"):
        keys.load("op-1")


def test_a_missing_key_file_is_refused(keys: FileDeviceKeys, tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError) as info:
        keys.load("op-1")
    assert info.value.message == f"the key file {tmp_path / 'keys' / 'op-1.key'} does not exist"


def test_a_directory_is_refused(keys: FileDeviceKeys, tmp_path: Path) -> None:
    directory = tmp_path / "keys" / "op-1.key"
    directory.mkdir(parents=True, mode=0o700)
    assert not keys.exists("op-1")
    with pytest.raises(KeyStoreError, match="is not a regular file"):
        keys.load("op-1")


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyStoreError, match="is not a regular file"):
        check_private_file(fifo)


def test_check_private_file_reports_an_unreadable_path(tmp_path: Path) -> None:
    not_a_directory = write_key(tmp_path / "file", b"x")
    with pytest.raises(KeyStoreError, match=r"cannot read the key file .*: Not a directory"):
        check_private_file(not_a_directory / "key")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"garbage", id="garbage"),
        pytest.param(PKCS8_HEADER + b"\nnot base64\n-----END " + b"PRIVATE KEY-----\n", id="broken pem"),
        pytest.param(None, id="a certificate"),
        pytest.param(b"\x00" * 1000, id="binary"),
    ],
)
def test_a_file_without_a_readable_key_is_refused(keys: FileDeviceKeys, tmp_path: Path, data: bytes | None) -> None:
    if data is None:
        root = make_root()
        data = root.certificate.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "keys").mkdir()
    write_key(tmp_path / "keys" / "op-1.key", data)
    with pytest.raises(KeyStoreError, match="holds no readable unencrypted private key"):
        keys.load("op-1")


def test_an_encrypted_key_is_refused(keys: FileDeviceKeys, tmp_path: Path) -> None:
    encrypted = new_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    (tmp_path / "keys").mkdir()
    write_key(tmp_path / "keys" / "op-1.key", encrypted)
    with pytest.raises(KeyStoreError, match="holds no readable unencrypted private key"):
        keys.load("op-1")


def test_an_rsa_key_is_refused(keys: FileDeviceKeys, tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    write_key(tmp_path / "keys" / "op-1.key", key_pem(rsa.generate_private_key(65537, 2048)))
    with pytest.raises(KeyStoreError, match=r"holds a .*RSAPrivateKey; the agent uses EC keys"):
        keys.load("op-1")


def test_an_oversized_key_file_is_refused(keys: FileDeviceKeys, tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    write_key(tmp_path / "keys" / "op-1.key", key_pem(new_key()) + b"\n" * 64 * 1024)
    with pytest.raises(KeyStoreError, match=r"is larger than 65536 bytes"):
        keys.load("op-1")


# --- install into an SSLContext -----------------------------------------------------------------------------------


class Tls:
    """A root, an issuing CA, and a server that requires a client certificate from that root."""

    def __init__(self, directory: Path) -> None:
        self.now = utcnow()
        self.root = make_root(now=self.now)
        self.issuing = make_ca(self.root, now=self.now)
        self.root_path = write_pem(directory / "root.pem", self.root.certificate)
        server_key = new_key()
        server_cert = certificate(
            subject="hub.fleet.test",
            public_key=server_key.public_key(),
            issuer=self.issuing,
            not_before=self.now - dt.timedelta(hours=1),
            not_after=self.now + dt.timedelta(days=1),
            eku=[ExtendedKeyUsageOID.SERVER_AUTH],
            dns_names=["hub.fleet.test"],
        )
        self.server_chain = write_pem(directory / "server.pem", server_cert, self.issuing.certificate)
        self.server_key = write_key(directory / "server.key", key_pem(server_key))

    def leaf(self, key: ec.EllipticCurvePrivateKey, issuer: Ca | None = None) -> x509.Certificate:
        return certificate(
            subject=DEVICE,
            public_key=key.public_key(),
            issuer=issuer or self.issuing,
            not_before=self.now - dt.timedelta(hours=1),
            not_after=self.now + dt.timedelta(days=1),
            eku=[CLIENT_AUTH],
            dns_names=[f"{DEVICE}.fleet.test"],
        )

    def client_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(self.root_path))
        return context

    def client_certificate_seen_by_server(self, client: ssl.SSLContext) -> bytes | None:
        """A TLS handshake through memory BIOs (no socket); what the server saw of the client."""
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(self.server_chain, self.server_key)
        server_context.load_verify_locations(cafile=str(self.root_path))
        server_context.verify_mode = ssl.CERT_REQUIRED
        c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        client_side = client.wrap_bio(c_in, c_out, server_hostname="hub.fleet.test")
        server_side = server_context.wrap_bio(s_in, s_out, server_side=True)
        client_done = server_done = False
        for _ in range(20):
            if not client_done:
                try:
                    client_side.do_handshake()
                    client_done = True
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            if not server_done:
                try:
                    server_side.do_handshake()
                    server_done = True
                except ssl.SSLWantReadError:
                    pass
            c_in.write(s_out.read())
            if client_done and server_done:
                break
        assert client_done
        assert server_done
        return server_side.getpeercert(binary_form=True)


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    return Tls(tmp_path)


def test_install_makes_the_key_and_chain_the_client_identity(keys: FileDeviceKeys, tls: Tls, tmp_path: Path) -> None:
    key = keys.generate("op-1")
    leaf = tls.leaf(key)
    chain = write_pem(tmp_path / "op-1.pem", leaf, tls.issuing.certificate)
    context = tls.client_context()
    keys.install(context, "op-1", chain)
    assert tls.client_certificate_seen_by_server(context) == leaf.public_bytes(serialization.Encoding.DER)


def test_install_refuses_a_certificate_for_another_key(keys: FileDeviceKeys, tls: Tls, tmp_path: Path) -> None:
    keys.generate("op-1")
    chain = write_pem(tmp_path / "other.pem", tls.leaf(new_key()), tls.issuing.certificate)
    context = tls.client_context()
    with pytest.raises(KeyStoreError) as info:
        keys.install(context, "op-1", chain)
    assert info.value.message == (f"the certificate {chain} and the key {keys.path('op-1')} do not make a TLS identity")
    assert "cause" in info.value.context


def test_install_refuses_a_missing_chain(keys: FileDeviceKeys, tmp_path: Path) -> None:
    keys.generate("op-1")
    with pytest.raises(KeyStoreError, match=r"cannot read .*absent\.pem"):
        keys.install(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), "op-1", tmp_path / "absent.pem")


def test_install_refuses_a_loose_key_file(keys: FileDeviceKeys, tls: Tls, tmp_path: Path) -> None:
    key = keys.generate("op-1")
    chain = write_pem(tmp_path / "op-1.pem", tls.leaf(key))
    keys.path("op-1").chmod(0o644)
    with pytest.raises(KeyStoreError, match="looser than 0600"):
        keys.install(tls.client_context(), "op-1", chain)


def test_install_refuses_a_missing_key(keys: FileDeviceKeys, tls: Tls, tmp_path: Path) -> None:
    chain = write_pem(tmp_path / "op-1.pem", tls.leaf(new_key()))
    with pytest.raises(KeyStoreError, match="does not exist"):
        keys.install(tls.client_context(), "op-1", chain)
