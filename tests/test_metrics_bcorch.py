"""bcorch's metrics port: slot state, restarts and batches, scraped from a real bcorch."""
from __future__ import annotations

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from bcorch.orchestrator.metrics import SlotCollector
from support import ManagedProcess, free_port, wait_until
from test_orch_fakes import FakeBcorch


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def slot_value(metrics: dict, name: str, gpu: int, **extra: str) -> float | None:
    for (sample, labels), value in metrics.items():
        d = dict(labels)
        if sample == name and d.get("gpu") == str(gpu) and all(d.get(k) == v for k, v in extra.items()):
            return value
    return None


def test_metrics_show_slot_states_restarts_and_batches(tmp_path, procs):
    port = free_port()
    b = FakeBcorch(tmp_path, gpus=2, modes={"1": "crash"},
                   orchestrator={"max_restarts": 1, "metrics_port": port})
    procs.append(b)
    b.start()
    b.wait_state(1, "FAILED", timeout=30)
    b.wait_state(0, "RUNNING")

    def settled():
        m = scrape(port)
        return m if (slot_value(m, "bcorch_slot_state", 1, state="FAILED") == 1
                     and (slot_value(m, "bcorch_slot_batches_total", 0) or 0) >= 2) else None
    m = wait_until(settled, 30, what="FAILED gpu1 and batches of gpu0 in /metrics")
    assert slot_value(m, "bcorch_slot_state", 0, state="RUNNING") == 1
    assert slot_value(m, "bcorch_slot_state", 0, state="FAILED") == 0
    assert slot_value(m, "bcorch_slot_restarts_total", 1) == 1
    assert slot_value(m, "bcorch_slot_batch_files", 0) == 4
    assert m[("bcorch_manager_reachable", ())] in (0.0, 1.0)
    assert slot_value(m, "bcorch_gpu_memory_used_bytes", 0) is None, "virtual GPUs have no NVML"

    b.signal(15)
    assert b.wait(30) == 0
    with socket.socket() as s:  # the metrics port is closed with bcorch
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_metrics_port_in_use_is_a_configuration_error(tmp_path, procs):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        b = FakeBcorch(tmp_path, gpus=1, orchestrator={"metrics_port": port})
        procs.append(b)
        ManagedProcess.start(b)  # not FakeBcorch.start: no control socket will appear
        assert b.wait(30) == 78
    assert "orchestrator.metrics_port" in b.log()


def test_collector_reports_nvml_health_from_the_snapshot():
    snapshot = {"host": "h1", "uptime_s": 5.0, "manager": {"reachable": False}, "slots": [
        {"gpu": 3, "engine_id": "h1-gpu3", "state": "DRAINING", "restarts": 2,
         "batches_done": 7, "files_done": 70, "job_id": None, "batch_size": 10,
         "health": {"memory_used": 2 << 30, "memory_total": 80 << 30, "utilization_pct": 97,
                    "temperature_c": 71, "ecc_uncorrected": 0, "lost": True}}]}
    families = {f.name: f for f in SlotCollector(lambda: snapshot).collect()}
    samples = {(s.name, s.labels.get("state")): s.value for f in families.values()
               for s in f.samples}
    assert samples[("bcorch_slot_state", "DRAINING")] == 1
    assert samples[("bcorch_slot_state", "RUNNING")] == 0
    assert samples[("bcorch_gpu_memory_used_bytes", None)] == 2 << 30
    assert samples[("bcorch_gpu_utilization_percent", None)] == 97
    assert samples[("bcorch_gpu_lost", None)] == 1
    assert samples[("bcorch_slot_batch_files", None)] == 0, "no job: nothing in a batch"
    assert samples[("bcorch_manager_reachable", None)] == 0
    assert list(SlotCollector(lambda: None).collect()) == []
