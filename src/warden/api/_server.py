"""``warden serve``: the hub on uvicorn, HTTPS only.

- TLS 1.2 and 1.3 only; TLS 1.2 with ECDHE and AEAD suites only; no compression, renegotiation or session tickets
  (every connection is verified against the trust store of the moment).
- The client certificate is optional at the TLS layer (the operator API authenticates with tokens), verified when
  presented against: this hub's CA, every enabled enrollment group's CAs, and every pinned onboarding certificate
  (partial chains allowed, so a group may trust the intermediate that signs its IDevIDs). A certificate that fails
  verification ends the handshake; each such refusal is counted by TLS alert.
- The trust store and the service certificate follow changes without a restart: a fresh ``SSLContext`` is built and
  handed to each new handshake from the SNI callback (docs/adr/0004-est-client-certificates.md).
- One worker on SQLite; several only on PostgreSQL, where the singleton jobs run in the worker holding the leader
  lock (a PostgreSQL advisory lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import resource
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from warden.api._app import create_app
from warden.api._logging import configure_logging
from warden.api._metrics import Metrics
from warden.broker import LocalBroker
from warden.core import TLS12_CIPHERS, ConfigurationError, Settings
from warden.hub import CommandDispatcher, Hub
from warden.store import LeaderLock

__all__ = ["TlsContexts", "WardenHttpProtocol", "prepare", "serve"]

log = logging.getLogger("warden.server")

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
# TLS alert descriptions (RFC 8446 section 6) the hub sends when it refuses a handshake.
_ALERTS = {
    10: "unexpected_message",
    20: "bad_record_mac",
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    47: "illegal_parameter",
    48: "unknown_ca",
    49: "access_denied",
    50: "decode_error",
    51: "decrypt_error",
    70: "protocol_version",
    71: "insufficient_security",
    80: "internal_error",
    86: "inappropriate_fallback",
    109: "missing_extension",
    110: "unsupported_extension",
    112: "unrecognized_name",
    116: "certificate_required",
    120: "no_application_protocol",
}
_ALERT = 21


class WardenHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the ASGI TLS extension: ``scope["extensions"]["tls"]`` carries the client
    certificate the handshake verified (Python exposes the leaf only, so the chain holds one PEM certificate)."""

    _tls: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        raw = transport.get_extra_info("socket")
        if raw is not None:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            self._tls = None
            return
        der = ssl_object.getpeercert(binary_form=True)
        self._tls = {
            "server_cert": None,
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
            "client_cert_name": None,
            "client_cert_error": None,
            "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
            "cipher_suite": None,
        }

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            self.scope["extensions"] = {"tls": self._tls}  # type: ignore[dict-item]


def _set_message_callback(context: ssl.SSLContext, callback: Callable[..., None]) -> None:
    """Install ``callback`` as the context's TLS message hook, on the C level when that can be done: ``ssl``'s
    Python wrapper turns three integers into enums for every TLS message (a dozen per handshake), and that cost
    about as much as the rest of the handshake's Python code. The callback gets plain integers there."""
    raw = getattr(super(ssl.SSLContext, ssl.SSLContext), "_msg_callback", None)  # _ssl._SSLContext's descriptor
    if raw is not None and hasattr(raw, "__set__"):
        raw.__set__(context, callback)
    elif hasattr(context, "_msg_callback"):
        context._msg_callback = callback


