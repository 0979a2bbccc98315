"""The composition root: builds every service from the settings. Only the shells (CLI, later the API) import it.

It also owns the one multi-context workflow that has no other home yet: initialising a data directory (settings
file, database, CA hierarchy, audit checkpoint key, OCSP signer). Initialisation either completes or leaves
nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import pwd
import secrets
import shutil
import ssl
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from warden.broker import (
    Access,
    BrokerLayout,
    Command,
    DeviceActivity,
    Flood,
    FloodWatch,
    HubLink,
    Ingest,
    IngestConfig,
    IngestPipeline,
    IngestRecorder,
    IngestStats,
    LinkOptions,
    LocalBroker,
    client_tls_context,
    device_topic,
    sign_command,
)
from warden.core import (
    DEFAULT_LIMITS,
    AlreadyExistsError,
    Clock,
    ConfigurationError,
    InvalidInputError,
    KeyStoreError,
    NotInitialisedError,
    Random,
    Settings,
    SystemClock,
    SystemRandom,
    WardenError,
    load_settings,
    validate_fleet_domain,
    write_settings_file,
)
from warden.core.files import read_limited, write_file_atomic, write_private_file
from warden.monitor import AuditEvent, AuditLog, CheckpointKey, CheckpointMirror
from warden.pki import (
    ISSUING_KEY,
    OCSP_SIGNER_KEY,
    ROOT_KEY,
    CAFiles,
    CertificateAuthority,
    FileKeyStore,
    KeyAlgorithm,
    KeyStore,
    Profile,
    create_hierarchy,
    key_csr,
    load_encrypted_key,
)
from warden.policy import TokenService
from warden.provisioning import ProvisioningService
from warden.registry import (
    CertificateRecord,
    CertificateService,
    CommandResult,
    CommandService,
    DeviceCommand,
    DeviceService,
    DeviceState,
    IssuancePolicy,
    PublishedCrl,
    RegistryUnitOfWork,
    Restriction,
)
from warden.store import CommitSink, Database, GroupCommitter, LoopCommitter

__all__ = ["CommandDispatcher", "Hub", "HubCA", "initialise"]

log = logging.getLogger(__name__)
ItemT = TypeVar("ItemT")
R = TypeVar("R")

PASSPHRASE_FILE = "keys/ca-passphrase"  # noqa: S105 - a file name, not a secret
TOKEN_KEY_FILE = "keys/token-mac.key"  # noqa: S105 - a file name, not a secret
BROKER_ADMIN_FILE = "keys/broker-admin.secret"
BROKER_DIR = "broker"
#: the broker rights of a device in each registry state (active and pending devices: the ACL file's own topics)
_BROKER_ACCESS = {
    DeviceState.QUARANTINED: Access.QUARANTINED,
    DeviceState.DISABLED: Access.DISABLED,
    DeviceState.DECOMMISSIONED: Access.DISABLED,
}
SERVICE_CERT_FILE = "ca/service.pem"
SERVICE_KEY_FILE = "keys/service.key.pem"
HUB_CLIENT_CERT_FILE = "ca/hub-client.pem"
HUB_CLIENT_KEY_FILE = "keys/hub-client.key.pem"
COMMAND_SIGNER_CERT_FILE = "ca/command-signer.pem"
COMMAND_SIGNER_KEY_FILE = "keys/command-signer.key.pem"


def _passphrase_path(settings: Settings) -> Path:
    return settings.ca_passphrase_file or settings.data_dir / PASSPHRASE_FILE


def read_passphrase(settings: Settings) -> bytes | None:
    """The hub passphrase: ``WARDEN_CA_PASSPHRASE``, else the passphrase file (which must be mode 0600)."""
    if settings.ca_passphrase is not None:
        value = settings.ca_passphrase.get_secret_value().encode("utf-8")
        if not value:
            raise ConfigurationError("WARDEN_CA_PASSPHRASE is empty")
        return value
    path = _passphrase_path(settings)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(f"the passphrase file {path} is readable by others", hint=f"run 'chmod 600 {path}'")
    value = read_limited(path, 1024, what="the passphrase file").rstrip(b"\r\n")
    if not value:
        raise ConfigurationError(f"the passphrase file {path} is empty")
    return value


def open_key_store(settings: Settings, passphrase: Callable[[], bytes | None]) -> KeyStore:
    if settings.key_store == "file":
        secret = passphrase()
        if secret is None:
            raise KeyStoreError(
                "no CA passphrase", hint=f"set WARDEN_CA_PASSPHRASE or create {_passphrase_path(settings)}"
            )
        return FileKeyStore(settings.data_dir / "keys", secret)
    if settings.key_store.startswith("pkcs11:"):
        from warden.pki import Pkcs11KeyStore, parse_pkcs11_uri

        pin = settings.pkcs11_pin.get_secret_value() if settings.pkcs11_pin is not None else None
        return Pkcs11KeyStore(parse_pkcs11_uri(settings.key_store), pin=pin)
    raise ConfigurationError(
        f"unknown key store {settings.key_store[:40]!r}", hint="use 'file' or a 'pkcs11:' URI (RFC 7512)"
    )


class HubCA:
    """The CA as the hub holds it: certificates in ``<data-dir>/ca``, keys in the configured key store."""

    def __init__(self, settings: Settings, key_store: Callable[[], KeyStore]) -> None:
        self._settings = settings
        self._key_store = key_store
        self.files = CAFiles(settings.data_dir / "ca")
        self._authority: CertificateAuthority | None = None
        self._ocsp_key: ec.EllipticCurvePrivateKey | None = None

    def authority(self) -> CertificateAuthority:
        if self._authority is None:
            certificate = self.files.read(ISSUING_KEY)
            key = self._key_store().load(ISSUING_KEY)
            if key.public_key() != certificate.public_key():
                raise KeyStoreError("the issuing CA key in the key store does not match the issuing CA certificate")
            base = self._settings.public_url
            self._authority = CertificateAuthority(
                certificate=certificate,
                key=key,
                org=self._settings.org,
                crl_url=f"{base}/pki/crl" if base else "",
                ocsp_url=f"{base}/pki/ocsp" if base else "",
            )
        return self._authority

    def ocsp_signer(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
        store = self._key_store()
        if not self.files.path(OCSP_SIGNER_KEY).exists() or not store.exists(OCSP_SIGNER_KEY):
            return None
        if self._ocsp_key is None:
            self._ocsp_key = store.load(OCSP_SIGNER_KEY)
        certificate = self.files.read(OCSP_SIGNER_KEY)
        if certificate.public_key() != self._ocsp_key.public_key():
            return None  # a signer certificate for another key is useless: a new pair is made
        return certificate, self._ocsp_key

    def new_ocsp_signer_key(self) -> ec.EllipticCurvePrivateKey:
        store = self._key_store()
        if store.exists(OCSP_SIGNER_KEY):
            store.delete(OCSP_SIGNER_KEY)
        self._ocsp_key = store.generate(OCSP_SIGNER_KEY, KeyAlgorithm(self._settings.key_algorithm))
        return self._ocsp_key

    def store_ocsp_signer(self, certificate: x509.Certificate) -> None:
        self.files.write(OCSP_SIGNER_KEY, certificate)

    def root_key_present(self) -> bool:
        return self._key_store().exists(ROOT_KEY)


@dataclass(frozen=True, slots=True)
class CAInfo:
    root: x509.Certificate
    issuing: x509.Certificate
    root_key_present: bool
    key_store: str


class Hub:
    """Every service of one hub, built from one settings object."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        random: Random | None = None,
        group_commit: bool = False,
        key_store: KeyStore | None = None,
    ) -> None:
        if not settings.initialised:
            raise NotInitialisedError(
                f"{settings.data_dir} is not an initialised Warden data directory",
                hint="run 'warden init --org NAME --fleet-domain DOMAIN', or pass --data-dir",
            )
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.random: Random = random or SystemRandom()
        self.db = Database(settings.effective_database_url)
        self._passphrase_cache: bytes | None = None
        #: opened on first use unless given (init hands over the store it has just filled)
        self._store: KeyStore | None = key_store
        self.ca = HubCA(settings, self.key_store)
        self.checkpoint_key = CheckpointKey(
            settings.data_dir / "keys" / "audit-checkpoint.key.pem",
            settings.data_dir / "audit" / "checkpoint-public.pem",
            self.passphrase,
        )
        self.audit = AuditLog(
            clock=self.clock,
            key=self.checkpoint_key,
            mirror=CheckpointMirror(settings.data_dir / "audit" / "checkpoints.jsonl"),
            every=settings.audit_checkpoint_every,
        )
        self._committer: GroupCommitter | LoopCommitter | None = GroupCommitter(self.db) if group_commit else None
        self.devices = DeviceService(transactions=self.db.transaction, audit=self.audit, clock=self.clock)
        self.commands = CommandService(
            transactions=self.db.transaction, audit=self.audit, clock=self.clock, random=self.random
        )
        self.certificates = CertificateService(
            transactions=self.db.transaction,
            writer=self._write,
            audit=self.audit,
            ca=self.ca,
            policy=IssuancePolicy(
                fleet_domain=settings.fleet_domain,
                validity=_validity(settings),
                allow_same_key_renewal=settings.allow_same_key_renewal,
                crl_validity=dt.timedelta(hours=settings.crl_validity_hours),
                ocsp_validity=dt.timedelta(minutes=settings.ocsp_validity_minutes),
            ),
            clock=self.clock,
            random=self.random,
        )
        self._token_key: bytes | None = None
        self._broker: LocalBroker | None = None
        self._broker_lock = threading.Lock()
        self._provisioning: ProvisioningService | None = None
        self._tokens: TokenService | None = None
        self._ingest: IngestRecorder | None = None
        self.identities = HubIdentities(self)

    @property
    def provisioning(self) -> ProvisioningService:
        if self._provisioning is None:
            self._provisioning = ProvisioningService(
                transactions=self.db.transaction,
                certificates=self.certificates,
                audit=self.audit,
                clock=self.clock,
                random=self.random,
                token_key=self.token_key(),
                fleet_domain=self.settings.fleet_domain,
                chain=(self.ca.files.read(ISSUING_KEY), self.ca.files.read(ROOT_KEY)),
                token_validity=dt.timedelta(days=self.settings.enrollment_token_days),
                anonymous_audits_per_minute=self.settings.anonymous_audits_per_minute,
            )
        return self._provisioning

    @property
    def tokens(self) -> TokenService:
        if self._tokens is None:
            self._tokens = TokenService(
                transactions=self.db.transaction,
                audit=self.audit,
                clock=self.clock,
                random=self.random,
                key=self.token_key(),
            )
        return self._tokens

    def token_key(self) -> bytes:
        """The hub-wide key under which token secrets are stored as HMACs (made on first use, mode 0600)."""
        if self._token_key is None:
            self._token_key = self._secret_file(TOKEN_KEY_FILE, "the token key")
        return self._token_key

    def _secret_file(self, name: str, what: str) -> bytes:
        """256 random bits kept as hex in ``<data-dir>/name``: made on first use (mode 0600, created exclusively so
        two processes starting together agree), refused when others may read it."""
        path = self.settings.data_dir / name
        if not path.exists():
            with contextlib.suppress(FileExistsError):
                _create_exclusive(path, self.random.token_bytes(32).hex().encode("ascii") + b"\n")
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigurationError(f"{path} is readable by others", hint=f"run 'chmod 600 {path}'")
        text = read_limited(path, 256, what=what).strip()
        try:
            key = bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            key = b""
        if len(key) != 32:
            raise ConfigurationError(f"{path} does not hold a 256-bit hex key")
        return key

    # -- the embedded broker ----------------------------------------------------------------------------------

    def broker_admin_password(self) -> str:
        """The broker administrator's password (made on first use, mode 0600; only its hash reaches the broker)."""
        return self._secret_file(BROKER_ADMIN_FILE, "the broker admin password").hex()

    def broker_exceptions(self) -> dict[str, Access]:
        """Devices whose broker rights are not normal, from the registry: device states, then restrictions (a
        quarantined, disabled or decommissioned device keeps the rights of its state)."""
        exceptions = {
            device.id: access
            for state, access in _BROKER_ACCESS.items()
            for device in self.devices.list_devices(state=state)
        }
        for restriction in self.devices.list_restrictions():
            exceptions.setdefault(restriction.device_id, Access.RESTRICTED)
        return exceptions

    def local_broker(self) -> LocalBroker | None:
        """The embedded broker (None when ``broker`` is not ``local``). It is started by :meth:`start_broker`; any
        process of the hub may administer it."""
        if self.settings.broker != "local":
            return None
        with self._broker_lock:
            if self._broker is None:
                self._broker = self._new_broker()
            return self._broker

    def _new_broker(self) -> LocalBroker:
        return LocalBroker(
            BrokerLayout(self.settings.data_dir / BROKER_DIR),
            host=self.settings.broker_host,
            port=self.settings.broker_port,
            hub_client=f"hub.{self.settings.fleet_domain}",
            admin_password=self.broker_admin_password,
            exceptions=self.broker_exceptions,
            user=pwd.getpwuid(os.getuid()).pw_name,
        )

    def start_broker(self, *, actor: str = "hub") -> LocalBroker | None:
        """Start the embedded broker with a fresh certificate for ``broker.<fleet-domain>`` (its key, made here,
        is written unencrypted into the broker's 0700 directory: Mosquitto cannot be given a passphrase), the CA
        chain, the current CRL, and every device exception of the registry."""
        broker = self.local_broker()
        if broker is None:
            return None
        name = f"broker.{self.settings.fleet_domain}"
        key = ec.generate_private_key(ec.SECP256R1())
        issued = self.certificates.issue_service(names=(name,), csr=key_csr(key, name), actor=actor)
        issuing = self.ca.files.read(ISSUING_KEY).public_bytes(serialization.Encoding.PEM)
        broker.start(
            chain_pem=self.chain_pem(),
            certificate_pem=issued.pem + issuing,
            key_pem=key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            crl_pem=self._current_crl_pem(),
        )
        return broker

    def _current_crl_pem(self) -> bytes:
        crl = self.certificates.current_crl()
        if crl is None:
            self.certificates.publish_crl_if_due(actor="hub")
            crl = self.certificates.current_crl()
        assert crl is not None
        return _crl_pem(crl)

    def apply_device_access(self, device_id: str) -> bool:
        """Give the device the broker rights of its registry state now (containment takes effect at once; a
        device whose rights shrink is disconnected). False when no broker could be told: reconciliation repairs
        that within a jobs interval."""
        broker = self.local_broker()
        if broker is None or not broker.is_up():
            return False  # no broker runs: it gets the registry's exceptions when it starts
        try:
            with broker.changing():
                # Read under the broker's lock: of two changes racing, the one applied last is the newest state.
                state, restricted = self.devices.access_view(device_id)
                broker.set_access(device_id, _access(state, restricted))
        except Exception as e:  # the registry has changed already: never fail the caller for the broker
            log.warning("the broker could not be told about device %s: %s", device_id, _describe(e))
            return False
        return True

    def kick_device(self, device_id: str) -> bool:
        """Disconnect the device's broker session (after a revocation: its reconnect then fails the handshake)."""
        broker = self.local_broker()
        if broker is None or not broker.is_up():
            return False
        try:
            broker.kick(device_id)
        except Exception as e:
            log.warning("the broker could not disconnect device %s: %s", device_id, _describe(e))
            return False
        return True

    def after_revocation(self, record: CertificateRecord, *, actor: str) -> None:
        """Cut a revoked certificate off now: a new CRL (published, and reloaded by the broker), then the device's
        session is dropped, so its reconnect fails the handshake. The revocation has committed already: a failure
        here is logged (the leader publishes within a second, reconciliation follows), never raised."""
        try:
            self.crl_job(actor=actor)
        except Exception as e:
            log.warning("publishing the CRL after a revocation failed: %s", _describe(e))
        if record.device_id is not None:
            self.kick_device(record.device_id)

    def reconcile_broker(self, *, actor: str = "hub") -> list[str]:
        """Repair any drift between the broker and the registry; each repair is audited."""
        broker = self.local_broker()
        if broker is None:
            return []
        if not broker.is_up():
            log.error("the broker is not running: devices cannot connect (see %s)", broker.layout.log)
            return []
        repairs = broker.reconcile()
        if repairs:
            with self.db.transaction() as uow:
                self.audit.append(
                    uow, *(AuditEvent(actor, "broker.repair", "broker", details={"repair": r}) for r in repairs)
                )
        return repairs

    # -- ingest and restrictions --------------------------------------------------------------------------------

    def ingest_config(self) -> IngestConfig:
        return IngestConfig(max_devices=self.settings.ingest_max_devices)

    @property
    def ingest(self) -> IngestRecorder:
        """Reads (and, in the process that runs the ingest, writes) device activity and the ingest's totals."""
        if self._ingest is None:
            settings = self.settings
            self._ingest = IngestRecorder(
                transactions=self.db.transaction,
                config=self.ingest_config(),
                flood=FloodWatch(
                    default_rate=settings.ingest_flood_rate,
                    window=settings.ingest_flood_window_seconds,
                    max_devices=settings.ingest_max_devices,
                ),
            )
        return self._ingest

    def device_activity(self, device_id: str) -> DeviceActivity | None:
        return self.ingest.activity(device_id)

    def ingest_stats(self) -> IngestStats:
        return self.ingest.stats()

    def ingest_pipeline(self) -> IngestPipeline | None:
        """The ingest of ``warden serve`` (None when the hub link or the broker is off): the hub's one MQTT connection
        with its hub-client certificate, to the embedded broker, and the recorder behind it. Only the process that
        runs the broker runs it: a second connection with the same certificate would take the first one's session
        over."""
        settings = self.settings
        if not settings.hub_link or settings.broker != "local":
            return None
        cert = settings.data_dir / HUB_CLIENT_CERT_FILE
        key = settings.data_dir / HUB_CLIENT_KEY_FILE
        host = settings.broker_host
        # A listener on every address is reached on loopback.
        address = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104

        def tls() -> ssl.SSLContext:
            return client_tls_context(
                ca_pem=self.chain_pem(), cert_file=cert, key_file=key, key_password=self.identities.key_password()
            )

        def tls_version() -> object:
            try:
                return cert.stat().st_mtime_ns
            except OSError:
                return None

        return IngestPipeline(
            ingest=Ingest(self.ingest_config()),
            recorder=self.ingest,
            link=LinkOptions(
                address=(address, settings.broker_port),
                server_name=f"broker.{settings.fleet_domain}",
                client_id=f"hub.{settings.fleet_domain}",
                tls=tls,
                tls_version=tls_version,
                session_expiry=settings.ingest_session_expiry_seconds,
                tick_seconds=settings.ingest_flush_seconds,
            ),
            on_floods=self.restrict_for_flooding,
            on_reports=self.record_command_reports,
            now=self.clock.now,
        )

    def command_publisher(self, publish: Callable[[str, bytes], bool]) -> Callable[[DeviceCommand], bool]:
        """Signs a command with the current command-signing key and hands it to ``publish`` (the broker link)."""

        def send(command: DeviceCommand) -> bool:
            certificate, key = self.identities.command_signer()
            envelope = sign_command(
                key,
                certificate,
                Command(
                    id=command.id,
                    device=command.device_id,
                    counter=command.counter,
                    name=command.name,
                    issued=command.created_at,
                    args=command.args,
                ),
            )
            return publish(device_topic(command.device_id, "commands"), envelope)

        return send

    def record_command_reports(self, reports: Sequence[tuple[str, str, Mapping[str, Any]]]) -> int:
        """Close the commands agents reported on (their ``command.result`` / ``command.rejected`` events)."""
        results = []
        for device_id, kind, data in reports:
            command_id = data.get("id")
            status = "rejected" if kind == "command.rejected" else str(data.get("status", "failed"))
            detail = data.get("detail") if kind == "command.result" else data.get("reason")
            results.append(
                CommandResult(
                    device_id=device_id,
                    command_id=command_id if isinstance(command_id, str) else None,
                    counter=data.get("counter") if isinstance(data.get("counter"), int) else None,
                    status=status[:32],
                    detail=str(detail or "")[:256],
                )
            )
        return self.commands.record_results(results)

    def restrict_for_flooding(self, floods: Sequence[Flood], *, actor: str = "hub:ingest") -> int:
        """Restrict devices the ingest found above their flood limit (recorded, audited with the measured rate and
        the limit, and applied on the broker at once); how many were newly restricted."""
        now = self.clock.now()
        cooldown = self.settings.ingest_flood_cooldown_seconds
        until = now + dt.timedelta(seconds=cooldown) if cooldown else None
        restrictions = [
            Restriction(
                device_id=f.device_id,
                since=now,
                reason="flooding",
                actor=actor,
                until=until,
                details={"rate": f.rate, "limit": f.limit, "window_seconds": f.window, "messages": f.messages},
            )
            for f in floods
        ]
        made = self.devices.restrict(restrictions)
        for restriction in made:
            log.warning(
                "device %s restricted for flooding: %s messages/s over %s s, limit %s",
                restriction.device_id,
                restriction.details.get("rate"),
                restriction.details.get("window_seconds"),
                restriction.details.get("limit"),
            )
            self.apply_device_access(restriction.device_id)
        return len(made)

    def unrestrict_device(self, device_id: str, *, actor: str, reason: str = "") -> Restriction:
        """Lift the device's restriction (audited) and give it the broker rights of its state at once."""
        restriction = self.devices.unrestrict(device_id, actor=actor, reason=reason)
        self.apply_device_access(device_id)
        return restriction

    def lift_expired_restrictions(self, *, actor: str = "hub") -> list[str]:
        """Lift the restrictions whose cool-down is over (audited), and apply each on the broker."""
        lifted = self.devices.lift_expired_restrictions(actor=actor)
        for restriction in lifted:
            self.apply_device_access(restriction.device_id)
        return [f"{r.device_id} unrestricted (cool-down over)" for r in lifted]

    def run_jobs(self, *, actor: str = "hub") -> list[str]:
        """The hub's own upkeep, run by the worker that holds the leader lock: publish a CRL before the current one
        is half-way to its nextUpdate, renew the OCSP signer, service and hub-client certificates in the last
        third of their lives, and lift restrictions whose cool-down is over. Returns what was done."""
        done = self.crl_job(actor=actor)
        before = (
            self.ca.files.read(OCSP_SIGNER_KEY).serial_number if self.ca.files.path(OCSP_SIGNER_KEY).exists() else None
        )
        self.certificates.ensure_ocsp_responder(actor=actor)
        if self.ca.files.read(OCSP_SIGNER_KEY).serial_number != before:
            done.append("ocsp-signer")
        if self.identities.ensure_service(actor=actor):
            done.append("service")
        if self.identities.ensure_hub_client(actor=actor):
            done.append("hub-client")
        if self.identities.ensure_command_signer(actor=actor):
            done.append("command-signer")
        done += self.lift_expired_restrictions(actor=actor)
        return done

    def crl_job(self, *, actor: str = "hub") -> list[str]:
        """Publish a CRL when one is due (see :meth:`CertificateService.publish_crl_if_due`); the leader runs this
        every second, so a revocation made anywhere (CLI, API, another worker) is in the served CRL within about a
        second."""
        crl = self.certificates.publish_crl_if_due(actor=actor)
        if crl is None:
            return []
        broker = self.local_broker()
        if broker is not None and broker.reload(crl_pem=_crl_pem(crl)):
            return [f"crl {crl.number}", "broker reloaded"]
        return [f"crl {crl.number}"]

    @classmethod
    def open(
        cls,
        settings: Settings,
        *,
        clock: Clock | None = None,
        random: Random | None = None,
        group_commit: bool = False,
    ) -> Hub:
        """A hub on an initialised data directory whose database schema is current."""
        hub = cls(settings, clock=clock, random=random, group_commit=group_commit)
        try:
            hub.db.ensure_current()
        except BaseException:
            hub.close()
            raise
        return hub

    def close(self) -> None:
        if self._committer is not None:
            self._committer.close()
        self.db.dispose()
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, fn: Callable[[RegistryUnitOfWork, Sequence[ItemT]], Sequence[R]], item: ItemT) -> R:
        if self._committer is not None:
            return self._committer.run(fn, item)
        with self.db.transaction() as uow:
            return fn(uow, [item])[0]

    def commit_in(self, loop: asyncio.AbstractEventLoop) -> bool:
        """On SQLite, move group commit into ``loop`` (call it from the loop's thread): one thread runs the server's
        Python, with no GIL handed back and forth (see :class:`LoopCommitter`). On PostgreSQL every statement is a
        network round trip the loop must not wait for: the committer thread stays. True when it moved."""
        if not self.db.is_sqlite or not isinstance(self._committer, GroupCommitter):
            return False
        # The new committer takes over before the old one drains: a write arriving meanwhile finds one or the other.
        previous, self._committer = (
            self._committer,
            LoopCommitter(self.db, loop, linger=self.settings.commit_linger_ms / 1000),
        )
        previous.close()
        return True

    def submit_write(
        self,
        fn: Callable[[RegistryUnitOfWork, Sequence[ItemT]], Sequence[R]],
        item: ItemT,
        sink: CommitSink,
        token: object,
    ) -> bool:
        """Hand ``item`` to the group committer without waiting (``sink`` hears of it once its batch commits, see
        :meth:`GroupCommitter.submit`); False when this hub has no committer and the caller must write itself."""
        if self._committer is None:
            return False
        self._committer.submit(fn, item, sink, token)
        return True

    def passphrase(self) -> bytes | None:
        if self._passphrase_cache is None:
            self._passphrase_cache = read_passphrase(self.settings)
        return self._passphrase_cache

    def key_store(self) -> KeyStore:
        if self._store is None:
            self._store = open_key_store(self.settings, self.passphrase)
        return self._store

    # -- CA administration --------------------------------------------------------------------------------------

    def ca_info(self) -> CAInfo:
        return CAInfo(
            root=self.ca.files.read(ROOT_KEY),
            issuing=self.ca.files.read(ISSUING_KEY),
            root_key_present=self.ca.root_key_present(),
            key_store="file" if self.settings.key_store == "file" else "pkcs11",
        )

    def chain_pem(self) -> bytes:
        return self.ca.files.chain_pem()

    def export_root(self, out: Path, *, actor: str) -> None:
        """Write the root CA certificate and its key (encrypted with the hub passphrase) to ``out``, check the file
        reads back, then remove the root key from the hub. The hub goes on with the issuing CA alone."""
        store = self.key_store()
        if not isinstance(store, FileKeyStore):
            raise KeyStoreError(
                "the root key lives in a PKCS#11 token and cannot be exported",
                hint="take the token offline with your HSM's backup procedure",
            )
        if not store.exists(ROOT_KEY):
            raise KeyStoreError("the root key has already been exported and removed from this hub")
        if out.exists():
            raise AlreadyExistsError(f"{out} exists already", hint="choose a new file name")
        root = self.ca.files.read(ROOT_KEY)
        key = store.load(ROOT_KEY)
        bundle = root.public_bytes(serialization.Encoding.PEM) + store.encrypt(key)
        write_private_file(out, bundle)
        passphrase = self.passphrase()
        assert passphrase is not None
        reread = load_encrypted_key(
            read_limited(out, DEFAULT_LIMITS.max_pem_file_bytes, what="the export"),
            passphrase,
            what="the exported root key",
        )
        if reread.public_key() != root.public_key():
            out.unlink()
            raise KeyStoreError("the exported root key did not read back correctly; nothing was removed")
        with self.db.transaction() as uow:
            self.audit.append(
                uow,
                AuditEvent(actor, "ca.export-root", "ca:root", details={"file": out.name, "key_removed": True}),
            )
            store.delete(ROOT_KEY)


