"""Rate-limit benchmark: good devices enrolling while one source address floods ``simpleenroll`` with bad requests,
and the memory of a rate limiter that has seen a million distinct sources.

Run from the repository root::

    PYTHONPATH=. .venv/bin/python bench/ratelimit.py                     # 30 s flood, 50 good devices
    PYTHONPATH=. .venv/bin/python bench/ratelimit.py --seconds 8 --clients 10 --limiter-keys 100000   # quick

Setup (untimed): a hub with its default rate limits and ``WARDEN_LOG_LEVEL=warning``; ``--clients`` + ``--quiet``
token enrollments made with the CLI (``warden enrollment add dev-N --token --json``); a CSR (fresh P-256 key) per
device.

1. Quiet reference: ``--quiet`` devices enroll one after another with their tokens, nothing else running.
2. Timed, ``--seconds``: one process floods from 127.0.0.66 (loopback accepts any 127/8 source address) at
   ``--bad-rate`` requests/s (default 1,000), paced, over ``--bad-connections`` keep-alive TLS connections:
   ``POST /.well-known/est/simpleenroll`` with a CSR and, alternately, ``Authorization: Bearer`` garbage and a
   well-formed token that does not exist. Meanwhile ``--clients`` good devices (default 50), each from its own
   address 127.0.1.N, enroll once with their token over a new TLS connection, their starts spread evenly over the
   flood. Reported: the good devices' latency (connect to certificate; a 429 is retried after Retry-After and the
   wait counts) and the bad requests' answers by status (429 vs other).
3. ``RateLimiter`` (``warden.api._ratelimit``) in this process fed ``--limiter-keys`` distinct IPv4 source keys:
   memory by tracemalloc (current and peak, per key held) and time per ``take``, with max_keys = the number of keys
   and with the hub's default max_keys (``rate_limit_max_keys``).

Results go to bench/results/ratelimit.json. A measurement, not a test: exit 0 unless ``--check`` is given and a
target is missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import multiprocessing
import secrets
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.enroll import (
    BENCH_ENV,
    Connection,
    client_context,
    cpu_seconds,
    est_request,
    hub_metrics,
    issued_common_name,
    latency_summary,
    machine,
    new_csr,
    note_load,
    percentile,
    root_der,
    rss_bytes,
    start_bench_hub,
    write_json,
)
from tests.hubserver import HubServer

from warden.api._ratelimit import RateLimiter
from warden.core import Settings

RESULTS = Path(__file__).resolve().parent / "results" / "ratelimit.json"
TARGET_GOOD_P99_MS = 1000.0
BAD_SOURCE = "127.0.0.66"


def good_source(i: int) -> str:
    return f"127.0.1.{i + 1}"


# -- setup ----------------------------------------------------------------------------------------------------------


def create_tokens(hub: HubServer, device_ids: Sequence[str]) -> dict[str, str]:
    """One-time enrollment tokens from the CLI, four at a time (each call is a process start)."""

    def one(device_id: str) -> tuple[str, str]:
        out = hub.warden("enrollment", "add", device_id, "--token", "--json").stdout
        return device_id, str(json.loads(out)["token"])

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(one, device_ids))


# -- the good devices -----------------------------------------------------------------------------------------------


def enroll_with_token(
    port: int, root: bytes, source: str, device_id: str, request: bytes, *, deadline: float
) -> dict[str, Any]:
    """One device: connect from ``source``, TLS without a client certificate, ``simpleenroll`` with its token; a 429
    is retried after its Retry-After (the wait counts in the latency). Returns latency, statuses, attempts."""
    context = client_context(root)
    began = time.perf_counter()
    statuses: list[str] = []
    while True:
        try:
            connection = Connection(port, context, source=source)
            try:
                status, headers, body = connection.request(request)
            finally:
                connection.close()
        except (OSError, ValueError) as e:
            statuses.append(type(e).__name__)
            return {"ok": False, "latency": time.perf_counter() - began, "statuses": statuses}
        statuses.append(str(status))
        if status == 200:
            name = issued_common_name(body)
            return {
                "ok": name == device_id,
                "latency": time.perf_counter() - began,
                "statuses": statuses,
                "problem": None if name == device_id else f"issued CN {name!r}",
            }
        if status != 429 or time.perf_counter() > deadline:
            return {"ok": False, "latency": time.perf_counter() - began, "statuses": statuses, "body": body[:200]}
        time.sleep(float(headers.get(b"retry-after", b"1")))


def good_devices(
    port: int, root: bytes, devices: Sequence[tuple[str, str, bytes]], start: float, spread: float
) -> list[dict[str, Any]]:
    """Each device (id, source, prepared request) in its own thread, starting at ``start`` + i * spread / n."""
    results: list[dict[str, Any]] = [{} for _ in devices]

    def run(i: int, device_id: str, source: str, request: bytes) -> None:
        delay = start + i * spread / len(devices) - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        results[i] = enroll_with_token(port, root, source, device_id, request, deadline=start + spread + 30)

    threads = [threading.Thread(target=run, args=(i, *d)) for i, d in enumerate(devices)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


# -- the flood ------------------------------------------------------------------------------------------------------


def bad_requests(port: int, count: int) -> list[bytes]:
    """Alternately garbage and a well-formed token that does not exist (a new id each time), with a real CSR."""
    csr = new_csr("intruder")
    prepared = []
    for i in range(count):
        token = f"enr_{secrets.token_hex(8)}.{secrets.token_urlsafe(32)}" if i % 2 else secrets.token_hex(12)
        prepared.append(est_request(port, csr, authorization=f"Bearer {token}", close=False))
    return prepared


def flood(port: int, root: bytes, rate: float, connections: int, start: float, seconds: float, results: Any) -> None:
    """A process: ``connections`` threads, each with one keep-alive connection from BAD_SOURCE, together sending
    ``rate`` requests/s on a fixed schedule: a thread that falls behind sends at once (counted as late), and what
    is still due when the time is up is not sent (counted as missed)."""
    requests = bad_requests(port, 512)
    context = client_context(root)
    lock = threading.Lock()
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    totals: dict[str, Any] = {"sent": 0, "late": 0, "missed": 0, "reconnects": 0, "last": start}
    interval = connections / rate

    def run(k: int) -> None:
        connection: Connection | None = None
        mine: Counter[str] = Counter()
        lat: list[float] = []
        sent = late = missed = reconnects = 0
        last = start
        n = 0
        end = start + seconds
        while True:
            due = start + (k + n * connections) / rate
            if due >= end:
                break
            n += 1
            now = time.perf_counter()
            if now >= end:  # behind schedule at the end: what is left is not sent
                missed += 1
                continue
            if due > now:
                time.sleep(due - now)
            elif now - due > interval:
                late += 1
            try:
                if connection is None:
                    connection = Connection(port, context, source=BAD_SOURCE)
                    reconnects += 1
                t = time.perf_counter()
                status, headers, _ = connection.request(requests[(k + n * connections) % len(requests)])
                last = time.perf_counter()
                lat.append(last - t)
                mine[str(status)] += 1
                if headers.get(b"connection", b"").lower() == b"close":
                    connection.close()
                    connection = None
            except (OSError, ValueError) as e:
                mine[type(e).__name__] += 1
                if connection is not None:
                    connection.close()
                connection = None
            sent += 1
        if connection is not None:
            connection.close()
        with lock:
            statuses.update(mine)
            latencies.extend(lat)
            totals["sent"] += sent
            totals["late"] += late
            totals["missed"] += missed
            totals["reconnects"] += max(0, reconnects - 1)
            totals["last"] = max(totals["last"], last)

    cpu_before = time.process_time()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put(
        {
            **totals,
            "statuses": dict(statuses),
            "latency": latency_summary(latencies),
            "ended": time.perf_counter(),
            "client_cpu_s": time.process_time() - cpu_before,
        }
    )


# -- the limiter's memory --------------------------------------------------------------------------------------------


def _source_key(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def limiter_memory(keys: int, max_keys: int) -> dict[str, Any]:
    """Feed ``keys`` distinct source keys to a RateLimiter with the hub's default rate and burst: time per take
    (untraced), then memory by tracemalloc (a second limiter, traced)."""
    defaults = Settings.model_fields
    rate = float(defaults["enroll_rate_per_address"].default)
    burst = int(defaults["enroll_burst_per_address"].default)
    limiter = RateLimiter(rate=rate, burst=burst, max_keys=max_keys)
    start = time.perf_counter()
    for i in range(keys):
        limiter.take(_source_key(i))
    take_us = (time.perf_counter() - start) / keys * 1e6
    del limiter
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    limiter = RateLimiter(rate=rate, burst=burst, max_keys=max_keys)
    for i in range(keys):
        limiter.take(_source_key(i))
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held = len(limiter)
    return {
        "keys_fed": keys,
        "max_keys": max_keys,
        "keys_held": held,
        "rate": rate,
        "burst": burst,
        "take_us": round(take_us, 3),
        "current_mb": round((current - base) / 2**20, 1),
        "peak_mb": round((peak - base) / 2**20, 1),
        "bytes_per_key_held": round((current - base) / held, 1) if held else None,
    }


# -- the run --------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=30.0, help="duration of the flood (default 30)")
    parser.add_argument("--clients", type=int, default=50, help="good devices enrolling during the flood (default 50)")
    parser.add_argument("--quiet", type=int, default=10, help="good devices enrolling before it (default 10)")
    parser.add_argument("--bad-rate", type=float, default=1000.0, help="bad requests/s (default 1000)")
    parser.add_argument("--bad-connections", type=int, default=64, help="keep-alive connections (default 64)")
    parser.add_argument("--limiter-keys", type=int, default=1_000_000, help="distinct sources (default 1,000,000)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument("--keep", type=Path, help="keep the hub's data here (default: a temporary directory)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.clients > 254 or args.quiet > 254:
        parser.error("--clients and --quiet: at most 254 each (one source address 127.0.x.N per device)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    load_start = note_load()
    base = args.keep or Path(tempfile.mkdtemp(prefix="warden-bench-ratelimit-"))
    base.mkdir(parents=True, exist_ok=True)
    hub = start_bench_hub(base)
    try:
        pid, port = hub.process.pid, hub.port
        root = root_der(hub)
        ids = [f"dev-{i}" for i in range(args.quiet + args.clients)]
        print(f"hub pid {pid} on port {port}; creating {len(ids)} token enrollments with the CLI (untimed)")
        tokens = create_tokens(hub, ids)
        # Quiet devices connect from 127.0.2.N, the others from 127.0.1.N: every device has an address of its own.
        sources = [f"127.0.2.{i + 1}" for i in range(args.quiet)] + [good_source(i) for i in range(args.clients)]
        devices = [
            (device_id, source, est_request(port, new_csr(device_id), authorization=f"Bearer {tokens[device_id]}"))
            for device_id, source in zip(ids, sources, strict=True)
        ]
        quiet = [
            enroll_with_token(port, root, source, device_id, request, deadline=time.perf_counter() + 60)
            for device_id, source, request in devices[: args.quiet]
        ]
        quiet_summary = _good_summary(quiet)
        if quiet:
            print(
                f"quiet: {args.quiet} devices enrolled one by one: p50 {quiet_summary['p50_ms']} ms, "
                f"max {quiet_summary['max_ms']} ms"
            )
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        start = time.perf_counter() + 0.5
        flooder = context.Process(
            target=flood, args=(port, root, args.bad_rate, args.bad_connections, start, args.seconds, queue)
        )
        flooder.start()
        cpu_before = cpu_seconds(pid)
        wait = start - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        # The good devices start from one second into the flood until one second before its end.
        good = good_devices(port, root, devices[args.quiet :], start + 1.0, max(0.0, args.seconds - 2.0))
        bad = queue.get(timeout=args.seconds + 120)
        flooder.join(timeout=30)
        window = max(bad["ended"], time.perf_counter()) - start
        server_cpu = cpu_seconds(pid) - cpu_before
        metrics = hub_metrics(hub)
        server_rss = rss_bytes(pid)
    finally:
        hub.stop()
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)

    good_summary = _good_summary(good)
    bad_total = sum(bad["statuses"].values())
    refused = bad["statuses"].get("429", 0)
    flood_seconds = max(1e-9, bad["last"] - start)
    print(
        f"flood: {bad['sent']:,} bad requests in {flood_seconds:.1f} s ({bad['sent'] / flood_seconds:,.0f}/s; "
        f"{bad['late']:,} late, {bad['missed']:,} not sent in time): {bad['statuses']}"
    )
    print(
        f"good: {good_summary['ok']}/{len(good)} enrolled, p50 {good_summary['p50_ms']} ms, p99 "
        f"{good_summary['p99_ms']} ms, max {good_summary['max_ms']} ms; statuses {good_summary['statuses']}"
    )
    limiters = []
    default_max = int(Settings.model_fields["rate_limit_max_keys"].default)
    for max_keys in dict.fromkeys([args.limiter_keys, min(default_max, args.limiter_keys)]):
        figures = limiter_memory(args.limiter_keys, max_keys)
        limiters.append(figures)
        print(
            f"limiter: {figures['keys_fed']:,} sources fed, max_keys {max_keys:,}: {figures['keys_held']:,} held, "
            f"{figures['current_mb']} MB ({figures['bytes_per_key_held']} B/key), peak {figures['peak_mb']} MB, "
            f"{figures['take_us']} us/take"
        )

    met = {
        "good_p99": good_summary["p99_ms"] < TARGET_GOOD_P99_MS,
        "good_all_enrolled": good_summary["ok"] == len(good),
    }
    results: dict[str, object] = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "loadavg_1m_start": round(load_start, 2)},
        "seconds": args.seconds,
        "server": {
            "workers": 1,
            "env": BENCH_ENV,
            "note": "default rate limits; access log off (log level warning)",
            "rss_mb_end": round(server_rss / 2**20, 1),
            "cpu_s_during_flood": round(server_cpu, 2),
            "cpu_share_during_flood": round(server_cpu / window, 3),
        },
        "good": {"devices": len(good), **good_summary},
        "good_quiet_reference": {"devices": len(quiet), **quiet_summary},
        "bad": {
            "source": BAD_SOURCE,
            "target_rate": args.bad_rate,
            "sent": bad["sent"],
            "rate": round(bad["sent"] / flood_seconds, 1),
            "late": bad["late"],
            "missed": bad["missed"],
            "connections": args.bad_connections,
            "reconnects": bad["reconnects"],
            "statuses": dict(sorted(bad["statuses"].items())),
            "answered_429": refused,
            "answered_other": bad_total - refused,
            "latency": bad["latency"],
            "client_cpu_s": round(bad["client_cpu_s"], 2),
            "server_cpu_ms_per_request": round(server_cpu / bad["sent"] * 1000, 3) if bad["sent"] else None,
        },
        "server_metrics": {
            k: v for k, v in metrics.items() if k.startswith(("warden_rate_limited", "warden_est", "warden_http_req"))
        },
        "limiter_memory": limiters,
        "targets": {"good_p99_ms": TARGET_GOOD_P99_MS},
        "met": met,
        "runtime_s": round(time.perf_counter() - began, 1),
    }
    _print_summary(results)
    write_json(args.out, results)
    print(f"\nwrote {args.out}  (total {results['runtime_s']} s)")
    return 1 if args.check and not all(met.values()) else 0


def _good_summary(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    latencies = sorted(r["latency"] for r in results if r.get("ok"))
    statuses: Counter[str] = Counter(s for r in results for s in r.get("statuses", []))
    return {
        "ok": len(latencies),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "max_ms": round(latencies[-1] * 1000, 1) if latencies else float("nan"),
        "retried_after_429": sum(1 for r in results if "429" in r.get("statuses", [])),
        "statuses": dict(sorted(statuses.items())),
        "problems": [r.get("problem") or r.get("body") for r in results if not r.get("ok")][:5],
    }


def _print_summary(results: dict[str, Any]) -> None:
    good, quiet, bad, met = results["good"], results["good_quiet_reference"], results["bad"], results["met"]
    flag = "ok" if met["good_p99"] else "MISSED"
    print(f"\nRate limits: {good['devices']} good devices enrolling during a flood from {bad['source']}")
    rows = [
        ("good devices enrolled", f"{good['ok']}/{good['devices']}", "ok" if met["good_all_enrolled"] else "FAILED"),
        (
            "good latency p50 / p99",
            f"{good['p50_ms']} / {good['p99_ms']} ms",
            f"p99 < {TARGET_GOOD_P99_MS:.0f} ms: {flag}",
        ),
        ("  same, quiet hub (reference)", f"{quiet['p50_ms']} / {quiet['p99_ms']} ms", ""),
        ("good devices that met a 429", str(good["retried_after_429"]), ""),
        ("bad requests sent (rate)", f"{bad['sent']:,} ({bad['rate']:,.0f}/s)", f"target {bad['target_rate']:,.0f}/s"),
        ("bad answered 429 / other", f"{bad['answered_429']:,} / {bad['answered_other']:,}", str(bad["statuses"])),
        ("bad latency p50 / p99", f"{bad['latency']['p50_ms']} / {bad['latency']['p99_ms']} ms", ""),
        ("server CPU per bad request", f"{bad['server_cpu_ms_per_request']} ms", ""),
        ("server CPU share during the flood", f"{results['server']['cpu_share_during_flood']}", ""),
    ]
    for figures in results["limiter_memory"]:
        rows.append(
            (
                f"limiter, {figures['keys_fed']:,} sources, max_keys {figures['max_keys']:,}",
                f"{figures['current_mb']} MB, {figures['bytes_per_key_held']} B/key",
                f"peak {figures['peak_mb']} MB, {figures['take_us']} us/take",
            )
        )
    for name, value, target in rows:
        print(f"  {name:<42}{value:>28}  {target}")
    print(
        f"\n  server: 1 worker, {results['server']['note']}. {results['machine']['cpus']} CPUs shared by clients "
        f"and server; load average {results['machine']['loadavg_1m_start']} at start, "
        f"{results['machine']['loadavg_1m']} at end."
    )


if __name__ == "__main__":
    sys.exit(main())
