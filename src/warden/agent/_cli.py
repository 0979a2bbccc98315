"""``warden-agent`` (also ``warden agent``): run the agent, onboard once, or show its status.

Standard library only (argparse), so that the agent installs without the hub's command-line dependencies.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from warden.agent._agent import Agent, read_status
from warden.agent._config import load_config
from warden.core import WardenError

__all__ = ["main", "render_status"]

#: a status file older than this means the agent is not running
_STALE_SECONDS = 10.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warden-agent", description="Warden's device agent.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "onboard if needed, then stay connected, publish telemetry and health, renew before expiry"),
        ("enroll", "onboard (EST simpleenroll) and exit"),
        ("status", "identity, certificate expiry, broker connection and queue depth"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", "-c", type=Path, default=Path("/etc/warden/agent.toml"), help="agent.toml")
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "run":
            p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sim = sub.add_parser(
        "simulate",
        help="a simulated factory and fleet of N real agents in this process",
        description="Create a device maker's CA and an enrollment group for it on the hub (operator API token), "
        "then run N agents that onboard with their IDevIDs, connect, publish and renew until stopped.",
    )
    sim.add_argument("--devices", "-n", type=int, default=20)
    sim.add_argument("--hub", required=True, help="the hub's URL, e.g. https://hub.fleet.example:8443")
    sim.add_argument("--ca", type=Path, required=True, help="the hub's root certificate (pinned)")
    sim.add_argument("--address", help="connect to this address instead of resolving the hub's and broker's names")
    sim.add_argument("--broker-host", help="the broker's name (default: broker.<the hub's domain>)")
    sim.add_argument("--broker-port", type=int, default=8883)
    sim.add_argument("--token-file", type=Path, help="a file holding an operator API token (or $WARDEN_API_TOKEN)")
    sim.add_argument("--group", default="simulated", help="the enrollment group to create for the factory")
    sim.add_argument("--work", type=Path, default=Path("warden-sim"), help="directory for the factory and devices")
    sim.add_argument("--telemetry-interval", type=float, default=5.0)
    sim.add_argument("--seconds", type=float, default=0, help="stop after this long (default: until interrupted)")
    return parser


def simulate(args: argparse.Namespace) -> int:
    from warden.agent._config import BrokerConfig, HubConfig
    from warden.agent._simulate import Fleet, create_enrollment_group

    token = os.environ.get("WARDEN_API_TOKEN", "")
    if args.token_file is not None:
        token = args.token_file.read_text().strip()
    if not token:
        raise WardenError("an operator API token is needed", hint="--token-file FILE or WARDEN_API_TOKEN")
    if not 1 <= args.devices <= 2000:
        raise WardenError("--devices must be between 1 and 2000 (run several processes for more)")
    hub = HubConfig(url=args.hub, ca=args.ca, address=args.address)
    broker_host = args.broker_host or "broker." + hub.host.split(".", 1)[-1]
    broker = BrokerConfig(host=broker_host, port=args.broker_port, address=args.address)
    fleet = Fleet(hub, broker, args.work, args.devices, telemetry_interval=args.telemetry_interval)
    created = create_enrollment_group(hub, token, args.group, fleet.factory.ca_path)
    print(f"enrollment group {args.group!r} {'created' if created else 'exists already'}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fleet.start()
    started = time.monotonic()
    try:
        while not stop.wait(5.0):
            s = fleet.summary()
            print(
                f"{time.monotonic() - started:6.0f} s  {s['connected']}/{s['devices']} connected, "
                f"{s['delivered']} delivered, {s['refused']} refused, {s['queued']} queued, "
                f"{s['renewals']} renewals, {s['failed']} failed",
                flush=True,
            )
            if args.seconds and time.monotonic() - started >= args.seconds:
                break
    finally:
        fleet.stop()
    return 0 if fleet.summary()["failed"] == 0 else 1


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status_of(state_dir: Path) -> dict[str, Any]:
    status = read_status(state_dir) or {}
    updated = status.get("updated")
    running = (
        not status.get("stopped")
        and isinstance(updated, int | float)
        and time.time() - updated < _STALE_SECONDS
        and _alive(status.get("pid"))
    )
    return {"running": running, **status}


def render_status(status: dict[str, Any]) -> str:
    if not status.get("device_id"):
        return "the agent has not run yet (no status file in its state directory)"
    cert = status.get("certificate") or {}
    broker = status.get("broker") or {}
    queue = status.get("queue") or {}
    renewal = status.get("renewal") or {}
    keystore = status.get("keystore") or {}
    lines = [
        f"device       {status['device_id']}  ({'running' if status.get('running') else 'NOT RUNNING'})",
        f"key store    {keystore.get('kind', '?')}" + (" (hardware-backed)" if keystore.get("hardware_backed") else ""),
    ]
    if cert:
        left = _left(cert.get("not_after"))
        lines.append(f"certificate  serial {cert.get('serial')}, expires {cert.get('not_after')} ({left})")
        lines.append(
            f"renewal      due {renewal.get('due')}, {renewal.get('renewals', 0)} done, "
            f"{renewal.get('failures', 0)} failures in a row"
            + (f": {renewal['last_error']}" if renewal.get("last_error") else "")
        )
    else:
        lines.append("certificate  none (not enrolled)")
    state = "connected" if broker.get("connected") else "disconnected"
    lines.append(
        f"broker       {broker.get('host')}:{broker.get('port')} {state}"
        + (
            f" since {dt.datetime.fromisoformat(broker['since']).strftime('%H:%M:%S')}"
            if broker.get("since") and broker.get("connected")
            else ""
        )
        + (f" ({broker['last_error']})" if broker.get("last_error") else "")
    )
    lines.append(
        f"messages     {broker.get('delivered', 0)} delivered, {broker.get('refused', 0)} refused by the broker, "
        f"{broker.get('received', 0)} received"
    )
    lines.append(
        f"queue        {queue.get('depth', 0)} waiting (limit {queue.get('limit')}), {queue.get('dropped', 0)} dropped"
    )
    offset = status.get("clock_offset_seconds")
    if offset is not None:
        lines.append(f"clock        {offset:+.1f} s against the hub")
    return "\n".join(lines)


def _left(iso: str | None) -> str:
    if not iso:
        return "?"
    seconds = dt.datetime.fromisoformat(iso).timestamp() - time.time()
    if seconds < 0:
        return "EXPIRED"
    if seconds < 3600:
        return f"in {seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"in {seconds / 3600:.1f} h"
    return f"in {seconds / 86400:.0f} days"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "simulate":
            logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            return simulate(args)
        config = load_config(args.config)
        if args.command == "status":
            status = status_of(config.state_dir)
            if args.json:
                print(json.dumps(status, indent=2))
                return 0
            try:
                print(render_status(status))
            except (KeyError, TypeError, ValueError):
                print("the status file is damaged; the agent rewrites it every two seconds while it runs")
                return 1
            return 0
        logging.basicConfig(
            level=getattr(logging, getattr(args, "log_level", "info").upper()),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        agent = Agent(config)
        if args.command == "enroll":
            identity = agent.onboard()
            agent.write_status()
            until = identity.certificate.not_valid_after_utc
            print(f"enrolled {agent.device_id}: certificate {identity.serial} valid until {until:%Y-%m-%d %H:%M:%SZ}")
            return 0
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        agent.run(stop)
        return 0
    except WardenError as e:
        print(f"error: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return e.exit_code


def main_exit() -> None:
    sys.exit(main())
