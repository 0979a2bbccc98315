"""``warden demo``: the zero-trust loop end to end on embedded defaults.

A hub (SQLite, its own local Mosquitto) in a temporary data directory, a simulated factory and a fleet of real agents
that onboard with their IDevIDs over EST and publish over mutual TLS; then a scripted incident: a device's stolen
credentials are used by an impostor that probes another device's topics and floods, and the security team contains
it (quarantine, then revocation) while the demo measures the time from each command to the impostor's cut.

In a terminal it shows a live view (rich); in a pipe, plain progress lines. It exits 0 when every step did what it
should, 1 otherwise; ``--keep-running`` leaves the hub and fleet up for exploring with the CLI and API.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from warden.agent._config import BrokerConfig, HubConfig
from warden.agent._est import _Connection, client_context
from warden.agent._simulate import Fleet, Impostor, create_enrollment_group
from warden.core import WardenError

__all__ = ["run_demo"]

FLEET_DOMAIN = "fleet.demo.test"
HUB_NAME = f"hub.{FLEET_DOMAIN}"
BROKER_NAME = f"broker.{FLEET_DOMAIN}"
NOT_AUTHORIZED = 135


class DemoFailedError(WardenError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Api:
    hub: HubConfig
    token: str

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        connection = _Connection(
            self.hub.host, self.hub.port, address=self.hub.address, context=client_context(self.hub.ca), timeout=30
        )
        try:
            connection.request(
                method,
                path,
                body=json.dumps(body).encode() if body is not None else None,
                headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            )
            response = connection.getresponse()
            data = response.read(4 * 1024 * 1024)
        finally:
            connection.close()
        try:
            return response.status, json.loads(data) if data else None
        except ValueError:
            return response.status, data.decode(errors="replace")


class _View:
    """The live fleet view: a rich table in a terminal, a plain line every few seconds in a pipe."""

    def __init__(self, fleet: Fleet, api: _Api, console: Console, live: bool) -> None:
        self.fleet = fleet
        self.api = api
        self.console = console
        self.live = live
        self.events: list[str] = []
        self._states: dict[str, dict[str, Any]] = {}
        self._last_line = 0.0

    def note(self, text: str) -> None:
        self.events.append(text)
        if not self.live:
            print(f"==> {text}", flush=True)

    def refresh_states(self) -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            status, page = self.api.call("GET", "/api/v1/devices?limit=1000")
            if status == 200 and isinstance(page, dict):
                self._states = {d["id"]: d for d in page.get("items", [])}

    def table(self) -> Table:
        table = Table(title=f"Warden demo: {len(self.fleet.members)} devices", expand=False)
        for column in ("device", "hub state", "broker", "certificate expires", "last seen", "sent", "refused"):
            table.add_column(column)
        now = time.time()
        for member in self.fleet.members:
            agent = member.agent
            hub_view = self._states.get(member.device_id, {})
            identity = agent.identity
            expires = "-" if identity is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(identity.not_after))
            seen = hub_view.get("last_seen")
            if isinstance(seen, str):
                with contextlib.suppress(ValueError):
                    import datetime as dt

                    seen = f"{now - dt.datetime.fromisoformat(seen).timestamp():.0f} s ago"
            state = str(hub_view.get("state", "?"))
            style = {"quarantined": "yellow", "disabled": "red", "active": "green"}.get(state, "")
            table.add_row(
                member.device_id,
                f"[{style}]{state}[/]" if style else state,
                "connected" if agent.session_state.connected else "[red]offline[/]",
                expires,
                str(seen or "-"),
                str(agent.session_state.delivered),
                str(agent.session_state.refused),
            )
        for text in self.events[-6:]:
            table.caption = (table.caption + "\n" if table.caption else "") + text
        return table

    def plain_line(self) -> None:
        if time.monotonic() - self._last_line < 3:
            return
        self._last_line = time.monotonic()
        s = self.fleet.summary()
        states: dict[str, int] = {}
        for d in self._states.values():
            states[d.get("state", "?")] = states.get(d.get("state", "?"), 0) + 1
        shown = ", ".join(f"{n} {k}" for k, n in sorted(states.items()))
        print(
            f"    fleet: {s['connected']}/{s['devices']} connected, {s['delivered']} messages delivered, "
            f"{s['refused']} refused; hub: {shown}",
            flush=True,
        )


@contextlib.contextmanager
def _hub_process(work: Path) -> Iterator[tuple[HubConfig, int, Path, subprocess.Popen[bytes]]]:
    data = work / "hub"
    port, broker_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARDEN_")}
    env.update(
        {
            "WARDEN_BROKER": "local",
            "WARDEN_BROKER_PORT": str(broker_port),
            "WARDEN_JOBS_INTERVAL_SECONDS": "1",
            "WARDEN_LOG_LEVEL": "warning",
        }
    )
    cli = [sys.executable, "-m", "warden.cli", "--data-dir", str(data)]
    init = [*cli, "init", "--org", "Demo Factory", "--fleet-domain", FLEET_DOMAIN]
    init += ["--public-url", f"https://{HUB_NAME}:{port}"]
    subprocess.run(init, env=env, check=True, capture_output=True, timeout=120)
    log = (work / "serve.log").open("wb")
    process = subprocess.Popen(
        [*cli, "serve", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    hub = HubConfig(url=f"https://{HUB_NAME}:{port}", ca=data / "ca" / "root-ca.pem", address="127.0.0.1")
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise DemoFailedError(f"the hub exited: see {work / 'serve.log'}")
            try:
                connection = _Connection(HUB_NAME, port, address="127.0.0.1", context=client_context(hub.ca), timeout=5)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    break
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise DemoFailedError(f"the hub did not come up: see {work / 'serve.log'}")
            time.sleep(0.2)
        yield hub, broker_port, data, process
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


def _token(data: Path, role: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "warden.cli", "--data-dir", str(data), "token", "create", "--role", role, "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return str(json.loads(out.stdout)["token"])


def _stolen_files(fleet: Fleet, device_id: str) -> tuple[Path, Path]:
    member = next(m for m in fleet.members if m.device_id == device_id)
    identity = member.agent.identity
    if identity is None:
        raise DemoFailedError(f"{device_id} has no certificate to steal")
    return identity.chain, member.agent.config.state_dir / "keys" / f"{identity.label}.key"


def _wait(what: str, probe: Any, within: float) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.02)
    raise DemoFailedError(f"not within {within:.0f} s: {what}")


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def run_demo(*, devices: int = 20, keep_running: bool = False, work: Path | None = None) -> int:
    live = sys.stdout.isatty()
    # The agents' own warnings (a session kicked by a containment) would interleave with the demo's lines.
    logging.getLogger("warden.agent").setLevel(logging.ERROR)
    console = Console()
    own_dir = work is None
    work = work or Path(tempfile.mkdtemp(prefix="warden-demo-"))
    results: dict[str, float] = {}
    print(f"==> Warden demo in {work} (hub: SQLite and a local Mosquitto; {devices} simulated devices)", flush=True)
    try:
        with _hub_process(work) as (hub, broker_port, data, process), contextlib.ExitStack() as stack:
            print(f"==> Hub up at {hub.url} (broker {BROKER_NAME}:{broker_port})", flush=True)
            operator, security = _token(data, "operator"), _token(data, "security-admin")
            api = _Api(hub, operator)
            broker = BrokerConfig(host=BROKER_NAME, port=broker_port, address="127.0.0.1")
            fleet = Fleet(hub, broker, work / "fleet", devices, prefix="sensor", telemetry_interval=1.0, seed=7)
            create_enrollment_group(hub, security, "demo-factory", fleet.factory.ca_path)
            print("==> Enrollment group 'demo-factory' trusts the simulated factory's CA", flush=True)
            view = _View(fleet, api, console, live)
            started = time.monotonic()
            fleet.start()
            stack.callback(fleet.stop)
            display = Live(view.table(), console=console, refresh_per_second=4) if live else None
            with display or contextlib.nullcontext():

                def tick(seconds: float) -> None:
                    end = time.monotonic() + seconds
                    while time.monotonic() < end:
                        view.refresh_states()
                        if display is not None:
                            display.update(view.table())
                        else:
                            view.plain_line()
                        time.sleep(0.5)

                if not fleet.wait_connected(120):
                    raise DemoFailedError(f"only {fleet.connected()} of {devices} devices connected")
                results["fleet_connected_s"] = time.monotonic() - started
                view.note(
                    f"{devices} devices onboarded with their IDevIDs over EST and connected over mutual TLS "
                    f"in {results['fleet_connected_s']:.1f} s"
                )
                tick(4)
                _incident(fleet, api, _Api(hub, security), hub, broker_port, view, results, tick)
                tick(2)
            _summary(fleet, results)
            if keep_running:
                token_file = work / "operator.token"
                fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(operator)
                print(f"==> The hub (pid {process.pid}) and the fleet keep running; Ctrl-C stops them.", flush=True)
                print(f"    warden --data-dir {data} device list", flush=True)
                print(f"    operator API token in {token_file} (mode 0600); API at {hub.url}/api/v1/", flush=True)
                _wait_for_signal()
                print(f"==> Stopped; the data directory stays in {work}", flush=True)
            fleet.stop()
        return 0
    except (DemoFailedError, WardenError) as e:
        print(f"demo failed: {e.message}", file=sys.stderr, flush=True)
        return 1
    finally:
        if own_dir and not keep_running:
            shutil.rmtree(work, ignore_errors=True)


def _incident(
    fleet: Fleet,
    operator: _Api,
    security: _Api,
    hub: HubConfig,
    broker_port: int,
    view: _View,
    results: dict[str, float],
    tick: Any,
) -> None:
    victim, neighbour = fleet.members[len(fleet.members) // 2], fleet.members[0]
    chain, key = _stolen_files(fleet, victim.device_id)
    # The device was taken from the field: it is off, and its key and certificate are in an attacker's hands.
    fleet.stop_device(victim.device_id)
    copied = Path(tempfile.mkdtemp(prefix="impostor-"))
    shutil.copy(chain, copied / "chain.pem")
    shutil.copy(key, copied / "key.pem")
    view.note(f"INCIDENT: {victim.device_id}'s certificate and key were stolen; an impostor connects with them")
    impostor = Impostor.with_stolen(
        victim.device_id,
        copied / "chain.pem",
        copied / "key.pem",
        hub.ca,
        BrokerConfig(host=BROKER_NAME, port=broker_port, address="127.0.0.1"),
    )
    try:
        _wait("the impostor connected", impostor.connected.is_set, 20)
        before = len(impostor.refused)
        impostor.publish(f"warden/{neighbour.device_id}/telemetry")
        impostor.publish(f"warden/{neighbour.device_id}/commands")
        _wait("the broker refused the foreign topics", lambda: len(impostor.refused) >= before + 2, 10)
        view.note(
            f"impostor tried {neighbour.device_id}'s topics: refused by the broker (least privilege, reason code "
            f"{NOT_AUTHORIZED})"
        )
        # It floods its own telemetry topic.
        flood_until = time.monotonic() + 3
        sent = 0
        while time.monotonic() < flood_until and impostor.connected.is_set():
            impostor.publish(f"warden/{victim.device_id}/telemetry", b'{"v":1,"seq":0,"ts":"x","metrics":{}}')
            sent += 1
            if sent % 200 == 0:
                time.sleep(0.01)
        view.note(f"impostor flooded {sent} messages in 3 s on {victim.device_id}'s telemetry topic")
        restriction = _restriction(operator, victim.device_id, within=5.0)
        if restriction is not None:
            view.note(f"the hub's ingest restricted {victim.device_id} to health and updates: {restriction}")
        tick(2)
        # Containment, step 1: quarantine (the security team's call, through the operator API).
        _wait("the impostor is connected", impostor.connected.is_set, 20)
        start = time.monotonic()
        status, answer = operator.call(
            "POST", f"/api/v1/devices/{victim.device_id}/state", {"state": "quarantined", "reason": "impostor"}
        )
        if status != 200:
            raise DemoFailedError(f"quarantine failed: {status} {answer}")
        while impostor.cut_after(start) is None and time.monotonic() - start < 10:
            impostor.publish(f"warden/{victim.device_id}/telemetry")
            time.sleep(0.005)
        cut = impostor.cut_after(start)
        if cut is None:
            raise DemoFailedError("the quarantine did not cut the impostor off")
        results["quarantine_cut_ms"] = cut * 1000
        view.note(f"quarantined {victim.device_id}: the impostor was cut off {cut * 1000:.0f} ms after the command")
        tick(2)
        # Step 2: revocation. The hub publishes a CRL, the broker reloads it and drops the session.
        serial = victim.agent.identity.serial if victim.agent.identity else ""
        _wait("the impostor reconnected", impostor.connected.is_set, 20)
        start = time.monotonic()
        status, answer = security.call("POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"})
        if status != 200:
            raise DemoFailedError(f"revocation failed: {status} {answer}")
        _wait("the impostor's session was dropped", lambda: impostor.cut_after(start) is not None, 10)
        cut = impostor.cut_after(start)
        assert cut is not None
        results["revocation_cut_ms"] = cut * 1000
        impostor.close()
        refused_at = _reconnect_refused(copied / "chain.pem", copied / "key.pem", hub.ca, broker_port)
        view.note(
            f"revoked {victim.device_id}'s certificate (key compromise): session dropped {cut * 1000:.0f} ms after "
            f"the command; a new TLS handshake with it is refused ({refused_at})"
        )
    finally:
        with contextlib.suppress(Exception):
            impostor.close()
        shutil.rmtree(copied, ignore_errors=True)


def _restriction(api: _Api, device_id: str, *, within: float) -> str | None:
    """The hub's flood restriction of ``device_id`` once the ingest has applied it (None if none within the time)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status, device = api.call("GET", f"/api/v1/devices/{device_id}")
        restriction = device.get("restriction") if status == 200 and isinstance(device, dict) else None
        if isinstance(restriction, dict):
            details = restriction.get("details") or {}
            shown = ", ".join(f"{k} {v}" for k, v in list(details.items())[:4]) if isinstance(details, dict) else ""
            return str(restriction.get("reason", "restricted")) + (f" ({shown})" if shown else "")
        time.sleep(0.2)
    return None


