"""Cloud-to-device commands: recorded with the device's next counter, audited, dispatched by the process that holds
the hub's broker link, and closed by the result the agent reports.

A command is first a row (an outbox): the operator's request commits whether or not the broker is reachable, and
the dispatcher publishes what is pending (signed by the hub's command-signing key, see
:mod:`warden.broker._commands`) as soon as it can. The per-device counter is allocated under the device's row lock,
so two operators never give two commands the same number; the agent refuses any counter it has seen.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from warden.core import Clock, IllegalTransitionError, InvalidInputError, NotFoundError, Random
from warden.monitor import AuditEvent, AuditLog, AuditStore
from warden.registry._model import Device, DeviceState
from warden.registry._ports import DeviceStore

__all__ = ["COMMAND_NAMES", "CommandResult", "CommandService", "CommandState", "CommandStore", "DeviceCommand"]

#: what the agent executes (kept in step with warden.broker.COMMAND_NAMES by a test)
COMMAND_NAMES = frozenset({"ping", "report-health", "renew-certificate"})
_MAX_ARGS_BYTES = 4096
_MAX_DETAIL = 256


class CommandState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class DeviceCommand:
    id: str
    device_id: str
    counter: int
    name: str
    actor: str
    created_at: dt.datetime
    state: CommandState = CommandState.PENDING
    args: Mapping[str, Any] = field(default_factory=dict)
    sent_at: dt.datetime | None = None
    result: str | None = None
    result_at: dt.datetime | None = None

    def to_json(self) -> dict[str, object]:
        def time(value: dt.datetime | None) -> str | None:
            return value.isoformat().replace("+00:00", "Z") if value else None

        return {
            "id": self.id,
            "device_id": self.device_id,
            "counter": self.counter,
            "name": self.name,
            "args": dict(self.args),
            "actor": self.actor,
            "state": str(self.state),
            "created_at": time(self.created_at),
            "sent_at": time(self.sent_at),
            "result": self.result,
            "result_at": time(self.result_at),
        }


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What an agent reported about a command (its ``command.result`` or ``command.rejected`` event)."""

    device_id: str
    command_id: str | None
    counter: int | None
    status: str
    detail: str


class CommandStore(Protocol):
    def insert(self, command: DeviceCommand) -> None: ...
    def last_counter(self, device_id: str) -> int: ...
    def get(self, command_id: str) -> DeviceCommand | None: ...
    def find(self, device_id: str, *, limit: int) -> list[DeviceCommand]: ...
    def pending(self, *, limit: int) -> list[DeviceCommand]: ...
    def mark_sent(self, command_ids: Iterable[str], at: dt.datetime) -> None: ...
    def close(self, command_id: str, state: CommandState, result: str, at: dt.datetime) -> bool:
        """Set the outcome of a command that has none yet; False if it had one (or does not exist)."""
        ...


class CommandUnitOfWork(Protocol):
    @property
    def devices(self) -> DeviceStore: ...
    @property
    def commands(self) -> CommandStore: ...
    @property
    def audit(self) -> AuditStore: ...
    def after_commit(self, callback: Callable[[], None]) -> None: ...


class CommandTransactions(Protocol):
    def __call__(self, *, readonly: bool = False) -> AbstractContextManager[CommandUnitOfWork]: ...