class TlsContexts:
    """The listener's TLS contexts. ``base`` is what the server socket was created with; its SNI callback moves
    every new handshake onto ``current``, which :meth:`refresh` rebuilds when the trust material (enrollment
    groups, pinned onboarding certificates) or the service certificate changes."""

    def __init__(self, hub: Hub, metrics: Metrics) -> None:
        self._hub = hub
        self._metrics = metrics
        self._lock = threading.Lock()
        self._version: tuple[str, float] | None = None
        self.current = self._build()
        self.base = self.current
        self.base.sni_callback = self._sni

    def _state(self) -> tuple[str, float]:
        cert, _ = self._hub.identities.service_paths()
        return self._hub.provisioning.trust_version(), cert.stat().st_mtime

    def _build(self) -> ssl.SSLContext:
        version = self._state()
        cert, key = self._hub.identities.service_paths()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(TLS12_CIPHERS)
        context.options |= (
            ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
        )
        context.num_tickets = 0
        context.load_cert_chain(cert, key, password=self._hub.identities.key_password())
        context.verify_mode = ssl.CERT_OPTIONAL
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        material = self._hub.provisioning.trust_material()
        context.load_verify_locations(cadata=self._hub.chain_pem().decode("ascii") + "".join(material.pem))
        context.set_alpn_protocols(["http/1.1"])
        # CPython's (private) TLS message hook is the only place a refused handshake is visible from Python:
        # asyncio drops the error silently. Every fatal alert OpenSSL produces is counted (asyncio then closes the
        # connection without flushing it, so the client sees the connection end, not the alert).
        _set_message_callback(context, self._on_message)
        self._version = version
        return context

    def _on_message(
        self, conn: object, direction: str, version: object, content_type: int, msg_type: int, data: bytes
    ) -> None:
        if content_type == _ALERT and direction == "write" and len(data) == 2 and data[0] == 2:
            self._metrics.tls_failures.labels(_ALERTS.get(data[1], str(data[1]))).inc()

    def _sni(self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        current = self.current
        if current is not context:
            ssl_object.context = current

    def refresh(self) -> bool:
        """Rebuild the context if what it is made of changed; True when it did."""
        with self._lock:
            if self._state() == self._version:
                return False
            self.current = self._build()
        self._hub.provisioning.forget_caches()
        self._metrics.trust_reloads.inc()
        log.info("TLS context rebuilt (trust store or service certificate changed)")
        return True


def prepare(hub: Hub, *, actor: str = "hub") -> None:
    """What must exist before the listener starts: the service certificate, a current CRL, the OCSP signer and
    the hub-client certificate."""
    hub.run_jobs(actor=actor)


async def _jobs_loop(hub: Hub, tls: TlsContexts, metrics: Metrics, wake: asyncio.Event) -> None:
    interval = hub.settings.jobs_interval_seconds
    leader = None
    loop = asyncio.get_running_loop()
    since_jobs = interval
    while True:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=1.0)
        wake.clear()
        try:
            await loop.run_in_executor(None, tls.refresh)
        except Exception:
            log.exception("TLS context refresh failed; the previous one stays in use")
        since_jobs += 1.0
        if leader is not None and since_jobs < interval:
            try:
                await loop.run_in_executor(None, hub.crl_job)
            except Exception:
                log.exception("CRL publication failed")
        if since_jobs < interval:
            continue
        since_jobs = 0.0
        if leader is not None and not await loop.run_in_executor(None, _still_held, leader):
            leader = None
        if leader is None:
            leader = await loop.run_in_executor(None, hub.db.try_leader_lock, "jobs")
        metrics.leader.set(1 if leader is not None else 0)
        if leader is None:
            continue
        try:
            done = await loop.run_in_executor(None, hub.run_jobs)
            metrics.jobs.labels("ok").inc()
            if done:
                log.info("singleton jobs ran", extra={"fields": {"done": done}})
        except Exception:
            metrics.jobs.labels("failed").inc()
            log.exception("singleton jobs failed")
        try:
            repairs = await loop.run_in_executor(None, hub.reconcile_broker)
            if repairs:
                log.warning("broker drift repaired", extra={"fields": {"repairs": repairs[:50]}})
        except Exception:
            log.exception("broker reconciliation failed")
        crl = await loop.run_in_executor(None, hub.certificates.current_crl)
        if crl is not None:
            metrics.crl_next_update.set(crl.next_update.timestamp())


