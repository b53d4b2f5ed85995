"""One manager per OUTPUT_DIR (issue 11, hole 6): a second manager on the same state exits 78
naming the holder; the lock works across hosts through a lease file on the shared filesystem.
Real bcmanager processes; another host is played by writing its lock file."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest

import sys

from bcorch.config_writer import write_config
from bcorch.manager.instance_lock import LOCK_NAME, InstanceLock
from support import ManagedProcess, ManagerProcess, free_port, wait_until


def _dirs(tmp_path):
    for d in ("in", "out"):
        (tmp_path / d).mkdir(exist_ok=True)
    return tmp_path / "in", tmp_path / "out"


def _manager(tmp_path, procs, *, refresh_s: float | None = None, extra=()) -> ManagerProcess:
    inp, out = _dirs(tmp_path)
    port = free_port()
    config = None
    if refresh_s is not None:
        config = tmp_path / f"manager-{port}.toml"
        write_config(config, manager={"settle_s": 0.0, "scan_interval_s": 0.2,
                                      "lock_refresh_s": refresh_s})
    m = ManagerProcess(tmp_path, inp, out, port=port, config=config, extra=extra)
    procs.append(m)
    return m


def _second(tmp_path, procs, *extra: str) -> ManagedProcess:
    """A second bcmanager on the same directories (another port), not waited for."""
    inp, out = _dirs(tmp_path)
    p = ManagedProcess([sys.executable, "-m", "bcorch.manager", "--input-dir", str(inp),
                        "--output-dir", str(out), "--port", str(free_port()), *extra],
                       tmp_path / f"second-{len(procs)}.log")
    procs.append(p)
    return p.start()


def _lock(tmp_path) -> dict:
    return json.loads((tmp_path / "out" / LOCK_NAME).read_text())


def _foreign_lock(tmp_path, age_s: float, refresh_s: float = 10.0, **fields) -> None:
    """The lock of a manager on another host, last refreshed age_s ago (file-server time).
    Written whole and renamed into place, as a manager does: a running manager re-reads it."""
    path = _dirs(tmp_path)[1] / LOCK_NAME
    staging = path.with_name(LOCK_NAME + ".test-staging")
    now = time.time()
    staging.write_text(json.dumps({"host": "other-node", "pid": 4242, "pid_started": now - 3600,
                                   "instance": "feedfacecafebeef", "started": now - 3600,
                                   "refreshed": now - age_s, "refresh_s": refresh_s, **fields}))
    os.utime(staging, (now - age_s, now - age_s))
    os.replace(staging, path)


def test_second_manager_on_the_same_output_dir_exits_78_naming_the_holder(tmp_path, procs):
    first = _manager(tmp_path, procs).start()
    second = _second(tmp_path, procs)
    assert second.wait(30) == 78
    lines = second.log().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert f"host {socket.gethostname()} pid {first.pid}" in lines[0], lines[0]
    assert first.status()["files"] is not None  # the holder still serves


def test_a_manager_killed_with_9_is_replaced_on_its_host_at_once(tmp_path, procs):
    first = _manager(tmp_path, procs).start()
    assert _lock(tmp_path)["pid"] == first.pid
    first.signal(signal.SIGKILL)
    # not reaped yet: a zombie holds no lock either
    wait_until(lambda: psutil.Process(first.pid).status() == psutil.STATUS_ZOMBIE, 30,
               what="the killed manager to be a zombie")
    again = _manager(tmp_path, procs).start()  # no stale wait: the holder's pid is gone
    assert _lock(tmp_path)["pid"] == again.pid
    assert "gone" in again.log()


def test_clean_exit_releases_the_lock(tmp_path, procs):
    m = _manager(tmp_path, procs).start()
    assert (tmp_path / "out" / LOCK_NAME).exists()
    m.signal(signal.SIGTERM)
    assert m.wait(30) == 0
    assert not (tmp_path / "out" / LOCK_NAME).exists()
    assert not list((tmp_path / "out").glob(LOCK_NAME + ".*"))  # no temp files left


def test_fresh_lock_of_another_host_is_refused_even_with_take_over(tmp_path, procs):
    _foreign_lock(tmp_path, age_s=5)
    for extra in ((), ("--take-over",)):
        p = _second(tmp_path, procs, *extra)
        assert p.wait(30) == 78, p.log()
        line = p.log().strip()
        assert "\n" not in line and "host other-node pid 4242" in line, line
        ago = re.search(r"lock refreshed (\d+) s ago", line)
        assert ago and 5 <= int(ago.group(1)) < 60, line
    assert _lock(tmp_path)["host"] == "other-node"


def test_stale_lock_of_another_host_needs_take_over(tmp_path, procs):
    _foreign_lock(tmp_path, age_s=600)  # 6 x 10 s without a refresh: stale
    refused = _second(tmp_path, procs)
    assert refused.wait(30) == 78
    assert "stale" in refused.log() and "--take-over" in refused.log(), refused.log()
    taker = _manager(tmp_path, procs, extra=["--take-over"]).start()
    lock = _lock(tmp_path)
    assert (lock["host"], lock["pid"]) == (socket.gethostname(), taker.pid)
    assert "taking it over from host other-node pid 4242" in taker.log()


def test_a_take_over_inside_a_refresh_is_not_overwritten(tmp_path, monkeypatch):
    """Another manager takes the lock between refresh()'s read and its rename (the window is
    the temp file's write and fsync; the test below, refreshing every 0.2 s, can hit it):
    the refresh must find the lock lost, not write its own over the taker's."""
    lock = InstanceLock(tmp_path, refresh_s=0.2)
    lock.acquire()
    taker = InstanceLock(tmp_path, refresh_s=0.2)
    write_temp = lock._write_temp

    def taken_meanwhile(holder):
        tmp = write_temp(holder)
        (tmp_path / LOCK_NAME).write_text(json.dumps(taker.me.__dict__))
        return tmp
    monkeypatch.setattr(lock, "_write_temp", taken_meanwhile)
    reason = lock.refresh()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["instance"] == taker.me.instance
    assert "now held by" in reason


