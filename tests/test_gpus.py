"""GPU discovery and health through NVML, with the pynvml functions replaced (no driver here)."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pynvml
import pytest

from bcorch.orchestrator import cli, gpus
from bcorch.orchestrator.gpus import GpuMonitor, GpuSelectionError, select_gpus


class FakeNvml:
    """A host with some GPUs, as pynvml would show it."""

    def __init__(self, monkeypatch, devices):
        self.devices = devices          # list of dicts: uuid, name, total, used, util, temp, ecc
        self.initialised = 0
        self.lost: set[int] = set()
        self.xids: list[tuple[int, int]] = []
        patch = lambda name, fn: monkeypatch.setattr(pynvml, name, fn)
        patch("nvmlInit", self._init)
        patch("nvmlShutdown", self._shutdown)
        patch("nvmlDeviceGetCount", lambda: len(self.devices))
        patch("nvmlDeviceGetHandleByIndex", lambda i: i)
        patch("nvmlDeviceGetHandleByUUID", self._by_uuid)
        patch("nvmlDeviceGetUUID", lambda h: self.devices[h]["uuid"])
        patch("nvmlDeviceGetName", lambda h: self.devices[h]["name"].encode())
        patch("nvmlDeviceGetMemoryInfo", self._checked(
            lambda h: SimpleNamespace(total=self.devices[h]["total"], used=self.devices[h]["used"],
                                      free=0)))
        patch("nvmlDeviceGetUtilizationRates", self._checked(
            lambda h: SimpleNamespace(gpu=self.devices[h]["util"], memory=0)))
        patch("nvmlDeviceGetTemperature", self._checked(lambda h, sensor: self.devices[h]["temp"]))
        patch("nvmlDeviceGetTotalEccErrors", self._checked(self._ecc))
        patch("nvmlEventSetCreate", lambda: "events")
        patch("nvmlDeviceRegisterEvents", lambda h, kind, events: None)
        patch("nvmlEventSetFree", lambda events: None)
        patch("nvmlEventSetWait_v2", self._wait_event)

    def _init(self):
        self.initialised += 1

    def _shutdown(self):
        self.initialised -= 1

    def _by_uuid(self, uuid):
        for i, d in enumerate(self.devices):
            if d["uuid"] == uuid:
                return i
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def _checked(self, fn):
        def call(handle, *args):
            if handle in self.lost:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
            return fn(handle, *args)
        return call

    def _ecc(self, handle, kind, counter):
        ecc = self.devices[handle].get("ecc")
        if ecc is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return ecc

    def _wait_event(self, events, timeout_ms):
        if not self.xids:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
        handle, xid = self.xids.pop(0)
        return SimpleNamespace(device=handle, eventData=xid, eventType=0)


def device(n, **kw):
    return {"uuid": f"GPU-0000000{n}-aaaa-bbbb-cccc-dddddddddddd", "name": "NVIDIA A100",
            "total": 80 * 1024 ** 3, "used": n * 1024 ** 3, "util": 10 * n, "temp": 40 + n,
            "ecc": 0, **kw}


@pytest.fixture
def host(monkeypatch):
    return FakeNvml(monkeypatch, [device(0), device(1), device(2), device(3, ecc=None)])


def test_all_lists_every_gpu_in_index_order(host):
    found = select_gpus("all")
    assert [g.index for g in found] == [0, 1, 2, 3]
    assert found[2].uuid == device(2)["uuid"] and found[2].name == "NVIDIA A100"
    assert found[0].memory_total == 80 * 1024 ** 3 and not found[0].virtual
    assert host.initialised == 0, "NVML shut down again after discovery"


def test_selection_by_index_keeps_the_given_order(host):
    assert [g.index for g in select_gpus("2,0")] == [2, 0]


def test_selection_by_uuid_and_mixed(host):
    uuid3 = device(3)["uuid"]
    assert [g.index for g in select_gpus(f"{uuid3.lower()},1")] == [3, 1]


@pytest.mark.parametrize("spec, message", [
    ("7", "--gpus: no GPU with index 7 (this host has indices 0,1,2,3)"),
    ("GPU-nope", "--gpus: no GPU with UUID 'GPU-nope'"),
    ("1,1", "--gpus: GPU 1 is listed twice"),
    ("0,,1", "--gpus: empty entry"),
])
def test_bad_selection_is_one_line_naming_gpus(host, spec, message):
    with pytest.raises(GpuSelectionError) as err:
        select_gpus(spec)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert err.value.exit_code == 78


def test_virtual_gpus_do_not_touch_nvml(monkeypatch):
    def no_nvml():
        raise AssertionError("NVML must not be called for virtual GPUs")
    monkeypatch.setattr(pynvml, "nvmlInit", no_nvml)
    found = select_gpus("virtual:3")
    assert [(g.index, g.uuid, g.virtual) for g in found] == [
        (0, "virtual-0", True), (1, "virtual-1", True), (2, "virtual-2", True)]


@pytest.mark.parametrize("spec", ["virtual:0", "virtual:x", "virtual:", "virtual:65"])
def test_bad_virtual_count(spec):
    with pytest.raises(GpuSelectionError, match=r"^--gpus: virtual:N needs N from 1 to 64"):
        select_gpus(spec)


def test_missing_driver_says_so_and_names_virtual(monkeypatch):
    def init():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    monkeypatch.setattr(pynvml, "nvmlInit", init)
    with pytest.raises(GpuSelectionError) as err:
        select_gpus("all")
    text = str(err.value)
    assert "no NVIDIA driver" in text and "virtual:N" in text and "\n" not in text


def test_no_gpu_on_a_host_with_a_driver(monkeypatch):
    FakeNvml(monkeypatch, [])
    with pytest.raises(GpuSelectionError, match="found no GPU.*virtual:N"):
        select_gpus("all")


def test_monitor_reads_figures_and_tolerates_unsupported_ecc(host):
    found = select_gpus("1,3")
    monitor = GpuMonitor(found)
    monitor.open()
    try:
        sample = monitor.sample()
    finally:
        monitor.close()
    one, three = sample[found[0].uuid], sample[found[1].uuid]
    assert (one.memory_used, one.utilization_pct, one.temperature_c, one.ecc_uncorrected) == (
        1024 ** 3, 10, 41, 0)
    assert three.ecc_uncorrected is None and not three.lost
    assert host.initialised == 0


def test_monitor_reports_a_lost_gpu_and_counts_xids(host):
    found = select_gpus("0,1")
    monitor = GpuMonitor(found)
    monitor.open()
    try:
        host.lost.add(1)
        host.xids.append((1, 79))
        sample = monitor.sample()
        assert sample[found[1].uuid].lost and sample[found[1].uuid].error == "GPU is lost"
        assert sample[found[1].uuid].xid_events == 1 and sample[found[1].uuid].last_xid == 79
        assert not sample[found[0].uuid].lost
        host.lost.clear()
        assert monitor.sample()[found[1].uuid].lost, "a lost GPU stays lost"
    finally:
        monitor.close()


def test_bcorch_gpus_json_lists_health(host, capsys):
    assert cli.main(["gpus", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["gpus"]
    assert [g["index"] for g in listed] == [0, 1, 2, 3]
    assert listed[1]["health"]["utilization_pct"] == 10


def test_bcorch_gpus_table(host, capsys):
    assert cli.main(["gpus", "--gpus", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["INDEX", "UUID", "NAME"]
    assert len(out) == 2 and device(0)["uuid"] in out[1] and "ok" in out[1]


def test_bcorch_gpus_without_a_driver_is_one_line_and_78():
    """The real pynvml on this machine: no driver (skipped where there is one)."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    result = subprocess.run([sys.executable, "-m", "bcorch.orchestrator", "gpus"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 78
    assert result.stderr.count("\n") == 1 and "virtual:N" in result.stderr
