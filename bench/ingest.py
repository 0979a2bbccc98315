"""Ingest: sustained device messages through the broker into the hub's ingest.

Run from the repository root::

    PYTHONPATH=. .venv/bin/python bench/ingest.py               # 1,000 devices; 30 s each at 12,000 and 20,000
                                                                # messages/s offered at QoS 1, 15 s at QoS 0
    PYTHONPATH=. .venv/bin/python bench/ingest.py --devices 200 --seconds 10 --qos0-seconds 5 --rates 12000

Setup (untimed): a real ``warden serve`` (SQLite, one worker) with its embedded Mosquitto, ``--devices`` devices
registered (a CSV import) and given operational certificates by the hub (each its own P-256 key, written to files).
The hub's flood limit is raised out of the way (``--flood-rate``): this measures throughput, not flooding.

Timed, once per offered rate in ``--rates`` at QoS 1 (``--seconds`` each), then at QoS 0 at the highest rate
(``--qos0-seconds``): ``--processes`` load-generator processes (asyncio, one mutual-TLS MQTT 5 connection per device,
packets built by hand, open-file limits raised) publish valid telemetry (each device its own increasing sequence
numbers, three metrics) at the offered rate, spread over the devices in 50 ms bursts; at QoS 1 a device keeps at
most ``--window`` messages unacknowledged. The rates are paced because an unpaced generator measures the broker: it
acknowledges publishers far faster than it can forward to one subscriber, and drops the rest.

Measured after ``--warmup`` seconds, from the hub's side:

- **messages/s processed**: the growth of the ingest's own ``accepted`` total (what ``warden ingest status``
  shows) between two of its flushes, divided by the time between those flushes (their ``last_flush_at``); not what
  the generators sent. Beside it: what the ingest accepted over everything the generators sent (below 100%, the
  broker dropped messages for the hub: its queue was full).
- **hub CPU per message**: utime + stime of the ``warden serve`` process (all threads: the link's network thread,
  the recorder, the idle HTTP server) from /proc, over the same interval, divided by the messages processed; and
  the broker's and the load generator's shares of a core (the three share the machine's cores).
- the batches (transactions) written and their average size.

Results go to bench/results/ingest.json. Target: >= 12,000 messages/s processed at QoS 1 on this 2-core machine.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.containment import write_identity
from bench.enroll import cpu_seconds, machine, note_load, write_json
from tests.hubserver import HubServer, csr_der, start_hub

from warden.core import load_settings
from warden.hub import Hub

RESULTS = Path(__file__).resolve().parent / "results" / "ingest.json"
FLEET = "fleet.acme.test"
BROKER_NAME = f"broker.{FLEET}"
TARGET_QOS1 = 12_000.0


def raise_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- MQTT v5, by hand --------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _connect_packet(client_id: str) -> bytes:
    """MQTT 5 CONNECT: clean start, keep-alive 300 s, no properties."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x05\x02" + struct.pack("!H", 300) + b"\x00" + struct.pack("!H", len(cid)) + cid
    return b"\x10" + _varint(len(body)) + body


def _publish_packet(topic: bytes, mid: int, payload: bytes, qos: int) -> bytes:
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"") + b"\x00" + payload
    return bytes([0x30 | (qos << 1)]) + _varint(len(body)) + body


def _payload(seq: int, stamp: str) -> bytes:
    return (
        f'{{"v":1,"seq":{seq},"ts":"{stamp}","metrics":{{"temperature":{20 + seq % 7}.5,'
        f'"humidity":{40 + seq % 11},"battery":0.{seq % 97:02d}}}}}'
    ).encode()


class _Device:
    def __init__(self, device_id: str, context: ssl.SSLContext) -> None:
        self.device_id = device_id
        self.context = context
        self.topic = f"warden/{device_id}/telemetry".encode()
        self.seq = 0
        self.sent = 0
        self.acked = 0

    def packets(self, count: int, qos: int, stamp: str) -> bytes:
        """The device's next ``count`` telemetry messages, as PUBLISH packets."""
        out = []
        for _ in range(count):
            self.seq += 1
            out.append(_publish_packet(self.topic, self.seq % 65535 + 1, _payload(self.seq, stamp), qos))
        self.sent += count
        return b"".join(out)


class _Run:
    """What one generator's devices share: the handshake gate, the count of connected devices, go and stop."""

    def __init__(self, port: int, qos: int, window: int, rate: float) -> None:
        self.port, self.qos, self.window = port, qos, window
        #: messages per second per device (0: as fast as the broker acknowledges)
        self.rate = rate
        self.gate = asyncio.Semaphore(100)
        self.connected = 0
        self.go = asyncio.Event()
        self.stop = False


