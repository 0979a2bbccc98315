"""The agent's clock-driven decisions without a hub or a broker: when a renewal is due, what a failed one leaves
(the current identity, a failure count, the next attempt after an exponential backoff capped at 300 s), and that
nothing is published before a session exists.

The hub URL points at a loopback port nobody listens on, so every real EST call fails at once with "connection
refused"; where a test needs a hub that answers, it replaces ``agent.est.simplereenroll`` with a function that
issues from the test's CA. ``Agent.tick`` is called with chosen times; the rng is scripted so jitter and backoff
are exact."""

from __future__ import annotations

import datetime as dt
import json
import random
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.unit.agent.certkit import CLIENT_AUTH, Ca, certificate, make_ca, make_root, new_key, utcnow, write_pem
from warden.agent import Agent, AgentConfig, Identity, IdentityStore, MemoryQueue, read_status
from warden.agent._est import EstRefusedError, EstResult, EstUnavailableError
from warden.broker import COMMAND_SIGNING_EKU, Command, Event, decode_message, parse_device_topic, sign_command
from warden.core import WardenError

DEVICE = "dev-1"
LIFETIME = dt.timedelta(days=30)
BACKOFF_CAP = 300.0


class ScriptedRandom(random.Random):
    """``uniform(a, b)`` always at the same place between a (0.0) and b (1.0); the rest as random.Random."""

    def __init__(self, position: float) -> None:
        super().__init__(0)
        self.position = position

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.position


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Pki:
    def __init__(self, directory: Path) -> None:
        self.now = utcnow()
        self.root = make_root(now=self.now)
        self.issuing = make_ca(self.root, now=self.now)
        self.root_path = write_pem(directory / "hub-root.pem", self.root.certificate)

    def leaf(
        self,
        public_key: ec.EllipticCurvePublicKey,
        *,
        not_before: dt.datetime | None = None,
        lifetime: dt.timedelta = LIFETIME,
        device: str = DEVICE,
        issuer: Ca | None = None,
    ) -> x509.Certificate:
        start = not_before or self.now - dt.timedelta(hours=1)  # back-dated, as the hub issues them
        return certificate(
            subject=device,
            public_key=public_key,
            issuer=issuer or self.issuing,
            not_before=start,
            not_after=start + lifetime,
            eku=[CLIENT_AUTH],
            dns_names=[f"{device}.fleet.test"],
        )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def make_config(tmp_path: Path, pki: Pki, **overrides: Any) -> AgentConfig:
    data: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "device_id": DEVICE,
        "hub": {"url": f"https://hub.fleet.test:{free_port()}", "ca": str(pki.root_path), "address": "127.0.0.1"},
        "broker": {"host": "broker.fleet.test", "address": "127.0.0.1", "port": free_port()},
        "onboarding": {"token_file": str(tmp_path / "enroll.token")},
        "queue": "memory",
    }
    data.update(overrides)
    return AgentConfig.model_validate(data)


AgentFactory = Callable[..., Agent]


@pytest.fixture
def make_agent(tmp_path: Path, pki: Pki) -> AgentFactory:
    def factory(position: float = 1.0, **overrides: Any) -> Agent:
        config = make_config(tmp_path, pki, **overrides)
        return Agent(config, queue=MemoryQueue(config.queue_limit), rng=ScriptedRandom(position))

    return factory


def give_identity(
    agent: Agent, pki: Pki, label: str = "op-current", **leaf: Any
) -> tuple[Identity, ec.EllipticCurvePrivateKey]:
    """What onboarding leaves behind: a committed identity; then the agent loads it as at start."""
    store = IdentityStore(agent.config.state_dir, agent.keys)
    store.begin(label)
    key = agent.keys.generate(label)
    store.commit(label, [pki.leaf(key.public_key(), **leaf), pki.issuing.certificate])
    identity = agent.load_identity()
    assert identity is not None
    return identity, key


def expected_due(identity: Identity, fraction: float) -> float:
    start = max(identity.not_before, min(identity.received, identity.not_after))
    return start + (identity.not_after - start) * min(fraction, 0.95)


def key_files(agent: Agent) -> list[str]:
    return sorted(p.name for p in (agent.config.state_dir / "keys").iterdir())


def queued_kinds(agent: Agent) -> list[str]:
    kinds = []
    for item in agent.queue.pending(1000):
        parsed = parse_device_topic(item.topic)
        assert parsed is not None
        kinds.append(parsed[1])
    return kinds


def queued_events(agent: Agent) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for item in agent.queue.pending(1000):
        message = decode_message("events", item.payload)
        assert isinstance(message, Event)
        out.append((message.type, dict(message.data)))
    return out


