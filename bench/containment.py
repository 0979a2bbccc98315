"""Containment: from the command to the moment a connected device's messages stop being delivered.

Run from the repository root::

    PYTHONPATH=. .venv/bin/python bench/containment.py                   # 10,000 devices, 100 trials of each
    PYTHONPATH=. .venv/bin/python bench/containment.py --devices 1000 --trials 20

Setup: a hub (SQLite) with ``--devices`` devices registered (a CSV import) and ``--contained`` of them quarantined,
and its embedded Mosquitto started as ``warden serve`` starts it (the registry's exceptions written before start).
One probe device connects with its certificate and publishes QoS 1 on its telemetry topic every 5 ms, reconnecting
on its own (paho, like an agent); a second device does the same, as the bystander. The hub's own certificate
subscribes to both, independently of the probe.

Timed, ``--trials`` times each:

- **quarantine**: the device's registry state is set and the broker is told, as ``POST /api/v1/devices/<id>/state``
  does; the cut is the time from the command to the arrival of the probe's last telemetry message. The probe is
  then released and its messages flow again before the next trial.
- **revocation**: the probe connects with a fresh certificate; the certificate is revoked as the API does (a new
  CRL, the broker reloads it, the session is dropped); the cut is measured the same way.

Also reported: the round trip of the broker command (a bound on the broker's stall, as it serves no one else while
it runs the command) and the longest gap in the bystander's messages around each trial. Results go to
bench/results/containment.json. Targets: quarantine p99 <= 1 s (moonshot 250 ms), revocation p99 <= 2 s.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
from bench.enroll import machine, percentile, write_json
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion
from tests.hubserver import csr_der, free_port

from warden.core import load_settings
from warden.hub import Hub, initialise
from warden.pki import Profile, RevocationReason
from warden.registry import DeviceState

RESULTS = Path(__file__).resolve().parent / "results" / "containment.json"
FLEET = "fleet.acme.test"
TARGET_QUARANTINE_P99 = 1.0
TARGET_REVOCATION_P99 = 2.0


class Arrivals:
    """Arrival times of each device's messages, as the hub's subscriber sees them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last: dict[str, float] = {}
        self.times: dict[str, list[float]] = {}

    def on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        device = message.topic.split("/")[1]
        with self._lock:
            self.last[device] = now
            self.times.setdefault(device, []).append(now)

    def last_of(self, device: str) -> float:
        with self._lock:
            return self.last.get(device, 0.0)

    def max_gap(self, device: str, start: float, end: float) -> float:
        with self._lock:
            times = [t for t in self.times.get(device, []) if start <= t <= end]
            self.times[device] = self.times.get(device, [])[-1000:]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