def _split_packets(buffer: bytes) -> tuple[list[int], bytes]:
    """The packet types of the complete packets at the start of ``buffer``, and what is left."""
    types = []
    while len(buffer) >= 2:
        length = shift = 0
        pos = 1
        while pos < len(buffer) and pos <= 4:
            byte = buffer[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        else:
            break  # the remaining length is not complete yet
        if pos + length > len(buffer):
            break
        types.append(buffer[0] >> 4)
        buffer = buffer[pos + length :]
    return types, buffer


async def _run_device(device: _Device, run: _Run) -> None:
    async with run.gate:  # 100 handshakes at a time; the connections stay open
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", run.port, ssl=device.context, server_hostname=BROKER_NAME
        )
        writer.write(_connect_packet(device.device_id))
        header = await reader.readexactly(2)
        rest = await reader.readexactly(header[1]) if header[1] < 128 else b""
    if header[0] != 0x20 or len(rest) < 2 or rest[1] != 0:
        raise RuntimeError(f"{device.device_id}: CONNACK {header.hex()} {rest.hex()}")
    run.connected += 1
    await run.go.wait()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if run.rate:
        await _paced(device, run, reader, writer, stamp)
        return
    if run.qos == 0:
        while not run.stop:
            writer.write(device.packets(run.window, 0, stamp))
            await writer.drain()
        writer.close()
        return
    writer.write(device.packets(run.window, 1, stamp))
    buffer = b""
    while not run.stop:
        data = await reader.read(65536)
        if not data:
            raise RuntimeError(f"{device.device_id}: the broker closed the connection")
        types, buffer = _split_packets(buffer + data)
        acks = types.count(4)  # PUBACK
        device.acked += acks
        if acks and not run.stop:
            writer.write(device.packets(acks, 1, stamp))
    writer.close()


async def _paced(
    device: _Device, run: _Run, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stamp: str
) -> None:
    """Publish at ``run.rate`` messages per second, in bursts every 50 ms (at QoS 1 never more than ``run.window``
    unacknowledged: a device that falls behind sends less)."""
    tick = 0.05
    loop = asyncio.get_running_loop()
    # Devices start spread over one tick, so the bursts do not all coincide.
    await asyncio.sleep(tick * (hash(device.device_id) % 1000) / 1000)
    started, due = loop.time(), 0.0
    buffer = b""

    async def read_acks() -> None:
        nonlocal buffer
        while True:
            data = await reader.read(65536)
            if not data:
                return
            types, buffer = _split_packets(buffer + data)
            device.acked += types.count(4)

    acks = asyncio.create_task(read_acks()) if run.qos else None
    try:
        while not run.stop:
            due = (loop.time() - started) * run.rate
            count = int(due) - device.sent
            if run.qos:
                count = min(count, run.window - (device.sent - device.acked))
            if count > 0:
                writer.write(device.packets(count, run.qos, stamp))
            await asyncio.sleep(tick)
    finally:
        if acks is not None:
            acks.cancel()
        writer.close()


