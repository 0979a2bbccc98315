"""How much one containment costs the broker, by the size of the dynamic security plugin's state.

Run from the repository root::

    PYTHONPATH=. .venv/bin/python bench/broker_rights.py              # states of 10, 1,000 and 10,000 clients
    PYTHONPATH=. .venv/bin/python bench/broker_rights.py --sizes 10 3000 --trials 20

For each size N a real Mosquitto is started (tests/brokerkit.py: the hub's configuration, certificates and ACL
file) with N device exceptions written into the plugin's state before start; then ``--trials`` containments are
sent over the admin socket, each one message of commands (quarantine a new device: a role, its ACLs, a client),
and each is lifted again. Timed: the round trip of each message (the broker runs it on its only thread, rewriting
its whole state file, and serves no other client meanwhile, so the round trip bounds the stall), and the broker's
start-up with that state.

Warden keeps only exceptions (contained devices) in the plugin's state and gives every other device its rights by
the ACL file's patterns (docs/adr/0005-broker-rights.md): its N is the number of contained devices. Per-device
roles for every device would make N the fleet's size. Results go to bench/results/broker_rights.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.enroll import machine, percentile, write_json
from tests.brokerkit import FLEET, start_broker

from warden.broker import Access, access_commands
from warden.core.settings import load_settings
from warden.hub import Hub, initialise

RESULTS = Path(__file__).resolve().parent / "results" / "broker_rights.json"


def measure(base: Path, hub: Hub, size: int, trials: int) -> dict[str, object]:
    exceptions = {f"held-{i:06d}": Access.QUARANTINED for i in range(size)}
    started = time.perf_counter()
    broker = start_broker(hub, base / f"broker-{size}", exceptions=exceptions)
    startup = time.perf_counter() - started
    state_bytes = broker.config.dynsec_file.stat().st_size
    admin = broker.admin()
    contain: list[float] = []
    lift: list[float] = []
    try:
        for i in range(trials):
            device = f"trial-{i:04d}"
            t0 = time.perf_counter()
            admin.execute(access_commands(device, Access.QUARANTINED, known=False))
            contain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            admin.execute(access_commands(device, Access.NORMAL, known=True))
            lift.append(time.perf_counter() - t0)
    finally:
        admin.close()
        broker.process.stop()
    commands = len(access_commands("x", Access.QUARANTINED, known=False))
    contain.sort()
    lift.sort()
    return {
        "exceptions": size,
        "state_file_bytes": state_bytes,
        "startup_s": round(startup, 3),
        "commands_per_containment": commands,
        "containment_p50_ms": round(percentile(contain, 0.5) * 1000, 2),
        "containment_p99_ms": round(percentile(contain, 0.99) * 1000, 2),
        "containment_mean_ms": round(statistics.fmean(contain) * 1000, 2),
        "lift_p50_ms": round(percentile(lift, 0.5) * 1000, 2),
        "per_command_ms": round(statistics.fmean(contain) * 1000 / commands, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 10000])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="warden-bench-broker-") as tmp:
        base = Path(tmp)
        initialise(base / "hub", org="Bench", fleet_domain=FLEET, actor="bench")
        with Hub.open(load_settings(base / "hub")) as hub:
            for size in args.sizes:
                row = measure(base, hub, size, args.trials)
                rows.append(row)
                print(
                    f"{size:>7,} exceptions ({row['state_file_bytes']:>11,} B of state): containment p50 "
                    f"{row['containment_p50_ms']} ms, p99 {row['containment_p99_ms']} ms "
                    f"({row['per_command_ms']} ms per command, {row['commands_per_containment']} commands); "
                    f"lift p50 {row['lift_p50_ms']} ms; broker start {row['startup_s']} s",
                    flush=True,
                )
    write_json(args.out, {"machine": machine(), "trials": args.trials, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