# --- when renewal is due ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", [0.0, 0.5, 1.0])
def test_renewal_is_due_at_two_thirds_of_the_lifetime_from_receipt_plus_jitter(
    make_agent: AgentFactory, pki: Pki, position: float
) -> None:
    agent = make_agent(position)
    identity, _ = give_identity(agent, pki)
    assert identity.received > identity.not_before  # back-dated: receipt, not not_before, starts the clock
    fraction = 2 / 3 + 0.05 * position
    due = identity.received + (identity.not_after - identity.received) * fraction
    assert agent.renewal.due == pytest.approx(due, abs=1e-3)
    assert agent.renewal.next_attempt == agent.renewal.due
    assert agent.renewal.failures == 0


@pytest.mark.parametrize("seed", range(10))
def test_the_jitter_stays_within_jitter_fraction(tmp_path: Path, pki: Pki, seed: int) -> None:
    config = make_config(tmp_path, pki, renew_at=0.5, jitter_fraction=0.2)
    agent = Agent(config, queue=MemoryQueue(100), rng=random.Random(seed))
    identity, _ = give_identity(agent, pki)
    lifetime = identity.not_after - identity.received
    assert identity.received + lifetime * 0.5 <= agent.renewal.due <= identity.received + lifetime * 0.7


def test_the_renewal_point_is_capped_at_95_percent(make_agent: AgentFactory, pki: Pki) -> None:
    agent = make_agent(1.0, renew_at=0.9, jitter_fraction=0.2)
    identity, _ = give_identity(agent, pki)
    assert agent.renewal.due == pytest.approx(expected_due(identity, 0.95), abs=1e-3)
    assert agent.renewal.due < identity.not_after


def test_a_certificate_not_yet_valid_when_received_counts_from_not_before(make_agent: AgentFactory, pki: Pki) -> None:
    agent = make_agent(0.0)
    identity, _ = give_identity(agent, pki, not_before=pki.now + dt.timedelta(days=1))
    assert identity.received < identity.not_before
    due = identity.not_before + LIFETIME.total_seconds() * 2 / 3
    assert agent.renewal.due == pytest.approx(due, abs=1e-3)


def test_without_a_receipt_time_the_lifetime_counts_from_not_before(make_agent: AgentFactory, pki: Pki) -> None:
    agent = make_agent(0.0)
    identity, _ = give_identity(agent, pki)
    record = agent.identities.directory / "current.json"
    record.write_text(json.dumps({"label": identity.label, "chain": identity.chain.name}))
    loaded = agent.load_identity()
    assert loaded is not None
    assert loaded.received == identity.not_before
    assert agent.renewal.due == pytest.approx(identity.not_before + LIFETIME.total_seconds() * 2 / 3, abs=1e-3)


# --- ticks before the renewal is due ------------------------------------------------------------------------------


def test_a_tick_before_the_renewal_is_due_renews_nothing_and_publishes_nothing(
    make_agent: AgentFactory, pki: Pki
) -> None:
    agent = make_agent()
    identity, _ = give_identity(agent, pki)
    for now in (identity.received, identity.received + 3600, agent.renewal.due - 0.001):
        agent.tick(now)
    assert agent.renewal.failures == 0
    assert agent.renewal.last_error is None
    assert key_files(agent) == ["op-current.key"]
    assert not (agent.identities.directory / "pending.json").exists()
    assert len(agent.queue) == 0  # no session: no telemetry, no health
    status = read_status(agent.config.state_dir)
    assert status is not None
    assert status["device_id"] == DEVICE
    assert status["certificate"]["serial"] == identity.serial
    assert status["renewal"]["failures"] == 0
    assert status["broker"]["connected"] is False
    assert status["queue"] == {"depth": 0, "dropped": 0, "limit": 10_000}


def test_an_agent_without_identity_does_not_try_to_renew(make_agent: AgentFactory) -> None:
    agent = make_agent()
    assert agent.load_identity() is None
    agent.tick(0.0)
    agent.tick(1e12)
    assert agent.renewal.failures == 0
    assert len(agent.queue) == 0
    with pytest.raises(WardenError, match="onboard first"):
        agent.renew()


# --- a failed renewal ---------------------------------------------------------------------------------------------