class Publisher:
    """A device that publishes every 5 ms and reconnects on its own, like an agent."""

    def __init__(self, device: str, cert: Path, key: Path, cafile: Path, port: int) -> None:
        self.device = device
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(cafile), certfile=str(cert), keyfile=str(key))
        self.client.tls_insecure_set(True)  # the broker's name does not resolve here; the chain is verified
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(0.005):
            if self.client.is_connected():
                n += 1
                self.client.publish(f"warden/{self.device}/telemetry", str(n), qos=1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.client.loop_stop()
        self.client.disconnect()


def write_identity(
    directory: Path, name: str, pem: bytes, chain: bytes, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(pem + chain)
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def device_identity(hub: Hub, directory: Path, device: str, tag: str) -> tuple[Path, Path, int]:
    csr, key = csr_der(device)
    issued = hub.certificates.sign(device_id=device, csr=csr, actor="bench")
    cert, key_path = write_identity(directory, f"{device}-{tag}", issued.pem, hub.chain_pem(), key)
    return cert, key_path, issued.record.serial


def wait_flowing(arrivals: Arrivals, device: str, timeout: float = 30.0) -> None:
    """Until the device's messages arrive again (three within the last 100 ms)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        now = time.perf_counter()
        with arrivals._lock:
            recent = [t for t in arrivals.times.get(device, [])[-5:] if now - t < 0.1]
        if len(recent) >= 3:
            return
        time.sleep(0.02)
    raise RuntimeError(f"{device}'s messages do not arrive")


def cut_after(arrivals: Arrivals, device: str, t0: float, quiet: float) -> float:
    """Seconds from ``t0`` to the device's last delivered message, once none has come for ``quiet`` seconds."""
    while time.perf_counter() - max(arrivals.last_of(device), t0) < quiet:
        time.sleep(0.02)
    return max(0.0, arrivals.last_of(device) - t0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--contained", type=int, default=100, help="devices already quarantined before start")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--quiet", type=float, default=0.6, help="seconds without a message that end a cut")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="warden-bench-contain-") as tmp:
        base = Path(tmp)
        initialise(base / "hub", org="Bench", fleet_domain=FLEET, actor="bench")
        settings = load_settings(base / "hub").model_copy(update={"broker": "local", "broker_port": free_port()})
        with Hub.open(settings) as hub:
            return run(hub, base, args)


def run(hub: Hub, base: Path, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    rows = "device_id\n" + "".join(f"fleet-{i:06d}\n" for i in range(args.devices))
    hub.provisioning.import_csv(rows.encode(), actor="bench")
    for i in range(args.contained):
        device = f"fleet-{i:06d}"
        hub.devices.change_state(device, DeviceState.ACTIVE, actor="bench")
        hub.devices.change_state(device, DeviceState.QUARANTINED, actor="bench")
    for device in ("probe", "bystander"):
        hub.devices.add_device(device, actor="bench")
    print(f"{args.devices:,} devices registered, {args.contained} quarantined ({time.perf_counter() - started:.1f} s)")
    broker = hub.start_broker(actor="bench")
    assert broker is not None
    cafile = broker.layout.cafile
    try:
        key = ec.generate_private_key(ec.SECP256R1())
        issued = hub.certificates.issue_service(
            names=(f"hub.{FLEET}",), csr=csr_der("hub", key)[0], actor="bench", profile=Profile.HUB_CLIENT
        )
        hub_cert, hub_key = write_identity(base, "hub-client", issued.pem, hub.chain_pem(), key)
        arrivals = Arrivals()
        subscriber = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-hub", protocol=mqtt.MQTTv5)
        subscriber.tls_set(ca_certs=str(cafile), certfile=str(hub_cert), keyfile=str(hub_key))
        subscriber.tls_insecure_set(True)
        subscriber.on_message = arrivals.on_message
        subscriber.on_connect = lambda c, u, f, r, p: c.subscribe("warden/+/telemetry", qos=0)
        subscriber.connect("127.0.0.1", broker.port)
        subscriber.loop_start()
        cert, key_path, _ = device_identity(hub, base, "bystander", "0")
        bystander = Publisher("bystander", cert, key_path, cafile, broker.port)
        results: dict[str, dict[str, list[float]]] = {}
        try:
            wait_flowing(arrivals, "bystander")
            results["quarantine"] = quarantine_trials(hub, base, arrivals, cafile, broker.port, args)
            results["revocation"] = revocation_trials(hub, base, arrivals, cafile, broker.port, args)
        finally:
            bystander.close()
            subscriber.loop_stop()
            subscriber.disconnect()
    finally:
        broker.stop()
    summary = {kind: summarise(values) for kind, values in results.items()}
    for kind, s in summary.items():
        print(
            f"{kind}: cut p50 {s['cut_p50_ms']} ms, p99 {s['cut_p99_ms']} ms, max {s['cut_max_ms']} ms; "
            f"command p50 {s['command_p50_ms']} ms, p99 {s['command_p99_ms']} ms; "
            f"bystander's longest gap p50 {s['bystander_gap_p50_ms']} ms, max {s['bystander_gap_max_ms']} ms"
        )
    ok = (
        summary["quarantine"]["cut_p99_ms"] <= TARGET_QUARANTINE_P99 * 1000
        and summary["revocation"]["cut_p99_ms"] <= TARGET_REVOCATION_P99 * 1000
    )
    print(
        f"targets: quarantine p99 <= {TARGET_QUARANTINE_P99 * 1000:.0f} ms, revocation p99 <= "
        f"{TARGET_REVOCATION_P99 * 1000:.0f} ms: {'ok' if ok else 'MISSED'}"
    )
    write_json(
        args.out,
        {
            "machine": machine(),
            "devices": args.devices,
            "contained_before": args.contained,
            "trials": args.trials,
            "summary": summary,
            "targets": {"quarantine_p99_s": TARGET_QUARANTINE_P99, "revocation_p99_s": TARGET_REVOCATION_P99},
        },
    )
    print(f"wrote {args.out}")
    return 0 if ok or not args.check else 1


def quarantine_trials(
    hub: Hub, base: Path, arrivals: Arrivals, cafile: Path, port: int, args: argparse.Namespace
) -> dict[str, list[float]]:
    cert, key_path, _ = device_identity(hub, base, "probe", "q")
    probe = Publisher("probe", cert, key_path, cafile, port)
    out: dict[str, list[float]] = {"cut": [], "command": [], "gap": []}
    try:
        for _ in range(args.trials):
            wait_flowing(arrivals, "probe")
            t0 = time.perf_counter()
            hub.devices.change_state("probe", DeviceState.QUARANTINED, actor="bench")
            hub.apply_device_access("probe")
            out["command"].append(time.perf_counter() - t0)
            out["cut"].append(cut_after(arrivals, "probe", t0, args.quiet))
            out["gap"].append(arrivals.max_gap("bystander", t0 - 0.1, time.perf_counter()))
            hub.devices.change_state("probe", DeviceState.ACTIVE, actor="bench")
            hub.apply_device_access("probe")
    finally:
        probe.close()
    return out


def revocation_trials(
    hub: Hub, base: Path, arrivals: Arrivals, cafile: Path, port: int, args: argparse.Namespace
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"cut": [], "command": [], "gap": []}
    for trial in range(args.trials):
        cert, key_path, serial = device_identity(hub, base, "probe", f"r{trial}")
        probe = Publisher("probe", cert, key_path, cafile, port)
        try:
            wait_flowing(arrivals, "probe")
            t0 = time.perf_counter()
            record = hub.certificates.revoke(serial, reason=RevocationReason.KEY_COMPROMISE, actor="bench")
            hub.after_revocation(record, actor="bench")
            out["command"].append(time.perf_counter() - t0)
            out["cut"].append(cut_after(arrivals, "probe", t0, args.quiet))
            out["gap"].append(arrivals.max_gap("bystander", t0 - 0.1, time.perf_counter()))
        finally:
            probe.close()
    return out


def summarise(values: dict[str, list[float]]) -> dict[str, float]:
    cut, command, gap = sorted(values["cut"]), sorted(values["command"]), sorted(values["gap"])
    return {
        "cut_p50_ms": round(percentile(cut, 0.5) * 1000, 1),
        "cut_p99_ms": round(percentile(cut, 0.99) * 1000, 1),
        "cut_max_ms": round(cut[-1] * 1000, 1),
        "command_p50_ms": round(percentile(command, 0.5) * 1000, 1),
        "command_p99_ms": round(percentile(command, 0.99) * 1000, 1),
        "bystander_gap_p50_ms": round(percentile(gap, 0.5) * 1000, 1),
        "bystander_gap_max_ms": round(gap[-1] * 1000, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