def _create_exclusive(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class HubIdentities:
    """The hub's own TLS identities, issued by its CA and renewed in the last third of their lives: the ``service``
    certificate of ``warden serve`` (``hub.<fleet-domain>`` plus configured names) and the ``hub-client``
    certificate the hub presents to the broker. Keys are made fresh for every certificate and written 0600,
    encrypted with the hub passphrase when there is one."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._signer: tuple[tuple[int, int], x509.Certificate, ec.EllipticCurvePrivateKey] | None = None

    @property
    def operator_provided(self) -> bool:
        return self._hub.settings.service_cert_file is not None

    def service_paths(self) -> tuple[Path, Path]:
        settings = self._hub.settings
        if settings.service_cert_file is not None:
            if settings.service_key_file is None:
                raise ConfigurationError("service_cert_file is set but service_key_file is not")
            return settings.service_cert_file, settings.service_key_file
        return settings.data_dir / SERVICE_CERT_FILE, settings.data_dir / SERVICE_KEY_FILE

    def key_password(self) -> bytes | None:
        """The password of the hub's own TLS keys (None when they are stored unencrypted, with a PKCS#11 CA)."""
        if self._hub.settings.key_store != "file":
            return None
        return self._hub.passphrase()

    def ensure_service(self, *, actor: str) -> bool:
        """Issue or renew the service certificate when needed; True when a new one was written."""
        if self.operator_provided:
            return False
        cert_path, key_path = self.service_paths()
        names = self._hub.settings.service_names
        return self._ensure(cert_path, key_path, names, Profile.SERVICE, actor)

    def ensure_hub_client(self, *, actor: str) -> bool:
        settings = self._hub.settings
        return self._ensure(
            settings.data_dir / HUB_CLIENT_CERT_FILE,
            settings.data_dir / HUB_CLIENT_KEY_FILE,
            (f"hub.{settings.fleet_domain}",),
            Profile.HUB_CLIENT,
            actor,
        )

    def ensure_command_signer(self, *, actor: str) -> bool:
        """Issue or rotate (fresh key, in the last third of its life) the command-signing certificate."""
        settings = self._hub.settings
        return self._ensure(
            settings.data_dir / COMMAND_SIGNER_CERT_FILE,
            settings.data_dir / COMMAND_SIGNER_KEY_FILE,
            (f"commands.{settings.fleet_domain}",),
            Profile.COMMAND_SIGNER,
            actor,
        )

    def command_signer(self, *, _repair: bool = True) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """The current command-signing certificate and key (issued on first use)."""
        settings = self._hub.settings
        cert_path, key_path = settings.data_dir / COMMAND_SIGNER_CERT_FILE, settings.data_dir / COMMAND_SIGNER_KEY_FILE
        if not cert_path.exists() or not key_path.exists():
            self.ensure_command_signer(actor="hub")
        version = (cert_path.stat().st_mtime_ns, key_path.stat().st_mtime_ns)
        cached = self._signer
        if cached is not None and cached[0] == version:
            return cached[1], cached[2]
        certificate = x509.load_pem_x509_certificates(read_limited(cert_path, 256 * 1024, what=str(cert_path)))[0]
        key = serialization.load_pem_private_key(
            read_limited(key_path, 64 * 1024, what=str(key_path)), password=self.key_password()
        )
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError(f"{key_path} does not hold an EC key")
        unusable = (
            key.public_key() != certificate.public_key() or certificate.not_valid_after_utc <= self._hub.clock.now()
        )
        if unusable and _repair:
            # Read in the middle of a rotation by another process (the key is written first), or left to expire
            # because no leader ran the jobs: make a new pair rather than sign what every agent would refuse.
            self.ensure_command_signer(actor="hub")
            return self.command_signer(_repair=False)
        if unusable:
            raise ConfigurationError("the command-signing certificate and key do not match or have expired")
        self._signer = (version, certificate, key)
        return certificate, key

    def _key_matches(self, key_path: Path, certificate: x509.Certificate) -> bool:
        """Whether the key file holds the certificate's key: a crash between writing the two (the key goes first)
        leaves a new key beside the old certificate, which no TLS listener could load; a new pair is made then."""
        try:
            key = serialization.load_pem_private_key(
                read_limited(key_path, 64 * 1024, what=str(key_path)), password=self.key_password()
            )
        except (ValueError, TypeError):
            return False
        return key.public_key() == certificate.public_key()

    def _ensure(self, cert_path: Path, key_path: Path, names: tuple[str, ...], profile: Profile, actor: str) -> bool:
        now = self._hub.clock.now()
        if cert_path.exists() and key_path.exists():
            current = x509.load_pem_x509_certificates(read_limited(cert_path, 256 * 1024, what=str(cert_path)))[0]
            lifetime = current.not_valid_after_utc - current.not_valid_before_utc
            try:
                san = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                current_names = tuple(san.get_values_for_type(x509.DNSName))
            except x509.ExtensionNotFound:
                current_names = ()
            if (
                now < current.not_valid_after_utc - lifetime / 3
                and current_names == names
                and self._key_matches(key_path, current)
            ):
                return False
        key = ec.generate_private_key(ec.SECP256R1())
        csr = key_csr(key, names[0])
        issued = self._hub.certificates.issue_service(names=names, csr=csr, actor=actor, profile=profile)
        password = self.key_password()
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        )
        write_private_file(
            key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        )
        write_file_atomic(
            cert_path, issued.pem + self._hub.ca.files.read(ISSUING_KEY).public_bytes(serialization.Encoding.PEM)
        )
        return True