def _reconnect_refused(chain: Path, key: Path, root: Path, port: int) -> str:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(root))
    context.load_cert_chain(chain, key)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=BROKER_NAME) as tls,
        ):
            # TLS 1.3: the server's verdict on the client certificate arrives after the handshake.
            tls.sendall(b"\x10\x00")
            if tls.recv(1) == b"":
                return "connection closed by the broker"
    except (ssl.SSLError, OSError) as e:
        return f"TLS: {getattr(e, 'reason', None) or type(e).__name__}"
    raise DemoFailedError("the broker still accepts the revoked certificate")


def _summary(fleet: Fleet, results: dict[str, float]) -> None:
    s = fleet.summary()
    print("==> Summary", flush=True)
    print(
        f"    fleet: {s['devices']} devices, {s['delivered']} messages delivered, {s['renewals']} renewals", flush=True
    )
    print(f"    onboarding and connection of the whole fleet: {results.get('fleet_connected_s', 0):.1f} s", flush=True)
    print(
        f"    quarantine: impostor cut off {results.get('quarantine_cut_ms', 0):.0f} ms after the command", flush=True
    )
    print(
        f"    revocation: session dropped {results.get('revocation_cut_ms', 0):.0f} ms after the command; "
        "reconnects refused in the TLS handshake",
        flush=True,
    )
