"""The agent's CommandHandler: a verified command runs its action and is reported; the counter is on disk before
the action runs, so neither a failing action nor a restart reopens the door to a replay; a damaged counter file
refuses everything; other topics are none of its business."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tests.unit.agent.certkit import certificate, make_ca, make_root, new_key, utcnow
from warden.agent._commands import COUNTER_FILE, CommandHandler
from warden.broker import COMMAND_SIGNING_EKU, MAX_COMMAND_BYTES, Command, sign_command

DEVICE = "dev-a"
TOPIC = f"warden/{DEVICE}/commands"


@dataclasses.dataclass
class Hub:
    """The hub's side: a root, an issuing CA and the command-signing certificate under it."""

    root: x509.Certificate
    issuing: x509.Certificate
    signer: x509.Certificate
    signer_key: ec.EllipticCurvePrivateKey

    def command(self, counter: int, name: str = "ping", *, device: str = DEVICE) -> bytes:
        sent = Command(
            id=f"cmd_{counter:016x}", device=device, counter=counter, name=name, issued=utcnow(), args={"n": counter}
        )
        return sign_command(self.signer_key, self.signer, sent)


@pytest.fixture(scope="module")
def hub() -> Hub:
    now = utcnow()
    root = make_root(now=now)
    issuing = make_ca(root, now=now)
    key = new_key()
    signer = certificate(
        subject="Hub Command Signer",
        public_key=key.public_key(),
        issuer=issuing,
        not_before=now - dt.timedelta(hours=1),
        not_after=now + dt.timedelta(days=30),
        eku=[COMMAND_SIGNING_EKU],
    )
    return Hub(root.certificate, issuing.certificate, signer, key)


@dataclasses.dataclass
class Harness:
    hub: Hub
    state_dir: Path
    events: list[tuple[str, dict[str, Any]]] = dataclasses.field(default_factory=list)
    ran: list[Command] = dataclasses.field(default_factory=list)

    def handler(self, actions: dict[str, Callable[[Command], str]] | None = None) -> CommandHandler:
        """A handler over the state directory (a new one is what the agent makes after a restart)."""

        def ping(command: Command) -> str:
            self.ran.append(command)
            return "pong"

        return CommandHandler(
            DEVICE,
            self.state_dir,
            roots=lambda: [self.hub.root],
            intermediates=lambda: [self.hub.issuing],
            emit=lambda kind, data: self.events.append((kind, data)),
            actions={"ping": ping} if actions is None else actions,
        )

    @property
    def counter_file(self) -> Path:
        return self.state_dir / COUNTER_FILE

    def stored_counter(self) -> int:
        return int(json.loads(self.counter_file.read_bytes())["counter"])

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


@pytest.fixture
def harness(hub: Hub, tmp_path: Path) -> Harness:
    return Harness(hub, tmp_path)


def test_an_accepted_command_runs_its_action_and_reports_the_result(harness: Harness) -> None:
    handler = harness.handler()
    assert handler.last_counter == 0
    handler.handle(TOPIC, harness.hub.command(1))
    assert [c.counter for c in harness.ran] == [1]
    assert harness.ran[0].args == {"n": 1}
    assert harness.events == [
        (
            "command.result",
            {"id": "cmd_0000000000000001", "name": "ping", "counter": 1, "status": "ok", "detail": "pong"},
        )
    ]
    assert (handler.accepted, handler.rejected) == (1, 0)
    assert handler.last_counter == 1
    assert harness.stored_counter() == 1
    assert stat.S_IMODE(harness.counter_file.stat().st_mode) == 0o600


def test_the_counter_is_on_disk_before_the_action_runs(harness: Harness) -> None:
    seen: list[int] = []

    def look(command: Command) -> str:
        seen.append(harness.stored_counter())
        return "looked"

    harness.handler({"ping": look}).handle(TOPIC, harness.hub.command(5))
    assert seen == [5]