def test_holder_refreshes_and_stops_when_another_manager_took_over(tmp_path, procs):
    m = _manager(tmp_path, procs, refresh_s=0.2).start()
    first = _lock(tmp_path)["refreshed"]
    wait_until(lambda: _lock(tmp_path)["refreshed"] > first, 30, what="a lock refresh")
    _foreign_lock(tmp_path, age_s=0)  # another host took it (--take-over) meanwhile
    assert m.wait(30) == 78
    assert "now held by host other-node pid 4242" in m.log()
    assert _lock(tmp_path)["host"] == "other-node"  # not removed by the loser


def test_another_container_of_this_machine_is_taken_over_once_stale(tmp_path, procs):
    """Same kernel (boot id), another pid namespace: a live one is refused; a stale one
    cannot be cut off by a network, so it is dead or frozen, and is taken without a flag."""
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    container = {"host": "manager-container", "boot_id": boot_id, "pid_namespace": "1"}
    _foreign_lock(tmp_path, age_s=1, **container)
    refused = _second(tmp_path, procs)
    assert refused.wait(30) == 78 and "host manager-container pid 4242" in refused.log()
    _foreign_lock(tmp_path, age_s=600, **container)
    taker = _manager(tmp_path, procs).start()
    assert _lock(tmp_path)["pid"] == taker.pid
    assert "by a process of this machine" in taker.log()


def test_two_managers_started_together_one_serves(tmp_path, procs):
    inp, out = _dirs(tmp_path)
    ports = [free_port(), free_port()]
    both = [ManagedProcess([sys.executable, "-m", "bcorch.manager", "--input-dir", str(inp),
                            "--output-dir", str(out), "--port", str(port)],
                           tmp_path / f"together-{port}.log") for port in ports]
    procs.extend(both)
    for p in both:
        p.start()
    loser = wait_until(lambda: next((p for p in both if p.proc.poll() is not None), None), 30,
                       what="one of the two to exit")
    assert loser.proc.returncode == 78, loser.log()
    winner = next(p for p in both if p is not loser)
    assert winner.proc.poll() is None and _lock(tmp_path)["pid"] == winner.pid
    assert f"pid {winner.pid}" in loser.log()
