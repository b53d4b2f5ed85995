"""A GPU that NVML reports lost, or whose uncorrectable ECC count rises, is drained and FAILED.

The supervisor runs in a thread of the test (fake engine processes, a real control pipe);
the GPU monitor is replaced by one whose figures the test sets."""
from __future__ import annotations

import signal
import threading

import pytest

from bcorch.orchestrator import supervisor as supervisor_module
from bcorch.orchestrator.control import request
from bcorch.orchestrator.gpus import GpuHealth, virtual_gpus
from bcorch.orchestrator.supervisor import Supervisor
from support import wait_until
from test_orch_fakes import fake_engine
from bcorch.config import from_mapping




class SetMonitor:
    def __init__(self, uuids):
        self.health = {u: GpuHealth(memory_used=1, memory_total=2, ecc_uncorrected=0) for u in uuids}
        self.opened = self.closed = False

    def open(self):
        self.opened = True

    def close(self):
        self.closed = True

    def sample(self):
        return {u: GpuHealth(**vars(h)) for u, h in self.health.items()}


@pytest.fixture
def running(tmp_path, monkeypatch):
    monkeypatch.setattr(supervisor_module, "HEALTH_INTERVAL_S", 0.1)
    gpus = virtual_gpus(2)
    monitor = SetMonitor([g.uuid for g in gpus])
    sock = tmp_path / "ctl" / "s.sock"
    sup = Supervisor(from_mapping({"orchestrator": {"hang_timeout_s": 5.0}}), gpus,
                     socket_path=sock, target=fake_engine, monitor=monitor)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", sup.run()))
    thread.start()
    try:
        wait_until(sock.exists, 20, what="control socket")
        ask = lambda **r: request(sock, r)
        for i in range(2):
            wait_until(lambda i=i: ask(cmd="status")["slots"][i]["state"] == "RUNNING", 20,
                       what=f"gpu{i} running")
        yield ask, monitor
    finally:
        sup.post(("signal", signal.SIGTERM))
        sup.post(("signal", signal.SIGTERM))
        thread.join(30)
    assert not thread.is_alive() and result["code"] == 0
    assert monitor.opened and monitor.closed


def slot(ask, gpu):
    return ask(cmd="status")["slots"][gpu]


def test_lost_gpu_is_drained_and_failed_with_the_reason(running):
    ask, monitor = running
    monitor.health["virtual-1"].lost = True
    failed = wait_until(lambda: (s := slot(ask, 1))["state"] == "FAILED" and s, 20,
                        what="gpu1 FAILED")
    assert failed["reason"] == "GPU unhealthy: NVML reports the GPU lost"
    assert failed["gpu_failure"] == "NVML reports the GPU lost" and failed["health"]["lost"]
    assert slot(ask, 0)["state"] == "RUNNING"


def test_rising_ecc_count_fails_the_gpu_and_resume_takes_a_new_baseline(running):
    ask, monitor = running
    monitor.health["virtual-0"].ecc_uncorrected = 2
    failed = wait_until(lambda: (s := slot(ask, 0))["state"] == "FAILED" and s, 20,
                        what="gpu0 FAILED")
    assert "uncorrectable ECC errors rose from 0 to 2" in failed["reason"]
    assert slot(ask, 1)["state"] == "RUNNING"
    assert ask(cmd="resume", gpu=0)["ok"]
    wait_until(lambda: slot(ask, 0)["state"] == "RUNNING", 20, what="gpu0 back")
    assert slot(ask, 0)["gpu_failure"] == ""


def test_a_fatal_xid_fails_the_gpu_and_an_application_xid_does_not(running):
    ask, monitor = running
    monitor.health["virtual-0"].xid_events, monitor.health["virtual-0"].last_xid = 1, 13
    monitor.health["virtual-1"].xid_events, monitor.health["virtual-1"].last_xid = 1, 79
    failed = wait_until(lambda: (s := slot(ask, 1))["state"] == "FAILED" and s, 20,
                        what="gpu1 FAILED")
    assert failed["reason"] == "GPU unhealthy: critical XID 79 (the GPU needs a reset)"
    assert slot(ask, 0)["health"]["xid_events"] == 1, "gpu0's XID 13 was seen"
    assert slot(ask, 0)["state"] == "RUNNING"
