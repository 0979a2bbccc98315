"""The agent's side of cloud-to-device commands: verify, persist the counter, execute, report.

The counter of the last accepted command is written (atomically, fsynced) *before* the command runs, so that a
crash can at worst skip a command, never run one twice, and a replay of any earlier command is refused also after
a restart. Every outcome is reported on the device's events topic: ``command.result`` or ``command.rejected``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from warden.broker import Command, CommandRejectedError, CommandVerifier, parse_device_topic
from warden.core.files import write_file_atomic

__all__ = ["CommandHandler"]

_log = logging.getLogger("warden.agent.commands")
COUNTER_FILE = "commands.json"


class CommandHandler:
    def __init__(
        self,
        device_id: str,
        state_dir: Path,
        *,
        roots: Callable[[], list[x509.Certificate]],
        intermediates: Callable[[], list[x509.Certificate]],
        emit: Callable[[str, dict[str, Any]], None],
        actions: dict[str, Callable[[Command], str]],
    ) -> None:
        self.device_id = device_id
        self._path = state_dir / COUNTER_FILE
        self._roots = roots
        self._intermediates = intermediates
        self._emit = emit
        self._actions = actions
        self._lock = threading.Lock()
        self.accepted = 0
        self.rejected = 0

    @property
    def last_counter(self) -> int:
        try:
            data = json.loads(self._path.read_bytes()[:4096])
            return int(data["counter"])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError):
            # A damaged counter file must not reopen the door to replays: refuse until it is repaired.
            raise CommandRejectedError(f"the command counter file {self._path} is unreadable") from None

    def handle(self, topic: str, payload: bytes) -> None:
        parsed = parse_device_topic(topic)
        if parsed is None or parsed != (self.device_id, "commands"):
            return  # updates (issue 8) and anything else are not commands
        with self._lock:
            try:
                verifier = CommandVerifier(self.device_id, self._roots(), self._intermediates())
                command = verifier.verify(payload, last_counter=self.last_counter, now=dt.datetime.now(dt.UTC))
                write_file_atomic(self._path, json.dumps({"counter": command.counter}).encode(), mode=0o600)
            except CommandRejectedError as e:
                self.rejected += 1
                _log.warning("command rejected: %s", e.message)
                report: dict[str, Any] = {"reason": e.message[:256]}
                if e.command_id is not None:
                    report["id"] = e.command_id
                self._emit("command.rejected", report)
                return
            self.accepted += 1
        action = self._actions.get(command.name)
        try:
            detail = action(command) if action is not None else "not supported by this agent"
            status = "ok" if action is not None else "unsupported"
        except Exception as e:  # report, never crash the session
            _log.exception("command %s failed", command.name)
            status, detail = "failed", type(e).__name__
        _log.info("command %s (counter %d): %s", command.name, command.counter, status)
        self._emit(
            "command.result",
            {"id": command.id, "name": command.name, "counter": command.counter, "status": status, "detail": detail},
        )