def _raise_open_file_limit() -> None:
    """The soft open-file limit (often 1,024) up to the hard one: with one worker, the HTTP connections this process
    serves and the ingest's broker connection share one table, and the link must not fail to reconnect because
    clients hold every descriptor (it waits with epoll, so a high descriptor number is fine)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _freeze_startup_objects() -> None:
    """Move everything made so far (modules, the app, the hub's services: hundreds of thousands of objects) out of
    the garbage collector's reach. A full collection walks every tracked object with the GIL held: measured
    200-400 ms here, during which the ingest's link reads nothing and the broker drops what it cannot queue
    (docs/adr/0007-ingest.md). What was made at start lives as long as the process anyway."""
    gc.collect()
    gc.freeze()


def _still_held(lock: LeaderLock) -> bool:
    return lock.held


def _worker(settings: Settings, sock: socket.socket) -> None:
    """One worker. It gets the settings object itself, not the data directory: the CLI removes secrets (the CA
    passphrase, the PKCS#11 PIN) from the environment once read, so re-reading settings here would lose them."""
    root = logging.getLogger()
    for handler in list(root.handlers):  # the CLI's plain stderr handler: the server logs JSON lines only
        root.removeHandler(handler)
    configure_logging(level=settings.log_level.upper(), json=settings.log_format == "json")
    hub = Hub.open(settings, group_commit=True)
    metrics = Metrics()
    tls = TlsContexts(hub, metrics)

    async def main() -> None:
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        hub.commit_in(loop)

        def on_trust_change() -> None:
            loop.call_soon_threadsafe(wake.set)

        app = create_app(hub, metrics=metrics, on_trust_change=on_trust_change)
        config = uvicorn.Config(
            app,
            http=WardenHttpProtocol,
            ssl_context_factory=lambda _config, _default: tls.base,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_keep_alive=15,
            backlog=2048,
        )
        server = uvicorn.Server(config)
        _freeze_startup_objects()
        jobs = asyncio.create_task(_jobs_loop(hub, tls, metrics, wake))
        try:
            await server.serve(sockets=[sock])
        finally:
            jobs.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await jobs

    try:
        asyncio.run(main())
    finally:
        hub.close()


def _worker_entry(settings: Settings, sock: socket.socket) -> None:
    # The settings (secrets included) reach a spawned worker through the pipe multiprocessing pickles its
    # arguments into, never through the environment or the command line.
    _worker(settings, sock)


def serve(settings: Settings, *, host: str, port: int, workers: int, announce: Callable[[str], None]) -> None:
    """Run the hub until SIGINT or SIGTERM."""
    with Hub.open(settings) as hub:
        if workers > 1 and hub.db.is_sqlite:
            raise ConfigurationError(
                "several workers need PostgreSQL", hint="SQLite runs one worker; set database_url to PostgreSQL"
            )
        prepare(hub)
        _raise_open_file_limit()
        # The embedded broker belongs to this process (the workers administer it over its socket), and so does the
        # ingest: its MQTT connection uses the hub-client certificate, whose one session a second connection would
        # take over, so it runs here and in no worker.
        broker = hub.start_broker()
        supervisor = _BrokerSupervisor(hub, broker) if broker is not None else None
        pipeline = hub.ingest_pipeline() if broker is not None else None
        dispatcher: CommandDispatcher | None = None
        # uvicorn ends its graceful shutdown by raising the signal it caught again, to the handler that was there
        # before it: with Python's default one the process would die on the spot and leave the broker running.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        try:
            if supervisor is not None:
                supervisor.start()
            if pipeline is not None:
                pipeline.start()
                announce("ingest: reading devices' telemetry, health and events with the hub-client certificate")
                dispatcher = CommandDispatcher(hub, pipeline.link)
                dispatcher.start()
            _freeze_startup_objects()
            _listen(settings, host=host, port=port, workers=workers, announce=announce, broker=broker)
        finally:
            if dispatcher is not None:
                dispatcher.stop()
            if pipeline is not None:
                pipeline.stop()  # the last batch is written before the broker goes
            if supervisor is not None:
                supervisor.stop()
            if broker is not None:
                broker.stop()


class _BrokerSupervisor(threading.Thread):
    """Keeps the embedded broker running: a broker that exited is started again (with the registry's exceptions
    as they are then), and one whose certificate is in the last third of its life is restarted with a new one
    (devices reconnect on their own)."""

    def __init__(self, hub: Hub, broker: LocalBroker, *, every: float = 2.0) -> None:
        super().__init__(name="warden-broker-supervisor", daemon=True)
        self._hub = hub
        self._broker = broker
        self._every = every
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self._every):
            try:
                if not self._broker.running():
                    log.error("the broker exited; starting it again (its log: %s)", self._broker.layout.log)
                    self._hub.start_broker()
                elif self._broker.needs_renewal(self._hub.clock.now()):
                    log.info("the broker's certificate is in the last third of its life: restarting with a new one")
                    self._broker.stop()
                    self._hub.start_broker()
            except Exception:
                log.exception("broker supervision failed; trying again")

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=30)


def _exit_on_signal(signum: int, _frame: object) -> None:
    # A requested stop that completed its shutdown is a success (exit 0, as uvicorn's own exit would be).
    raise SystemExit(0)


def _listen(
    settings: Settings,
    *,
    host: str,
    port: int,
    workers: int,
    announce: Callable[[str], None],
    broker: LocalBroker | None,
) -> None:
    if broker is not None:
        announce(f"broker (mosquitto) listening on mqtts://{broker.host}:{broker.port} (mutual TLS)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the listening socket says
    # so, and without it a response written in two parts waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    bound = sock.getsockname()[1]
    names = ", ".join(settings.service_names)
    announce(f"warden hub listening on https://{host}:{bound} (certificate for {names}; {workers} worker(s))")
    if workers == 1:
        _worker(settings, sock)
        return
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_entry, args=(settings, sock)) for _ in range(workers)]
    for process in processes:
        process.start()

    def stop(*_: object) -> None:
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for process in processes:
        process.join()
    sock.close()
    if any(p.exitcode not in (0, -signal.SIGTERM) for p in processes):
        sys.exit(1)
