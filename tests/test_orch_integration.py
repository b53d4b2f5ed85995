"""bcorch end to end: real engines (simulate runner over real POD5 files), a real manager
(HTTP on loopback, SQLite), real processes and signals. Virtual GPUs stand in for GPUs."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bcorch.orchestrator.control import request
from bcorch.config_writer import write_config
from support import ManagedProcess, ManagerProcess, wait_until
from bcorch.workers.read_ids import read_ids_under
from bcorch.orchestrator.pod5_dataset import write_dataset

SIMULATE = "bcorch.workers.runners.simulate_main"


class Site:
    """INPUT_DIR of real POD5 files, a manager serving them, and bcorch over virtual GPUs."""

    def __init__(self, tmp: Path, procs, n_files: int, *, reads: int = 5, samples: int = 4000,
                 samples_per_s: float = 5e6, orchestrator: dict | None = None,
                 engine: dict | None = None, report_back_interval: float = 3.0,
                 batch_size: int = 2):
        self.tmp, self.procs = tmp, procs
        self.input_dir, self.output_dir = tmp / "input", tmp / "output"
        self.output_dir.mkdir()
        self.input_dir.mkdir()
        self.written = write_dataset(self.input_dir, n_files, reads_per_file=reads,
                                     samples_per_read=samples)
        self.manager_kw = dict(report_back_interval=report_back_interval, batch_size=batch_size,
                               input_closed=True)
        self.manager = self.start_manager()
        wait_until(lambda: sum(self.manager.status()["files"].values()) == n_files, 20,
                   what="manager to find the input files")
        self.socket = tmp / "ctl" / "c.sock"
        self.config = tmp / "bcorch.toml"
        sections = {
            "manager": {"url": self.manager.url},
            "engine": {"input_dir": str(self.input_dir), "output_dir": str(self.output_dir),
                       "polling_interval": 0.005, "work_until_none_left": True,
                       "request_retries": 1, "connect_timeout_s": 1.0, "read_timeout_s": 5.0,
                       **(engine or {})},
            "runner": {"kind": "simulate", "samples_per_s": samples_per_s, "stop_grace_s": 2.0},
            # exit_when_done off: these tests end bcorch themselves (one test turns it on)
            "orchestrator": {"hang_timeout_s": 3.0, "drain_timeout_s": 30.0,
                             "exit_when_done": False, **(orchestrator or {})},
        }
        write_config(self.config, **sections)

    def start_manager(self, port: int | None = None) -> ManagerProcess:
        m = ManagerProcess(self.tmp, self.input_dir, self.output_dir, port=port, **self.manager_kw)
        self.procs.append(m)
        return m.start()

    def bcorch(self, gpus: int, *extra: str) -> ManagedProcess:
        b = ManagedProcess([sys.executable, "-m", "bcorch.orchestrator", "--config", str(self.config),
                            "--gpus", f"virtual:{gpus}", "--socket", str(self.socket), *extra],
                           self.tmp / "bcorch.log")
        self.procs.append(b)
        b.start()
        wait_until(lambda: self.socket.exists() or b.proc.poll() is not None, 30,
                   what="bcorch control socket")
        assert b.proc.poll() is None, b.log()
        return b

    def status(self) -> dict:
        return request(self.socket, {"cmd": "status"})

    def read_counts(self):
        return read_ids_under([self.output_dir / "pass", self.output_dir / "fail"])

    def assert_every_read_once(self) -> None:
        expected = sorted(r for ids in self.written.values() for r in ids)
        counts = self.read_counts()
        assert sorted(counts) == expected
        assert max(counts.values()) == 1, [r for r, n in counts.items() if n > 1][:5]


def tree_of(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def basecallers(pid: int) -> list[psutil.Process]:
    found = []
    for p in tree_of(pid):
        try:
            if SIMULATE in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def none_alive(procs: list[psutil.Process], timeout: float) -> list[str]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    left = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
        except psutil.Error:
            continue
    return left


def test_all_work_done_then_bcorch_exits_0(tmp_path, procs):
    site = Site(tmp_path, procs, n_files=6)
    b = site.bcorch(2)
    assert b.wait(60) == 0, b.log()[-3000:]
    site.assert_every_read_once()
    assert site.manager.status()["files"].get("DONE") == 6
    assert "every engine finished with nothing left" in b.log()


def test_bcorch_exits_0_once_the_manager_reports_the_run_complete(tmp_path, procs):
    """Engines that would wait for more input forever (work_until_none_left = false):
    bcorch itself sees the run complete on the manager's /status and drains (issue 12 §2)."""
    site = Site(tmp_path, procs, n_files=4, orchestrator={"exit_when_done": True},
                engine={"work_until_none_left": False})
    b = site.bcorch(2)
    assert b.wait(60) == 0, b.log()[-3000:]
    site.assert_every_read_once()
    assert "bcorch drains: the manager reports the run complete" in b.log()


