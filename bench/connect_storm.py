"""Connect storm: N devices connect to the embedded broker over mutual TLS at once.

Run from the repository root::

    PYTHONPATH=. .venv/bin/python bench/connect_storm.py                  # 10,000 devices
    PYTHONPATH=. .venv/bin/python bench/connect_storm.py --devices 2000 --in-flight 100

Setup (untimed): a hub (SQLite) and its broker, started as ``warden serve`` starts it; ``--devices`` operational
certificates (own P-256 key each) issued by the hub's CA and written to files, the way devices hold them.

Timed: a load generator in its own process (asyncio, ``--in-flight`` handshakes at a time, open-file limits raised
on both ends) opens one TLS connection per device, verifying the broker's name ``broker.<fleet-domain>`` against
the hub's CA and presenting the device's certificate, sends an MQTT CONNECT and waits for CONNACK; every
connection stays open until all are connected. Reported: connects/s, time until all are connected, p50/p99 of one
connect, failures by kind, and the broker's CPU per connect (/proc). Results go to bench/results/connect_storm.json.
Target: 10,000 devices connected in <= 30 s (Mosquitto's ceiling here is about 770 mutual-TLS connects/s per core).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing
import resource
import ssl
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.containment import write_identity
from bench.enroll import cpu_seconds, machine, percentile, write_json
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tests.hubserver import csr_der, free_port

from warden.core import load_settings
from warden.hub import Hub, initialise
from warden.pki import IssuedIdentity, Profile, parse_csr

RESULTS = Path(__file__).resolve().parent / "results" / "connect_storm.json"
FLEET = "fleet.acme.test"
BROKER_NAME = f"broker.{FLEET}"
TARGET_SECONDS = 30.0


def raise_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def issue_devices(hub: Hub, directory: Path, count: int) -> list[tuple[str, Path, Path]]:
    """Certificates straight from the issuing CA (no registry rows: the broker checks the chain, not the registry)."""
    authority = hub.ca.authority()
    chain = hub.chain_pem()
    now = dt.datetime.now(dt.UTC)
    devices = []
    for i in range(count):
        device_id = f"storm-{i:06d}"
        key = ec.generate_private_key(ec.SECP256R1())
        csr = parse_csr(csr_der(device_id, key)[0])
        certificate = authority.issue(
            csr=csr,
            profile=Profile.DEVICE,
            identity=IssuedIdentity.for_device(device_id, FLEET),
            serial=10**12 + i,
            now=now,
            validity=dt.timedelta(days=1),
        )
        pem = certificate.public_bytes(serialization.Encoding.PEM)
        devices.append((device_id, *write_identity(directory, device_id, pem, chain, key)))
    return devices


def _connect_packet(client_id: str) -> bytes:
    """MQTT 3.1.1 CONNECT: clean session, keep-alive 300 s (the broker uses the certificate's name anyway)."""
    cid = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02" + struct.pack("!H", 300)
    payload = struct.pack("!H", len(cid)) + cid
    remaining = len(variable) + len(payload)
    return bytes([0x10, remaining]) + variable + payload


async def _storm(
    devices: list[tuple[str, ssl.SSLContext]], port: int, in_flight: int
) -> tuple[list[float], Counter[str], list[Any]]:
    gate = asyncio.Semaphore(in_flight)
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    writers: list[Any] = []

    async def one(device_id: str, context: ssl.SSLContext) -> None:
        async with gate:
            started = time.perf_counter()
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=BROKER_NAME), 60
                )
                writer.write(_connect_packet(device_id))
                connack = await asyncio.wait_for(reader.readexactly(4), 60)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ssl.SSLError) as e:
                failures[type(e).__name__] += 1
                return
            if connack[0] != 0x20 or connack[3] != 0:
                failures[f"connack {connack.hex()}"] += 1
                writer.close()
                return
            latencies.append(time.perf_counter() - started)
            writers.append(writer)

    await asyncio.gather(*(one(*d) for d in devices))
    return latencies, failures, writers