def _validity(settings: Settings) -> dict[Profile, dt.timedelta]:
    validity = {p: dt.timedelta(days=getattr(settings, _VALIDITY[p])) for p in Profile}
    if settings.device_validity_minutes is not None:
        for profile in (Profile.DEVICE, Profile.GATEWAY):
            validity[profile] = dt.timedelta(minutes=settings.device_validity_minutes)
    return validity


_VALIDITY = {
    Profile.DEVICE: "device_validity_days",
    Profile.GATEWAY: "gateway_validity_days",
    Profile.SERVICE: "service_validity_days",
    Profile.HUB_CLIENT: "hub_client_validity_days",
    Profile.OCSP_SIGNER: "ocsp_signer_validity_days",
    Profile.COMMAND_SIGNER: "command_signer_validity_days",
}


@dataclass(frozen=True, slots=True)
class InitResult:
    settings: Settings
    passphrase_file: Path | None
    root: x509.Certificate
    issuing: x509.Certificate


def initialise(
    data_dir: Path,
    *,
    org: str,
    fleet_domain: str,
    key_store: str = "file",
    key_algorithm: str = "P-256",
    public_url: str = "",
    actor: str,
    clock: Clock | None = None,
    random: Random | None = None,
) -> InitResult:
    """Create a Warden data directory: settings, database, CA hierarchy, audit key, OCSP signer.

    On any failure everything this call created is removed again (files, and keys it generated in a token)."""
    clock = clock or SystemClock()
    random = random or SystemRandom()
    if not org or len(org) > 64 or not org.isprintable():
        raise InvalidInputError("the organisation name must be 1-64 printable characters")
    fleet_domain = validate_fleet_domain(fleet_domain)
    try:
        algorithm = KeyAlgorithm(key_algorithm)
    except ValueError:
        raise InvalidInputError(f"unknown key algorithm {key_algorithm!r}", hint="use P-256 or P-384") from None
    persisted_store = _persistable_key_store(key_store)
    existing = load_settings(data_dir)
    if existing.initialised:
        raise AlreadyExistsError(f"{data_dir} is initialised already", hint="use another --data-dir")
    overrides: dict[str, str] = {
        "org": org,
        "fleet_domain": fleet_domain,
        "key_store": key_store,
        "key_algorithm": algorithm.value,
    }
    if public_url:
        if not public_url.startswith(("https://", "http://")) or len(public_url) > 512 or not public_url.isprintable():
            raise InvalidInputError("--public-url must be an http(s) URL", hint="e.g. https://hub.fleet.example.com")
        overrides["public_url"] = public_url.rstrip("/")
    # What init is told explicitly wins over WARDEN_* variables (which otherwise rank first): it is what gets
    # pinned in the settings file, so it must also be what this init uses.
    settings = load_settings(data_dir).model_copy(update=overrides)
    with _undo_on_failure(data_dir) as undo:
        for sub in ("", "keys", "ca", "audit"):
            (data_dir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        passphrase_file: Path | None = None
        if settings.ca_passphrase is None and not _passphrase_path(settings).exists():
            passphrase_file = _passphrase_path(settings)
            write_private_file(passphrase_file, secrets.token_urlsafe(32).encode("ascii") + b"\n")
        db = Database(settings.effective_database_url)
        try:
            if db.revision() is not None:
                raise AlreadyExistsError(
                    "the database already holds a Warden schema", hint="use a fresh database for a new hub"
                )
            db.migrate()
        finally:
            db.dispose()
        # On SQLite the file goes with the data directory; on a server database the schema is removed again.
        undo.append(lambda: _drop_schema(settings.effective_database_url))
        store = open_key_store(settings, lambda: read_passphrase(settings))
        undo.append(store.close)
        existing_keys = [label for label in (ROOT_KEY, ISSUING_KEY, OCSP_SIGNER_KEY) if store.exists(label)]
        if existing_keys:
            # Checked before any undo is registered: a refused init must never delete keys it did not make.
            raise KeyStoreError(
                f"the key store already holds a key named {existing_keys[0]!r}",
                hint="use a fresh data directory or token, or remove the old hub's keys first",
            )
        undo.append(lambda: _delete_keys(store))
        now = clock.now()
        hierarchy = create_hierarchy(
            store=store,
            algorithm=algorithm,
            org=org,
            now=now,
            root_serial_bytes=random.token_bytes(16),
            issuing_serial_bytes=random.token_bytes(16),
            root_days=settings.root_validity_days,
            issuing_days=settings.issuing_validity_days,
        )
        files = CAFiles(data_dir / "ca")
        files.write_hierarchy(hierarchy)
        values: dict[str, object] = {"org": org, "fleet_domain": fleet_domain, "key_store": persisted_store}
        if algorithm is not KeyAlgorithm.P256:
            values["key_algorithm"] = algorithm.value
        # Settings that shape what is issued or where state lives are pinned in the settings file, so that later
        # commands do not depend on the environment they happen to run in.
        for name in ("database_url", "public_url"):
            if getattr(settings, name):
                values[name] = getattr(settings, name)
        with Hub(settings, clock=clock, random=random, key_store=store) as hub:
            hub.checkpoint_key.create()
            with hub.db.transaction() as uow:
                hub.audit.append(
                    uow,
                    AuditEvent(
                        actor,
                        "ca.init",
                        "ca:root",
                        details={
                            "org": org,
                            "fleet_domain": fleet_domain,
                            "key_store": store.kind,
                            "algorithm": algorithm.value,
                            "root_serial": f"{hierarchy.root.serial_number:X}",
                            "issuing_serial": f"{hierarchy.issuing.serial_number:X}",
                        },
                    ),
                )
            # The delegated OCSP responder is issued now, through the normal path, so it is recorded and audited.
            hub.certificates.ensure_ocsp_responder(actor=actor)
        write_settings_file(settings.settings_path, values)
    return InitResult(
        settings=load_settings(data_dir),
        passphrase_file=passphrase_file,
        root=hierarchy.root,
        issuing=hierarchy.issuing,
    )


def _persistable_key_store(key_store: str) -> str:
    """The key store spec as it may be written to the settings file: never with a PIN in it."""
    if key_store == "file":
        return key_store
    if not key_store.startswith("pkcs11:"):
        raise InvalidInputError(
            f"unknown key store {key_store[:40]!r}", hint="use 'file' or a 'pkcs11:' URI (RFC 7512)"
        )
    from warden.pki import parse_pkcs11_uri

    uri = parse_pkcs11_uri(key_store)
    return uri.without_pin()


def _drop_schema(url: str) -> None:
    db = Database(url)
    try:
        db.drop_schema()
    finally:
        db.dispose()


def _delete_keys(store: KeyStore) -> None:
    for label in (ROOT_KEY, ISSUING_KEY, OCSP_SIGNER_KEY):
        with contextlib.suppress(KeyStoreError):
            if store.exists(label):
                store.delete(label)


@contextlib.contextmanager
def _undo_on_failure(data_dir: Path) -> Iterator[list[Callable[[], None]]]:
    created_dir = not data_dir.exists()
    before = set(data_dir.rglob("*")) if not created_dir else set()
    undo: list[Callable[[], None]] = []
    try:
        yield undo
    except BaseException:
        for action in reversed(undo):
            with contextlib.suppress(Exception):
                action()
        if created_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            for path in sorted(set(data_dir.rglob("*")) - before, reverse=True):
                with contextlib.suppress(OSError):
                    path.rmdir() if path.is_dir() else path.unlink()
        raise


def migrate_database(settings: Settings) -> str | None:
    """``warden db upgrade``: bring the schema to this version's newest revision."""
    db = Database(settings.effective_database_url)
    try:
        db.migrate()
        return db.revision()
    finally:
        db.dispose()


def _access(state: DeviceState, restricted: bool) -> Access:
    """A device's broker rights: those of its state when it is quarantined, disabled or decommissioned, else
    restricted or normal."""
    access = _BROKER_ACCESS.get(state)
    if access is not None:
        return access
    return Access.RESTRICTED if restricted else Access.NORMAL


def _describe(error: BaseException) -> str:
    return error.message if isinstance(error, WardenError) else type(error).__name__


def _crl_pem(crl: PublishedCrl) -> bytes:
    """The broker reads its CRL as PEM; the hub keeps and serves it as DER."""
    return x509.load_der_x509_crl(crl.der).public_bytes(serialization.Encoding.PEM)


class CommandDispatcher(threading.Thread):
    """Publishes the commands waiting in the outbox over the hub's broker link, a few times a second, in the one
    process that holds the link (any worker or the CLI may have recorded them)."""

    def __init__(self, hub: Hub, link: HubLink, *, interval: float = 0.2) -> None:
        super().__init__(name="warden-commands", daemon=True)
        self._hub = hub
        self._link = link
        self._interval = interval
        self._halt = threading.Event()  # not _stop: threading.Thread has a method of that name
        self._failures = 0

    def _publish(self, topic: str, payload: bytes) -> bool:
        """True once the broker acknowledged the command (it then holds it for the device's persistent session);
        a command not acknowledged stays pending and goes out again (the agent ignores a counter it has seen)."""
        if not self._link.connected:
            return False
        return self._link.publish(topic, payload, qos=1).wait(5.0)

    def run(self) -> None:
        send = self._hub.command_publisher(self._publish)
        while not self._halt.wait(self._interval):
            if not self._link.connected:
                continue
            try:
                self._hub.commands.dispatch(send)
                self._failures = 0
            except Exception:
                self._failures += 1
                if self._failures == 1 or self._failures % 100 == 0:
                    log.exception("dispatching commands failed (%d in a row)", self._failures)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