def test_keep_serving_stays_after_the_run_is_complete(tmp_path, procs):
    site = Site(tmp_path, procs, n_files=2, orchestrator={"exit_when_done": True},
                engine={"work_until_none_left": False})
    b = site.bcorch(1, "--keep-serving")
    wait_until(lambda: site.status()["manager"]["run_complete"], 30, what="the run complete")
    assert b.proc.poll() is None and site.status()["state"] == "RUNNING"
    assert site.status()["exit_when_done"] is False
    b.signal(signal.SIGTERM)
    assert b.wait(30) == 0


def test_a_manager_never_reached_is_exit_75_with_one_line(tmp_path):
    import socket
    held = socket.socket()   # bound, never listening: refused, and no other test can take it
    held.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{held.getsockname()[1]}"
    config = tmp_path / "bcorch.toml"
    write_config(config, orchestrator={"first_contact_timeout_s": 2.0},
                 engine={"input_dir": str(tmp_path), "output_dir": str(tmp_path)})
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "bcorch.orchestrator", "--config", str(config),
                             "--gpus", "virtual:1", "--manager-url", url, "--socket",
                             str(tmp_path / "ctl" / "s.sock")],
                            capture_output=True, text=True, timeout=120)
    held.close()
    assert result.returncode == 75, result.stderr[-3000:]
    assert time.monotonic() - t0 < 60
    lines = [line for line in result.stderr.splitlines() if "never" in line or "not reached" in line]
    assert any(f"manager {url} not reached in the 2 s since bcorch started" in line
               and "refused" in line.lower() for line in lines), result.stderr[-3000:]


@pytest.mark.slow
def test_kill_9_of_an_engine_mid_batch(tmp_path, procs):
    # a batch of 2 files x 5 reads x 4000 samples at 10k samples/s takes about 4 s
    site = Site(tmp_path, procs, n_files=8, samples_per_s=1e4, report_back_interval=2.0)
    b = site.bcorch(2)
    victim = wait_until(lambda: next((s for s in site.status()["slots"]
                                      if s["state"] == "RUNNING" and s["basecaller_pid"]), None),
                        30, what="an engine with a batch")
    old_basecaller = victim["basecaller_pid"]
    psutil.Process(victim["pid"]).kill()
    t0 = time.monotonic()
    wait_until(lambda: site.status()["slots"][victim["gpu"]]["pid"] not in (None, victim["pid"]),
               30, interval=0.05, what="the engine restarted")
    assert time.monotonic() - t0 < 20        # the first-restart delay, not a backoff of minutes
    wait_until(lambda: not psutil.pid_exists(old_basecaller)
               or psutil.Process(old_basecaller).status() == psutil.STATUS_ZOMBIE, 30,
               what="the dead engine's basecaller stopped")
    assert b.wait(120) == 0, b.log()[-3000:]
    site.assert_every_read_once()
    assert "signal SIGKILL" in b.log()


def test_sigstop_of_an_engine_is_replaced(tmp_path, procs):
    site = Site(tmp_path, procs, n_files=0, engine={"work_until_none_left": False})
    b = site.bcorch(2)
    first = wait_until(lambda: (s := site.status()["slots"][1])["state"] == "RUNNING" and s, 30,
                       what="engine 1 running")
    psutil.Process(first["pid"]).suspend()
    t0 = time.monotonic()
    wait_until(lambda: (s := site.status()["slots"][1])["state"] == "RUNNING"
               and s["pid"] != first["pid"], 50, interval=0.05, what="a replacement")
    # hang_timeout_s 3, not the 60 s default; the rest is a real engine's start on a loaded host
    assert time.monotonic() - t0 < 45
    assert not psutil.pid_exists(first["pid"]) or \
        psutil.Process(first["pid"]).status() == psutil.STATUS_ZOMBIE
    tree = tree_of(b.pid)
    b.signal(signal.SIGTERM)
    assert b.wait(30) == 0
    assert none_alive(tree, 5) == []


def test_config_error_in_engines_fails_without_restart_and_exits_78(tmp_path, procs):
    site = Site(tmp_path, procs, n_files=0)
    text = site.config.read_text().replace('kind = "simulate"', 'kind = "script"')
    site.config.write_text(text)                     # script runner without bc_script
    b = site.bcorch(2)
    assert b.wait(60) == 78, b.log()[-3000:]
    log = b.log()
    assert log.count("-> FAILED (configuration error (exit 78") == 2
    assert "restart after backoff" not in log


@pytest.mark.slow
def test_sigterm_drains_real_engines_and_leaves_nothing(tmp_path, procs):
    site = Site(tmp_path, procs, n_files=8, samples_per_s=2e4)
    b = site.bcorch(2)
    wait_until(lambda: len(basecallers(b.pid)) == 2, 30, what="two batches running")
    tree = tree_of(b.pid)
    b.signal(signal.SIGTERM)
    assert b.wait(60) == 0, b.log()[-3000:]
    assert none_alive(tree, 5) == []
    files = site.manager.status()["files"]
    assert files.get("ASSIGNED", 0) == 0, files
    assert files.get("DONE", 0) >= 4, "the batches running at SIGTERM were finished"
    counts = site.read_counts()
    assert counts and max(counts.values()) == 1


