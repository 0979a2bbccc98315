"""Real agents against a real hub in tests: write an agent.toml for a running ``warden serve`` and run the agent in a
thread of the test process (or as ``warden-agent`` in a subprocess)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.hubserver import FLEET, HubServer, Issued
from warden.agent import Agent, load_config


def write_config(
    hub: HubServer,
    directory: Path,
    device_id: str,
    *,
    token: str | None = None,
    idevid: Issued | None = None,
    extra: str = "",
    keystore: str = "",
) -> Path:
    """An agent.toml for ``device_id`` that onboards with ``token`` or ``idevid`` and talks to ``hub``."""
    directory.mkdir(parents=True, exist_ok=True)
    if token is not None:
        (directory / "enroll.token").write_text(token)
        (directory / "enroll.token").chmod(0o600)
        onboarding = 'token_file = "enroll.token"'
    else:
        assert idevid is not None
        key = f'key = "{idevid.key_path}"' if not keystore else 'key_label = "idevid"'
        onboarding = f'certificate = "{idevid.cert_path}"\n{key}'
    path = directory / "agent.toml"
    path.write_text(
        f"""state_dir = "state"
device_id = "{device_id}"
telemetry_interval_seconds = 0.5
health_interval_seconds = 5
{extra}

[hub]
url = "{hub.url}"
ca = "{hub.root_path}"
address = "127.0.0.1"

[broker]
host = "broker.{FLEET}"
port = {hub.broker_port}
address = "127.0.0.1"

{keystore}

[onboarding]
{onboarding}
"""
    )
    return path


def token_for(hub: HubServer, device_id: str) -> str:
    return str(json.loads(hub.warden("enrollment", "add", device_id, "--token", "--json").stdout)["token"])


@dataclass
class RunningAgent:
    agent: Agent
    stop: threading.Event
    thread: threading.Thread

    def connected(self) -> bool:
        return self.agent.session_state.connected

    @property
    def status(self) -> dict[str, object]:
        return self.agent.status()


@contextmanager
def running_agent(config: Path, **kwargs: object) -> Iterator[RunningAgent]:
    agent = Agent(load_config(config), **kwargs)  # type: ignore[arg-type]
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            agent.run(stop)
        except BaseException as e:  # surfaced by the test
            errors.append(e)

    thread = threading.Thread(target=run, name=f"agent-{agent.device_id}", daemon=True)
    thread.start()
    try:
        yield RunningAgent(agent, stop, thread)
    finally:
        stop.set()
        thread.join(30)
    if errors:
        raise errors[0]