def _generator(
    devices: list[tuple[str, Path, Path]], cafile: Path, port: int, in_flight: int, ready: Any, go: Any, out: Any
) -> None:
    """One load-generator process: its TLS contexts are made before the clock starts (a device has its own
    certificate loaded already), then it connects its share of devices when ``go`` is set."""
    raise_file_limit()
    chain = cafile.read_text()
    contexts = []
    for device_id, cert, key in devices:
        context = ssl.create_default_context(cadata=chain)
        context.load_cert_chain(cert, key)
        contexts.append((device_id, context))
    ready.set()
    go.wait()

    async def main() -> None:
        latencies, failures, writers = await _storm(contexts, port, in_flight)
        out.send((latencies, dict(failures), time.time()))
        await asyncio.sleep(1)  # every connection stays open until all processes are done
        for writer in writers:
            writer.close()

    asyncio.run(main())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--in-flight", type=int, default=200, help="handshakes under way at once, in all")
    parser.add_argument("--processes", type=int, default=2, help="load-generator processes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args(argv)
    limit = raise_file_limit()
    if limit < args.devices + 200:
        print(f"the open-file limit ({limit}) is below {args.devices + 200}: raise it (ulimit -n)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="warden-bench-storm-") as tmp:
        base = Path(tmp)
        initialise(base / "hub", org="Bench", fleet_domain=FLEET, actor="bench")
        settings = load_settings(base / "hub").model_copy(update={"broker": "local", "broker_port": free_port()})
        with Hub.open(settings) as hub:
            started = time.perf_counter()
            (base / "devices").mkdir()
            devices = issue_devices(hub, base / "devices", args.devices)
            print(f"{args.devices:,} device certificates issued ({time.perf_counter() - started:.1f} s, untimed)")
            broker = hub.start_broker(actor="bench")
            assert broker is not None
            try:
                pid = broker._process.pid if broker._process is not None else None
                assert pid is not None
                context = multiprocessing.get_context("spawn")
                go = context.Event()
                processes, pipes = [], []
                for share in range(args.processes):
                    ready = context.Event()
                    receiver, sender = context.Pipe(duplex=False)
                    process = context.Process(
                        target=_generator,
                        args=(
                            devices[share :: args.processes],
                            broker.layout.cafile,
                            broker.port,
                            max(1, args.in_flight // args.processes),
                            ready,
                            go,
                            sender,
                        ),
                    )
                    process.start()
                    ready.wait(600)
                    processes.append(process)
                    pipes.append(receiver)
                cpu_before = cpu_seconds(pid)
                go_at = time.time()
                go.set()
                latencies, failures, finished = [], Counter(), go_at
                for receiver in pipes:
                    part, part_failures, done_at = receiver.recv()
                    latencies += part
                    failures.update(part_failures)
                    finished = max(finished, done_at)
                elapsed = finished - go_at
                broker_cpu = cpu_seconds(pid) - cpu_before
                for process in processes:
                    process.join(timeout=120)
            finally:
                broker.stop()
    latencies.sort()
    connected = len(latencies)
    result = {
        "devices": args.devices,
        "in_flight": args.in_flight,
        "generator_processes": args.processes,
        "connected": connected,
        "failures": failures,
        "seconds_until_all_connected": round(elapsed, 2),
        "connects_per_s": round(connected / elapsed, 1) if elapsed else 0.0,
        "connect_p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "connect_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "broker_cpu_ms_per_connect": round(broker_cpu * 1000 / max(connected, 1), 3),
        "target_seconds": TARGET_SECONDS,
    }
    ok = connected == args.devices and elapsed <= TARGET_SECONDS
    print(
        f"{connected:,}/{args.devices:,} connected in {elapsed:.1f} s = {result['connects_per_s']:,} connects/s; "
        f"one connect p50 {result['connect_p50_ms']} ms, p99 {result['connect_p99_ms']} ms; broker CPU "
        f"{result['broker_cpu_ms_per_connect']} ms per connect; failures {failures or 'none'}"
    )
    print(f"target: all {args.devices:,} within {TARGET_SECONDS:.0f} s: {'ok' if ok else 'MISSED'}")
    write_json(args.out, {"machine": machine(), **result})
    print(f"wrote {args.out}")
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
