"""Prometheus metrics of the manager, served at /metrics.

A dedicated CollectorRegistry per App (never the process-global one), so two managers in
one process (tests) do not mix. Counts of files, jobs and leases are read at scrape time
from what the manager already keeps (the store's counters and jobs table, the lease table):
no second bookkeeping that could drift. Only request latency is recorded as it happens,
by MetricsMiddleware, which wraps the WSGI application.

Token: /metrics needs the bearer token like every route but /heartbeat (Prometheus
scrape configs take `authorization: {credentials: <token>}`); see docs/operations.md.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .read_counts import ReadTotals
from .service import Manager

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)


class ManagerCollector:
    """Reads the manager's current state on each scrape."""

    def __init__(self, manager: Manager):
        self.manager = manager

    def collect(self) -> Iterable[Any]:
        counters = self.manager.store.snapshot()
        files = GaugeMetricFamily("bcmanager_files", "Input files by state", labels=["state"])
        size = GaugeMetricFamily("bcmanager_file_bytes", "Bytes of input files by state",
                                 labels=["state"])
        for state, n in sorted(counters.files.items()):
            files.add_metric([state], n)
            size.add_metric([state], counters.bytes[state])
        yield files
        yield size
        yield GaugeMetricFamily("bcmanager_files_quarantined",
                                "Files given up on after max_attempts failures",
                                value=counters.files.get("QUARANTINED", 0))
        yield CounterMetricFamily("bcmanager_files_done",  # DONE is final: rate() is throughput
                                  "Files basecalled (DONE), since the database began",
                                  value=counters.files.get("DONE", 0))
        yield CounterMetricFamily("bcmanager_bytes_done",
                                  "Bytes of input files basecalled (DONE), since the database began",
                                  value=counters.bytes.get("DONE", 0))

        jobs = self.manager.store.job_counts()
        yield CounterMetricFamily("bcmanager_assignments",
                                  "Batches handed out (jobs created), since the database began",
                                  value=sum(jobs.values()))
        yield CounterMetricFamily("bcmanager_lease_expiries",
                                  "Jobs whose lease expired (no keep-alive for an interval)",
                                  value=jobs.get("EXPIRED", 0))
        yield jobs_finished(jobs)
        yield from read_families([((), self.manager.store.read_totals())])

        per_engine = self.manager.leases.by_engine()
        in_flight = GaugeMetricFamily("bcmanager_engine_jobs_in_flight",
                                      "Live leases per engine", labels=["engine"])
        for engine, job_ids in sorted(per_engine.items()):
            in_flight.add_metric([engine], len(job_ids))
        yield in_flight
        yield GaugeMetricFamily("bcmanager_jobs_in_flight", "Live leases (batches being worked on)",
                                value=sum(len(j) for j in per_engine.values()))
        yield GaugeMetricFamily("bcmanager_input_closed",
                                "1 when no more input files will come", value=int(self.manager.input_closed))


def jobs_finished(jobs: dict[str, int]) -> CounterMetricFamily:
    """bcmanager_jobs_finished from job counts by state (LIVE jobs have not finished)."""
    finished = CounterMetricFamily("bcmanager_jobs_finished", "Jobs by final state",
                                   labels=["state"])
    for state, n in sorted(jobs.items()):
        if state != "LIVE":
            finished.add_metric([state], n)
    return finished


READS_HELP = ("Reads written into pass/ and fail/ by DONE batches whose engine reported "
              "them, since the database began")
READ_JOBS_HELP = ("DONE jobs whose engine reported their reads (known) or did not (unknown: "
                  "an engine that does not count, or a database rebuilt from the journal)")


def read_families(rows: Iterable[tuple[tuple[str, ...], ReadTotals]],
                  labels: tuple[str, ...] = ()) -> tuple[CounterMetricFamily, CounterMetricFamily]:
    """bcmanager_reads_total{kind} and bcmanager_read_jobs_total{reads}, one sample set per
    (label values, totals) row. Reads of jobs that did not report theirs are in neither
    kind: a dashboard tells "0 reads" (some known, none written) from "not reported" (only
    unknown) by the second family."""
    reads = CounterMetricFamily("bcmanager_reads", READS_HELP, labels=[*labels, "kind"])
    jobs = CounterMetricFamily("bcmanager_read_jobs", READ_JOBS_HELP, labels=[*labels, "reads"])
    for values, totals in rows:
        reads.add_metric([*values, "pass"], totals.passed)
        reads.add_metric([*values, "fail"], totals.failed)
        jobs.add_metric([*values, "known"], totals.jobs_counted)
        jobs.add_metric([*values, "unknown"], totals.jobs_done - totals.jobs_counted)
    return reads, jobs


class CollectorMetrics:
    """A registry of its own holding one collector and the request latency histogram."""

    def __init__(self, collector: Any):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(collector)
        self.latency = Histogram("bcmanager_request_duration_seconds",
                                 "HTTP request latency by route and status code",
                                 ["route", "code"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)

    def exposition(self, every_run: bool = False) -> tuple[bytes, str]:
        """every_run: a facility's series of every run (FacilityMetrics); here the same."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Metrics(CollectorMetrics):
    """One manager's registry: its state collector and the request latency histogram."""

    def __init__(self, manager: Manager):
        super().__init__(ManagerCollector(manager))


PAGE_ROUTE = "/"   # the live page and its log-in (manager.web_page), served beside `routes`


def route_label(path: str, routes: frozenset[str]) -> str:
    """The route of a request path as the app resolves it (one trailing slash is dropped),
    or "other": label values stay bounded whatever paths clients send."""
    route = path.rstrip("/") if len(path) > 1 else path
    return route if route in routes else "other"


class MetricsMiddleware:
    """Wraps a WSGI app: times each request by route (known routes and the live page only)
    and status code."""

    def __init__(self, app: Callable, metrics: CollectorMetrics, routes: Iterable[str]):
        self.app = app
        self.metrics = metrics
        self.routes = frozenset(routes) | {PAGE_ROUTE}

    def __call__(self, environ: dict, start_response: Callable) -> Any:
        start = time.perf_counter()
        seen: list[str] = []

        def recording_start_response(status: str, headers: list, exc_info: Any = None) -> Any:
            seen.append(status.split(" ", 1)[0])
            return start_response(status, headers, exc_info) if exc_info else \
                start_response(status, headers)

        try:
            return self.app(environ, recording_start_response)
        finally:
            route = route_label(environ.get("PATH_INFO") or "/", self.routes)
            self.metrics.latency.labels(route, seen[0] if seen else "500").observe(
                time.perf_counter() - start)