def _generator(
    devices: list[tuple[str, str, str]], cafile: str, port: int, qos: int, window: int, rate: float, pipe: Any
) -> None:
    """One load-generator process: connects its devices and says how many, publishes from "go" until "stop"
    (both read from ``pipe``), then reports what it sent and what the broker acknowledged."""
    raise_file_limit()
    chain = Path(cafile).read_text()
    prepared = []
    for device_id, cert, key in devices:
        context = ssl.create_default_context(cadata=chain)
        context.load_cert_chain(cert, key)
        prepared.append(_Device(device_id, context))

    async def main() -> None:
        run = _Run(port, qos, window, rate)
        loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(_run_device(d, run)) for d in prepared]
        deadline = time.monotonic() + 120
        while run.connected + sum(t.done() for t in tasks) < len(tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        pipe.send(("connected", run.connected))
        await loop.run_in_executor(None, pipe.recv)  # go
        run.go.set()
        await loop.run_in_executor(None, pipe.recv)  # stop
        run.stop = True
        await asyncio.sleep(0.5)
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [repr(r) for r in results if isinstance(r, Exception)]
        pipe.send(("done", sum(d.sent for d in prepared), sum(d.acked for d in prepared), errors[:5]))

    asyncio.run(main())


# -- the run -----------------------------------------------------------------------------------------------------


def _stats(hub: Hub) -> dict[str, Any]:
    stats = hub.ingest_stats()
    return {
        "accepted": stats.accepted,
        "processed": stats.processed,
        "flushes": stats.flushes,
        "at": stats.last_flush_at,
        "malformed": stats.malformed,
        "duplicates": stats.duplicates,
        "unknown": stats.unknown,
        "overflow": stats.overflow,
    }


def _next_flush(hub: Hub, after: dt.datetime | None, timeout: float = 10.0) -> dict[str, Any]:
    """The ingest's totals as of its first flush after ``after``."""
    deadline = time.monotonic() + timeout
    while True:
        stats = _stats(hub)
        if stats["at"] is not None and (after is None or stats["at"] > after):
            return stats
        if time.monotonic() > deadline:
            raise RuntimeError("the hub's ingest wrote no batch: is it running?")
        time.sleep(0.05)


def phase(
    server: HubServer,
    hub: Hub,
    broker_pid: int,
    devices: list[tuple[str, str, str]],
    args: argparse.Namespace,
    *,
    qos: int,
    rate: float,
) -> dict[str, Any]:
    seconds = args.seconds if qos else args.qos0_seconds
    context = multiprocessing.get_context("spawn")
    pipes, processes = [], []
    cafile = str(server.data_dir / "broker" / "ca.pem")
    for share in range(args.processes):
        parent, child = context.Pipe()
        process = context.Process(
            target=_generator,
            args=(
                devices[share :: args.processes],
                cafile,
                server.broker_port,
                qos,
                args.window,
                rate / len(devices),
                child,
            ),
        )
        process.start()
        pipes.append(parent)
        processes.append(process)
    connected = sum(pipe.recv()[1] for pipe in pipes)
    before = _stats(hub)
    for pipe in pipes:
        pipe.send("go")
    time.sleep(args.warmup)
    first = _next_flush(hub, _stats(hub)["at"])
    cpu0, broker_cpu0, wall0 = cpu_seconds(server.process.pid), cpu_seconds(broker_pid), time.monotonic()
    generator_cpu0 = sum(cpu_seconds(p.pid) for p in processes if p.pid is not None)
    time.sleep(seconds)
    last = _next_flush(hub, _stats(hub)["at"])
    cpu1, broker_cpu1, wall1 = cpu_seconds(server.process.pid), cpu_seconds(broker_pid), time.monotonic()
    generator_cpu1 = sum(cpu_seconds(p.pid) for p in processes if p.pid is not None)
    for pipe in pipes:
        pipe.send("stop")
    sent = acked = 0
    errors: list[str] = []
    for pipe in pipes:
        _, s, a, e = pipe.recv()
        sent, acked = sent + s, acked + a
        errors += e
    for process in processes:
        process.join(timeout=60)
    time.sleep(args.flush_seconds * 3)  # the last batches
    final = _stats(hub)
    interval = (last["at"] - first["at"]).total_seconds()
    processed = last["accepted"] - first["accepted"]
    flushes = last["flushes"] - first["flushes"]
    delivered = final["accepted"] - before["accepted"]
    return {
        "qos": qos,
        "offered_per_s": rate or None,
        "devices_connected": connected,
        "seconds": round(interval, 2),
        "messages_processed": processed,
        "messages_per_s": round(processed / interval, 1),
        "hub_cpu_us_per_message": round((cpu1 - cpu0) * 1e6 / max(processed, 1), 1),
        "hub_cpu_share": round((cpu1 - cpu0) / (wall1 - wall0), 2),
        "broker_cpu_us_per_message": round((broker_cpu1 - broker_cpu0) * 1e6 / max(processed, 1), 1),
        "broker_cpu_share": round((broker_cpu1 - broker_cpu0) / (wall1 - wall0), 2),
        "generator_cpu_share": round((generator_cpu1 - generator_cpu0) / (wall1 - wall0), 2),
        "batches": flushes,
        "average_batch": round(processed / max(flushes, 1), 1),
        "generators_sent": sent,
        "generators_acked": acked if qos else None,
        "ingested_of_sent": round(delivered / max(sent, 1), 4),
        "malformed": final["malformed"],
        "duplicates": final["duplicates"],
        "unknown": final["unknown"],
        "overflow": final["overflow"],
        "generator_errors": errors,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0, help="timed phase at QoS 1")
    parser.add_argument("--qos0-seconds", type=float, default=15.0, help="timed phase at QoS 0 (0: skip)")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--window", type=int, default=10, help="QoS 1 messages in flight per device")
    parser.add_argument(
        "--rates",
        default="12000,20000",
        help="messages/s offered in all, one QoS 1 phase each (0: as fast as the broker acknowledges)",
    )
    parser.add_argument("--processes", type=int, default=1, help="load-generator processes")
    parser.add_argument("--flood-rate", type=float, default=100_000.0, help="the hub's flood limit for the run")
    parser.add_argument("--flush-seconds", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", type=Path, help="keep the hub's data (and the broker's log) here")
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args(argv)
    limit = raise_file_limit()
    if limit < args.devices + 100:
        print(f"the open-file limit ({limit}) is below {args.devices + 100}: raise it (ulimit -n)", file=sys.stderr)
        return 2
    load_start = note_load()
    with tempfile.TemporaryDirectory(prefix="warden-bench-ingest-", ignore_cleanup_errors=True) as tmp:
        base = Path(tmp) if args.keep is None else args.keep
        base.mkdir(parents=True, exist_ok=True)
        server = start_hub(
            base,
            broker=True,
            extra_env={
                "WARDEN_LOG_LEVEL": "warning",
                "WARDEN_JOBS_INTERVAL_SECONDS": "30",
                "WARDEN_INGEST_FLOOD_RATE": str(args.flood_rate),
                "WARDEN_INGEST_FLUSH_SECONDS": str(args.flush_seconds),
            },
        )
        try:
            settings = load_settings(server.data_dir)  # the passphrase file of a fresh data directory
            with Hub.open(settings) as hub:
                devices = register(hub, base / "devices", args.devices)
                broker_pid = int((server.data_dir / "broker" / "mosquitto.pid").read_text().strip())
                rates = [float(r) for r in args.rates.split(",")]
                results = [phase(server, hub, broker_pid, devices, args, qos=1, rate=r) for r in rates]
                if args.qos0_seconds > 0:
                    results.append(phase(server, hub, broker_pid, devices, args, qos=0, rate=max(rates)))
        finally:
            server.stop()
            _wait_gone(server.data_dir / "broker" / "mosquitto.pid")
    for r in results:
        print(
            f"QoS {r['qos']}, {r['offered_per_s'] or 'unpaced'} offered: {r['messages_per_s']:,} messages/s processed "
            f"by the hub's ingest ({r['messages_processed']:,} in {r['seconds']} s, {r['devices_connected']} devices, "
            f"{r['ingested_of_sent']:.1%} of what was sent); hub CPU {r['hub_cpu_us_per_message']} us/message "
            f"({r['hub_cpu_share']:.0%} of a core), broker CPU {r['broker_cpu_us_per_message']} us/message "
            f"({r['broker_cpu_share']:.0%}), load generator {r['generator_cpu_share']:.0%} of a core; "
            f"{r['batches']} batches of {r['average_batch']:,} on average"
        )
        if r["generator_errors"]:
            print(f"  generator errors: {r['generator_errors']}")
    ok = max(r["messages_per_s"] for r in results if r["qos"] == 1) >= TARGET_QOS1
    print(f"target: >= {TARGET_QOS1:,.0f} messages/s at QoS 1: {'ok' if ok else 'MISSED'}")
    write_json(
        args.out,
        {
            "machine": machine(),
            "load_at_start": load_start,
            "devices": args.devices,
            "window": args.window,
            "generator_processes": args.processes,
            "flush_seconds": args.flush_seconds,
            "results": results,
            "target_qos1_per_s": TARGET_QOS1,
        },
    )
    print(f"wrote {args.out}")
    return 0 if ok or not args.check else 1


def _wait_gone(pid_file: Path, timeout: float = 30.0) -> None:
    """Until the broker has exited (it saves its persistence file on the way out)."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def register(hub: Hub, directory: Path, count: int) -> list[tuple[str, str, str]]:
    """``count`` registered devices with operational certificates (their files: id, certificate, key)."""
    started = time.perf_counter()
    ids = [f"sensor-{i:05d}" for i in range(count)]
    hub.provisioning.import_csv(("device_id\n" + "".join(f"{d}\n" for d in ids)).encode(), actor="bench")
    directory.mkdir()
    chain = hub.chain_pem()
    devices = []
    for device_id in ids:
        csr, key = csr_der(device_id)
        issued = hub.certificates.sign(device_id=device_id, csr=csr, actor="bench")
        cert, key_path = write_identity(directory, device_id, issued.pem, chain, key)
        devices.append((device_id, str(cert), str(key_path)))
    print(f"{count:,} devices registered with certificates ({time.perf_counter() - started:.1f} s, untimed)")
    return devices


if __name__ == "__main__":
    sys.exit(main())
