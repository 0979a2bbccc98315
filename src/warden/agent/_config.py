"""The agent's configuration: one TOML file (``agent.toml``), validated before anything starts.

```toml
state_dir = "/var/lib/warden-agent"   # operational key and certificate, queue, status, command counter
# device_id = "sensor-0001"           # default: the onboarding certificate's CN; required with a token

[hub]
url = "https://hub.fleet.example:8443"  # EST base; the host name is what the hub's certificate must name
ca = "/etc/warden/hub-root.pem"         # the hub's root, pinned: nothing else is trusted
# address = "10.0.0.5"                  # connect here instead of resolving the name (the name is still verified)

[broker]
host = "broker.fleet.example"
port = 8883
# address = "10.0.0.5"

[keystore]
kind = "file"                            # or "pkcs11"
# module = "/usr/lib/softhsm/libsofthsm2.so"
# token = "warden-device"
# pin_file = "/etc/warden/token.pin"

[onboarding]
certificate = "/etc/warden/idevid.pem"   # the IDevID, with
key = "/etc/warden/idevid.key"           # its key file (kind = "file") or
# key_label = "idevid"                   # its label in the token (kind = "pkcs11")
# token_file = "/etc/warden/enroll.token"  # or a one-time enrollment token instead of a certificate
```
"""

from __future__ import annotations

import tomllib
import urllib.parse
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from warden.core import ConfigurationError, InvalidInputError, validate_device_id

__all__ = ["AgentConfig", "BrokerConfig", "HubConfig", "KeystoreConfig", "OnboardingConfig", "load_config"]

MAX_CONFIG_BYTES = 64 * 1024


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubConfig(_Section):
    url: Annotated[str, Field(max_length=512)]
    ca: Path
    address: str | None = None
    timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 30.0

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urllib.parse.urlsplit(self.url).port or 443

    @property
    def path_prefix(self) -> str:
        return urllib.parse.urlsplit(self.url).path.rstrip("/")

    @model_validator(mode="after")
    def _https(self) -> HubConfig:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError("hub.url must be an https:// URL with a host name")
        try:
            parts.port  # noqa: B018 (raises for a port that is not a number from 0 to 65535)
        except ValueError:
            raise ValueError("hub.url has an invalid port") from None
        return self


class BrokerConfig(_Section):
    host: Annotated[str, Field(min_length=1, max_length=253)]
    port: Annotated[int, Field(gt=0, lt=65536)] = 8883
    address: str | None = None
    keepalive_seconds: Annotated[int, Field(ge=5, le=3600)] = 30
    #: how long the broker keeps the session (and its QoS 1 messages to the device) while the agent is away
    session_expiry_seconds: Annotated[int, Field(ge=0, le=7 * 86400)] = 86400


class KeystoreConfig(_Section):
    kind: Literal["file", "pkcs11"] = "file"
    module: Path | None = None
    token: str | None = None
    pin_file: Path | None = None

    @model_validator(mode="after")
    def _pkcs11_needs(self) -> KeystoreConfig:
        if self.kind == "pkcs11" and (self.module is None or self.token is None or self.pin_file is None):
            raise ValueError("keystore kind 'pkcs11' needs module, token and pin_file")
        return self


class OnboardingConfig(_Section):
    certificate: Path | None = None
    key: Path | None = None
    key_label: str | None = None
    token_file: Path | None = None

    @model_validator(mode="after")
    def _one_way(self) -> OnboardingConfig:
        if (self.certificate is None) == (self.token_file is None):
            raise ValueError("onboarding needs either certificate (with key or key_label) or token_file")
        if self.certificate is not None and (self.key is None) == (self.key_label is None):
            raise ValueError("an onboarding certificate needs exactly one of key (a file) or key_label (in the token)")
        return self


class AgentConfig(_Section):
    state_dir: Path
    device_id: str | None = None
    hub: HubConfig
    broker: BrokerConfig
    keystore: KeystoreConfig = KeystoreConfig()
    onboarding: OnboardingConfig
    #: seconds between telemetry messages
    telemetry_interval_seconds: Annotated[float, Field(gt=0, le=86400)] = 30.0
    #: seconds between health reports (also sent at start)
    health_interval_seconds: Annotated[float, Field(gt=0, le=86400)] = 300.0
    #: messages kept while the broker is unreachable; the oldest telemetry is dropped first when full
    queue_limit: Annotated[int, Field(ge=10, le=1_000_000)] = 10_000
    #: "file": the queue survives an agent restart (SQLite in state_dir); "memory": only a broker outage
    queue: Literal["file", "memory"] = "file"
    #: renewal at this fraction of the certificate's lifetime (plus up to jitter_fraction of it at random)
    renew_at: Annotated[float, Field(gt=0.1, lt=0.95)] = 2 / 3
    jitter_fraction: Annotated[float, Field(ge=0, le=0.2)] = 0.05
    #: the clock difference to the hub above which the agent reports a skew
    max_clock_skew_seconds: Annotated[float, Field(gt=0)] = 60.0

    @model_validator(mode="after")
    def _coherent(self) -> AgentConfig:
        if self.device_id is not None:
            try:
                validate_device_id(self.device_id)
            except InvalidInputError as e:
                raise ValueError(e.message) from None
        elif self.onboarding.token_file is not None:
            raise ValueError("device_id is required when onboarding with an enrollment token")
        if self.onboarding.key_label is not None and self.keystore.kind != "pkcs11":
            raise ValueError("onboarding.key_label needs keystore kind 'pkcs11'")
        if self.onboarding.key is not None and self.keystore.kind != "file":
            raise ValueError("onboarding.key (a file) needs keystore kind 'file'; in a token use key_label")
        return self


def load_config(path: Path) -> AgentConfig:
    """Read and validate ``agent.toml``; relative paths in it are relative to the file's directory."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigurationError(f"cannot read the agent configuration {path}: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigurationError(f"the agent configuration {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"the agent configuration {path} is not valid TOML: {e}") from None
    _resolve_paths(data, path.parent.resolve())
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "configuration"
        raise ConfigurationError(
            f"invalid agent configuration {path}: {where}: {first.get('msg', 'invalid')}",
            hint=f"{e.error_count()} problem(s) in all" if e.error_count() > 1 else None,
        ) from None


_PATH_KEYS = {
    (): ("state_dir",),
    ("hub",): ("ca",),
    ("keystore",): ("module", "pin_file"),
    ("onboarding",): ("certificate", "key", "token_file"),
}


def _resolve_paths(data: dict[str, object], base: Path) -> None:
    for section, keys in _PATH_KEYS.items():
        table: object = data
        for name in section:
            table = table.get(name) if isinstance(table, dict) else None
        if not isinstance(table, dict):
            continue
        for key in keys:
            value = table.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                table[key] = str(base / value)