def test_a_failing_action_is_reported_and_still_advances_the_counter(harness: Harness) -> None:
    def explode(command: Command) -> str:
        raise RuntimeError("the action broke")

    handler = harness.handler({"ping": explode})
    handler.handle(TOPIC, harness.hub.command(3))
    assert harness.events[-1] == (
        "command.result",
        {"id": "cmd_0000000000000003", "name": "ping", "counter": 3, "status": "failed", "detail": "RuntimeError"},
    )
    assert handler.accepted == 1
    assert harness.stored_counter() == 3
    # and the same command again is a replay, not a second attempt
    handler.handle(TOPIC, harness.hub.command(3))
    assert harness.events[-1] == (
        "command.rejected",
        {"reason": "replayed or stale command: counter 3, last accepted 3", "id": "cmd_0000000000000003"},
    )
    assert handler.rejected == 1


def test_a_command_the_agent_has_no_action_for_is_reported_unsupported(harness: Harness) -> None:
    handler = harness.handler()
    handler.handle(TOPIC, harness.hub.command(1, "renew-certificate"))
    assert harness.events == [
        (
            "command.result",
            {
                "id": "cmd_0000000000000001",
                "name": "renew-certificate",
                "counter": 1,
                "status": "unsupported",
                "detail": "not supported by this agent",
            },
        )
    ]
    assert harness.stored_counter() == 1


def test_a_replay_is_refused_also_after_a_restart(harness: Harness) -> None:
    first = harness.hub.command(7)
    harness.handler().handle(TOPIC, first)
    restarted = harness.handler()
    assert restarted.last_counter == 7
    restarted.handle(TOPIC, first)
    restarted.handle(TOPIC, harness.hub.command(6))
    assert harness.kinds() == ["command.result", "command.rejected", "command.rejected"]
    # The rejection names the command (its payload was signed and readable), so the hub can close it.
    assert harness.events[1][1] == {
        "reason": "replayed or stale command: counter 7, last accepted 7",
        "id": "cmd_0000000000000007",
    }
    assert harness.events[2][1] == {
        "reason": "replayed or stale command: counter 6, last accepted 7",
        "id": "cmd_0000000000000006",
    }
    assert (restarted.accepted, restarted.rejected) == (0, 2)
    assert len(harness.ran) == 1
    restarted.handle(TOPIC, harness.hub.command(8))
    assert [c.counter for c in harness.ran] == [7, 8]
    assert harness.stored_counter() == 8


def test_counters_may_skip_but_never_go_back(harness: Harness) -> None:
    handler = harness.handler()
    for counter in (2, 10, 9, 11, 11, 1000):
        handler.handle(TOPIC, harness.hub.command(counter))
    assert [c.counter for c in harness.ran] == [2, 10, 11, 1000]
    assert (handler.accepted, handler.rejected) == (4, 2)
    assert harness.stored_counter() == 1000


def test_a_rejected_command_leaves_the_counter_alone(harness: Harness) -> None:
    handler = harness.handler()
    handler.handle(TOPIC, harness.hub.command(4))
    handler.handle(TOPIC, harness.hub.command(9, device="dev-b"))
    handler.handle(TOPIC, b"not json")
    assert harness.stored_counter() == 4
    assert harness.events[1:] == [
        ("command.rejected", {"reason": "the command is for 'dev-b', not for this device"}),
        ("command.rejected", {"reason": "the command is not JSON"}),
    ]


def test_the_rejection_reason_is_cut_to_256_characters(harness: Harness) -> None:
    handler = harness.handler()
    handler.handle(TOPIC, harness.hub.command(1, device="d" * 400))
    kind, data = harness.events[0]
    assert kind == "command.rejected"
    assert len(data["reason"]) == 256
    assert data["reason"].startswith("the command is for 'ddd")


def _foreign_signer() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    now = utcnow()
    ca = make_ca(make_root("Foreign Root", now=now), "Foreign CA", now=now)
    key = new_key()
    cert = certificate(
        subject="Foreign Signer",
        public_key=key.public_key(),
        issuer=ca,
        not_before=now - dt.timedelta(hours=1),
        not_after=now + dt.timedelta(days=1),
        eku=[COMMAND_SIGNING_EKU],
    )
    return cert, key