class CommandService:
    def __init__(self, *, transactions: CommandTransactions, audit: AuditLog, clock: Clock, random: Random) -> None:
        self._tx = transactions
        self._audit = audit
        self._clock = clock
        self._random = random

    def send(self, device_id: str, name: str, *, actor: str, args: Mapping[str, Any] | None = None) -> DeviceCommand:
        """Record a command for ``device_id`` with its next counter (audited as ``device.command``)."""
        if name not in COMMAND_NAMES:
            raise InvalidInputError(f"unknown command {name!r}", hint=f"one of {', '.join(sorted(COMMAND_NAMES))}")
        arguments = dict(args or {})
        if len(json.dumps(arguments)) > _MAX_ARGS_BYTES:
            raise InvalidInputError(f"the command's arguments are larger than {_MAX_ARGS_BYTES} bytes")
        now = self._clock.now()
        with self._tx() as uow:
            device = uow.devices.get(device_id, lock=True)  # serialises counters of one device
            _check_device(device, device_id)
            counter = uow.commands.last_counter(device_id) + 1
            command = DeviceCommand(
                id="cmd_" + self._random.token_bytes(10).hex(),
                device_id=device_id,
                counter=counter,
                name=name,
                actor=actor,
                created_at=now,
                args=arguments,
            )
            uow.commands.insert(command)
            self._audit.append(
                uow,
                AuditEvent(
                    actor,
                    "device.command",
                    f"device:{device_id}",
                    details={"command": command.id, "name": name, "counter": counter},
                ),
            )
        return command

    def get(self, command_id: str) -> DeviceCommand:
        with self._tx(readonly=True) as uow:
            command = uow.commands.get(command_id)
        if command is None:
            raise NotFoundError(f"no command {command_id!r}")
        return command

    def list(self, device_id: str, *, limit: int = 50) -> list[DeviceCommand]:
        with self._tx(readonly=True) as uow:
            return uow.commands.find(device_id, limit=limit)

    def dispatch(self, publish: Callable[[DeviceCommand], bool], *, limit: int = 200) -> int:
        """Publish pending commands in each device's counter order (``publish`` signs one and hands it to the broker
        link, True once the broker acknowledged it) and mark those as sent. Returns how many were sent."""
        with self._tx(readonly=True) as uow:
            pending = uow.commands.pending(limit=limit)
        sent: list[str] = []
        held: set[str] = set()
        for command in pending:
            # A device's commands go out in counter order: after one that could not be sent, none of its later ones.
            if command.device_id in held:
                continue
            if publish(command):
                sent.append(command.id)
            else:
                held.add(command.device_id)
        if sent:
            with self._tx() as uow:
                uow.commands.mark_sent(sent, self._clock.now())
        return len(sent)

    def record_results(self, results: Iterable[CommandResult]) -> int:
        """Close the commands the agents reported on, in one transaction; unknown or already closed ones (a
        redelivered report) are skipped. Returns how many were closed."""
        now = self._clock.now()
        closed = 0
        items = list(results)
        if not items:
            return 0
        with self._tx() as uow:
            events = []
            for result in items:
                if result.command_id is None:
                    continue  # a rejection the agent could not attribute (unparseable command): audited below
                command = uow.commands.get(result.command_id)
                if command is None or command.device_id != result.device_id:
                    continue
                state = {"ok": CommandState.DONE, "rejected": CommandState.REJECTED}.get(
                    result.status, CommandState.FAILED
                )
                if uow.commands.close(command.id, state, result.detail[:_MAX_DETAIL], now):
                    closed += 1
                    if state is not CommandState.DONE:
                        events.append(
                            AuditEvent(
                                f"device:{result.device_id}",
                                "device.command.result",
                                f"device:{result.device_id}",
                                outcome="failure",
                                details={"command": command.id, "status": result.status, "detail": result.detail[:120]},
                            )
                        )
            for result in items:
                if result.command_id is None:
                    events.append(
                        AuditEvent(
                            f"device:{result.device_id}",
                            "device.command.rejected",
                            f"device:{result.device_id}",
                            outcome="failure",
                            details={"reason": result.detail[:120]},
                        )
                    )
            if events:
                self._audit.append(uow, *events)
        return closed


def _check_device(device: Device | None, device_id: str) -> None:
    if device is None:
        raise NotFoundError(f"no device with id {device_id!r}", hint="see 'warden device list'")
    if device.state is not DeviceState.ACTIVE:
        raise IllegalTransitionError(
            f"device {device_id!r} is {device.state}: its rights on the broker do not include commands",
            hint="commands reach active devices only",
            device=device_id,
        )
