"""OCSP benchmark: ``POST /pki/ocsp`` (``application/ocsp-request``) over keep-alive HTTPS connections against a
real ``warden serve``, from several client processes, for a mix of serials: enrolled certificates that are good,
enrolled certificates that were revoked, and serials the hub never issued.

Run from the repository root::

    PYTHONPATH=. .venv/bin/python bench/ocsp.py                          # 4 clients, 30 s (+ 5 s of baseline)
    PYTHONPATH=. .venv/bin/python bench/ocsp.py --seconds 5 --clients 2    # a quick run

Setup (untimed): a hub with ``WARDEN_LOG_LEVEL=warning``; ``--certs`` devices enroll over EST (mutual TLS with an
IDevID from an enrollment group), ``--revoked`` of their certificates are revoked through ``/api/v1``; the requests
(SHA-1 CertIDs, no nonce, one certificate each, as RFC 5019 clients send them) are built before the clock starts.

Timed: each client process holds one keep-alive TLS connection and sends the next request as soon as the previous
answer has arrived (``--seconds``). Then, for ``--baseline-seconds``, the same clients send ``GET /healthz`` on
keep-alive connections: the cost of an HTTP request on this server with no work behind it.

Server CPU is utime + stime of the ``warden serve`` process from /proc/<pid>/stat. Results go to
bench/results/ocsp.json. A measurement, not a test: exit 0 unless ``--check`` is given and a target is missed.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.enroll import (
    BENCH_ENV,
    Connection,
    add_enrollment_group,
    client_context,
    est_request,
    http_request,
    hub_metrics,
    idevid_pem,
    machine,
    new_csr,
    note_load,
    root_der,
    rss_bytes,
    run_clients,
    start_bench_hub,
    summarise,
    write_json,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509 import ocsp
from tests.hubserver import HubServer

RESULTS = Path(__file__).resolve().parent / "results" / "ocsp.json"
TARGET_RATE = 3000.0  # OCSP responses/s

_EXPECTED = {"good": ocsp.OCSPCertStatus.GOOD, "revoked": ocsp.OCSPCertStatus.REVOKED}


# -- setup ----------------------------------------------------------------------------------------------------------


def enroll_devices(hub: HubServer, base: Path, count: int) -> list[x509.Certificate]:
    """``count`` devices enrolled over EST (mutual TLS, IDevIDs of a fresh enrollment group); their certificates."""
    ca = add_enrollment_group(hub, base)
    root = root_der(hub)
    now = dt.datetime.now(dt.UTC)
    folder = base / "idevids"
    folder.mkdir(parents=True, exist_ok=True)
    issued = []
    for i in range(count):
        device_id = f"ocsp-{i:05d}"
        path = folder / f"{device_id}.pem"
        path.write_bytes(idevid_pem(ca, device_id, now))
        # Each device from an address of its own (loopback accepts any 127/8 source), as devices in the field
        # are: the per-address enrollment limit is not what this benchmark is about.
        source = f"127.0.{3 + i // 250}.{i % 250 + 1}"
        request = est_request(hub.port, new_csr(device_id))
        for _ in range(5):
            connection = Connection(hub.port, client_context(root, path), source=source)
            try:
                status, headers, body = connection.request(request)
            finally:
                connection.close()
            if status != 429:
                break
            time.sleep(float(headers.get(b"retry-after", b"1")))
        if status != 200:
            raise SystemExit(f"enrolling {device_id} failed with {status}: {body[:300]!r}")
        issued.append(pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))[0])
    return issued


def revoke(hub: HubServer, certificates: Sequence[x509.Certificate]) -> None:
    token = hub.token("security-admin")
    with hub.client() as client:
        for certificate in certificates:
            response = client.post(
                f"/api/v1/certificates/{certificate.serial_number:X}/revoke",
                json={"reason": "keyCompromise"},
                headers={"Authorization": f"Bearer {token}"},
            )
            if response.status_code != 200:
                raise SystemExit(f"revoking {certificate.serial_number:X} failed: {response.status_code}")


def issuing_ca(hub: HubServer, leaf: x509.Certificate) -> x509.Certificate:
    for certificate in x509.load_pem_x509_certificates(hub.chain_path.read_bytes()):
        if certificate.subject == leaf.issuer:
            return certificate
    raise SystemExit("the issuing CA is not in the hub's chain")


def ocsp_requests(
    issuer: x509.Certificate, good: Sequence[x509.Certificate], revoked: Sequence[x509.Certificate], unknown: int
) -> list[tuple[str, bytes]]:
    """(expected status, DER OCSP request) for every certificate, and ``unknown`` serials never issued."""

    def request(certificate: x509.Certificate) -> bytes:
        # SHA-1 CertIDs: what RFC 5019 clients send (the hash identifies, it does not protect)
        built = ocsp.OCSPRequestBuilder().add_certificate(certificate, issuer, hashes.SHA1()).build()  # noqa: S303
        return built.public_bytes(serialization.Encoding.DER)

    mix = [("good", request(c)) for c in good] + [("revoked", request(c)) for c in revoked]
    name_hash = hashes.Hash(hashes.SHA1())  # noqa: S303
    name_hash.update(issuer.subject.public_bytes())
    key_hash = hashes.Hash(hashes.SHA1())  # noqa: S303
    key_hash.update(
        issuer.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    issuer_name_hash, issuer_key_hash = name_hash.finalize(), key_hash.finalize()
    for _ in range(unknown):
        serial = x509.random_serial_number()
        built = (
            ocsp.OCSPRequestBuilder()
            .add_certificate_by_hash(issuer_name_hash, issuer_key_hash, serial, hashes.SHA1())  # noqa: S303
            .build()
        )
        mix.append(("unknown", built.public_bytes(serialization.Encoding.DER)))
    return mix


# -- the clients ------------------------------------------------------------------------------------------------------


def ocsp_worker(
    index: int,
    port: int,
    root: bytes,
    mix: Sequence[tuple[str, bytes]],
    seconds: float,
    ready: Any,
    go: Any,
    start: Any,
    results: Any,
) -> None:
    """One client: one keep-alive connection, OCSP requests back to back in a shuffled order of ``mix``."""
    try:
        order = list(mix)
        random.Random(index).shuffle(order)
        prepared = [
            (
                expected,
                http_request("POST", "/pki/ocsp", port, headers={"Content-Type": "application/ocsp-request"}, body=der),
            )
            for expected, der in order
        ]
        context = client_context(root)
        connection = Connection(port, context)
    except BaseException as e:
        ready.put(f"{type(e).__name__}: {e}")
        raise
    ready.put("ready")
    deadline = _wait(go, start) + seconds
    cpu_before = time.process_time()
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    samples: list[str] = []
    checked: set[str] = set()
    reconnects = 0
    i = 0
    while time.perf_counter() < deadline:
        expected, request = prepared[i % len(prepared)]
        i += 1
        sent = time.perf_counter()
        try:
            status, headers, body = connection.request(request)
        except (OSError, ValueError) as e:
            statuses[type(e).__name__] += 1
            if len(samples) < 3:
                samples.append(f"{type(e).__name__}: {e}")
            connection.close()
            connection, reconnects = Connection(port, context), reconnects + 1
            continue
        if status == 200:
            latencies.append(time.perf_counter() - sent)
        statuses[str(status)] += 1
        if status != 200 and len(samples) < 3:
            samples.append(f"{status}: {body[:200]!r}")
        elif status == 200 and expected not in checked:  # one answer of each kind is decoded and checked
            checked.add(expected)
            problem = _check_answer(expected, body)
            if problem:
                samples.append(problem)
        if headers.get(b"connection", b"").lower() == b"close":
            connection.close()
            connection, reconnects = Connection(port, context), reconnects + 1
    connection.close()
    results.put(
        {
            "ended": time.perf_counter(),
            "latencies": latencies,
            "statuses": dict(statuses),
            "samples": samples,
            "client_cpu_s": time.process_time() - cpu_before,
            "exhausted": False,
            "reconnects": reconnects,
        }
    )


def _check_answer(expected: str, body: bytes) -> str | None:
    response = ocsp.load_der_ocsp_response(body)
    if response.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        return f"{expected}: response status {response.response_status}"
    status = response.certificate_status
    if expected == "unknown":
        return None if status is ocsp.OCSPCertStatus.UNKNOWN else f"unknown serial answered {status}"
    return None if status is _EXPECTED[expected] else f"{expected} certificate answered {status}"


def healthz_worker(
    index: int, port: int, root: bytes, seconds: float, ready: Any, go: Any, start: Any, results: Any
) -> None:
    """One client: ``GET /healthz`` back to back on one keep-alive connection."""
    try:
        connection = Connection(port, client_context(root))
        request = http_request("GET", "/healthz", port)
    except BaseException as e:
        ready.put(f"{type(e).__name__}: {e}")
        raise
    ready.put("ready")
    deadline = _wait(go, start) + seconds
    cpu_before = time.process_time()
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    while time.perf_counter() < deadline:
        sent = time.perf_counter()
        status = connection.request(request)[0]
        statuses[str(status)] += 1
        if status == 200:
            latencies.append(time.perf_counter() - sent)
    connection.close()
    results.put(
        {
            "ended": time.perf_counter(),
            "latencies": latencies,
            "statuses": dict(statuses),
            "samples": [],
            "client_cpu_s": time.process_time() - cpu_before,
            "exhausted": False,
        }
    )


def _wait(go: Any, start: Any) -> float:
    go.wait()
    delay = start.value - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
    return float(start.value)


# -- the run --------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=30.0, help="timed OCSP phase (default 30)")
    parser.add_argument("--clients", type=int, default=4, help="client processes, one connection each (default 4)")
    parser.add_argument("--certs", type=int, default=200, help="devices enrolled for the mix (default 200)")
    parser.add_argument("--revoked", type=int, default=20, help="of those, revoked (default 20)")
    parser.add_argument("--unknown", type=int, default=20, help="serials never issued in the mix (default 20)")
    parser.add_argument(
        "--baseline-seconds", type=float, default=5.0, help="keep-alive GET /healthz baseline (default 5; 0: skip)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument("--keep", type=Path, help="keep the hub's data here (default: a temporary directory)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args(argv)
    args.revoked = min(args.revoked, args.certs)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    load_start = note_load()
    base = args.keep or Path(tempfile.mkdtemp(prefix="warden-bench-ocsp-"))
    base.mkdir(parents=True, exist_ok=True)
    hub = start_bench_hub(base)
    try:
        print(f"hub pid {hub.process.pid} on port {hub.port}; enrolling {args.certs} devices over EST (untimed)")
        certificates = enroll_devices(hub, base, args.certs)
        revoked = certificates[: args.revoked]
        revoke(hub, revoked)
        issuer = issuing_ca(hub, certificates[0])
        mix = ocsp_requests(issuer, certificates[args.revoked :], revoked, args.unknown)
        root = root_der(hub)
        pid = hub.process.pid
        collected, seconds, cpu = run_clients(
            ocsp_worker, [(i, hub.port, root, mix) for i in range(args.clients)], pid, args.seconds
        )
        result = summarise(collected, seconds, cpu)
        result["reconnects"] = sum(r.get("reconnects", 0) for r in collected)
        _print_phase("OCSP POST, keep-alive", result)
        baseline = None
        if args.baseline_seconds > 0:
            collected, seconds, cpu = run_clients(
                healthz_worker, [(i, hub.port, root) for i in range(args.clients)], pid, args.baseline_seconds
            )
            baseline = summarise(collected, seconds, cpu)
            _print_phase("GET /healthz, keep-alive", baseline)
        metrics = hub_metrics(hub)
        server_rss = rss_bytes(pid)
    finally:
        hub.stop()
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)

    met = {"rate": result["per_s"] >= TARGET_RATE, "no_failures": not result["failures"]}
    results: dict[str, object] = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "loadavg_1m_start": round(load_start, 2)},
        "clients": args.clients,
        "seconds": args.seconds,
        "mix": {"good": args.certs - args.revoked, "revoked": args.revoked, "unknown": args.unknown},
        "server": {
            "workers": 1,
            "env": BENCH_ENV,
            "note": "access log off (log level warning)",
            "rss_mb_end": round(server_rss / 2**20, 1),
        },
        "ocsp": result,
        "baseline_healthz_keepalive": baseline,
        "server_metrics": {
            k: v for k, v in metrics.items() if k.startswith(("warden_http_requests_total", "warden_tls"))
        },
        "targets": {"per_s": TARGET_RATE},
        "met": met,
        "runtime_s": round(time.perf_counter() - began, 1),
    }
    _print_summary(results)
    write_json(args.out, results)
    print(f"\nwrote {args.out}  (total {results['runtime_s']} s)")
    return 1 if args.check and not all(met.values()) else 0


def _print_phase(label: str, r: dict[str, Any]) -> None:
    print(
        f"{label}: {r['completed']:,} in {r['seconds']:.1f} s = {r['per_s']:,.1f}/s, p50 {r['p50_ms']:.2f} ms, "
        f"p99 {r['p99_ms']:.2f} ms; server CPU {r['server_cpu_ms_per_op']} ms/op (loop "
        f"{r['server_loop_cpu_ms_per_op']} + threads {r['server_threads_cpu_ms_per_op']}; "
        f"{r['server_cpu_share']:.0%} of a core), client CPU {r['client_cpu_ms_per_op']} ms/op"
    )
    if r["failures"] or r["samples"]:
        print(f"    failures by status: {r['failures']}  {r['samples'][:2]}")


def _print_summary(results: dict[str, Any]) -> None:
    r, met, baseline = results["ocsp"], results["met"], results["baseline_healthz_keepalive"]
    flag = "ok" if met["rate"] else "MISSED"
    print(f"\nOCSP over HTTPS, {results['clients']} client processes with one keep-alive connection each")
    rows = [
        ("responses/s", f"{r['per_s']:,.1f}", f">= {TARGET_RATE:,.0f}: {flag}"),
        ("latency p50 / p99", f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms", ""),
        ("server CPU per response", f"{r['server_cpu_ms_per_op']} ms", ""),
        (
            "  event-loop thread / other threads",
            f"{r['server_loop_cpu_ms_per_op']} / {r['server_threads_cpu_ms_per_op']} ms",
            "",
        ),
        ("server CPU share (1.0 = one core)", f"{r['server_cpu_share']}", ""),
        ("client CPU per response (all clients)", f"{r['client_cpu_ms_per_op']} ms", ""),
        ("failures by status", str(r["failures"] or "none"), "ok" if met["no_failures"] else "FAILED"),
        ("reconnects", str(r["reconnects"]), ""),
    ]
    if baseline is not None:
        rows.append(
            (
                "baseline: GET /healthz keep-alive",
                f"{baseline['per_s']:,.0f}/s, {baseline['server_cpu_ms_per_op']} ms CPU",
                "",
            )
        )
    for name, value, target in rows:
        print(f"  {name:<42}{value:>28}  {target}")
    mix = results["mix"]
    print(
        f"\n  mix: {mix['good']} good, {mix['revoked']} revoked, {mix['unknown']} unknown serials (SHA-1 CertIDs, "
        f"no nonce); server: 1 worker, {results['server']['note']}, RSS {results['server']['rss_mb_end']} MB.\n"
        f"  {results['machine']['cpus']} CPUs shared by clients and server; load average "
        f"{results['machine']['loadavg_1m_start']} at start, {results['machine']['loadavg_1m']} at end."
    )


if __name__ == "__main__":
    sys.exit(main())
