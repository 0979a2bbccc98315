"""The agent's main loop: onboard, keep the MQTT session up, publish telemetry and health, renew before expiry.

Everything time-dependent is decided in :meth:`Agent.tick`, which the loop calls a few times a second with the
current time; tests and the simulator drive it the same way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import random
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from warden.agent._commands import CommandHandler
from warden.agent._config import AgentConfig
from warden.agent._est import EstClient, EstRefusedError, EstUnavailableError, client_context
from warden.agent._identity import Identity, IdentityStore, check_issued, load_pem_bundle
from warden.agent._keys import DeviceKeys, FileDeviceKeys, Pkcs11DeviceKeys, check_private_file
from warden.agent._queue import FileQueue, MemoryQueue, MessageQueue
from warden.agent._session import Session, SessionState
from warden.broker import Command, Event, Health, Telemetry, device_topic, encode_message
from warden.core import WardenError
from warden.core.files import write_file_atomic

__all__ = ["Agent", "RenewalState", "read_status", "system_metrics"]

_log = logging.getLogger("warden.agent")
ONBOARDING_LABEL = "idevid"
STATUS_FILE = "status.json"
_MAX_TOKEN = 4096
#: renewal retries back off from this many seconds, doubling, up to the cap
_BACKOFF_START = 5.0
_BACKOFF_CAP = 300.0


@dataclass
class RenewalState:
    due: float = 0.0
    next_attempt: float = 0.0
    failures: int = 0
    last_error: str | None = None
    last_renewed: float | None = None
    renewals: int = 0


@dataclass
class _Counters:
    seq: int = 0
    clock_offset: float | None = None
    started: float = field(default_factory=time.time)


def system_metrics() -> dict[str, float]:
    """Telemetry of a Linux device from /proc: load, memory and uptime."""
    metrics: dict[str, float] = {}
    try:
        load = Path("/proc/loadavg").read_text().split()
        metrics["load1"] = float(load[0])
        meminfo = {
            line.split(":")[0]: float(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()[:8]
        }
        if meminfo.get("MemTotal"):
            metrics["mem_available_ratio"] = round(meminfo.get("MemAvailable", 0.0) / meminfo["MemTotal"], 4)
        metrics["uptime_s"] = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return metrics


def make_keys(config: AgentConfig) -> DeviceKeys:
    files = {ONBOARDING_LABEL: config.onboarding.key} if config.onboarding.key is not None else {}
    if config.keystore.kind == "pkcs11":
        assert config.keystore.module
        assert config.keystore.token
        assert config.keystore.pin_file
        return Pkcs11DeviceKeys(
            module=config.keystore.module, token=config.keystore.token, pin_file=config.keystore.pin_file
        )
    return FileDeviceKeys(config.state_dir / "keys", files=files)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        keys: DeviceKeys | None = None,
        queue: MessageQueue | None = None,
        telemetry: Callable[[], dict[str, float]] = system_metrics,
        rng: random.Random | None = None,
        on_command: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.config = config
        self.keys = keys or make_keys(config)
        config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        config.state_dir.chmod(0o700)  # keys, the queue and the command counter live here
        self.identities = IdentityStore(config.state_dir, self.keys)
        self.queue: MessageQueue = queue or (
            FileQueue(config.state_dir / "queue.sqlite", config.queue_limit)
            if config.queue == "file"
            else MemoryQueue(config.queue_limit)
        )
        self.est = EstClient(config.hub)
        self.renewal = RenewalState()
        self.session_state = SessionState()
        self._telemetry = telemetry
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not secrets)
        self._on_command = on_command
        self._counters = _Counters()
        self._session: Session | None = None
        self._identity: Identity | None = None
        self._roots = load_pem_bundle(config.hub.ca, "the pinned hub CA")
        self._device_id = config.device_id or self._onboarding_cn()
        self.commands = CommandHandler(
            self._device_id,
            config.state_dir,
            roots=lambda: self._roots,
            intermediates=self._ca_chain,
            emit=self.emit,
            actions={
                "ping": lambda _c: "pong",
                "report-health": self._command_health,
                "renew-certificate": self._command_renew,
            },
        )
        self._cacerts: list[x509.Certificate] = []
        self._next_telemetry = 0.0
        self._next_health = 0.0
        self._next_status = 0.0
        self._lock = threading.RLock()
        self._stopped = False
        self._running = False
        self._next_session_try = 0.0
        self._seq_lock = threading.Lock()

    # -- identity ---------------------------------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def identity(self) -> Identity | None:
        return self._identity

    def _onboarding_cn(self) -> str:
        if self.config.onboarding.certificate is None:
            raise WardenError("device_id is not configured and there is no onboarding certificate to take it from")
        leaf = load_pem_bundle(self.config.onboarding.certificate, "the onboarding certificate")[0]
        names = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if len(names) != 1 or not isinstance(names[0], str):
            raise WardenError("the onboarding certificate has no single common name: set device_id in the config")
        return names[0]

    def load_identity(self) -> Identity | None:
        self.identities.abandon_pending()
        self._identity = self.identities.current()
        if self._identity is not None:
            self._schedule_renewal(self._identity)
        return self._identity

    def _csr(self, key: ec.EllipticCurvePrivateKey) -> bytes:
        request = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self._device_id)]))
            .sign(key, hashes.SHA256())
        )
        return request.public_bytes(serialization.Encoding.DER)

    def _new_label(self) -> str:
        return f"op-{int(time.time() * 1000):x}-{self._rng.randrange(16**4):04x}"

    def onboard(self) -> Identity:
        """``simpleenroll`` with the onboarding certificate or the enrollment token; stores the new identity."""
        onboarding = self.config.onboarding
        token: str | None = None
        installer = None
        if onboarding.token_file is not None:
            token = _read_token(onboarding.token_file)
        else:
            assert onboarding.certificate is not None
            onboarding_label = onboarding.key_label or ONBOARDING_LABEL
            onboarding_chain = onboarding.certificate

            def installer(context: ssl.SSLContext) -> None:
                self.keys.install(context, onboarding_label, onboarding_chain)

        label = self._new_label()
        self.identities.begin(label)
        try:
            key = self.keys.generate(label)
            result = self.est.simpleenroll(self._csr(key), identity=installer, token=token)
            self._note_clock(result.clock_offset)
            issued = self._checked(result.certificates, key, result.clock_offset)
        except BaseException:
            self.identities.abandon_pending()
            raise
        identity = self.identities.commit(label, issued)
        self._identity = identity
        self._schedule_renewal(identity)
        _log.info(
            "enrolled as %s: certificate %s valid until %s", self._device_id, identity.serial, _iso(identity.not_after)
        )
        self.emit("agent.enrolled", {"serial": identity.serial, "not_after": _iso(identity.not_after)})
        return identity

    def renew(self) -> Identity:
        """``simplereenroll`` with a fresh key, authenticated by the current certificate; then reconnect with it."""
        current = self._identity
        if current is None:
            raise WardenError("there is no operational certificate to renew: onboard first")
        label = self._new_label()
        self.identities.begin(label)
        try:
            key = self.keys.generate(label)
            result = self.est.simplereenroll(self._csr(key), identity=self._installer(current))
            self._note_clock(result.clock_offset)
            chain = self._checked(result.certificates, key, result.clock_offset)
        except BaseException:
            self.identities.abandon_pending()
            raise
        identity = self.identities.commit(label, chain)
        with self._lock:
            self._identity = identity
            self.renewal.renewals += 1
            self.renewal.last_renewed = time.time()
            self.renewal.failures = 0
            self.renewal.last_error = None
            self._schedule_renewal(identity)
            restart = self._session is not None
        if restart:
            # Outside the lock: closing waits for paho's thread, which may be delivering a command that emits.
            try:
                self._restart_session()
            except WardenError as e:
                # The renewal itself succeeded; tick() starts the session again (never a new renewal for this).
                self.session_state.last_error = f"cannot start the session with the new certificate: {e.message}"
                _log.error("%s", self.session_state.last_error)
        _log.info(
            "renewed: certificate %s (was %s) valid until %s", identity.serial, current.serial, _iso(identity.not_after)
        )
        self.emit(
            "certificate.renewed",
            {"serial": identity.serial, "previous": current.serial, "not_after": _iso(identity.not_after)},
        )
        return identity

    def _checked(
        self, certificates: list[x509.Certificate], key: ec.EllipticCurvePrivateKey, offset: float | None
    ) -> list[x509.Certificate]:
        """:func:`check_issued` at the hub's time (a device whose clock is behind must not refuse a certificate the
        hub issued a moment ago), once more with fresh ``cacerts`` if the cached ones no longer chain (a CA
        rollover)."""
        at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset or 0.0)
        try:
            return check_issued(self._with_cacerts(certificates), key, self._device_id, self._roots, at=at)
        except WardenError:
            if len(certificates) > 1 or not self._cacerts:
                raise
            self._cacerts = []
            return check_issued(self._with_cacerts(certificates), key, self._device_id, self._roots, at=at)

    def _with_cacerts(self, issued: list[x509.Certificate]) -> list[x509.Certificate]:
        """The issued certificates plus the hub's CA certificates (EST ``cacerts``, fetched over the pinned TLS
        connection and cached) that the chain needs; path validation to the pinned root follows in any case."""
        if len(issued) > 1:
            return issued
        if not self._cacerts:
            self._cacerts = self.est.cacerts()
        return [*issued, *self._cacerts]

    def _installer(self, identity: Identity) -> Callable[[ssl.SSLContext], None]:
        def install(context: ssl.SSLContext) -> None:
            self.keys.install(context, identity.label, identity.chain)

        return install

    def _schedule_renewal(self, identity: Identity) -> None:
        start = max(identity.not_before, min(identity.received, identity.not_after))
        lifetime = identity.not_after - start
        fraction = self.config.renew_at + self._rng.uniform(0, self.config.jitter_fraction)
        self.renewal.due = start + lifetime * min(fraction, 0.95)
        self.renewal.next_attempt = self.renewal.due

    def _note_clock(self, offset: float | None) -> None:
        if offset is None:
            return
        self._counters.clock_offset = offset
        if abs(offset) > self.config.max_clock_skew_seconds:
            _log.warning("the device clock differs from the hub's by %.0f s", offset)
            self.emit("clock.skew", {"offset_seconds": round(offset, 1)})

    # -- messages ---------------------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        with self._seq_lock:
            self._counters.seq += 1
            return self._counters.seq

    def _now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    def emit(self, kind: str, data: dict[str, Any] | None = None) -> None:
        """Queue an event for the hub (sent once connected; never dropped for telemetry)."""
        message = Event(seq=self._next_seq(), ts=self._now(), type=kind, data=data or {})
        self._enqueue("events", encode_message(message), droppable=False)

    def publish_telemetry(self, metrics: dict[str, float] | None = None) -> None:
        message = Telemetry(
            seq=self._next_seq(), ts=self._now(), metrics=metrics if metrics is not None else self._telemetry()
        )
        self._enqueue("telemetry", encode_message(message), droppable=True)

    def publish_health(self) -> None:
        checks = {"certificate": "valid" if self._identity and self._identity.not_after > time.time() else "expired"}
        offset = self._counters.clock_offset
        checks["clock"] = "skewed" if offset is not None and abs(offset) > self.config.max_clock_skew_seconds else "ok"
        checks["keystore"] = self.keys.kind
        status = "ok" if all(v in ("valid", "ok", "file", "pkcs11") for v in checks.values()) else "degraded"
        message = Health(seq=self._next_seq(), ts=self._now(), status=status, checks=checks)
        self._enqueue("health", encode_message(message), droppable=False)

    def _enqueue(self, kind: str, payload: bytes, *, droppable: bool) -> None:
        self.queue.put(device_topic(self._device_id, kind), payload, droppable=droppable)
        session = self._session
        if session is not None:
            session.pump()

    def _message(self, topic: str, payload: bytes) -> None:
        if self._on_command is not None:
            self._on_command(topic, payload)
        else:
            self.commands.handle(topic, payload)

    def _ca_chain(self) -> list[x509.Certificate]:
        identity = self._identity
        chain = load_pem_bundle(identity.chain, "the operational certificate")[1:] if identity else []
        return [*chain, *self._cacerts]

    def _command_health(self, _command: Command) -> str:
        self.publish_health()
        return "health report queued"

    def _command_renew(self, _command: Command) -> str:
        self.renewal.next_attempt = 0.0
        return "renewal scheduled"

    # -- session ----------------------------------------------------------------------------------------------

    def _context(self, identity: Identity) -> ssl.SSLContext:
        context = client_context(self.config.hub.ca)
        self.keys.install(context, identity.label, identity.chain)
        return context

    def start_session(self) -> None:
        with self._lock:
            identity = self._identity
            if identity is None:
                raise WardenError("there is no operational certificate: onboard first")
            self._session = Session(
                self._device_id,
                self.config.broker,
                self._context(identity),
                self.queue,
                on_message=self._message,
                state=self.session_state,
            )
            self._session.start()

    def _restart_session(self) -> None:
        # One certificate holds one session (the broker's client id is the certificate's identity): close first.
        with self._lock:
            old, self._session = self._session, None
        if old is not None:
            old.close()
        self.start_session()

    def stop(self) -> None:
        self._stopped = True
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            session.close()  # outside the lock: it waits for paho's thread
        with contextlib.suppress(OSError, WardenError):
            self.write_status()
        self.queue.close()

    # -- the loop ---------------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Do whatever is due at ``now``: renewal (with backoff), the session if it is down for want of a TLS
        identity, telemetry, health, the status file. A step that fails is logged and tried again next time;
        it never ends the agent."""
        if self._identity is not None and now >= self.renewal.next_attempt:
            self._try_renew(now)
        if self._running and self._session is None and self._identity is not None and now >= self._next_session_try:
            self._next_session_try = now + 5.0
            self._step("starting the session", self.start_session)
        if self._session is not None:
            if now >= self._next_telemetry:
                self._next_telemetry = now + self.config.telemetry_interval_seconds
                self._step("telemetry", self.publish_telemetry)
            if now >= self._next_health:
                self._next_health = now + self.config.health_interval_seconds
                self._step("the health report", self.publish_health)
        if now >= self._next_status:
            self._next_status = now + 2.0
            self._step("the status file", self.write_status)

    def _step(self, what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except (WardenError, OSError, ValueError, sqlite3.Error) as e:
            _log.error("%s failed: %s", what, getattr(e, "message", None) or e)

    def _try_renew(self, now: float) -> None:
        try:
            self.renew()
        except (EstUnavailableError, EstRefusedError, WardenError, OSError) as e:
            self.renewal.failures += 1
            self.renewal.last_error = e.message if isinstance(e, WardenError) else str(e)
            delay = min(_BACKOFF_START * 2 ** (self.renewal.failures - 1), _BACKOFF_CAP)
            delay *= self._rng.uniform(0.5, 1.0)
            if isinstance(e, EstUnavailableError) and e.retry_after is not None:
                delay = max(delay, e.retry_after)
            self.renewal.next_attempt = now + delay
            _log.warning(
                "renewal failed (%d in a row), keeping certificate %s, next try in %.0f s: %s",
                self.renewal.failures,
                self._identity.serial if self._identity else "-",
                delay,
                self.renewal.last_error,
            )

    def onboard_until_done(self, stop: threading.Event) -> bool:
        """Onboard, retrying with backoff while the hub is unreachable; False if stopped first."""
        failures = 0
        while not stop.is_set():
            try:
                self.onboard()
                return True
            except EstUnavailableError as e:
                failures += 1
                delay = min(_BACKOFF_START * 2 ** (failures - 1), _BACKOFF_CAP) * self._rng.uniform(0.5, 1.0)
                _log.warning("onboarding failed, retrying in %.0f s: %s", delay, e.message)
                stop.wait(delay)
        return False

    def run(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set: onboard if needed, connect, then tick."""
        if self.load_identity() is None and not self.onboard_until_done(stop):
            return
        self.emit("agent.started", {"version": 1, "keystore": self.keys.kind})
        self._running = True
        self.start_session()
        try:
            while not stop.is_set():
                self.tick(time.time())
                stop.wait(0.25)
        finally:
            self.stop()

    # -- status -----------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        identity = self._identity
        state = self.session_state
        return {
            "pid": os.getpid(),
            "stopped": self._stopped,
            "updated": time.time(),
            "device_id": self._device_id,
            "keystore": {"kind": self.keys.kind, "hardware_backed": self.keys.hardware_backed},
            "certificate": None
            if identity is None
            else {
                "serial": identity.serial,
                "not_before": _iso(identity.not_before),
                "not_after": _iso(identity.not_after),
            },
            "renewal": {
                "due": _iso(self.renewal.due) if identity else None,
                "next_attempt": _iso(self.renewal.next_attempt) if identity else None,
                "failures": self.renewal.failures,
                "last_error": self.renewal.last_error,
                "renewals": self.renewal.renewals,
            },
            "broker": {
                "host": self.config.broker.host,
                "port": self.config.broker.port,
                "connected": state.connected,
                "since": _iso(state.since) if state.since else None,
                "connects": state.connects,
                "last_error": state.last_error,
                "delivered": state.delivered,
                "refused": state.refused,
                "received": state.received,
            },
            "queue": {"depth": len(self.queue), "dropped": self.queue.dropped, "limit": self.config.queue_limit},
            "clock_offset_seconds": None
            if self._counters.clock_offset is None
            else round(self._counters.clock_offset, 3),
        }

    def write_status(self) -> None:
        data = json.dumps(self.status(), indent=1).encode()
        write_file_atomic(self.config.state_dir / STATUS_FILE, data, mode=0o600)


def read_status(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / STATUS_FILE
    try:
        raw = path.read_bytes()[: 64 * 1024]
        data = json.loads(raw)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_token(path: Path) -> str:
    check_private_file(path)  # a one-time secret: 0600, like a key
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_TOKEN + 1)
    except OSError as e:
        raise WardenError(f"cannot read the enrollment token file {path}: {e.strerror}") from None
    token = raw.decode("utf-8", errors="replace").strip()
    if not token or len(raw) > _MAX_TOKEN:
        raise WardenError(f"the enrollment token file {path} is empty or too large")
    return token


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
