"""Prometheus metrics of one bcorch host, on orchestrator.metrics_port when it is set.

The supervisor's loop thread owns all slot state; it publishes a snapshot (the same dict
`bcorch status` shows) and this module only reads the latest published one, from
prometheus_client's own HTTP thread, so a scrape never touches live slot objects and
never blocks the loop. A dedicated CollectorRegistry, never the process-global one.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .slot import SlotState

log = logging.getLogger("bcorch.metrics")

SLOT_STATES = [s.value for s in SlotState]
HEALTH_GAUGES = (  # snapshot key, metric suffix, help
    ("memory_used", "gpu_memory_used_bytes", "GPU memory in use (NVML)"),
    ("memory_total", "gpu_memory_total_bytes", "GPU memory in all (NVML)"),
    ("utilization_pct", "gpu_utilization_percent", "GPU utilisation (NVML)"),
    ("temperature_c", "gpu_temperature_celsius", "GPU temperature (NVML)"),
    ("ecc_uncorrected", "gpu_ecc_uncorrected_errors", "Uncorrected ECC errors (NVML)"),
)


class SlotCollector:
    """Turns the latest published supervisor snapshot into metric families."""

    def __init__(self, snapshot: Callable[[], dict | None]):
        self.snapshot = snapshot

    def collect(self) -> Iterable[Any]:
        status = self.snapshot()
        if not status:
            return
        host = str(status.get("host", ""))
        slots = status.get("slots", [])
        labels = ["host", "gpu", "engine"]

        def key(s: dict) -> list[str]:
            return [host, str(s["gpu"]), str(s.get("engine_id", ""))]

        state = GaugeMetricFamily("bcorch_slot_state", "1 for the state each GPU slot is in",
                                  labels=labels + ["state"])
        restarts = CounterMetricFamily("bcorch_slot_restarts", "Engine restarts of the slot",
                                       labels=labels)
        batches = CounterMetricFamily(
            "bcorch_slot_batches", "Batches finished by the slot's current engine process "
            "(resets when it restarts)", labels=labels)
        files = CounterMetricFamily(
            "bcorch_slot_files", "Files basecalled by the slot's current engine process "
            "(resets when it restarts)", labels=labels)
        in_batch = GaugeMetricFamily("bcorch_slot_batch_files",
                                     "Files in the batch being basecalled (0 when idle)",
                                     labels=labels)
        # A model label is bounded by the few models a facility runs; a run label would
        # grow without bound over weeks of runs (the manager's metrics carry the run).
        model = GaugeMetricFamily("bcorch_slot_model",
                                  "1 for the model the slot's batch is basecalled with "
                                  "(absent when idle)", labels=labels + ["model"])
        health = {k: GaugeMetricFamily(f"bcorch_{name}", text, labels=labels)
                  for k, name, text in HEALTH_GAUGES}
        lost = GaugeMetricFamily("bcorch_gpu_lost", "1 when NVML reports the GPU lost",
                                 labels=labels)
        for s in slots:
            for value in SLOT_STATES:
                state.add_metric(key(s) + [value], 1.0 if s["state"] == value else 0.0)
            restarts.add_metric(key(s), s.get("restarts") or 0)
            batches.add_metric(key(s), s.get("batches_done") or 0)
            files.add_metric(key(s), s.get("files_done") or 0)
            in_batch.add_metric(key(s), (s.get("batch_size") or 0) if s.get("job_id") else 0)
            if s.get("job_id") and s.get("model"):
                model.add_metric(key(s) + [str(s["model"])], 1.0)
            sample = s.get("health") or {}
            for k, family in health.items():
                if sample.get(k) is not None:
                    family.add_metric(key(s), sample[k])
            if s.get("health") is not None:
                lost.add_metric(key(s), 1.0 if sample.get("lost") else 0.0)
        yield from (state, restarts, batches, files, in_batch, model, *health.values(), lost)
        manager = status.get("manager", {})
        yield GaugeMetricFamily("bcorch_manager_reachable",
                                "1 when the last contact with the manager succeeded",
                                value=1.0 if manager.get("reachable", True) else 0.0)
        yield GaugeMetricFamily("bcorch_uptime_seconds", "Seconds since bcorch started",
                                value=status.get("uptime_s") or 0.0)


class MetricsServer:
    """prometheus_client's HTTP server (its own daemon thread) over a SlotCollector."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], dict | None]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(SlotCollector(snapshot))
        self.host, self.port = host, port
        self._server: Any = None
        self._thread: Any = None

    def start(self) -> None:
        self._server, self._thread = start_http_server(self.port, addr=self.host,
                                                       registry=self.registry)
        self.port = self._server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None