@pytest.mark.slow
def test_kill_9_of_bcorch_leaves_no_engine_or_basecaller(tmp_path, procs):
    site = Site(tmp_path, procs, n_files=8, samples_per_s=1e4)
    b = site.bcorch(2)
    wait_until(lambda: len(basecallers(b.pid)) == 2, 30, what="two batches running")
    tree = tree_of(b.pid)
    b.proc.kill()
    b.wait(10)
    assert none_alive(tree, 5 + 1) == [], "every engine and basecaller gone within 5 s"
    wait_until(lambda: site.manager.status()["files"].get("ASSIGNED", 0) == 0, 30,
               what="the engines to report their batches STOPPED")


@pytest.mark.slow
def test_manager_outage_wait_policy_resumes_and_completes(tmp_path, procs):
    site = Site(tmp_path, procs, n_files=8, samples_per_s=2e4)
    b = site.bcorch(2)
    wait_until(lambda: len(basecallers(b.pid)) >= 1, 30, what="work under way")
    port = site.manager.port
    site.manager.close()
    wait_until(lambda: not site.status()["manager"]["reachable"], 60, what="bcorch sees it down")
    wait_until(lambda: all(s["state"] == "BACKOFF" and s["waiting_for_manager"]
                           for s in site.status()["slots"]), 60, what="engines waiting")
    restarts = [s["restarts"] for s in site.status()["slots"]]
    time.sleep(2.0)  # while the manager is down nothing is restarted
    assert [s["restarts"] for s in site.status()["slots"]] == restarts
    site.manager = site.start_manager(port=port)
    assert b.wait(120) == 0, b.log()[-4000:]
    assert "the manager answers again" in b.log()
    site.assert_every_read_once()


@pytest.mark.slow
def test_manager_outage_drain_policy_exits_75(tmp_path, procs):
    site = Site(tmp_path, procs, n_files=8, samples_per_s=2e4,
                orchestrator={"on_manager_failure": "drain"})
    b = site.bcorch(2)
    wait_until(lambda: len(basecallers(b.pid)) >= 1, 30, what="work under way")
    tree = tree_of(b.pid)
    site.manager.close()
    assert b.wait(90) == 75, b.log()[-3000:]
    assert "on_manager_failure = drain" in b.log()
    assert none_alive(tree, 5) == []


@pytest.mark.slow
def test_bcorch_status_names_the_facility_run_and_model_each_gpu_basecalls(tmp_path, procs):
    """Operators see which run and model each GPU works on: a real facility manager
    (--watch-root) with one run whose bcorch.toml asks for a methylation model, a real bcorch;
    `bcorch status --json` and its table name the run and the model while a batch runs."""
    from bcorch.orchestrator.local_cluster import bcorch_argv, manager_argv
    from support import free_port, http_json
    root = tmp_path / "root"
    name = "20261126_1001_P2S-01-A_FLOW001_abcd0001"
    run = root / "proto" / "methylation" / name
    write_dataset(run / "pod5", 2, reads_per_file=10, samples_per_read=4000)
    (run / "bcorch.toml").write_text('[run]\nmodel = "sup,5mCG_5hmCG"\n')
    port, sock = free_port(), tmp_path / "ctl" / "c.sock"
    cfg = write_config(
        tmp_path / "bcorch.toml",
        manager={"url": f"http://127.0.0.1:{port}", "port": port, "settle_s": 0.0,
                 "scan_interval_s": 0.2, "batch_size": 1},
        facility={"model": "hac"},
        engine={"polling_interval": 0.05, "work_until_none_left": True},
        runner={"kind": "simulate", "samples_per_s": 10_000, "stop_grace_s": 2.0},
        orchestrator={"hang_timeout_s": 30.0, "exit_when_done": False})
    manager = ManagedProcess(manager_argv(cfg, "--watch-root", str(root)), tmp_path / "m.log")
    procs.append(manager)
    manager.start()
    def manager_up() -> bool:
        try:
            return http_json(f"http://127.0.0.1:{port}/runs")[0] == 200
        except OSError:
            return False
    wait_until(manager_up, 30, what="the facility manager up")
    bcorch = ManagedProcess(bcorch_argv(cfg, 1, "--socket", str(sock)), tmp_path / "b.log")
    procs.append(bcorch)
    bcorch.start()
    wait_until(lambda: sock.exists() or bcorch.proc.poll() is not None, 30, what="control socket")

    def working_slot():
        slot = request(sock, {"cmd": "status"})["slots"][0]
        return slot if slot.get("job_id") else None
    slot = wait_until(working_slot, 60, what="a batch in bcorch status")
    assert (slot["run_id"], slot["model"]) == (name, "sup,5mCG_5hmCG"), slot
    table = subprocess.run([sys.executable, "-m", "bcorch.orchestrator", "status", "--socket",
                            str(sock)], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    runs = table.stdout.split("GPU  RUN")
    assert len(runs) == 2 and ["0", name, "sup,5mCG_5hmCG"] in [
        line.split() for line in runs[1].splitlines()], table.stdout
    bcorch.signal(signal.SIGTERM)
    assert bcorch.wait(60) == 0, bcorch.log()[-2000:]