def test_a_failed_renewal_keeps_the_identity_and_backs_off(make_agent: AgentFactory, pki: Pki) -> None:
    agent = make_agent(1.0)
    identity, key = give_identity(agent, pki)
    due = agent.renewal.due
    agent.tick(due)

    assert agent.renewal.failures == 1
    assert agent.renewal.last_error == f"cannot reach the hub at {agent.config.hub.url}: Connection refused"
    assert agent.renewal.next_attempt == pytest.approx(due + 5.0)
    assert agent.renewal.due == due
    assert agent.renewal.renewals == 0
    assert agent.identity is identity
    assert agent.identities.current() == identity
    assert agent.keys.load(identity.label).private_numbers() == key.private_numbers()
    assert key_files(agent) == ["op-current.key"]  # the renewal's new key is gone again
    assert sorted(p.name for p in agent.identities.directory.iterdir()) == ["current.json", "op-current.pem"]
    assert len(agent.queue) == 0
    status = read_status(agent.config.state_dir)
    assert status is not None
    assert status["renewal"]["failures"] == 1
    assert status["renewal"]["last_error"] == agent.renewal.last_error


@pytest.mark.parametrize(
    ("position", "delays"),
    [
        pytest.param(1.0, [5, 10, 20, 40, 80, 160, 300, 300, 300], id="longest"),
        pytest.param(0.0, [2.5, 5, 10, 20, 40, 80, 150, 150, 150], id="shortest"),
    ],
)
def test_failed_renewals_back_off_exponentially_up_to_300_seconds(
    make_agent: AgentFactory, pki: Pki, position: float, delays: list[float]
) -> None:
    agent = make_agent(position)
    give_identity(agent, pki)
    now = agent.renewal.due
    seen = []
    for failures, _ in enumerate(delays, start=1):
        agent.tick(now)
        assert agent.renewal.failures == failures
        seen.append(agent.renewal.next_attempt - now)
        # until the next attempt, ticks leave it alone
        agent.tick(agent.renewal.next_attempt - 0.01)
        assert agent.renewal.failures == failures
        now = agent.renewal.next_attempt
    assert seen == pytest.approx(delays)
    assert max(seen) <= BACKOFF_CAP
    assert key_files(agent) == ["op-current.key"]
    assert len(agent.queue) == 0


def test_a_late_tick_backs_off_from_the_time_of_the_attempt(make_agent: AgentFactory, pki: Pki) -> None:
    agent = make_agent(1.0)
    give_identity(agent, pki)
    late = agent.renewal.due + 86400
    agent.tick(late)
    assert agent.renewal.next_attempt == pytest.approx(late + 5.0)


