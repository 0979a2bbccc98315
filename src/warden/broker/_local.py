"""The embedded broker: a Mosquitto the hub configures, starts, keeps in line with the registry, and contains
devices on.

Its files live in one directory (``<data-dir>/broker``): the rendered configuration, the ACL file, the dynamic
security state, the CA chain, the broker's certificate and key (issued by the hub), the CRL, the persistence
directory, the pid file and, in a 0700 subdirectory, the admin socket. Any process of the hub can administer it
(the admin socket) and make it reload its CRL (the pid file); the process that started it supervises it."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from warden.broker._config import MosquittoConfig, render_config
from warden.broker._dynsec import access_commands, initial_state, state_exceptions
from warden.broker._mosquitto import BrokerAdmin, BrokerConnectionError, MosquittoProcess, find_dynsec_plugin
from warden.broker._rights import acl_file, exception_role, role_name
from warden.broker._topics import Access
from warden.core import BrokerError, InvalidInputError, validate_device_id
from warden.core.files import read_limited, write_file_atomic

__all__ = ["BrokerLayout", "LocalBroker"]

_MAX_PID_FILE = 64
_MAX_STATE_FILE = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class BrokerLayout:
    """Where the embedded broker's files are, under one directory."""

    directory: Path

    @property
    def config(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def acl(self) -> Path:
        return self.directory / "acl"

    @property
    def dynsec(self) -> Path:
        return self.directory / "dynamic-security.json"

    @property
    def cafile(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def certfile(self) -> Path:
        return self.directory / "broker.pem"

    @property
    def keyfile(self) -> Path:
        return self.directory / "broker.key"

    @property
    def crlfile(self) -> Path:
        return self.directory / "crl.pem"

    @property
    def admin_socket(self) -> Path:
        return self.directory / "admin" / "mosquitto.sock"

    @property
    def persistence(self) -> Path:
        return self.directory / "data"

    @property
    def pid_file(self) -> Path:
        return self.directory / "mosquitto.pid"

    @property
    def log(self) -> Path:
        return self.directory / "mosquitto.log"


class LocalBroker:
    """One embedded Mosquitto. ``exceptions`` answers, when asked, which devices must not have normal access now
    (from the registry); ``admin_password`` is the plugin administrator's."""

    def __init__(
        self,
        layout: BrokerLayout,
        *,
        host: str,
        port: int,
        hub_client: str,
        admin_password: Callable[[], str],
        exceptions: Callable[[], Mapping[str, Access]],
        user: str,
    ) -> None:
        self.layout = layout
        self.host = host
        self.port = port
        self._hub_client = hub_client
        self._admin_password = admin_password
        self._exceptions = exceptions
        self._user = user
        self._process: MosquittoProcess | None = None
        self._admin: BrokerAdmin | None = None
        self._renew_at: dt.datetime | None = None
        # Changes to the broker are serialised: by this lock within the process, and by a lock file across the
        # hub's processes (workers, CLI commands), so that no check-then-act of one interleaves with another's.
        self._lock = threading.RLock()
        self._depth = 0
        self._lock_file: int | None = None

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """Hold the broker for a read-decide-write sequence (re-entrant)."""
        with self._lock:
            if self._depth == 0:
                self.layout.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(self.layout.directory / ".changing.lock", os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._lock_file = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_file is not None:
                    fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                    os.close(self._lock_file)
                    self._lock_file = None

    def config(self) -> MosquittoConfig:
        layout = self.layout
        return MosquittoConfig(
            host=self.host,
            port=self.port,
            cafile=layout.cafile,
            certfile=layout.certfile,
            keyfile=layout.keyfile,
            crlfile=layout.crlfile,
            acl_file=layout.acl,
            dynsec_file=layout.dynsec,
            dynsec_plugin=find_dynsec_plugin(),
            admin_socket=layout.admin_socket,
            persistence_dir=layout.persistence,
            user=self._user,
        )

    # -- the process ----------------------------------------------------------------------------------------------

    def start(self, *, chain_pem: bytes, certificate_pem: bytes, key_pem: bytes, crl_pem: bytes) -> None:
        """Write every file (the plugin's state from the registry's exceptions as they are now) and start the
        broker; it is listening on both listeners when this returns."""
        layout = self.layout
        if self.is_up():
            raise BrokerError(
                f"a broker for this data directory runs already (pid {self._pid()})",
                hint="stop the other 'warden serve' first",
            )
        for directory in (layout.directory, layout.directory / "admin", layout.persistence):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)  # also when it existed with looser permissions
        write_file_atomic(layout.cafile, chain_pem)
        write_file_atomic(layout.certfile, certificate_pem)
        write_file_atomic(layout.keyfile, key_pem, mode=0o600)
        write_file_atomic(layout.crlfile, crl_pem)
        write_file_atomic(layout.acl, acl_file(self._hub_client).encode())
        write_file_atomic(layout.dynsec, initial_state(self._admin_password(), self._exceptions()).encode(), mode=0o600)
        write_file_atomic(layout.config, (render_config(self.config()) + f"pid_file {layout.pid_file}\n").encode())
        process = MosquittoProcess(layout.config, layout.log)
        process.start(host=self.host, port=self.port, admin_socket=layout.admin_socket)
        self._process = process
        certificate = x509.load_pem_x509_certificate(certificate_pem)
        lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
        self._renew_at = certificate.not_valid_after_utc - lifetime / 3

    def needs_renewal(self, now: dt.datetime) -> bool:
        """Whether the certificate the broker was started with is in the last third of its life."""
        return self._renew_at is not None and now >= self._renew_at

    def running(self) -> bool:
        return self._process is not None and self._process.running()

    def stop(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self._process is not None:
            self._process.stop()
            self._process = None

    def reload(self, *, crl_pem: bytes | None = None) -> bool:
        """Write a new CRL (when given) and make the broker read its CRL and certificates again (SIGHUP, by the pid
        file: any process of the hub may ask). False when no broker is running."""
        if crl_pem is not None and self.layout.directory.exists():
            write_file_atomic(self.layout.crlfile, crl_pem)
        pid = self._pid()
        if pid is None:
            return False
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            return False
        return True

    def is_up(self) -> bool:
        """Whether this broker's mosquitto runs (started by this process or another one of the hub)."""
        return self._pid() is not None

    def _pid(self) -> int | None:
        try:
            text = read_limited(self.layout.pid_file, _MAX_PID_FILE, what="the broker's pid file").decode().strip()
        except (InvalidInputError, UnicodeDecodeError):
            return None  # no pid file (no broker runs), or not one Mosquitto wrote
        if not text.isdigit():
            return None
        # A pid file a crash left behind may name another process by now: only our mosquitto gets the signal.
        try:
            cmdline = Path(f"/proc/{text}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if not cmdline or not cmdline[0].endswith(b"mosquitto") or str(self.layout.config).encode() not in cmdline:
            return None
        return int(text)

    # -- administration -------------------------------------------------------------------------------------------

    def admin(self) -> BrokerAdmin:
        """The admin connection, opened on first use and reopened after the broker restarted."""
        with self._lock:
            if self._admin is None:
                self._admin = BrokerAdmin(self.layout.admin_socket, self._admin_password())
            return self._admin

    def _execute(self, commands: list[dict[str, Any]], *, check: bool = True) -> list[dict[str, Any]]:
        with self._lock:
            admin = self.admin()
            try:
                return admin.execute(commands, check=check)
            except BrokerConnectionError:
                if admin.connected:
                    raise  # the broker is there but did not answer: retrying could apply the commands twice
                # The connection broke (the broker restarted): one fresh login, one more attempt.
                admin.close()
                self._admin = None
                return self.admin().execute(commands, check=check)

    def exception_clients(self) -> dict[str, list[str]]:
        """The device exceptions the broker holds now: device id -> its roles' names."""
        answer = self._execute([{"command": "listClients", "verbose": True}])[0]
        clients = answer.get("data", {}).get("clients", [])
        return {
            device: sorted(str(r.get("rolename")) for r in roles)
            for device, roles in state_exceptions({"clients": clients}).items()
        }

    def _has_exception(self, device_id: str) -> bool:
        """Whether the plugin holds a client for the device (one ``getClient``, not a listing of every client)."""
        answer = self._execute([{"command": "getClient", "username": device_id}], check=False)[0]
        return not answer.get("error")

    def set_access(self, device_id: str, access: Access) -> None:
        """Give ``device_id`` ``access`` now. A device whose rights shrink is disconnected, so its reconnect meets
        the new rules (Mosquitto 2.0's plugin does not cut a session when only a role's ACLs change)."""
        with self.changing():
            self._set_access(device_id, access)

    def _set_access(self, device_id: str, access: Access) -> None:
        known = self._has_exception(device_id)
        if access is Access.NORMAL and not known:
            return
        if not known:
            # A role left behind (a crash between two commands) would make createRole fail and keep stale rights.
            self._execute([{"command": "deleteRole", "rolename": role_name(device_id)}], check=False)
        commands = access_commands(device_id, access, known=known)
        if access is not Access.NORMAL:
            # Disabling and enabling a client makes the plugin disconnect its session (it has no kick command).
            commands += [
                {"command": "disableClient", "username": device_id},
                {"command": "enableClient", "username": device_id},
            ]
        self._execute(commands)

    def kick(self, device_id: str) -> None:
        """Disconnect the device's session. The plugin disconnects a client it deletes or disables: a device with
        an exception is disabled and enabled again; any other gets a client made and deleted at once."""
        validate_device_id(device_id)
        with self.changing():
            if self._has_exception(device_id):
                commands = [{"command": c, "username": device_id} for c in ("disableClient", "enableClient")]
            else:
                commands = [{"command": c, "username": device_id} for c in ("createClient", "deleteClient")]
            self._execute(commands)

    def reconcile(self) -> list[str]:
        """Make the broker's exceptions and ACL file match the registry; what was repaired, one line each."""
        with self.changing():
            return self._reconcile()

    def _reconcile(self) -> list[str]:
        repaired: list[str] = []
        wanted_acl = acl_file(self._hub_client).encode()
        try:
            current_acl = read_limited(self.layout.acl, 1024 * 1024, what="the broker's ACL file")
        except InvalidInputError:
            current_acl = b""  # missing, unreadable or huge: rewritten below
        if current_acl != wanted_acl:
            write_file_atomic(self.layout.acl, wanted_acl)
            self.reload()
            repaired.append("acl file rewritten")
        # The broker first, the registry second: a change made between the two reads then looks like drift the
        # registry already wants, never like one to undo (changes hold this lock too, in every process).
        held = self.exception_clients()
        roles = self._roles()
        wanted = {d: a for d, a in self._exceptions().items() if a is not Access.NORMAL}
        removed_roles: set[str] = set()
        for device in held:
            if device not in wanted:
                self._execute(access_commands(device, Access.NORMAL, known=True), check=False)
                removed_roles.add(role_name(device))
                repaired.append(f"{device}: exception removed (the registry has none)")
        for device, access in wanted.items():
            expected = exception_role(device, access)
            current = roles.get(role_name(device))
            if device not in held:
                self._execute(access_commands(device, access, known=False), check=False)
                repaired.append(f"{device}: {access} restored")
            elif held[device] != [role_name(device)] or _acl_set(current) != _acl_set(expected):
                commands = [{"command": "removeClientRole", "username": device, "rolename": r} for r in held[device]]
                self._execute(commands, check=False)
                self._execute(access_commands(device, access, known=True), check=False)
                repaired.append(f"{device}: {access} role repaired")
        extra_roles = [
            name
            for name in roles
            if name.startswith("device:") and name.removeprefix("device:") not in wanted and name not in removed_roles
        ]
        for name in extra_roles:
            answer = self._execute([{"command": "deleteRole", "rolename": name}], check=False)[0]
            if not answer.get("error"):
                repaired.append(f"role {name} removed")
        return repaired

    def _roles(self) -> dict[str, Mapping[str, Any]]:
        answer = self._execute([{"command": "listRoles", "verbose": True}])[0]
        return {str(r.get("rolename")): r for r in answer.get("data", {}).get("roles", [])}

    def state_on_disk(self) -> dict[str, Any]:
        """The plugin's state file as the broker last saved it."""
        data: dict[str, Any] = json.loads(read_limited(self.layout.dynsec, _MAX_STATE_FILE, what="the dynsec state"))
        return data


def _acl_set(role: Mapping[str, Any] | None) -> set[tuple[str, str, bool, int]]:
    if role is None:
        return set()
    return {
        (str(a.get("acltype")), str(a.get("topic")), bool(a.get("allow")), int(a.get("priority", 0)))
        for a in role.get("acls", [])
    }
