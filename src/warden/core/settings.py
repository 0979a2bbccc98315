"""Settings: one pydantic-settings object, built once by the shell and injected everywhere.

Precedence, highest first: ``WARDEN_*`` environment variables, then the settings file ``<data-dir>/warden.toml``
(written by ``warden init``), then defaults. The data directory itself comes from ``--data-dir``, else
``WARDEN_DATA_DIR``, else ``./warden-data``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from warden.core.errors import ConfigurationError, InvalidInputError
from warden.core.files import write_private_file
from warden.core.ids import validate_fleet_domain
from warden.core.limits import DEFAULT_LIMITS

__all__ = ["SETTINGS_FILE", "Settings", "load_settings", "resolve_data_dir", "write_settings_file"]

SETTINGS_FILE = "warden.toml"
DEFAULT_DATA_DIR = "warden-data"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WARDEN_", extra="forbid", frozen=True)

    data_dir: Path
    #: SQLAlchemy URL; empty means the embedded SQLite file ``<data-dir>/warden.db``
    database_url: str = ""
    org: str = ""
    fleet_domain: str = ""
    #: ``file`` or an RFC 7512 ``pkcs11:`` URI
    key_store: str = "file"
    key_algorithm: Literal["P-256", "P-384"] = "P-256"
    #: the passphrase protecting the CA and audit keys on disk (never logged, never passed to children)
    ca_passphrase: SecretStr | None = None
    ca_passphrase_file: Path | None = None
    pkcs11_pin: SecretStr | None = None

    root_validity_days: int = Field(default=7300, ge=365, le=36500)
    issuing_validity_days: int = Field(default=1825, ge=30, le=36500)
    device_validity_days: int = Field(default=30, ge=1, le=825)
    gateway_validity_days: int = Field(default=30, ge=1, le=825)
    #: when set, device and gateway certificates live this many minutes instead (short-lived identities; tests)
    device_validity_minutes: int | None = Field(default=None, ge=2, le=825 * 1440)
    service_validity_days: int = Field(default=90, ge=1, le=398)
    hub_client_validity_days: int = Field(default=30, ge=1, le=398)
    #: the command-signing certificate (rotated with a fresh key in the last third of its life)
    command_signer_validity_days: int = Field(default=30, ge=1, le=398)
    ocsp_signer_validity_days: int = Field(default=30, ge=1, le=365)
    crl_validity_hours: int = Field(default=168, ge=1, le=24 * 90)
    ocsp_validity_minutes: int = Field(default=60, ge=1, le=7 * 24 * 60)
    #: renewal with the same key as the current certificate (re-key is the default)
    allow_same_key_renewal: bool = False
    #: base URL under which the hub publishes ``/pki/crl`` and ``/pki/ocsp``; empty: no CDP/AIA in certificates
    public_url: str = ""
    audit_checkpoint_every: int = Field(default=1000, ge=1, le=1_000_000)

    # -- the hub server (warden serve) --
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=8443, ge=1, le=65535)
    #: extra DNS names for the hub's service certificate besides ``hub.<fleet-domain>``, comma-separated
    hub_names: str = ""
    #: an operator-provided TLS certificate chain (PEM) and key for the hub; empty: Warden issues its own
    service_cert_file: Path | None = None
    service_key_file: Path | None = None
    #: hub processes; more than one needs PostgreSQL
    workers: int = Field(default=1, ge=1, le=64)
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: EST rate limits: requests per second (and burst) per source address and per client identity
    enroll_rate_per_address: float = Field(default=20.0, gt=0, le=100_000)
    enroll_burst_per_address: int = Field(default=40, ge=1, le=1_000_000)
    enroll_rate_per_client: float = Field(default=1.0, gt=0, le=100_000)
    enroll_burst_per_client: int = Field(default=5, ge=1, le=1_000_000)
    #: at most this many addresses and identities are tracked per limiter (memory stays bounded)
    rate_limit_max_keys: int = Field(default=100_000, ge=100, le=10_000_000)
    #: audit records a minute per source address for refusals of unauthenticated EST clients (the rest are counted)
    anonymous_audits_per_minute: int = Field(default=10, ge=0, le=1_000_000)
    #: default lifetime of a one-time enrollment token
    enrollment_token_days: int = Field(default=7, ge=1, le=365)
    #: how often background jobs (CRL, certificate renewal, trust store) run
    jobs_interval_seconds: float = Field(default=30.0, ge=0.5, le=3600)
    #: the MQTT broker: "local" (warden serve starts and supervises a Mosquitto) or "off"
    broker: Literal["local", "off"] = "local"
    #: the local broker's mutual-TLS listener (devices and the hub's data connection)
    broker_host: str = "127.0.0.1"
    broker_port: int = Field(default=8883, ge=1, le=65535)
    #: under a stream of writes, how long the server's group commit on SQLite (in its event loop) keeps a batch open
    #: for more (each commit costs an fsync whatever it holds); 0 commits every batch at once
    commit_linger_ms: float = Field(default=6.0, ge=0, le=100)

    # -- ingest: what devices publish, read by warden serve through its broker (docs/ingest.md) --
    #: whether warden serve connects to its broker with the hub-client certificate: the ingest of what devices
    #: publish and the hub's messages to devices go over that one connection. Off frees the certificate's one
    #: session for another client (diagnostics), at the cost of both.
    hub_link: bool = True
    #: how often the aggregates of device messages are written, in one transaction each time
    ingest_flush_seconds: float = Field(default=1.0, ge=0.05, le=60)
    #: the flood limit: a device that publishes more than this many messages per second, averaged over the window,
    #: is restricted (health and updates only); an enrollment group can set its own limit
    ingest_flood_rate: float = Field(default=50.0, gt=0, le=1_000_000)
    ingest_flood_window_seconds: float = Field(default=10.0, ge=1, le=3600)
    #: how long a restriction for flooding lasts before the hub lifts it; 0: until an operator lifts it
    ingest_flood_cooldown_seconds: int = Field(default=900, ge=0, le=30 * 24 * 3600)
    #: devices whose sequence numbers and message rates the ingest tracks at once (memory stays bounded)
    ingest_max_devices: int = Field(default=1_000_000, ge=100, le=100_000_000)
    #: how long the broker keeps the hub's session (its subscriptions and up to max_queued_messages messages) while
    #: the hub is away
    ingest_session_expiry_seconds: int = Field(default=300, ge=0, le=7 * 24 * 3600)

    @field_validator("fleet_domain")
    @classmethod
    def _fleet_domain(cls, value: str) -> str:
        try:
            return validate_fleet_domain(value) if value else value
        except InvalidInputError as e:  # pydantic turns ValueError, and only that, into a validation error
            raise ValueError(e.message) from None

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        if value and not value.startswith(("https://", "http://")):
            raise ValueError("public_url must start with https:// or http://")
        return value.rstrip("/")

    @field_validator("hub_names")
    @classmethod
    def _hub_names(cls, value: str) -> str:
        names = [n.strip().lower() for n in value.split(",") if n.strip()]
        return ",".join(names)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first: the settings file's values arrive as init arguments and rank below it.
        return (_EnvWithoutDataDir(settings_cls), init_settings)

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'warden.db'}"

    @property
    def service_names(self) -> tuple[str, ...]:
        """The DNS names of the hub's own service certificate: ``hub.<fleet-domain>`` first."""
        extra = [n for n in self.hub_names.split(",") if n]
        return tuple(dict.fromkeys([f"hub.{self.fleet_domain}", *extra]))

    @property
    def settings_path(self) -> Path:
        return self.data_dir / SETTINGS_FILE

    @property
    def initialised(self) -> bool:
        return bool(self.org and self.fleet_domain)


