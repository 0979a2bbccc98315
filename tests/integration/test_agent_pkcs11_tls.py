"""Mutual TLS from Python's ``ssl`` with a client key that never leaves a PKCS#11 token (SoftHSM2), installed by
:func:`warden.agent._p11tls.use_pkcs11_key` through OpenSSL's pkcs11 engine.

The key is generated non-extractable on the token by ``warden.pki.Pkcs11KeyStore`` (python-pkcs11), signs its own
CSR there, and gets a clientAuth certificate from a CA made here. ``openssl s_server -Verify 1 -verify_return_error``
and a Python ``ssl`` server with ``CERT_REQUIRED`` must then accept the handshake, over TLS 1.2 and 1.3.

The engine stays initialised for the life of a process and SoftHSM reads ``SOFTHSM2_CONF`` only when initialised, so
everything that touches the engine runs in a fresh child process: this module is also the child program
(``python -m tests.integration.test_agent_pkcs11_tls <scenario> <json>``, one JSON line out). That also gives each
initialisation order of python-pkcs11 and the engine its own process.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.hubserver import free_port
from tests.softhsm import SKIP_REASON, SOFTHSM_AVAILABLE, SOFTHSM_MODULE, make_softhsm_token, unload_module
from warden.agent._p11tls import ENGINE_PACKAGE, engine_available, use_pkcs11_key
from warden.core import KeyStoreError, KeyStoreLockedError
from warden.pki._keystore import KeyAlgorithm
from warden.pki._pkcs11 import Pkcs11KeyStore, parse_pkcs11_uri

pytestmark = [pytest.mark.softhsm, pytest.mark.skipif(not SOFTHSM_AVAILABLE, reason=SKIP_REASON)]

REPO = Path(__file__).resolve().parents[2]
TOKEN = "device"
PIN = "4711-pin-of-the-device"
WRONG_PIN = "wrong-9c2e51-pin"
LABEL = "tls"
DEVICE = "device-1"
DEVICE_DNS = f"{DEVICE}.fleet.acme.test"
VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
S_SERVER_FLAGS = {"TLSv1.2": "-tls1_2", "TLSv1.3": "-tls1_3"}
CHILD_TIMEOUT = 180


# -- a CA and certificates (used by the test and by the child processes) --------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(directory: Path) -> Path:
    """A P-256 root CA (key in a file: it is the test's CA, not the device's key). Returns ca.pem."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("Warden Test Device CA"))
        .issuer_name(_name("Warden Test Device CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / "ca.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return directory / "ca.pem"


def issue_client_cert(ca_dir: Path, key: ec.EllipticCurvePrivateKey, out: Path, common_name: str = DEVICE) -> Path:
    """A CSR signed by ``key`` (the token key: the signature is made in the token), and a clientAuth certificate
    for it from the CA in ``ca_dir``, written to ``out`` as the chain file (leaf first)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(common_name))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"{common_name}.fleet.acme.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    assert csr.is_signature_valid
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


# -- the child processes ---------------------------------------------------------------------------------------------


@dataclass
class Params:
    """What a child needs; passed as JSON on its command line (the PIN too: argv is not printed anywhere)."""

    uri: str
    ca_dir: str
    trust: str  # the server certificate the client trusts
    pin: str = PIN
    token: str = TOKEN
    label: str = LABEL
    chain: str = ""
    module: str = SOFTHSM_MODULE
    port: int = 0
    version: str = "TLSv1.3"
    request: str = "ok"  # "ok": the Python server's greeting; "www": an HTTP GET to openssl s_server -www
    threads: int = 0
    rounds: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _client_context(p: Params, version: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(p.trust)
    context.minimum_version = context.maximum_version = VERSIONS[version]
    return context


def _install(p: Params, context: ssl.SSLContext, *, label: str | None = None, chain: str | None = None) -> None:
    use_pkcs11_key(
        context,
        chain=Path(chain or p.chain),
        module=Path(p.module),
        token=p.token,
        key_label=label or p.label,
        pin=p.pin,
    )


def _handshake(context: ssl.SSLContext, p: Params) -> dict[str, str]:
    with (
        socket.create_connection(("127.0.0.1", p.port), timeout=60) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        version = tls.version() or ""
        if p.request == "www":
            tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
        chunks: list[bytes] = []
        while chunk := tls.recv(65536):
            chunks.append(chunk)
            if p.request == "ok" and b"".join(chunks).endswith(b"ok\n"):
                break
        return {"version": version, "response": b"".join(chunks).decode(errors="replace")}


def _store(p: Params) -> Pkcs11KeyStore:
    return Pkcs11KeyStore(parse_pkcs11_uri(p.uri), pin=p.pin)


def _generate_and_certify(p: Params, store: Pkcs11KeyStore, label: str) -> str:
    key = store.generate(label, KeyAlgorithm.P256)
    return str(issue_client_cert(Path(p.ca_dir), key, Path(p.ca_dir) / f"{label}.pem", common_name=f"{DEVICE}-{label}"))


def child_connect(p: Params) -> dict[str, Any]:
    context = _client_context(p, p.version)
    _install(p, context)
    return _handshake(context, p)


def child_error(p: Params) -> dict[str, Any]:
    """use_pkcs11_key with what ``p`` says; the error it raised. Then, if ``extra.retry_chain`` is given, the same
    context must still take the right chain and handshake (the failed call left it untouched)."""
    context = _client_context(p, p.version)
    try:
        _install(p, context)
    except KeyStoreError as e:
        result: dict[str, Any] = {
            "error": type(e).__name__,
            "message": e.message,
            "hint": e.hint,
            "diagnostics": e.diagnostics(),
            "context": repr(dict(e.context)),
        }
    else:
        return {"error": None}
    retry = p.extra.get("retry_chain")
    if retry:
        _install(p, context, chain=retry)
        result["retry"] = _handshake(context, p)
    return result


def _sign_with_python_pkcs11(store: Pkcs11KeyStore, label: str) -> None:
    key = store.load(label)
    signature = key.sign(b"signed by python-pkcs11 next to the engine", ec.ECDSA(hashes.SHA256()))
    key.public_key().verify(signature, b"signed by python-pkcs11 next to the engine", ec.ECDSA(hashes.SHA256()))


def child_python_pkcs11_first(p: Params) -> dict[str, Any]:
    """python-pkcs11 initialises the module and generates the key, then the engine loads it."""
    store = _store(p)
    chain = _generate_and_certify(p, store, LABEL)
    first = {v: _client_context(p, v) for v in VERSIONS}
    for context in first.values():
        _install(p, context, chain=chain)
    result: dict[str, Any] = {"first": [_handshake(c, p) for c in first.values()]}
    # A key python-pkcs11 makes after the engine was initialised.
    late_chain = _generate_and_certify(p, store, "late")
    late = _client_context(p, "TLSv1.3")
    _install(p, late, label="late", chain=late_chain)
    result["late"] = _handshake(late, p)
    # python-pkcs11 makes and deletes other keys; the engine's key objects must survive that.
    _generate_and_certify(p, store, "other")
    store.delete("other")
    _sign_with_python_pkcs11(store, LABEL)
    result["after_other_keys"] = [_handshake(c, p) for c in first.values()]
    # Note: closing ``store`` here would log the engine out (python-pkcs11 logs out the session it logged in with);
    # prepare_pkcs11_module() is the way around that (see test_prepared_module_*).
    return result


def child_engine_first(p: Params) -> dict[str, Any]:
    """The engine initialises the module first (the key exists already); python-pkcs11 comes after."""
    first = {v: _client_context(p, v) for v in VERSIONS}
    for context in first.values():
        _install(p, context)
    result: dict[str, Any] = {"first": [_handshake(c, p) for c in first.values()]}
    store = _store(p)
    _sign_with_python_pkcs11(store, LABEL)
    late_chain = _generate_and_certify(p, store, "late")
    late = _client_context(p, "TLSv1.2")
    _install(p, late, label="late", chain=late_chain)
    result["late"] = _handshake(late, p)
    _generate_and_certify(p, store, "other")
    store.delete("other")
    store.close()
    result["after_other_keys"] = [_handshake(c, p) for c in first.values()]
    return result


def child_prepared(p: Params) -> dict[str, Any]:
    """prepare_pkcs11_module() at start-up, then the agent's order: generate, CSR, install, handshakes from several
    threads while python-pkcs11 keeps signing, generating and deleting keys on the same token."""
    from warden.agent._p11tls import prepare_pkcs11_module

    prepare_pkcs11_module(module=Path(p.module), token=p.token, pin=p.pin)
    store = _store(p)
    chain = _generate_and_certify(p, store, LABEL)
    contexts = [_client_context(p, v) for v in VERSIONS]
    for context in contexts:
        _install(p, context, chain=chain)
    # The key store logged in after the engine did, so closing it does not log the engine out.
    store.close()
    result: dict[str, Any] = {"after_close": [_handshake(c, p) for c in contexts]}

    failures: list[str] = []
    versions: list[str] = []
    start = threading.Barrier(p.threads + 1)

    def handshakes(n: int) -> None:
        start.wait()
        for i in range(p.rounds):
            try:
                versions.append(_handshake(contexts[(n + i) % len(contexts)], p)["version"])
            except Exception as e:  # collected and reported, not swallowed
                failures.append(f"handshake: {e!r}")

    def token_work() -> None:
        start.wait()
        with _store(p) as other:
            for i in range(p.rounds):
                try:
                    _sign_with_python_pkcs11(other, LABEL)
                    other.generate(f"scratch-{i}", KeyAlgorithm.P256)
                    other.delete(f"scratch-{i}")
                except Exception as e:  # collected and reported, not swallowed
                    failures.append(f"python-pkcs11: {e!r}")

    workers = [threading.Thread(target=handshakes, args=(n,)) for n in range(p.threads - 1)]
    workers.append(threading.Thread(target=token_work))
    for w in workers:
        w.start()
    start.wait()
    for w in workers:
        w.join()
    result["failures"] = failures
    result["versions"] = sorted(set(versions))
    result["handshakes"] = len(versions)
    return result


SCENARIOS: dict[str, Callable[[Params], dict[str, Any]]] = {
    "connect": child_connect,
    "error": child_error,
    "python_pkcs11_first": child_python_pkcs11_first,
    "engine_first": child_engine_first,
    "prepared": child_prepared,
}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _child_main(argv: list[str]) -> int:
    scenario, raw = argv
    collect = _Collect()
    logging.getLogger("warden.agent.p11tls").addHandler(collect)
    result = SCENARIOS[scenario](Params(**json.loads(raw)))
    result["warnings"] = collect.messages
    print(json.dumps(result))
    return 0


@dataclass
class ChildRun:
    result: dict[str, Any]
    output: str  # everything the child printed, stdout and stderr


def run_child(scenario: str, params: Params) -> ChildRun:
    """Run ``scenario`` in a fresh interpreter with this process's environment (SOFTHSM2_CONF included)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.test_agent_pkcs11_tls", scenario, json.dumps(params.__dict__)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"child {scenario} exited with {proc.returncode}:\n{output[-4000:]}"
    return ChildRun(json.loads(proc.stdout.strip().splitlines()[-1]), output)


# -- servers ---------------------------------------------------------------------------------------------------------


@dataclass
class Seen:
    version: str
    subject_cn: str
    dns_names: list[str]


class PythonServer:
    """A Python ``ssl`` server that requires a client certificate from ``ca`` and answers ``ok`` to each handshake."""

    def __init__(self, cert: Path, key: Path, ca: Path) -> None:
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        self._context.verify_mode = ssl.CERT_REQUIRED
        self._context.load_verify_locations(ca)
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.port: int = self._socket.getsockname()[1]
        self.seen: list[Seen] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        try:
            with self._context.wrap_socket(conn, server_side=True) as tls:
                peer = tls.getpeercert()
                assert peer
                subject = dict(item[0] for item in peer["subject"])
                dns = [value for kind, value in peer.get("subjectAltName", ()) if kind == "DNS"]
                with self._lock:
                    self.seen.append(Seen(tls.version() or "", str(subject["commonName"]), dns))
                tls.sendall(b"ok\n")
        except (OSError, AssertionError) as e:
            with self._lock:
                self.errors.append(repr(e))

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(timeout=10)
        self._socket.close()
        for thread in self._threads:
            thread.join(timeout=10)


@contextmanager
def s_server(throwaway: tuple[Path, Path], ca: Path, version: str) -> Iterator[tuple[int, list[str]]]:
    """``openssl s_server -www`` that requires a client certificate from ``ca``; yields its port and, once the
    block is left, the lines it printed."""
    cert, key = throwaway
    port = free_port()
    process = subprocess.Popen(
        [
            *("openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(cert), "-key", str(key)),
            *("-Verify", "1", "-verify_return_error", "-CAfile", str(ca), "-naccept", "1", "-www"),
            S_SERVER_FLAGS[version],
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.strip() == "ACCEPT":
                break
        else:
            raise AssertionError(f"openssl s_server did not start: {''.join(lines)}")
        yield port, lines
        rest, _ = process.communicate(timeout=30)
        lines.extend(rest.splitlines(keepends=True))
    finally:
        process.kill()
        process.wait(timeout=10)
        process.stdout.close()


# -- fixtures --------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _engine_installed() -> None:
    if not engine_available():
        pytest.skip(
            f"OpenSSL's pkcs11 engine is not installed: run scripts/system-packages.sh as root "
            f"(apt-get install {ENGINE_PACKAGE})"
        )


@dataclass
class Rig:
    uri: str
    ca_dir: Path
    ca: Path
    trust: Path
    tmp: Path

    def params(self, **overrides: Any) -> Params:
        return Params(uri=self.uri, ca_dir=str(self.ca_dir), trust=str(self.trust), **overrides)


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, throwaway: tuple[Path, Path]) -> Iterator[Rig]:
    """A fresh SoftHSM token (own token directory) and a CA; the PIN is passed explicitly, not in the URI."""
    uri, env = make_softhsm_token(tmp_path, label=TOKEN, pin=PIN)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    unload_module()
    ca_dir = tmp_path / "pki"
    ca_dir.mkdir()
    uri = uri.replace(f"&pin-value={PIN}", "")
    yield Rig(uri=uri, ca_dir=ca_dir, ca=make_ca(ca_dir), trust=throwaway[0], tmp=tmp_path)
    unload_module()


@pytest.fixture
def device_key(rig: Rig) -> Path:
    """The device key, generated in the token by this process's python-pkcs11, and its certificate (chain file)."""
    with Pkcs11KeyStore(parse_pkcs11_uri(rig.uri), pin=PIN) as store:
        key = store.generate(LABEL, KeyAlgorithm.P256)
        return issue_client_cert(rig.ca_dir, key, rig.ca_dir / "chain.pem")


@pytest.fixture
def python_server(rig: Rig, throwaway: tuple[Path, Path]) -> Iterator[PythonServer]:
    server = PythonServer(*throwaway, rig.ca)
    yield server
    server.close()


# -- tests -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", list(VERSIONS))
def test_openssl_s_server_accepts_the_token_key(
    rig: Rig, device_key: Path, throwaway: tuple[Path, Path], version: str
) -> None:
    with s_server(throwaway, rig.ca, version) as (port, server_lines):
        run = run_child("connect", rig.params(chain=str(device_key), port=port, version=version, request="www"))
    page = run.result["response"]
    assert run.result["version"] == version
    # s_server -www reports the session as the server sees it: protocol, the client's signature, and the client
    # certificate it verified, which must be the one issued for the token key.
    assert f"Protocol  : {version}" in page
    assert "Verify return code: 0 (ok)" in page
    assert "Peer signature type: ECDSA" in page, page
    assert "Client certificate" in page
    assert f"Subject: CN={DEVICE}" in page
    assert f"DNS:{DEVICE_DNS}" in page
    assert "TLS Web Client Authentication" in page
    seen_pem = page[page.index("-----BEGIN CERTIFICATE-----") : page.index("-----END CERTIFICATE-----")]
    assert x509.load_pem_x509_certificate(f"{seen_pem}-----END CERTIFICATE-----\n".encode()) == (
        x509.load_pem_x509_certificate(device_key.read_bytes())
    )
    log = "".join(server_lines)
    assert f"depth=0 CN = {DEVICE}\nverify return:1" in log, log  # s_server's own verification trace
    assert "verify error" not in log


@pytest.mark.parametrize("version", list(VERSIONS))
def test_python_ssl_server_sees_the_client_certificate(
    rig: Rig, device_key: Path, python_server: PythonServer, version: str
) -> None:
    run = run_child("connect", rig.params(chain=str(device_key), port=python_server.port, version=version))
    assert run.result == {"version": version, "response": "ok\n", "warnings": []}
    assert python_server.errors == []
    assert python_server.seen == [Seen(version, DEVICE, [DEVICE_DNS])]


def test_the_key_is_sensitive_and_never_extractable(rig: Rig, device_key: Path) -> None:
    """Read by python-pkcs11 straight from the token: the key the handshakes use cannot be exported."""
    import pkcs11
    from pkcs11 import exceptions as p11e
    from pkcs11.constants import Attribute, ObjectClass

    certificate = x509.load_pem_x509_certificate(device_key.read_bytes())
    token = pkcs11.lib(SOFTHSM_MODULE).get_token(token_label=TOKEN)
    with token.open(user_pin=PIN) as session:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=LABEL)
        attrs = key.get_attributes(
            [Attribute.EXTRACTABLE, Attribute.NEVER_EXTRACTABLE, Attribute.SENSITIVE, Attribute.ALWAYS_SENSITIVE]
        )
        assert attrs[Attribute.EXTRACTABLE] is False
        assert attrs[Attribute.NEVER_EXTRACTABLE] is True
        assert attrs[Attribute.SENSITIVE] is True
        assert attrs[Attribute.ALWAYS_SENSITIVE] is True
        with pytest.raises(p11e.AttributeSensitive):
            key[Attribute.VALUE]
    # And the key object Warden hands out refuses to serialise; its public half is the certificate's.
    with Pkcs11KeyStore(parse_pkcs11_uri(rig.uri), pin=PIN) as store:
        loaded = store.load(LABEL)
        assert loaded.public_key() == certificate.public_key()
        with pytest.raises(KeyStoreError, match="non-extractable"):
            loaded.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )


def _expect_error(run: ChildRun, kind: type[KeyStoreError], message: str) -> dict[str, Any]:
    result = run.result
    assert result["error"] == kind.__name__, result
    assert result["message"] == message
    for text in (result["diagnostics"], result["context"], run.output):
        assert PIN not in text
        assert WRONG_PIN not in text
    return result


def test_wrong_pin(rig: Rig, device_key: Path, python_server: PythonServer) -> None:
    run = run_child("error", rig.params(chain=str(device_key), pin=WRONG_PIN, port=python_server.port))
    result = _expect_error(
        run, KeyStoreLockedError, f"wrong PIN for the PKCS#11 token {TOKEN!r} (module {SOFTHSM_MODULE})"
    )
    assert "lock" in result["hint"]
    assert python_server.seen == []


def test_unknown_key_label(rig: Rig, device_key: Path, python_server: PythonServer) -> None:
    run = run_child("error", rig.params(chain=str(device_key), label="no-such-key", port=python_server.port))
    result = _expect_error(
        run,
        KeyStoreError,
        f"the private key 'no-such-key' is not on the PKCS#11 token {TOKEN!r} (module {SOFTHSM_MODULE})",
    )
    assert "pkcs11-tool" in result["hint"]


def test_unknown_token(rig: Rig, device_key: Path) -> None:
    run = run_child("error", rig.params(chain=str(device_key), token="no-such-token"))
    _expect_error(
        run,
        KeyStoreError,
        f"no PKCS#11 token labelled 'no-such-token' in the module {SOFTHSM_MODULE} (tokens: {TOKEN!r})",
    )


def test_certificate_for_another_key(rig: Rig, device_key: Path, python_server: PythonServer) -> None:
    """A chain issued for a software key is refused, and leaves the context as it was: the right chain then works."""
    other = issue_client_cert(rig.ca_dir, ec.generate_private_key(ec.SECP256R1()), rig.tmp / "other.pem")
    run = run_child(
        "error",
        rig.params(chain=str(other), port=python_server.port, extra={"retry_chain": str(device_key)}),
    )
    result = _expect_error(
        run,
        KeyStoreError,
        f"the certificate in {other} does not match the private key {LABEL!r} on the PKCS#11 token {TOKEN!r} "
        f"(module {SOFTHSM_MODULE})",
    )
    assert result["retry"] == {"version": "TLSv1.3", "response": "ok\n"}
    assert [s.subject_cn for s in python_server.seen] == [DEVICE]


def test_chain_that_is_not_pem(rig: Rig, device_key: Path) -> None:
    garbage = rig.tmp / "garbage.pem"
    garbage.write_text("not a certificate\n")
    run = run_child("error", rig.params(chain=str(garbage)))
    result = _expect_error(run, KeyStoreError, run.result["message"])
    assert result["message"].startswith(f"cannot read the certificate chain {garbage}: ")
    assert result["hint"] == "it must be PEM, the device certificate first"


@pytest.mark.parametrize(
    ("change", "kind", "message"),
    [
        ({"module": "/nonexistent/libp11module.so"}, KeyStoreError, "the PKCS#11 module /nonexistent/libp11module.so"),
        ({"chain": "/nonexistent/chain.pem"}, KeyStoreError, "the certificate chain /nonexistent/chain.pem"),
        ({"pin": ""}, KeyStoreLockedError, "no PIN given for the PKCS#11 token"),
    ],
    ids=["module", "chain", "pin"],
)
def test_missing_inputs_are_refused_before_openssl_is_touched(
    tmp_path: Path, change: dict[str, str], kind: type[KeyStoreError], message: str
) -> None:
    # In this process: these are refused before anything is loaded, so no engine is left initialised here.
    args: dict[str, Any] = {
        "chain": tmp_path / "chain.pem",
        "module": SOFTHSM_MODULE,
        "token": TOKEN,
        "key_label": LABEL,
        "pin": PIN,
    }
    (tmp_path / "chain.pem").write_text("")
    args.update(change)
    with pytest.raises(kind, match=re.escape(message)):
        use_pkcs11_key(
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),
            chain=Path(args["chain"]),
            module=Path(args["module"]),
            token=args["token"],
            key_label=args["key_label"],
            pin=args["pin"],
        )


def test_the_ssl_ctx_pointer_is_checked_before_use(monkeypatch: pytest.MonkeyPatch) -> None:
    # In this process: reading the pointer binds libssl but loads no engine.
    from warden.agent import _p11tls

    ossl = _p11tls._openssl()
    assert ossl.version == ssl.OPENSSL_VERSION
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pointer = _p11tls._ssl_ctx(ossl, context)
    context.options |= ssl.OP_NO_TICKET
    context.verify_mode = ssl.CERT_OPTIONAL
    assert _p11tls._ssl_ctx(ossl, context) == pointer  # read through the pointer, so it follows the context
    with pytest.raises(KeyStoreError, match=re.escape("only be installed into an ssl.SSLContext")):
        _p11tls._ssl_ctx(ossl, object())  # type: ignore[arg-type]
    # What the refusal looks like when what sits after PyObject_HEAD is not the context's SSL_CTX.
    monkeypatch.setattr(ossl, "SSL_CTX_get_options", lambda ctx: int(context.options) ^ 1)
    with pytest.raises(
        KeyStoreError, match=re.escape("cannot find OpenSSL's SSL_CTX inside this Python's ssl.SSLContext")
    ):
        _p11tls._ssl_ctx(ossl, context)


def test_openssl_must_be_the_version_the_ssl_module_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    from warden.agent import _p11tls

    monkeypatch.setattr(ssl, "OPENSSL_VERSION", "OpenSSL 0.9.8 (not this one)")
    with pytest.raises(KeyStoreError, match=re.escape("but the ssl module was built against 'OpenSSL 0.9.8")):
        _p11tls._OpenSSL()


def _assert_handshakes(records: list[dict[str, str]], versions: list[str]) -> None:
    assert [r["version"] for r in records] == versions
    assert all(r["response"] == "ok\n" for r in records)


def test_python_pkcs11_first_then_the_engine(rig: Rig, python_server: PythonServer) -> None:
    run = run_child("python_pkcs11_first", rig.params(port=python_server.port))
    result = run.result
    _assert_handshakes(result["first"], ["TLSv1.2", "TLSv1.3"])
    _assert_handshakes([result["late"]], ["TLSv1.3"])
    _assert_handshakes(result["after_other_keys"], ["TLSv1.2", "TLSv1.3"])
    assert python_server.errors == []
    assert [s.subject_cn for s in python_server.seen] == [f"{DEVICE}-{LABEL}"] * 2 + [f"{DEVICE}-late"] + [
        f"{DEVICE}-{LABEL}"
    ] * 2
    # The module was python-pkcs11's before the engine came: used as it is, and said so.
    assert len(result["warnings"]) == 1
    assert "initialised before OpenSSL's pkcs11 engine" in result["warnings"][0]


def test_engine_first_then_python_pkcs11(rig: Rig, device_key: Path, python_server: PythonServer) -> None:
    run = run_child("engine_first", rig.params(chain=str(device_key), port=python_server.port))
    result = run.result
    _assert_handshakes(result["first"], ["TLSv1.2", "TLSv1.3"])
    _assert_handshakes([result["late"]], ["TLSv1.2"])
    # ... and still after python-pkcs11 made, deleted and closed: it never logged the engine out.
    _assert_handshakes(result["after_other_keys"], ["TLSv1.2", "TLSv1.3"])
    assert result["warnings"] == []
    assert python_server.errors == []
    assert [s.subject_cn for s in python_server.seen] == [DEVICE] * 2 + [f"{DEVICE}-late"] + [DEVICE] * 2


def test_prepared_module_serves_concurrent_handshakes_next_to_python_pkcs11(
    rig: Rig, python_server: PythonServer
) -> None:
    threads, rounds = 6, 15
    run = run_child("prepared", rig.params(port=python_server.port, threads=threads, rounds=rounds))
    result = run.result
    _assert_handshakes(result["after_close"], ["TLSv1.2", "TLSv1.3"])
    assert result["failures"] == []
    assert result["handshakes"] == (threads - 1) * rounds
    assert result["versions"] == ["TLSv1.2", "TLSv1.3"]
    assert result["warnings"] == []
    assert python_server.errors == []
    assert len(python_server.seen) == 2 + (threads - 1) * rounds
    assert {s.subject_cn for s in python_server.seen} == {f"{DEVICE}-{LABEL}"}


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