def test_the_hubs_retry_after_stretches_the_backoff(
    make_agent: AgentFactory, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = make_agent(1.0)
    give_identity(agent, pki)
    retry_after = [600.0]

    def busy(csr_der: bytes, *, identity: Callable[[ssl.SSLContext], None]) -> EstResult:
        raise EstUnavailableError("the hub answered simplereenroll with 503: busy", retry_after=retry_after[0])

    monkeypatch.setattr(agent.est, "simplereenroll", busy)
    now = agent.renewal.due
    agent.tick(now)
    assert agent.renewal.next_attempt == pytest.approx(now + 600.0)
    assert agent.renewal.last_error == "the hub answered simplereenroll with 503: busy"
    retry_after[0] = 1.0  # shorter than the backoff: the backoff wins
    now = agent.renewal.next_attempt
    agent.tick(now)
    assert agent.renewal.next_attempt == pytest.approx(now + 10.0)
    assert agent.renewal.failures == 2


def test_a_refused_renewal_is_a_failure_like_any_other(
    make_agent: AgentFactory, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = make_agent(1.0)
    identity, _ = give_identity(agent, pki)

    def refuse(csr_der: bytes, *, identity: Callable[[ssl.SSLContext], None]) -> EstResult:
        raise EstRefusedError("the hub refused simplereenroll (403): device disabled", status=403)

    monkeypatch.setattr(agent.est, "simplereenroll", refuse)
    agent.tick(agent.renewal.due)
    assert agent.renewal.failures == 1
    assert agent.renewal.last_error == "the hub refused simplereenroll (403): device disabled"
    assert agent.identity is identity
    assert key_files(agent) == ["op-current.key"]


def test_a_certificate_for_another_key_is_a_failed_renewal(
    make_agent: AgentFactory, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = make_agent(1.0)
    identity, _ = give_identity(agent, pki)

    def wrong_key(csr_der: bytes, *, identity: Callable[[ssl.SSLContext], None]) -> EstResult:
        return EstResult([pki.leaf(new_key().public_key()), pki.issuing.certificate], None)

    monkeypatch.setattr(agent.est, "simplereenroll", wrong_key)
    agent.tick(agent.renewal.due)
    assert agent.renewal.failures == 1
    assert agent.renewal.last_error == "the hub's answer holds no certificate for the key the agent sent"
    assert agent.identity is identity
    assert agent.identities.current() == identity
    assert key_files(agent) == ["op-current.key"]


# --- a renewal that works (a hub stand-in that issues from the test's CA) -----------------------------------------


def issuing_hub(
    pki: Pki, calls: list[x509.CertificateSigningRequest], *, offset: float | None = None
) -> Callable[..., EstResult]:
    def reenroll(csr_der: bytes, *, identity: Callable[[ssl.SSLContext], None]) -> EstResult:
        identity(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # the current identity installs as the TLS client one
        csr = x509.load_der_x509_csr(csr_der)
        assert csr.is_signature_valid
        calls.append(csr)
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        return EstResult([pki.leaf(public_key), pki.issuing.certificate], offset)

    return reenroll


def test_a_successful_renewal_replaces_the_identity_and_resets_the_failures(
    make_agent: AgentFactory, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = make_agent(0.0)
    old, _ = give_identity(agent, pki)
    now = agent.renewal.due
    agent.tick(now)  # the first attempt fails (nobody listens)
    assert agent.renewal.failures == 1

    calls: list[x509.CertificateSigningRequest] = []
    monkeypatch.setattr(agent.est, "simplereenroll", issuing_hub(pki, calls))
    agent.tick(agent.renewal.next_attempt)

    new = agent.identity
    assert new is not None
    assert new.label != old.label
    assert len(calls) == 1
    assert calls[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DEVICE
    assert agent.identities.current() == new
    assert key_files(agent) == [f"{new.label}.key"]  # the previous key is deleted
    assert not old.chain.exists()
    assert agent.renewal.failures == 0
    assert agent.renewal.last_error is None
    assert agent.renewal.renewals == 1
    assert agent.renewal.due == pytest.approx(expected_due(new, 2 / 3), abs=1e-3)
    assert agent.renewal.next_attempt == agent.renewal.due
    assert queued_kinds(agent) == ["events"]  # the renewal is reported; still no telemetry or health
    assert queued_events(agent) == [
        ("certificate.renewed", {"serial": new.serial, "previous": old.serial, "not_after": _iso(new.not_after)})
    ]


def test_a_renewal_reports_a_skewed_device_clock(
    make_agent: AgentFactory, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = make_agent(0.0)
    give_identity(agent, pki)
    monkeypatch.setattr(agent.est, "simplereenroll", issuing_hub(pki, [], offset=-120.4))
    agent.tick(agent.renewal.due)
    assert [kind for kind, _ in queued_events(agent)] == ["clock.skew", "certificate.renewed"]
    assert queued_events(agent)[0][1] == {"offset_seconds": -120.4}
    status = read_status(agent.config.state_dir)
    assert status is not None
    assert status["clock_offset_seconds"] == -120.4


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- start-up and commands ----------------------------------------------------------------------------------------


def test_loading_the_identity_deletes_the_key_of_a_renewal_that_crashed(make_agent: AgentFactory, pki: Pki) -> None:
    agent = make_agent()
    identity, _ = give_identity(agent, pki)
    agent.identities.begin("op-crashed")
    agent.keys.generate("op-crashed")
    restarted = make_agent()
    assert restarted.load_identity() == identity
    assert key_files(restarted) == ["op-current.key"]
    assert not (restarted.identities.directory / "pending.json").exists()


def test_the_renew_certificate_command_makes_the_next_tick_renew(make_agent: AgentFactory, pki: Pki) -> None:
    agent = make_agent(1.0)
    identity, _ = give_identity(agent, pki)
    key = new_key()
    signer = certificate(
        subject="Hub Command Signer",
        public_key=key.public_key(),
        issuer=pki.issuing,
        not_before=pki.now - dt.timedelta(hours=1),
        not_after=pki.now + dt.timedelta(days=1),
        eku=[COMMAND_SIGNING_EKU],
    )
    command = Command(id="cmd_00000000000000aa", device=DEVICE, counter=1, name="renew-certificate", issued=pki.now)
    # The issuing CA is known to the agent from its own certificate chain; the root is the pinned one.
    agent.commands.handle(f"warden/{DEVICE}/commands", sign_command(key, signer, command))
    assert agent.renewal.next_attempt == 0.0
    assert queued_events(agent) == [
        (
            "command.result",
            {
                "id": "cmd_00000000000000aa",
                "name": "renew-certificate",
                "counter": 1,
                "status": "ok",
                "detail": "renewal scheduled",
            },
        )
    ]
    now = identity.received + 60  # long before the renewal would be due
    agent.tick(now)
    assert agent.renewal.failures == 1  # it was tried (and failed: nobody listens)
    assert agent.renewal.next_attempt == pytest.approx(now + 5.0)
    assert queued_kinds(agent) == ["events"]