class _EnvWithoutDataDir(EnvSettingsSource):
    """The data directory is resolved before the settings (it locates the settings file), never from here."""

    def __call__(self) -> dict[str, Any]:
        values = super().__call__()
        values.pop("data_dir", None)
        return values


def resolve_data_dir(cli_value: Path | None, environ: Mapping[str, str]) -> Path:
    if cli_value is not None:
        return cli_value.expanduser().absolute()
    env = environ.get("WARDEN_DATA_DIR")
    return Path(env or DEFAULT_DATA_DIR).expanduser().absolute()


def _read_settings_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = f.read(DEFAULT_LIMITS.max_settings_bytes + 1)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigurationError(f"cannot read settings file {path}: {e.strerror}") from e
    if len(raw) > DEFAULT_LIMITS.max_settings_bytes:
        raise ConfigurationError(f"settings file {path} is larger than {DEFAULT_LIMITS.max_settings_bytes} bytes")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"settings file {path} is not valid TOML: {e}") from e


def load_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Build the settings for ``data_dir`` from its settings file, the environment and ``overrides``."""
    values = _read_settings_file(data_dir / SETTINGS_FILE)
    values.pop("data_dir", None)
    values.update(overrides)
    try:
        return Settings(data_dir=data_dir, **values)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigurationError(
            f"invalid setting {where}: {first['msg']}",
            hint=f"check WARDEN_{where.upper()} and {data_dir / SETTINGS_FILE}",
        ) from None


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_settings_file(path: Path, values: Mapping[str, object]) -> None:
    """Write a flat TOML settings file atomically (tmp + fsync + rename)."""
    lines = ["# Warden settings. WARDEN_* environment variables override these.\n"]
    lines += [f"{key} = {_toml_value(value)}\n" for key, value in values.items()]
    # 0600: the database URL may carry a password.
    write_private_file(path, "".join(lines).encode("utf-8"))
