"""EST enrollment benchmark: full ``simpleenroll`` over mutual TLS against a real ``warden serve``, one fresh TCP+TLS
connection per enrollment, and the bare mTLS handshake on the same machine as the baseline.

Run from the repository root (``tests.hubserver`` starts the hub)::

    PYTHONPATH=. .venv/bin/python bench/enroll.py                 # 8 clients, 30 s (+ 2 x 10 s of baseline)
    PYTHONPATH=. .venv/bin/python bench/enroll.py --seconds 5 --clients 4 --baseline-seconds 3   # a quick run

What happens (see bench/README.md):

1. A hub is initialised in a temporary directory and started with ``WARDEN_LOG_LEVEL=warning`` (no access log),
   the per-address enrollment limit raised out of the way (all clients share 127.0.0.1; the limiter is still
   consulted on every request) and the jobs interval at its default.
2. A manufacturer CA is registered as an enrollment group (``warden enrollment group add``).
3. Every client process (``--clients``, each its own process) makes its share of the pool before the clock starts:
   per device an IDevID (own P-256 key, signed by the manufacturer CA, CN = device id) and a CSR from a fresh P-256
   key. Each device enrolls once.
4. Timed, for ``--seconds``: each client loops connect (TCP_NODELAY) -> TLS handshake presenting the next IDevID ->
   ``POST /.well-known/est/simpleenroll`` (``Connection: close``) -> read the response -> close.
5. Baseline, for ``--baseline-seconds`` each: the same clients connect + handshake (with an IDevID) + close, then
   connect + handshake + ``GET /healthz`` + close.

Server CPU is utime + stime of the ``warden serve`` process (all its threads) from /proc/<pid>/stat, read before
and after each timed phase. Results go to bench/results/enroll.json. A measurement, not a test: exit 0 unless
``--check`` is given and a target is missed.

The helpers below the ``shared`` marker are used by bench/ocsp.py and bench/ratelimit.py too.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import multiprocessing
import os
import platform
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tests.hubserver import HUB_NAME, HubServer, ManufacturerCA, start_hub

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS = RESULTS_DIR / "enroll.json"

TARGET_CPU_MS = 2.0  # server CPU per enrollment
TARGET_RATE = 250.0  # enrollments/s observed
TARGET_P99_MS = 250.0  # latency of one enrollment as a client sees it

EST_PATH = "/.well-known/est/simpleenroll"

# -- shared with bench/ocsp.py and bench/ratelimit.py -------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: the server settings every benchmark uses unless it says otherwise: no access log, default jobs interval
BENCH_ENV = {"WARDEN_LOG_LEVEL": "warning", "WARDEN_JOBS_INTERVAL_SECONDS": "30"}


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), from /proc/<pid>/stat (1/CLK_TCK resolution)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces; fields start at state (3)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """utime + stime per thread of process ``pid`` (thread id -> seconds); the thread whose id is ``pid`` is the
    main thread, which in ``warden serve`` runs the event loop."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        fields = text[text.rindex(")") + 2 :].split()
        found[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return found


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of an already sorted sequence (nearest rank); NaN when empty."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_summary(latencies: Sequence[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "p50_ms": round(percentile(ordered, 0.50) * 1000, 2),
        "p90_ms": round(percentile(ordered, 0.90) * 1000, 2),
        "p99_ms": round(percentile(ordered, 0.99) * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2) if ordered else float("nan"),
    }


def start_bench_hub(base: Path, extra_env: dict[str, str] | None = None) -> HubServer:
    return start_hub(base, extra_env={**BENCH_ENV, **(extra_env or {})})


def root_der(hub: HubServer) -> bytes:
    return x509.load_pem_x509_certificate(hub.root_path.read_bytes()).public_bytes(serialization.Encoding.DER)


