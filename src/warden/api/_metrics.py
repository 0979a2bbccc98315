"""The hub's Prometheus metrics, in a registry of their own per app (tests build many apps in one process)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series are noise
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.worker = Gauge("warden_worker_pid", "Process id of the worker that answered", registry=self.registry)
        self.worker.set(os.getpid())
        self.requests = Counter(
            "warden_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "warden_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self.est = Counter(
            "warden_est_requests",
            "EST enrollments and re-enrollments, by operation and outcome",
            ["operation", "outcome"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "warden_rate_limited",
            "Requests refused with 429, by the limiter that refused them",
            ["limiter"],
            registry=self.registry,
        )
        self.tls_failures = Counter(
            "warden_tls_handshake_failures",
            "TLS handshakes the hub refused, by the TLS alert OpenSSL raised",
            ["alert"],
            registry=self.registry,
        )
        self.trust_reloads = Counter(
            "warden_tls_context_reloads",
            "Times the TLS context was rebuilt (enrollment groups, pinned certificates or service certificate changed)",
            registry=self.registry,
        )
        self.leader = Gauge(
            "warden_leader", "1 when this worker holds the lock that runs the singleton jobs", registry=self.registry
        )
        self.jobs = Counter("warden_jobs", "Singleton job runs, by outcome", ["outcome"], registry=self.registry)
        self.crl_next_update = Gauge(
            "warden_crl_next_update_timestamp_seconds",
            "nextUpdate of the CRL the hub serves (Unix time)",
            registry=self.registry,
        )