def test_a_signer_the_agent_does_not_trust_is_rejected(harness: Harness) -> None:
    other = Hub(harness.hub.root, harness.hub.issuing, *_foreign_signer())
    harness.handler().handle(TOPIC, other.command(1))
    assert harness.events == [
        ("command.rejected", {"reason": "the command's signer does not chain to the pinned hub root"})
    ]
    assert not harness.counter_file.exists()


def test_the_trust_anchors_are_asked_for_at_every_command(harness: Harness) -> None:
    """The agent's roots and CA chain change with a renewal: the handler takes them as they are now."""
    anchors: list[list[x509.Certificate]] = [[]]
    handler = CommandHandler(
        DEVICE,
        harness.state_dir,
        roots=lambda: [harness.hub.root],
        intermediates=lambda: anchors[-1],
        emit=lambda kind, data: harness.events.append((kind, data)),
        actions={"ping": lambda c: "pong"},
    )
    handler.handle(TOPIC, harness.hub.command(1))
    anchors.append([harness.hub.issuing])
    handler.handle(TOPIC, harness.hub.command(2))
    assert harness.kinds() == ["command.rejected", "command.result"]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"garbage", id="garbage"),
        pytest.param(b"[]", id="array"),
        pytest.param(b"{}", id="no counter"),
        pytest.param(b'{"counter": "seven"}', id="counter a word"),
        pytest.param(b'{"counter": null}', id="counter null"),
        pytest.param(b'{"counter": 7', id="truncated"),
    ],
)
def test_a_damaged_counter_file_refuses_every_command(harness: Harness, content: bytes) -> None:
    harness.counter_file.write_bytes(content)
    handler = harness.handler()
    handler.handle(TOPIC, harness.hub.command(1))
    handler.handle(TOPIC, harness.hub.command(2**40))
    assert harness.ran == []
    assert (
        harness.events
        == [("command.rejected", {"reason": f"the command counter file {harness.counter_file} is unreadable"})] * 2
    )
    assert (handler.accepted, handler.rejected) == (0, 2)
    assert harness.counter_file.read_bytes() == content  # not "repaired" by a command


def test_a_counter_file_that_is_a_directory_refuses_every_command(harness: Harness) -> None:
    harness.counter_file.mkdir()
    handler = harness.handler()
    handler.handle(TOPIC, harness.hub.command(1))
    assert harness.kinds() == ["command.rejected"]
    assert "is unreadable" in harness.events[0][1]["reason"]
    assert harness.ran == []


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param(f"warden/{DEVICE}/updates", id="own updates"),
        pytest.param(f"warden/{DEVICE}/telemetry", id="own telemetry"),
        pytest.param("warden/dev-b/commands", id="another device's commands"),
        pytest.param(f"other/{DEVICE}/commands", id="another root"),
        pytest.param(f"warden/{DEVICE}/commands/extra", id="deeper"),
        pytest.param("warden/+/commands", id="wildcard"),
        pytest.param("", id="empty"),
        pytest.param(f"warden/{DEVICE.upper()}/commands", id="upper case id"),
    ],
)
def test_messages_on_other_topics_are_ignored(harness: Harness, topic: str) -> None:
    handler = harness.handler()
    handler.handle(topic, harness.hub.command(1))
    handler.handle(topic, b"garbage")
    assert harness.events == []
    assert harness.ran == []
    assert (handler.accepted, handler.rejected) == (0, 0)
    assert not harness.counter_file.exists()


def test_a_deeply_nested_envelope_is_reported_as_rejected(harness: Harness) -> None:
    handler = harness.handler()
    handler.handle(TOPIC, b"[" * MAX_COMMAND_BYTES)
    assert harness.kinds() == ["command.rejected"]
    assert handler.rejected == 1
