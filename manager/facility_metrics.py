"""Prometheus metrics of a facility: the single-run families, summed over runs, plus the
per-run file gauges, done counters and read counts with a `run` label, each run's state
and the model switches.

Like manager.metrics, everything is read at scrape time from what the runs keep: a run
being served from its store, a settled run (its part closed) from its summary, so its
counters neither vanish nor drop when it settles or the manager restarts.
"""
from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .facility import Facility
from .facility_states import RunState
from .metrics import CollectorMetrics, jobs_finished, read_families


class FacilityCollector:
    def __init__(self, facility: Facility):
        self.facility = facility

    def collect(self, every_run: bool = False) -> Iterable[Any]:
        """Per-run series for the runs /status shows (manager.facility_view), or for every
        run (GET /metrics?runs=all); the facility-wide sums over every run, so they never
        drop."""
        every = self.facility.run_counts()
        if every_run:
            shown = {run.run_id for run in every} | set(self.facility.states())
        else:
            shown = self.facility.shown_ids()
        runs = [run for run in every if run.run_id in shown]
        files = GaugeMetricFamily("bcmanager_files", "Input files by run and state",
                                  labels=["run", "state"])
        size = GaugeMetricFamily("bcmanager_file_bytes", "Bytes of input files by run and state",
                                 labels=["run", "state"])
        totals: dict[str, list[int]] = {}
        jobs: dict[str, int] = {}
        leases: dict[str, int] = {}
        for run in runs:
            for state, n in sorted(run.files.items()):
                files.add_metric([run.run_id, state], n)
                size.add_metric([run.run_id, state], run.bytes.get(state, 0))
        for run in every:
            for state, n in run.files.items():
                total = totals.setdefault(state, [0, 0])
                total[0] += n
                total[1] += run.bytes.get(state, 0)
            for state, n in run.jobs.items():
                jobs[state] = jobs.get(state, 0) + n
            for engine, n in run.leases.items():
                leases[engine] = leases.get(engine, 0) + n
        yield files
        yield size
        done = CounterMetricFamily("bcmanager_files_done", "Files basecalled (DONE), by run",
                                   labels=["run"])
        done_bytes = CounterMetricFamily("bcmanager_bytes_done",
                                         "Bytes of input files basecalled (DONE), by run",
                                         labels=["run"])
        for run in runs:
            done.add_metric([run.run_id], run.files.get("DONE", 0))
            done_bytes.add_metric([run.run_id], run.bytes.get("DONE", 0))
        yield done
        yield done_bytes
        yield GaugeMetricFamily("bcmanager_files_quarantined",
                                "Files given up on after max_attempts failures (all runs)",
                                value=totals.get("QUARANTINED", [0, 0])[0])
        yield CounterMetricFamily("bcmanager_assignments",
                                  "Batches handed out (jobs created), all runs",
                                  value=sum(jobs.values()))
        yield CounterMetricFamily("bcmanager_lease_expiries",
                                  "Jobs whose lease expired, all runs",
                                  value=jobs.get("EXPIRED", 0))
        yield jobs_finished(jobs)
        yield from read_families([((run.run_id,), run.reads) for run in runs], ("run",))
        in_flight = GaugeMetricFamily("bcmanager_engine_jobs_in_flight",
                                      "Live leases per engine", labels=["engine"])
        for engine, n in sorted(leases.items()):
            in_flight.add_metric([engine], n)
        yield in_flight
        yield GaugeMetricFamily("bcmanager_jobs_in_flight", "Live leases (all runs)",
                                value=sum(leases.values()))
        yield GaugeMetricFamily("bcmanager_input_closed", "1 when the facility takes no new runs",
                                value=int(self.facility.input_closed))
        state = GaugeMetricFamily("bcmanager_run_state", "1 for each run's current state",
                                  labels=["run", "state"])
        for run_id, current in sorted(self.facility.states().items()):
            if run_id not in shown:
                continue
            for s in RunState:
                state.add_metric([run_id, s.value], int(s.value == current))
        yield state
        served = GaugeMetricFamily("bcmanager_run_gpu_seconds",
                                   "GPU seconds served to each run (batches held)",
                                   labels=["run"])
        for run_id, seconds in sorted(self.facility.served().items()):
            if run_id not in shown:
                continue
            served.add_metric([run_id], seconds)
        yield served
        switches = CounterMetricFamily("bcmanager_model_switches",
                                       "Batches of another model than the engine's last",
                                       labels=["engine"])
        for engine, n in sorted(self.facility.fair.switches().items()):
            switches.add_metric([engine], n)
        yield switches


class FacilityMetrics(CollectorMetrics):
    """The facility's registry: its collector and the request latency histogram."""

    def __init__(self, facility: Facility):
        self.collector = FacilityCollector(facility)
        super().__init__(self.collector)

    def exposition(self, every_run: bool = False) -> tuple[bytes, str]:
        if not every_run:
            return super().exposition()
        return generate_latest(_EveryRun(self)), CONTENT_TYPE_LATEST  # type: ignore[arg-type]


class _EveryRun:
    """What generate_latest reads (a collect()): the registry's families, with the
    per-run series of every run."""

    def __init__(self, metrics: FacilityMetrics):
        self.metrics = metrics

    def collect(self) -> Iterable[Any]:
        yield from self.metrics.collector.collect(every_run=True)
        yield from self.metrics.latency.collect()
