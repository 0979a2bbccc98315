"""Running a local Mosquitto: the process, and the administration connection to it.

The process gets an environment of its own (``PATH`` and ``LANG`` only): nothing of the hub's, such as a CA
passphrase given in the environment, reaches the broker. Its log goes to a file in the broker's directory."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import itertools
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from warden.broker._dynsec import CONTROL_TOPIC, RESPONSE_TOPIC
from warden.broker._rights import ADMIN_USERNAME
from warden.core import BrokerError, ConfigurationError

__all__ = ["BrokerAdmin", "BrokerConnectionError", "MosquittoProcess", "find_dynsec_plugin", "find_mosquitto"]

_PLUGIN_CANDIDATES = (
    "/usr/lib/*/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/*/mosquitto_dynamic_security.so",
)
#: the largest dynsec answer the hub reads (a listing of every exception client is the biggest)
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise ConfigurationError(
            "mosquitto is not installed", hint="apt-get install mosquitto, or run without a broker: WARDEN_BROKER=off"
        )
    return found


def find_dynsec_plugin() -> Path:
    for pattern in _PLUGIN_CANDIDATES:
        for match in sorted(glob.glob(pattern)):
            return Path(match)
    raise ConfigurationError(
        "Mosquitto's dynamic security plugin (mosquitto_dynamic_security.so) was not found",
        hint="install Mosquitto 2.0 or later from your distribution",
    )


class MosquittoProcess:
    """One supervised ``mosquitto -c <config>``."""

    def __init__(self, config_path: Path, log_path: Path, *, binary: str | None = None) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.binary = binary or find_mosquitto()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, *, host: str, port: int, admin_socket: Path, timeout: float = 15.0) -> None:
        """Start the broker and wait until both listeners accept connections; a broker that exits or does not
        get there in ``timeout`` seconds is a :class:`BrokerError` that quotes the end of its log."""
        if self.running():
            return
        with contextlib.suppress(FileNotFoundError):
            admin_socket.unlink()  # a stale socket of an earlier run: Mosquitto would fail to bind it
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8"}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_child_setup,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(f"mosquitto exited at start (status {self._process.returncode}): {self._tail()}")
            if _accepts(host, port) and admin_socket.exists():
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not start listening within {timeout:.0f} s: {self._tail()}")

    def reload(self) -> None:
        """SIGHUP: Mosquitto reads its CRL, ACL file and certificates again (new connections see them)."""
        if self._process is not None and self.running():
            self._process.send_signal(signal.SIGHUP)

    def stop(self, *, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _tail(self, limit: int = 800) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - limit))
                return f.read().decode("utf-8", "replace").strip().replace("\n", " | ")
        except OSError:
            return "(no log)"


def _child_setup() -> None:
    """In the child, before exec: on Linux, have the kernel send it SIGTERM when the hub's process dies, even by
    SIGKILL, so that no broker outlives its supervisor; and let it hold as many connections as the system allows
    (the soft open-file limit, often 1,024, raised to the hard one)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    with contextlib.suppress(Exception):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_PR_SET_PDEATHSIG = 1


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class BrokerConnectionError(BrokerError):
    """The admin connection is down or the broker did not answer (as opposed to refusing a command)."""


class BrokerAdmin:
    """The hub's administration connection to the dynamic security plugin, over the broker's unix socket.

    :meth:`execute` sends a list of commands in one message and waits for the plugin's answer: the broker runs
    them back to back on its only thread, so no client's message is checked against a half-applied change."""

    def __init__(self, socket_path: Path, password: str, *, timeout: float = 10.0) -> None:
        self._timeout = timeout
        self._lock = threading.Lock()
        self._answers: dict[bytes, Any] = {}
        self._answered = threading.Condition()
        self._counter = itertools.count(1)
        # Every connection has its own client id and correlation prefix: the plugin sends its answers to every
        # administrator subscribed, and a shared client id would make two connections take each other over. The
        # colon keeps the id out of reach of any certificate (client ids on the TLS listener are device ids).
        self._prefix = f"{os.getpid()}.{secrets.token_hex(4)}."
        self._connected = threading.Event()
        self._refused: str | None = None
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{ADMIN_USERNAME}:{self._prefix.rstrip('.')}",
            protocol=mqtt.MQTTv5,
            transport="unix",
        )
        client.username_pw_set(ADMIN_USERNAME, password)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._subscribed = threading.Event()
        self._client = client
        try:
            client.connect(str(socket_path), port=1883, keepalive=30)  # the port is unused on a unix socket
        except OSError as e:
            raise BrokerError(f"cannot reach the broker's admin socket {socket_path}: {e.strerror or e}") from None
        client.loop_start()
        if not self._connected.wait(timeout) or self._refused is not None:
            self.close()
            raise BrokerError(f"the broker refused the hub's admin login: {self._refused or 'no answer'}")
        if not self._subscribed.wait(timeout):
            self.close()
            raise BrokerError("cannot subscribe to the dynamic security answers")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
        else:
            # Again after every reconnect: a clean session keeps no subscription.
            client.subscribe(RESPONSE_TOPIC, qos=1)
        self._connected.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic != RESPONSE_TOPIC or len(message.payload) > MAX_RESPONSE_BYTES:
            return
        try:
            body = json.loads(message.payload)
        except ValueError:
            return
        with self._answered:
            for response in body.get("responses", []) if isinstance(body, dict) else []:
                key = str(response.get("correlationData", "")).encode()
                if key.startswith(self._prefix.encode()):  # another administrator's answers are not ours
                    self._answers[key] = response
            self._answered.notify_all()

    def execute(self, commands: Sequence[dict[str, Any]], *, check: bool = True) -> list[dict[str, Any]]:
        """Run ``commands`` in one message; their answers, in order. ``check``: an answer with an error raises
        :class:`BrokerError` (naming the command), after all of them ran."""
        if not commands:
            return []
        with self._lock:
            if not self._client.is_connected():
                raise BrokerConnectionError("the admin connection to the broker is down")
            keys = [f"{self._prefix}{next(self._counter)}" for _ in commands]
            tagged = [{**c, "correlationData": k} for c, k in zip(commands, keys, strict=True)]
            info = self._client.publish(CONTROL_TOPIC, json.dumps({"commands": tagged}), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise BrokerConnectionError(f"cannot send commands to the broker ({mqtt.error_string(info.rc)})")
            deadline = time.monotonic() + self._timeout
            with self._answered:
                while not all(k.encode() in self._answers for k in keys):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        for k in keys:
                            self._answers.pop(k.encode(), None)
                        raise BrokerConnectionError(
                            f"the broker did not answer {len(commands)} admin command(s) in time"
                        )
                    self._answered.wait(remaining)
                answers = [self._answers.pop(k.encode()) for k in keys]
        if check:
            failed = [(c, a) for c, a in zip(commands, answers, strict=True) if a.get("error")]
            if failed:
                command, answer = failed[0]
                raise BrokerError(f"the broker refused {command.get('command')}: {str(answer.get('error'))[:200]}")
        return answers

    @property
    def connected(self) -> bool:
        return self._client.is_connected()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()
