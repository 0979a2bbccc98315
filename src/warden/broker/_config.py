"""The Mosquitto configuration the hub renders for the broker it supervises.

Every value is checked before it is written: a newline in a path would let whoever chose the path add a line of
their own to the broker's configuration."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from warden.core import TLS12_CIPHERS, TLS13_CIPHERSUITES, InvalidInputError

__all__ = ["MosquittoConfig", "render_config"]

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
#: a unix socket's path must fit in sockaddr_un (108 bytes with the terminating NUL)
_MAX_SOCKET_PATH = 107


@dataclass(frozen=True, slots=True)
class MosquittoConfig:
    """What the rendered configuration points at. Paths are absolute."""

    #: the device listener (mutual TLS)
    host: str
    port: int
    #: the hub's CA chain (the only issuer the listener trusts), the broker's certificate and key, the hub's CRL
    cafile: Path
    certfile: Path
    keyfile: Path
    crlfile: Path
    acl_file: Path
    dynsec_file: Path
    dynsec_plugin: Path
    #: the administration listener: a unix socket, reachable only through its directory's permissions
    admin_socket: Path
    persistence_dir: Path
    #: the account Mosquitto runs as (it drops to it when started as root)
    user: str
    #: per-client limits: the largest message; QoS 1/2 messages queued for a client (beyond those in flight: for a
    #: persistent session while it is offline, and for the hub's link while it is behind), in number and in bytes;
    #: and the bytes of QoS 1/2 messages in flight to one client. The queue is long enough for the hub's link to
    #: absorb a pause of about a second at 20,000 messages/s (docs/adr/0007-ingest.md); the byte limits bound what
    #: devices sending large messages could make the broker hold for it.
    max_packet_size: int = 256 * 1024
    max_queued_messages: int = 20_000
    max_queued_bytes: int = 64 * 1024 * 1024
    max_inflight_bytes: int = 16 * 1024 * 1024


def _path(value: Path, what: str) -> str:
    text = str(value)
    if not value.is_absolute():
        raise InvalidInputError(f"the broker's {what} must be an absolute path: {text[:200]!r}")
    if any(ch in text for ch in "\r\n\0") or text != text.strip():
        raise InvalidInputError(f"the broker's {what} path holds a line break, NUL or surrounding space")
    return text


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def render_config(config: MosquittoConfig) -> str:
    """``mosquitto.conf`` for ``config``: one mutual-TLS listener for devices and the hub, one unix-socket listener
    for administration, the ACL file for base rights and the dynamic security plugin for exceptions."""
    if not _is_ip(config.host) and not _HOST.fullmatch(config.host):
        raise InvalidInputError(f"invalid broker listen host {config.host[:100]!r}", hint="an IP address or host name")
    if not isinstance(config.port, int) or not 0 < config.port < 65536:
        raise InvalidInputError(f"invalid broker port {config.port!r}")
    if not _USER.fullmatch(config.user):
        raise InvalidInputError(f"invalid account name for the broker {config.user[:40]!r}")
    socket_path = _path(config.admin_socket, "admin socket")
    if len(socket_path.encode()) > _MAX_SOCKET_PATH:
        raise InvalidInputError(
            f"the broker's admin socket path is longer than {_MAX_SOCKET_PATH} bytes",
            hint="use a shorter data directory",
        )
    if not isinstance(config.max_packet_size, int) or not 1024 <= config.max_packet_size <= 256 * 1024 * 1024:
        raise InvalidInputError(f"invalid broker max_packet_size {config.max_packet_size!r}")
    # 0 would mean no limit to Mosquitto: a device offline for long would make it hold messages without end.
    if not isinstance(config.max_queued_messages, int) or not 1 <= config.max_queued_messages <= 1_000_000:
        raise InvalidInputError(f"invalid broker max_queued_messages {config.max_queued_messages!r}")
    # 0 would mean no limit here too.
    for name in ("max_queued_bytes", "max_inflight_bytes"):
        value = getattr(config, name)
        if not isinstance(value, int) or not 1024 <= value <= 16 * 1024 * 1024 * 1024:
            raise InvalidInputError(f"invalid broker {name} {value!r}", hint="1 KiB to 16 GiB")
    lines = [
        "# Written by Warden; do not edit: the hub renders this file at every start.",
        f"user {config.user}",
        "per_listener_settings false",
        "allow_anonymous false",
        "persistence true",
        f"persistence_location {_path(config.persistence_dir, 'persistence directory')}/",
        "autosave_interval 60",
        f"max_packet_size {config.max_packet_size}",
        f"max_queued_messages {config.max_queued_messages}",
        f"max_queued_bytes {config.max_queued_bytes}",
        f"max_inflight_bytes {config.max_inflight_bytes}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        f"acl_file {_path(config.acl_file, 'ACL file')}",
        f"plugin {_path(config.dynsec_plugin, 'dynamic security plugin')}",
        f"plugin_opt_config_file {_path(config.dynsec_file, 'dynamic security state file')}",
        "",
        "# Devices and the hub's data connection: mutual TLS, the certificate's CN is the username and the client id",
        "# (one certificate, one session).",
        f"listener {config.port} {config.host}",
        "protocol mqtt",
        f"cafile {_path(config.cafile, 'CA file')}",
        f"certfile {_path(config.certfile, 'certificate file')}",
        f"keyfile {_path(config.keyfile, 'key file')}",
        f"crlfile {_path(config.crlfile, 'CRL file')}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
        f"ciphers {TLS12_CIPHERS}",
        f"ciphers_tls1.3 {TLS13_CIPHERSUITES}",
        # Without it every mutual-TLS connect stalls about 45 ms on the delayed ACK.
        "set_tcp_nodelay true",
        "",
        "# Administration by the hub only: no TLS state or CRL can lock the hub out of its own control plane.",
        f"listener 0 {socket_path}",
        "protocol mqtt",
    ]
    return "\n".join(lines) + "\n"