def client_context(root: bytes, cert_file: str | Path | None = None) -> ssl.SSLContext:
    """A TLS client context that verifies the hub (by name, against its root) and presents ``cert_file`` (PEM with
    the certificate and its key) when given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=root)
    if cert_file is not None:
        context.load_cert_chain(cert_file)
    return context


class Connection:
    """One HTTP/1.1 connection to the hub over TLS, with just enough of HTTP for the benchmarks: requests are
    prepared bytes, responses must carry Content-Length (the hub's all do) or end with the connection."""

    __slots__ = ("_buffer", "sock")

    def __init__(self, port: int, context: ssl.SSLContext, *, source: str | None = None, timeout: float = 30) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(timeout)
            if source is not None:
                raw.bind((source, 0))
            raw.connect(("127.0.0.1", port))
            self.sock = context.wrap_socket(raw, server_hostname=HUB_NAME)
        except BaseException:
            raw.close()
            raise
        self._buffer = b""

    def request(self, data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        """Send one prepared request; returns (status, headers with lower-case names, body)."""
        self.sock.sendall(data)
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        while end < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the hub closed the connection before answering")
            buffer += chunk
            end = buffer.find(b"\r\n\r\n")
        lines = buffer[:end].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        start = end + 4
        length = headers.get(b"content-length")
        if length is None:  # the body ends with the connection
            while chunk := self.sock.recv(65536):
                buffer += chunk
            self._buffer = b""
            return status, headers, buffer[start:]
        stop = start + int(length)
        while len(buffer) < stop:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the hub closed the connection in the middle of a response")
            buffer += chunk
        self._buffer = buffer[stop:]
        return status, headers, buffer[start:stop]

    def close(self) -> None:
        self.sock.close()


def http_request(
    method: str, path: str, port: int, *, headers: dict[str, str] | None = None, body: bytes = b"", close: bool = False
) -> bytes:
    """A prepared HTTP/1.1 request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HUB_NAME}:{port}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def est_request(port: int, csr_der: bytes, *, authorization: str | None = None, close: bool = True) -> bytes:
    headers = {"Content-Type": "application/pkcs10", "Content-Transfer-Encoding": "base64"}
    if authorization is not None:
        headers["Authorization"] = authorization
    return http_request("POST", EST_PATH, port, headers=headers, body=base64.b64encode(csr_der), close=close)


def new_csr(common_name: str) -> bytes:
    """A DER PKCS#10 request for CN=``common_name`` from a fresh P-256 key."""
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.DER)


def issued_common_name(body: bytes) -> str:
    """The subject CN of the certificate in an EST certs-only response (base64 PKCS#7)."""
    certificates = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
    return str(certificates[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def idevid_pem(ca: ManufacturerCA, device_id: str, now: dt.datetime) -> bytes:
    """An onboarding certificate (own fresh P-256 key) for ``device_id``, as PEM certificate + PKCS#8 key."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def add_enrollment_group(hub: HubServer, base: Path, name: str = "bench") -> ManufacturerCA:
    """A manufacturer CA registered as an enrollment group; returns once the hub's TLS listener trusts it."""
    ca = ManufacturerCA(base / f"mfr-{name}")
    hub.warden("enrollment", "group", "add", name, "--ca", str(ca.path))
    probe = base / f"probe-{name}.pem"
    probe.write_bytes(idevid_pem(ca, f"probe-{name}", dt.datetime.now(dt.UTC)))
    context = client_context(root_der(hub), probe)
    request = http_request("GET", "/healthz", hub.port, close=True)
    deadline = time.monotonic() + 30
    while True:  # the listener rebuilds its trust store within about a second of the change
        try:
            connection = Connection(hub.port, context)
            try:
                if connection.request(request)[0] == 200:
                    return ca
            finally:
                connection.close()
        except (ssl.SSLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the hub's TLS listener did not start trusting the new enrollment group")
        time.sleep(0.2)


def hub_metrics(hub: HubServer, prefixes: Sequence[str] = ("warden_",)) -> dict[str, float]:
    """The hub's Prometheus counters and gauges whose names start with one of ``prefixes`` (histograms left out)."""
    token = hub.token("viewer")
    with hub.client() as client:
        text = client.get("/metrics", headers={"Authorization": f"Bearer {token}"}).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or "_bucket{" in line or not line.startswith(tuple(prefixes)):
            continue
        name, _, value = line.rpartition(" ")
        if name.endswith(("_sum", "_count")) or "_duration_" in name:
            continue
        found[name] = float(value)
    return found


def machine() -> dict[str, object]:
    return {
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "openssl": ssl.OPENSSL_VERSION,
        "code": code_version(),
        "cryptography": metadata.version("cryptography"),
        "uvicorn": metadata.version("uvicorn"),
        "fastapi": metadata.version("fastapi"),
    }


def code_version() -> dict[str, object]:
    """The commit the hub's code is at and the files under src/ that differ from it (read-only git commands)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.rstrip() if done.returncode == 0 else ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines() if line]
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "src_changed": changed}


def write_json(path: Path, results: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def note_load(label: str = "start") -> float:
    load = os.getloadavg()[0]
    if load > 0.25 * (os.cpu_count() or 1):
        print(f"note: load average {load:.2f} at {label}; other work on this machine skews the figures")
    return load


def run_clients(
    target: Any, worker_args: Sequence[tuple[Any, ...]], pid: int, seconds: float
) -> tuple[list[dict[str, Any]], float, dict[str, float]]:
    """Start one process per entry of ``worker_args`` running ``target(*args, seconds, ready, go, start,
    results)``; once all are ready (their setup is not timed) start them together for ``seconds``. Returns the
    workers' results, the wall time from the start to the last worker's end, and the server's CPU seconds over that
    window: ``total``, ``loop`` (the main thread: event loop, TLS, HTTP, FastAPI) and ``threads`` (all others:
    worker threads, the group-commit writer, jobs)."""
    context = multiprocessing.get_context("fork")
    ready, results = context.Queue(), context.Queue()
    start = context.Value("d", 0.0)
    go = context.Event()
    processes = [
        context.Process(target=target, args=(*args, seconds, ready, go, start, results), daemon=True)
        for args in worker_args
    ]
    for process in processes:
        process.start()
    for _ in processes:
        message = ready.get(timeout=600)
        if message != "ready":
            raise SystemExit(f"a client failed to prepare: {message}")
    cpu_before, threads_before = cpu_seconds(pid), thread_cpu_seconds(pid)
    start.value = time.perf_counter() + 0.02
    go.set()
    collected = [results.get(timeout=seconds + 600) for _ in processes]
    cpu_after, threads_after = cpu_seconds(pid), thread_cpu_seconds(pid)
    for process in processes:
        process.join(timeout=30)
    ended = max(r["ended"] for r in collected)
    total = cpu_after - cpu_before
    loop = threads_after.get(pid, 0.0) - threads_before.get(pid, 0.0)
    return collected, ended - start.value, {"total": total, "loop": loop, "threads": max(0.0, total - loop)}


def _wait_for_start(go: Any, start: Any) -> float:
    go.wait()
    delay = start.value - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
    return float(start.value)


def _failure_name(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError):
        return f"tls:{error.reason or type(error).__name__}"
    return type(error).__name__


# -- the enrollment clients -----------------------------------------------------------------------------------------


def enroll_worker(
    index: int,
    count: int,
    port: int,
    root: bytes,
    ca: ManufacturerCA,
    directory: str,
    seconds: float,
    ready: Any,
    go: Any,
    start: Any,
    results: Any,
) -> None:
    """One client: make ``count`` IDevIDs and CSRs (untimed), then enroll them one per connection until the time is
    up or the pool is used up."""
    try:
        now = dt.datetime.now(dt.UTC)
        folder = Path(directory) / f"client-{index:02d}"
        folder.mkdir(parents=True)
        pool: list[tuple[str, str, bytes]] = []
        for i in range(count):
            device_id = f"bench-{index:02d}-{i:06d}"
            path = folder / f"{device_id}.pem"
            path.write_bytes(idevid_pem(ca, device_id, now))
            pool.append((device_id, str(path), est_request(port, new_csr(device_id))))
    except BaseException as e:
        ready.put(f"{type(e).__name__}: {e}")
        raise
    ready.put("ready")
    began = _wait_for_start(go, start)
    deadline = began + seconds
    cpu_before = time.process_time()
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    samples: list[str] = []
    checked = False
    used = 0
    for device_id, path, request in pool:
        if time.perf_counter() >= deadline:
            break
        used += 1
        context = client_context(root, path)
        sent = time.perf_counter()
        try:
            connection = Connection(port, context)
            try:
                status, _, body = connection.request(request)
            finally:
                connection.close()
        except (OSError, ValueError) as e:
            statuses[_failure_name(e)] += 1
            if len(samples) < 3:
                samples.append(f"{_failure_name(e)}: {e}")
            continue
        elapsed = time.perf_counter() - sent
        statuses[str(status)] += 1
        if status == 200:
            latencies.append(elapsed)
            if not checked:  # one response per client is decoded: the certificate is for the device that asked
                checked = True
                name = issued_common_name(body)
                if name != device_id:
                    samples.append(f"issued CN {name!r} for {device_id!r}")
        elif len(samples) < 3:
            samples.append(f"{status}: {body[:200]!r}")
    results.put(
        {
            "ended": time.perf_counter(),
            "latencies": latencies,
            "statuses": dict(statuses),
            "samples": samples,
            "client_cpu_s": time.process_time() - cpu_before,
            "exhausted": used == len(pool),
        }
    )


def handshake_worker(
    index: int,
    mode: str,
    port: int,
    root: bytes,
    ca: ManufacturerCA,
    directory: str,
    seconds: float,
    ready: Any,
    go: Any,
    start: Any,
    results: Any,
) -> None:
    """One client: connect + TLS handshake with an IDevID + close (``mode`` "handshake"), or the same with one
    ``GET /healthz`` before closing (``mode`` "healthz"), in a loop."""
    try:
        path = Path(directory) / f"handshake-{mode}-{index:02d}.pem"
        path.write_bytes(idevid_pem(ca, f"handshake-{index:02d}", dt.datetime.now(dt.UTC)))
        context = client_context(root, path)
        request = http_request("GET", "/healthz", port, close=True)
    except BaseException as e:
        ready.put(f"{type(e).__name__}: {e}")
        raise
    ready.put("ready")
    deadline = _wait_for_start(go, start) + seconds
    cpu_before = time.process_time()
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    samples: list[str] = []
    while time.perf_counter() < deadline:
        sent = time.perf_counter()
        try:
            connection = Connection(port, context)
            try:
                status = connection.request(request)[0] if mode == "healthz" else 200
            finally:
                connection.close()
        except (OSError, ValueError) as e:
            statuses[_failure_name(e)] += 1
            if len(samples) < 3:
                samples.append(f"{_failure_name(e)}: {e}")
            continue
        statuses[str(status)] += 1
        if status == 200:
            latencies.append(time.perf_counter() - sent)
    results.put(
        {
            "ended": time.perf_counter(),
            "latencies": latencies,
            "statuses": dict(statuses),
            "samples": samples,
            "client_cpu_s": time.process_time() - cpu_before,
            "exhausted": False,
        }
    )


def summarise(collected: Sequence[dict[str, Any]], seconds: float, cpu: dict[str, float]) -> dict[str, Any]:
    """The figures of one timed phase: completed operations (status 200), rate, latency, server CPU per operation
    (all, and split into the event-loop thread and the other threads), client CPU per operation, statuses."""
    server_cpu = cpu["total"]
    latencies = [x for r in collected for x in r["latencies"]]
    statuses: Counter[str] = Counter()
    for r in collected:
        statuses.update(r["statuses"])
    done = len(latencies)
    client_cpu = sum(r["client_cpu_s"] for r in collected)
    return {
        "completed": done,
        "seconds": round(seconds, 3),
        "per_s": round(done / seconds, 1) if seconds > 0 else 0.0,
        **latency_summary(latencies),
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_ms_per_op": round(server_cpu / done * 1000, 3) if done else None,
        "server_loop_cpu_ms_per_op": round(cpu["loop"] / done * 1000, 3) if done else None,
        "server_threads_cpu_ms_per_op": round(cpu["threads"] / done * 1000, 3) if done else None,
        "server_cpu_share": round(server_cpu / seconds, 3) if seconds > 0 else None,
        "client_cpu_ms_per_op": round(client_cpu / done * 1000, 3) if done else None,
        "statuses": dict(sorted(statuses.items())),
        "failures": {k: v for k, v in sorted(statuses.items()) if k != "200"},
        "samples": [s for r in collected for s in r["samples"]][:5],
        "pool_exhausted": any(r["exhausted"] for r in collected),
    }


# -- the run --------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=30.0, help="timed enrollment phase (default 30)")
    parser.add_argument("--clients", type=int, default=8, help="client processes (default 8)")
    parser.add_argument(
        "--pool",
        type=int,
        default=0,
        help="IDevIDs (= enrollments at most) in all; default 700 per second of --seconds, at most 20,000",
    )
    parser.add_argument(
        "--baseline-seconds", type=float, default=10.0, help="each of the two handshake baselines (default 10; 0: skip)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument("--keep", type=Path, help="keep the hub's data and the IDevIDs here (default: a temp dir)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.pool <= 0:
        args.pool = int(min(20_000, max(1_000, 700 * args.seconds)))
    args.pool = max(args.pool, args.clients)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    load_start = note_load()
    base = args.keep or Path(tempfile.mkdtemp(prefix="warden-bench-enroll-"))
    base.mkdir(parents=True, exist_ok=True)
    server_env = {"WARDEN_ENROLL_RATE_PER_ADDRESS": "100000", "WARDEN_ENROLL_BURST_PER_ADDRESS": "1000000"}
    hub = start_bench_hub(base, server_env)
    try:
        ca = add_enrollment_group(hub, base)
        root = root_der(hub)
        pid = hub.process.pid
        share = [args.pool // args.clients + (1 if i < args.pool % args.clients else 0) for i in range(args.clients)]
        print(
            f"hub pid {pid} on port {hub.port}; {args.clients} clients preparing {args.pool:,} IDevIDs + CSRs (untimed)"
        )
        directory = str(base / "idevids")
        collected, seconds, cpu = run_clients(
            enroll_worker,
            [(i, share[i], hub.port, root, ca, directory) for i in range(args.clients)],
            pid,
            args.seconds,
        )
        enroll = summarise(collected, seconds, cpu)
        _print_phase("simpleenroll (new TCP+TLS per enrollment)", enroll)
        baselines: dict[str, dict[str, Any]] = {}
        if args.baseline_seconds > 0:
            for mode in ("handshake", "healthz"):
                collected, seconds, cpu = run_clients(
                    handshake_worker,
                    [(i, mode, hub.port, root, ca, directory) for i in range(args.clients)],
                    pid,
                    args.baseline_seconds,
                )
                baselines[mode] = summarise(collected, seconds, cpu)
                label = "mTLS handshake + close" if mode == "handshake" else "mTLS handshake + GET /healthz + close"
                _print_phase(label, baselines[mode])
        metrics = hub_metrics(hub)
        server_rss = rss_bytes(pid)
    finally:
        hub.stop()
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)

    per_enroll = enroll["server_cpu_ms_per_op"]
    handshake = baselines.get("handshake", {}).get("server_cpu_ms_per_op")
    healthz = baselines.get("healthz", {}).get("server_cpu_ms_per_op")
    met = {
        "server_cpu_ms": per_enroll is not None and per_enroll <= TARGET_CPU_MS,
        "rate": enroll["per_s"] >= TARGET_RATE,
        "p99": enroll["p99_ms"] < TARGET_P99_MS,
        "no_failures": not enroll["failures"],
    }
    results: dict[str, object] = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "loadavg_1m_start": round(load_start, 2)},
        "clients": args.clients,
        "seconds": args.seconds,
        "pool": args.pool,
        "server": {
            "workers": 1,
            "env": {**BENCH_ENV, **server_env},
            "note": "access log off (log level warning); per-address enrollment limit raised, still consulted",
            "rss_mb_end": round(server_rss / 2**20, 1),
        },
        "enroll": enroll,
        "baseline": baselines,
        "enroll_over_handshake_cpu": round(per_enroll / handshake, 2) if per_enroll and handshake else None,
        "enroll_over_healthz_cpu": round(per_enroll / healthz, 2) if per_enroll and healthz else None,
        "server_metrics": metrics,
        "targets": {"server_cpu_ms_per_enroll": TARGET_CPU_MS, "per_s": TARGET_RATE, "p99_ms": TARGET_P99_MS},
        "met": met,
        "runtime_s": round(time.perf_counter() - began, 1),
    }
    _print_summary(results)
    write_json(args.out, results)
    print(f"\nwrote {args.out}  (total {results['runtime_s']} s)")
    return 1 if args.check and not all(met.values()) else 0


def _print_phase(label: str, r: dict[str, Any]) -> None:
    cpu = (
        "-"
        if r["server_cpu_ms_per_op"] is None
        else f"{r['server_cpu_ms_per_op']:.2f} (loop {r['server_loop_cpu_ms_per_op']:.2f} + threads "
        f"{r['server_threads_cpu_ms_per_op']:.2f})"
    )
    client = "-" if r["client_cpu_ms_per_op"] is None else f"{r['client_cpu_ms_per_op']:.2f}"
    print(
        f"{label}: {r['completed']:,} in {r['seconds']:.1f} s = {r['per_s']:,.1f}/s, p50 {r['p50_ms']:.1f} ms, "
        f"p99 {r['p99_ms']:.1f} ms; server CPU {cpu} ms/op ({r['server_cpu_share']:.0%} of a core), "
        f"client CPU {client} ms/op"
    )
    if r["failures"]:
        print(f"    failures by status: {r['failures']}  e.g. {r['samples'][:2]}")
    if r["pool_exhausted"]:
        print("    note: a client used up its IDevIDs before the time was up (raise --pool)")


def _print_summary(results: dict[str, Any]) -> None:
    enroll, met, baseline = results["enroll"], results["met"], results["baseline"]

    def flag(name: str) -> str:
        return "ok" if met[name] else "MISSED"

    print(f"\nEST simpleenroll, {results['clients']} client processes, one TCP+TLS connection per enrollment")
    rows = [
        ("enrollments/s", f"{enroll['per_s']:,.1f}", f">= {TARGET_RATE:,.0f}: {flag('rate')}"),
        (
            "latency p50 / p99",
            f"{enroll['p50_ms']:.1f} / {enroll['p99_ms']:.1f} ms",
            f"p99 < {TARGET_P99_MS:.0f} ms: {flag('p99')}",
        ),
        (
            "server CPU per enrollment",
            f"{enroll['server_cpu_ms_per_op']} ms",
            f"<= {TARGET_CPU_MS} ms: {flag('server_cpu_ms')}",
        ),
        (
            "  event-loop thread / other threads",
            f"{enroll['server_loop_cpu_ms_per_op']} / {enroll['server_threads_cpu_ms_per_op']} ms",
            "",
        ),
        ("server CPU share (1.0 = one core)", f"{enroll['server_cpu_share']}", ""),
        ("client CPU per enrollment (all clients)", f"{enroll['client_cpu_ms_per_op']} ms", ""),
        ("failures by status", str(enroll["failures"] or "none"), flag("no_failures")),
    ]
    for mode, label in (("handshake", "baseline: mTLS handshake + close"), ("healthz", "baseline: + GET /healthz")):
        if mode in baseline:
            b = baseline[mode]
            rows.append((label, f"{b['per_s']:,.1f}/s, {b['server_cpu_ms_per_op']} ms CPU", ""))
    if results["enroll_over_handshake_cpu"] is not None:
        rows.append(("enrollment CPU / handshake CPU", f"{results['enroll_over_handshake_cpu']}x", ""))
    for name, value, target in rows:
        print(f"  {name:<42}{value:>28}  {target}")
    metrics = results["server_metrics"]
    est = {k: v for k, v in metrics.items() if k.startswith("warden_est_requests_total")}
    tls = {k: v for k, v in metrics.items() if k.startswith(("warden_tls", "warden_rate_limited"))}
    print(f"\n  server counters: {est} {tls}")
    print(
        f"  server: 1 worker, {results['server']['note']}; RSS {results['server']['rss_mb_end']} MB at the end.\n"
        f"  {results['machine']['cpus']} CPUs shared by clients and server; load average "
        f"{results['machine']['loadavg_1m_start']} at start, {results['machine']['loadavg_1m']} at end."
    )


if __name__ == "__main__":
    sys.exit(main())
