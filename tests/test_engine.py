"""BCEngine against the real manager on loopback, with real POD5 files and real processes."""
from __future__ import annotations

import json
import os
import multiprocessing
import signal
import stat
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from bcorch.config_writer import write_config
from support import ManagedProcess, ManagerProcess, free_port, kill_tree, wait_until
from test_engine_stubs import ScriptedServer, forwarder
from bcorch.workers.channel import EngineState, SpawnSpec
from bcorch.workers.engine import BCEngine, run_engine_process
from bcorch.workers.read_ids import read_ids_under, settings_under
from bcorch.orchestrator.pod5_dataset import write_dataset
from bcorch.config import ConfigError, from_mapping


# -- helpers --------------------------------------------------------------------------------

# For bc_scripts in these tests: one FASTQ record per read of a POD5 file, with its real read
# id (the engine's output check compares read ids after every batch).
WRITE_FASTQ = (f"{sys.executable} -c 'import sys, pod5; r = pod5.Reader(sys.argv[1]); "
               f"print(\"\".join(\"@%s\\nACGT\\n+\\n!!!!\\n\" % i for i in r.read_ids), end=\"\")'")

class Site:
    """INPUT_DIR with real POD5 files, OUTPUT_DIR, and the manager serving them."""

    def __init__(self, tmp: Path, procs, n_files: int, reads: int = 10, samples: int = 4000,
                 **manager_kw):
        self.tmp = tmp
        self.input_dir, self.output_dir = tmp / "input", tmp / "output"
        self.output_dir.mkdir()
        self.written = write_dataset(self.input_dir, n_files, reads_per_file=reads,
                                     samples_per_read=samples)
        self.procs = procs
        self.manager_kw = manager_kw
        self.manager = self.start_manager()
        wait_until(lambda: sum(self.manager.status()["files"].values()) == n_files, 20,
                   what="manager to find the input files")

    def start_manager(self, port: int | None = None) -> ManagerProcess:
        m = ManagerProcess(self.tmp, self.input_dir, self.output_dir, port=port, **self.manager_kw)
        self.procs.append(m)
        return m.start()

    def read_ids(self) -> list[str]:
        return sorted(r for ids in self.written.values() for r in ids)

    def config(self, url: str | None = None, *, engine: dict | None = None,
               runner: dict | None = None, name: str = "engine.toml") -> Path:
        sections = {
            "manager": {"url": url or self.manager.url},
            "engine": {"input_dir": str(self.input_dir), "output_dir": str(self.output_dir),
                       "engine_id": "test", "polling_interval": 0.005,
                       "request_retries": 1, "connect_timeout_s": 1.0, "read_timeout_s": 5.0,
                       **(engine or {})},
            "runner": {"kind": "simulate", "samples_per_s": 5e6, "stop_grace_s": 2.0,
                       **(runner or {})},
        }
        return write_config(self.tmp / name, **sections)

    def engine(self, config: Path, log: str = "engine.log") -> ManagedProcess:
        p = ManagedProcess([sys.executable, "-m", "bcorch.workers.engine_cli", "--gpu", "0",
                            "--config", str(config)], self.tmp / log)
        self.procs.append(p)
        return p.start()

    def files(self) -> dict[str, int]:
        return self.manager.status()["files"]


def basecaller_of(pid: int) -> psutil.Process | None:
    try:
        for child in psutil.Process(pid).children(recursive=True):
            if "bcorch.workers.runners.simulate_main" in " ".join(child.cmdline()):
                return child
    except psutil.Error:
        return None
    return None


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Child:
    """An engine started as the orchestrator does: spawn context, duplex pipe, SpawnSpec."""

    def __init__(self, spec: SpawnSpec):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_end = ctx.Pipe()
        self.proc = ctx.Process(target=run_engine_process, args=(child_end, spec))
        self.proc.start()
        child_end.close()
        self.messages: list[dict] = []

    def wait_for(self, kind: str, timeout: float = 30.0, **match) -> dict:
        def seen():
            for m in self.messages:
                if m.get("type") == kind and all(m.get(k) == v for k, v in match.items()):
                    return m
            while self.conn.poll(0.05):
                try:
                    self.messages.append(self.conn.recv())
                except EOFError:
                    return None
            return None
        return wait_until(seen, timeout, what=f"{kind} message {match}")

    def close(self) -> None:
        if self.proc.pid is not None and self.proc.is_alive():
            kill_tree(self.proc.pid)
        self.proc.join(10)
        self.conn.close()




@pytest.fixture
def children():
    started: list[Child] = []
    yield started
    for c in started:
        c.close()


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


# -- a full cycle -----------------------------------------------------------------------------

def test_full_cycle_every_read_id_once(tmp_path, procs):
    site = Site(tmp_path, procs, n_files=6, reads=15, batch_size=2, input_closed=True)
    engine = site.engine(site.config(engine={"work_until_none_left": True},
                                     runner={"fail_fraction": 0.25}))
    assert engine.wait(60) == 0, engine.log()
    counts = read_ids_under([site.output_dir / "pass", site.output_dir / "fail"])
    assert sorted(counts) == site.read_ids() and set(counts.values()) == {1}
    assert list(read_ids_under([site.output_dir / "fail"]))  # the simulated q-score split
    assert site.files()["DONE"] == 6
    assert "nothing left to basecall" in engine.log() and "Traceback" not in engine.log()


def test_back_to_back_batches_without_pause(tmp_path, procs, restore_signals):
    site = Site(tmp_path, procs, n_files=4, reads=5, batch_size=1, input_closed=True)
    conf = from_mapping({
        "manager": {"url": site.manager.url},
        "engine": {"input_dir": str(site.input_dir), "output_dir": str(site.output_dir),
                   "engine_id": "b2b", "polling_interval": 10.0, "busy_pause_s": 0.0,
                   "work_until_none_left": True, "optimal_request_size": 1},
        "runner": {"kind": "simulate", "samples_per_s": 5e6}})
    engine = BCEngine(None, 0, conf=conf)
    started = time.monotonic()
    assert engine.begin_working() == 0
    assert time.monotonic() - started < 60  # never waited the 10-minute polling interval
    timings = engine.batch_timings
    assert len(timings) == 4 and engine.batches_done == 4 and engine.files_done == 4
    gaps = [nxt.requested - prev.reported for prev, nxt in zip(timings, timings[1:])]
    assert all(0 <= g < 0.25 for g in gaps), gaps
    assert all(t.overhead_s < 1.0 for t in timings)


def test_script_runner_failure_is_reported_and_retried(tmp_path, procs):
    site = Site(tmp_path, procs, n_files=2, reads=3, batch_size=2, input_closed=True)
    marker = tmp_path / "failed-once"
    script = tmp_path / "bc.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"if [ ! -e {marker} ]; then touch {marker}; echo 'no GPU today' >&2; exit 1; fi\n"
        'mkdir -p "$2/pass"\n'
        f'for f in "$1"/*.pod5; do n=$(basename "$f" .pod5); {WRITE_FASTQ} "$f" '
        '> "$2/pass/$n.fastq"; done\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    engine = site.engine(site.config(engine={"work_until_none_left": True},
                                     runner={"kind": "script", "bc_script": str(script)}))
    assert engine.wait(60) == 0, engine.log()
    assert "FAILED: bc_script exited with 1" in engine.log()
    assert "FAILED" in site.manager.log()
    assert site.files()["DONE"] == 2
    written = sorted((site.output_dir / "pass").glob("*.fastq"))
    assert len(written) == 2


# -- losing the lease, losing the manager ------------------------------------------------------

def lease_lying_proxy(site: Site) -> tuple[ScriptedServer, list[float]]:
    """A proxy to the manager that tells the engine its lease is 6 s.

    With the manager's lease at 1 s, the engine's first keep-alive (after 3 s) reaches a
    manager that has already expired the job. Returns the proxy and the times at which
    `late` answers passed through it.
    """
    late_at: list[float] = []

    def rewrite(route, fields, body):
        if route == "/assignwork" and body.get("batch_size"):
            body["report_back_interval"] = 6
        if route == "/keepalive" and body.get("late"):
            late_at.append(time.monotonic())
        return body

    return ScriptedServer(forwarder(site.manager.url, rewrite)), late_at


def test_lease_lost_mid_batch_stops_basecaller_and_exits_75(tmp_path, procs):
    site = Site(tmp_path, procs, n_files=2, reads=20, batch_size=2, report_back_interval=1)
    proxy, _ = lease_lying_proxy(site)
    with proxy:
        # 2 files x 20 reads x 4000 samples at 4000/s: a 40 s batch, far longer than the lease
        engine = site.engine(site.config(proxy.url, runner={"samples_per_s": 4_000}))
        caller = wait_until(lambda: basecaller_of(engine.pid), 30, what="basecaller")
        assert engine.wait(30) == 75, engine.log()
        wait_until(lambda: gone(caller.pid), 30, what="basecaller gone")
    log = engine.log()
    # On a loaded machine the engine may give up on slow keep-alives before any `late`
    # answer reaches it (CI saw none pass the proxy): either way the lease is lost.
    assert "lease lost" in log and ("answered late" in log or "no keep-alive succeeded" in log)
    # the basecaller's own log ends early: it was stopped, not finished
    assert "done in" not in next(site.output_dir.rglob("basecaller.log")).read_text()
    assert not list(site.output_dir.glob("pass/*"))
    assert site.files()["DONE"] == 0


def test_lease_loss_kills_basecaller_within_two_seconds(tmp_path, procs):
    site = Site(tmp_path, procs, n_files=1, reads=20, report_back_interval=1)
    proxy, late_at = lease_lying_proxy(site)
    with proxy:
        # 20 reads x 4000 samples at 2000/s: a 40 s batch, so a basecaller gone within
        # seconds of the late answer was stopped, not finished
        engine = site.engine(site.config(proxy.url, runner={"samples_per_s": 2_000}))
        caller = wait_until(lambda: basecaller_of(engine.pid), 30, what="basecaller")
        # the manager's late answer, or the engine giving up first on slow keep-alives
        lost_at = wait_until(lambda: late_at[0] if late_at else
                             "lease lost" in engine.log() and time.monotonic(),
                             20, what="a late keep-alive answer or the engine's lease lost")
        wait_until(lambda: gone(caller.pid), 15, what="basecaller gone")
        assert time.monotonic() - lost_at < 10.0   # stop_grace_s 2, on a loaded machine
        assert engine.wait(10) == 75


def test_manager_down_when_asking_exits_75(tmp_path, procs):
    (tmp_path / "input").mkdir()
    (tmp_path / "output").mkdir()
    cfg = tmp_path / "engine.toml"
    cfg.write_text(f'[manager]\nurl = "http://127.0.0.1:{free_port()}"\n'
                   f'[engine]\ninput_dir = "{tmp_path / "input"}"\n'
                   f'output_dir = "{tmp_path / "output"}"\nrequest_retries = 2\n'
                   f'[runner]\nkind = "simulate"\n')
    engine = ManagedProcess([sys.executable, "-m", "bcorch.workers.engine_cli", "--gpu", "1",
                             "--config", str(cfg)], tmp_path / "engine.log")
    procs.append(engine.start())
    assert engine.wait(30) == 75
    log = engine.log()
    assert "manager unreachable" in log and "cannot connect" in log and "Traceback" not in log


@pytest.mark.slow
def test_manager_down_shorter_than_an_interval_batch_still_done(tmp_path, procs):
    site = Site(tmp_path, procs, n_files=2, reads=20, batch_size=2, report_back_interval=10)
    engine = site.engine(site.config(runner={"samples_per_s": 14_000}))  # ~11 s of basecalling
    wait_until(lambda: basecaller_of(engine.pid), 30, what="basecaller")
    port = site.manager.port
    site.manager.close()
    wait_until(lambda: "keep-alive of job" in engine.log(), 15, what="a failed keep-alive")
    site.manager = site.start_manager(port=port)
    wait_until(lambda: site.files()["DONE"] == 2, 40, what="batch DONE after the outage")
    counts = read_ids_under([site.output_dir / "pass", site.output_dir / "fail"])
    assert sorted(counts) == site.read_ids()
    assert "lease lost" not in engine.log()
    engine.signal(signal.SIGTERM)
    assert engine.wait(30) == 0


@pytest.mark.parametrize("answer, message", [
    (b"<html>gateway error</html>", "answer is not JSON"),
    ({"batch_size": 2, "batch": ["a.pod5", "b.pod5"]}, "has no report_back_interval"),
    ({"jobid": "j1", "job_input_dir": "../../etc", "job_output_dir": "o", "bc_engine_id": "e",
      "batch_size": 1, "batch": ["a.pod5"], "report_back_interval": 5},
     "job_input_dir must be a plain directory name"),
    *[({"jobid": "j1", "job_input_dir": "i", "job_output_dir": "o", "bc_engine_id": "e",
        "batch_size": 1, "batch": ["a.pod5"], "report_back_interval": 5, key: bad},
       f"{key} must be a relative path")
      for key, bad in [("run_input_dir", "../../etc"), ("run_input_dir", "/etc"),
                       ("run_output_dir", "g/s//run"), ("run_output_dir", "g/./run"),
                       ("run_output_dir", "g/s/run/.."), ("run_input_dir", 7)]],
    ({"jobid": "j1", "job_input_dir": "i", "job_output_dir": "o", "bc_engine_id": "e",
      "batch_size": 1, "batch": ["a.pod5"], "report_back_interval": 5, "model": "hac; rm -rf /"},
     "model must match"),
    ({"jobid": "j1", "job_input_dir": "i", "job_output_dir": "o", "bc_engine_id": "e",
      "batch_size": 1, "batch": ["a.pod5"], "report_back_interval": 5, "emit": "sam"},
     "emit must be one of fastq, bam"),
])
def test_malformed_answer_is_one_clear_error(tmp_path, procs, answer, message):
    with ScriptedServer(lambda route, fields: (200, answer)) as srv:
        cfg = tmp_path / "engine.toml"
        cfg.write_text(f'[manager]\nurl = "{srv.url}"\n[engine]\ninput_dir = "{tmp_path}"\n'
                       f'output_dir = "{tmp_path}"\n[runner]\nkind = "simulate"\n')
        engine = ManagedProcess([sys.executable, "-m", "bcorch.workers.engine_cli", "--gpu", "0",
                                 "--config", str(cfg)], tmp_path / "engine.log")
        procs.append(engine.start())
        assert engine.wait(30) == 75
    log = engine.log()
    assert message in log and "bad answer from the manager" in log
    assert "Traceback" not in log
    assert len(srv.routes("/assignwork")) == 1  # a protocol error is not retried in a loop


# -- facility mode: the batch carries its run's directories and settings ---------------------

RUN_REL = "cancer_panel/sample_7/20261101_1200_1A_PAW12345_abcdef12"


def run_settings_proxy(upstream: str, **fields) -> ScriptedServer:
    """A proxy to a single-run manager that adds a facility's run fields to every batch."""

    def rewrite(route, _fields, body):
        if route == "/assignwork" and body.get("batch_size"):
            body.update(fields)
        return body

    return ScriptedServer(forwarder(upstream, rewrite))


def test_batch_with_run_fields_lands_in_the_runs_output_with_the_runs_model(tmp_path, procs):
    """The manager serves one run of a MinKNOW tree; the engine knows only the shared roots.
    Its input and output dirs resolve under the run's directories, and the basecaller runs
    with the run's model and kit instead of engine.model (old engine: exit 78, no such
    input dir at the root)."""
    root, out_root = tmp_path / "root", tmp_path / "out"
    run_in, run_out = root / RUN_REL, out_root / RUN_REL / "basecalls"
    written = write_dataset(run_in / "pod5", 4, reads_per_file=6, samples_per_read=2000)
    run_out.mkdir(parents=True)
    manager = ManagerProcess(tmp_path, run_in, run_out, batch_size=2, input_closed=True)
    procs.append(manager.start())
    wait_until(lambda: manager.status()["files"].get("PENDING") == 4, 20, what="files found")
    with run_settings_proxy(manager.url, run_id="PAW12345", run_input_dir=RUN_REL,
                            run_output_dir=f"{RUN_REL}/basecalls", model="sup,5mCG_5hmCG",
                            kit="SQK-NBD114-24") as proxy:
        cfg = write_config(tmp_path / "engine.toml", manager={"url": proxy.url}, engine={
            "input_dir": str(root), "output_dir": str(out_root), "model": "hac",
            "engine_id": "fac", "polling_interval": 0.005, "work_until_none_left": True,
            "request_retries": 1}, runner={"kind": "simulate", "samples_per_s": 5e6,
                                           "fail_fraction": 0.0})
        engine = ManagedProcess([sys.executable, "-m", "bcorch.workers.engine_cli", "--gpu", "0",
                                 "--config", str(cfg)], tmp_path / "engine.log")
        procs.append(engine.start())
        assert engine.wait(60) == 0, engine.log()[-3000:]
    assert manager.status()["files"]["DONE"] == 4
    expected = sorted(r for ids in written.values() for r in ids)
    counts = read_ids_under([run_out])
    assert sorted(counts) == expected and set(counts.values()) == {1}
    assert sorted(p.name for p in out_root.iterdir()) == ["cancer_panel"], \
        "nothing is written at the output root itself"
    calls = settings_under([run_out])
    assert {read: calls[read] for read in expected} == {
        read: {"model": "sup,5mCG_5hmCG", "kit": "SQK-NBD114-24"} for read in expected}
    assert "(run_id PAW12345, model sup,5mCG_5hmCG, kit SQK-NBD114-24)" in engine.log()


def test_a_runs_model_missing_here_fails_its_batch_not_the_engine(tmp_path, procs):
    """A run's model that is not in runner.models_directory: its files fail with the reason
    and are quarantined; the engine does not exit 78 (other runs' batches go on)."""
    from dorado_helpers import FAKES, DoradoSite, models_dir
    site = DoradoSite(tmp_path, procs, n_files=2, max_attempts=1, batch_size=1)
    root = models_dir(tmp_path)
    with run_settings_proxy(site.manager.url, run_id="r1", model="sup") as proxy:
        cfg = site.config({"kind": "dorado", "dorado_path": str(FAKES / "dorado"),
                           "models_directory": str(root)}, engine={"model": "hac"})
        cfg.write_text(cfg.read_text().replace(site.manager.url, proxy.url))
        engine = site.engine(cfg)
        assert engine.wait(60) == 0, engine.log()[-3000:]
    assert site.files() == {"QUARANTINED": 2}
    reasons = site.quarantined()
    assert len(reasons) == 2 and all("run r1: engine.model: no 'sup' model" in r
                                     for r in reasons.values()), reasons
    assert "engine exits with 0" in engine.log()


# -- drain, stop, signals, parent ----------------------------------------------------------------

def spec(site: Site, cfg: Path, **extra) -> SpawnSpec:
    return SpawnSpec(config_path=str(cfg), gpu_index=3, device_index=0,
                     env={"CUDA_VISIBLE_DEVICES": "3"}, **extra)


def test_drain_from_parent_finishes_the_batch_then_exits_0(tmp_path, procs, children):
    site = Site(tmp_path, procs, n_files=3, reads=20, batch_size=1)
    child = Child(spec(site, site.config(runner={"samples_per_s": 20_000})))
    children.append(child)
    ready = child.wait_for("ready")
    assert ready["gpu"] == 3 and ready["engine_id"] == "test-gpu3"
    start = child.wait_for("job_start")
    beat = child.wait_for("heartbeat", state="WORKING")
    assert beat["job_id"] == start["job_id"] and beat["basecaller_pid"]
    child.conn.send({"cmd": "drain"})
    child.wait_for("heartbeat", state="DRAINING")
    end = child.wait_for("job_end")
    assert end == {"type": "job_end", "job_id": start["job_id"], "state": "DONE",
                   "files_failed": 0}
    assert child.wait_for("exiting")["code"] == 0
    child.proc.join(10)
    assert child.proc.exitcode == 0
    files = site.files()
    assert files["DONE"] == 1 and files["PENDING"] == 2


def test_stop_from_parent_reports_stopped_quickly(tmp_path, procs, children):
    site = Site(tmp_path, procs, n_files=1, reads=20)
    child = Child(spec(site, site.config(runner={"samples_per_s": 5_000, "stop_grace_s": 1.0})))
    children.append(child)
    child.wait_for("job_start")
    beat = child.wait_for("heartbeat", state="WORKING")
    stopped_at = time.monotonic()
    child.conn.send({"cmd": "stop"})
    assert child.wait_for("job_end")["state"] == "STOPPED"
    child.proc.join(10)
    # a backstop well below the 16 s batch (20 reads x 4000 samples at 5000/s)
    assert child.proc.exitcode == 0 and time.monotonic() - stopped_at < 10.0
    assert gone(beat["basecaller_pid"])
    assert site.files()["PENDING"] == 1  # given back at once, no attempt counted
    assert "STOPPED" in site.manager.log()


def test_parent_gone_stops_reports_and_exits_within_5s(tmp_path, procs, children):
    site = Site(tmp_path, procs, n_files=1, reads=20)
    child = Child(spec(site, site.config(runner={"samples_per_s": 5_000})))
    children.append(child)
    child.wait_for("job_start")
    beat = child.wait_for("heartbeat", state="WORKING")
    closed_at = time.monotonic()
    child.conn.close()
    child.proc.join(10)
    assert time.monotonic() - closed_at < 5.0 and child.proc.exitcode == 0
    assert gone(beat["basecaller_pid"])
    wait_until(lambda: site.files()["PENDING"] == 1, 10, what="files given back")


def test_heartbeats_name_the_facility_run_and_model_being_basecalled(tmp_path, procs, children):
    """`bcorch status` shows which run and model each GPU works on: the heartbeat during a
    facility batch names the batch's run_id and the run's model (not engine.model); a
    heartbeat before any batch names neither."""
    root, out_root = tmp_path / "root", tmp_path / "out"
    run_in, run_out = root / RUN_REL, out_root / RUN_REL / "basecalls"
    write_dataset(run_in / "pod5", 1, reads_per_file=20, samples_per_read=4000)
    run_out.mkdir(parents=True)
    manager = ManagerProcess(tmp_path, run_in, run_out, batch_size=1, input_closed=True)
    procs.append(manager.start())
    wait_until(lambda: manager.status()["files"].get("PENDING") == 1, 20, what="files found")
    with run_settings_proxy(manager.url, run_id="PAW12345", run_input_dir=RUN_REL,
                            run_output_dir=f"{RUN_REL}/basecalls",
                            model="sup,5mCG_5hmCG") as proxy:
        cfg = write_config(tmp_path / "engine.toml", manager={"url": proxy.url}, engine={
            "input_dir": str(root), "output_dir": str(out_root), "model": "hac",
            "engine_id": "fac", "polling_interval": 0.005, "request_retries": 1},
            runner={"kind": "simulate", "samples_per_s": 5_000, "stop_grace_s": 1.0})
        child = Child(SpawnSpec(config_path=str(cfg), gpu_index=0))
        children.append(child)
        first = child.wait_for("heartbeat")
        assert first["job_id"] is None and (first["run_id"], first["model"]) == (None, None)
        start = child.wait_for("job_start")
        beat = child.wait_for("heartbeat", state="WORKING")
        assert beat["job_id"] == start["job_id"]
        assert (beat["run_id"], beat["model"]) == ("PAW12345", "sup,5mCG_5hmCG"), beat
        child.conn.send({"cmd": "stop"})
        assert child.wait_for("job_end")["state"] == "STOPPED"
        child.proc.join(10)
        assert child.proc.exitcode == 0


def test_heartbeats_of_a_single_run_batch_name_no_run_and_the_configured_model(
        tmp_path, procs, children):
    """A single-run manager's batch names no run: the heartbeat's run_id is None and its
    model is engine.model, the one the basecaller runs."""
    site = Site(tmp_path, procs, n_files=1, reads=20)
    child = Child(spec(site, site.config(engine={"model": "hac@v5.0.0"},
                                         runner={"samples_per_s": 5_000, "stop_grace_s": 1.0})))
    children.append(child)
    child.wait_for("job_start")
    beat = child.wait_for("heartbeat", state="WORKING")
    assert (beat["run_id"], beat["model"]) == (None, "hac@v5.0.0"), beat
    child.conn.send({"cmd": "stop"})
    assert child.wait_for("job_end")["state"] == "STOPPED"
    child.proc.join(10)
    assert child.proc.exitcode == 0


def test_sigterm_on_lone_engine_drains_and_second_one_stops(tmp_path, procs):
    site = Site(tmp_path, procs, n_files=4, reads=20, batch_size=1)
    engine = site.engine(site.config(runner={"samples_per_s": 40_000}))
    wait_until(lambda: basecaller_of(engine.pid), 30, what="basecaller")
    engine.signal(signal.SIGTERM)
    assert engine.wait(30) == 0
    assert site.files()["DONE"] == 1  # the batch in hand was finished

    engine2 = site.engine(site.config(runner={"samples_per_s": 2_000}), log="engine2.log")
    caller = wait_until(lambda: basecaller_of(engine2.pid), 30, what="basecaller")
    engine2.signal(signal.SIGINT)
    wait_until(lambda: "send it again to stop now" in engine2.log(), 30, what="first signal seen")
    engine2.signal(signal.SIGINT)
    assert engine2.wait(30) == 0
    assert gone(caller.pid)
    assert "STOPPED" in site.manager.log() and site.files()["DONE"] == 1


# -- configuration ------------------------------------------------------------------------------

def legacy(tmp_path: Path, **changes) -> Path:
    script = tmp_path / "supervisor.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    data = {"Basecalling": {"input_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / "out"),
                            "model": "dna_r10.4.1_e8.2_400bps_hac@v4.2.0", "port": 8000,
                            "supervisor_script_path": str(script)},
            "ComputingResources": {"index_host": "10.1.2.3", "nodes_ip": ["10.1.2.4"],
                                   "nodes_list": ["gpu01"], "batch_size_list": [20, 40]}}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data[section][key] = value
    path = tmp_path / "bc_config.json"
    path.write_text(json.dumps(data))
    return path


def test_original_json_configuration_loads(tmp_path):
    engine = BCEngine(legacy(tmp_path), 1)
    assert engine.api_url == "http://10.1.2.3:8000"
    assert engine.optimal_request_size == 40
    assert engine.INPUTDIR == tmp_path / "in" and engine.OUTPUTDIR == tmp_path / "out"
    assert engine.bc_script == str(tmp_path / "supervisor.sh")
    assert engine.conf.runner.kind == "script"
    assert engine.bc_model == "dna_r10.4.1_e8.2_400bps_hac@v4.2.0"
    assert engine.engine_id.endswith("-gpu1") and engine.work_until_none_left is False
    engine._cleanup()


@pytest.mark.parametrize("change, message", [
    ({"ComputingResources__batch_size_list": [20]}, "ComputingResources.batch_size_list: no entry"),
    ({"Basecalling__port": "eighty"}, "Basecalling.port: expected int"),
    ({"ComputingResources__index_host": 7}, "ComputingResources.index_host: expected str"),
])
def test_original_json_errors_name_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError) as err:
        BCEngine(legacy(tmp_path, **change), 1)
    assert str(err.value).startswith(message)


def test_configuration_error_exits_78_with_one_line(tmp_path, children):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[engine]\npolling_interval = 'often'\n")
    child = Child(SpawnSpec(config_path=str(cfg), gpu_index=0, device_index=0))
    children.append(child)
    msg = child.wait_for("exiting")
    child.proc.join(10)
    assert child.proc.exitcode == 78 and msg["code"] == 78
    assert msg["reason"].startswith("engine.polling_interval: expected a number")
    from bcorch.workers.engine_cli import main
    assert main(["--gpu", "0", "--config", str(cfg)]) == 78


def test_token_is_sent_and_a_refused_token_is_a_configuration_error(tmp_path, procs):
    site = Site(tmp_path, procs, n_files=2, reads=5, batch_size=2, input_closed=True,
                token="s3cret")
    wrong = site.engine(site.config(engine={"work_until_none_left": True}, name="wrong.toml"),
                        log="wrong.log")
    assert wrong.wait(30) == 78
    assert "manager.token: the manager refused our token" in wrong.log()
    cfg = site.config(engine={"work_until_none_left": True}, name="right.toml")
    cfg.write_text(cfg.read_text().replace("[manager]\n", '[manager]\ntoken = "s3cret"\n'))
    right = site.engine(cfg, log="right.log")
    assert right.wait(30) == 0, right.log()
    assert site.files()["DONE"] == 2


def test_parent_gone_while_the_manager_hangs_still_exits_within_5s(tmp_path, children):
    release = threading.Event()

    def hang(route, fields):
        release.wait(30)
        return 200, {"batch_size": 0, "input_closed": False}

    with ScriptedServer(hang) as srv:
        cfg = tmp_path / "engine.toml"
        cfg.write_text(f'[engine]\ninput_dir = "{tmp_path}"\noutput_dir = "{tmp_path}"\n'
                       f'[runner]\nkind = "simulate"\n')
        child = Child(SpawnSpec(config_path=str(cfg), gpu_index=0, device_index=0,
                                manager_url=srv.url, engine_id="hang-gpu0"))
        children.append(child)
        child.wait_for("heartbeat", state="REQUESTING")
        closed_at = time.monotonic()
        child.conn.close()
        child.proc.join(10)
        elapsed = time.monotonic() - closed_at
        release.set()
    assert child.proc.exitcode == 0 and elapsed < 10.0   # not the hung request's timeout


def test_original_json_configuration_runs_against_the_manager(tmp_path, procs):
    site = Site(tmp_path, procs, n_files=2, reads=3, batch_size=2)
    script = tmp_path / "supervisor.sh"
    script.write_text('#!/bin/bash\nmkdir -p "$2/pass"\necho "model=$3 port=$4"\n'
                      f'for f in "$1"/*.pod5; do n=$(basename "$f" .pod5); {WRITE_FASTQ} "$f" '
                      '> "$2/pass/$n.fastq"; done\n')
    script.chmod(0o755)
    cfg = tmp_path / "bc_config.json"
    cfg.write_text(json.dumps({
        "Basecalling": {"input_dir": str(site.input_dir), "output_dir": str(site.output_dir),
                        "model": "sup", "port": site.manager.port,
                        "supervisor_script_path": str(script)},
        "ComputingResources": {"index_host": "127.0.0.1", "nodes_ip": ["127.0.0.1"],
                               "nodes_list": ["localhost"], "batch_size_list": [2]}}))
    engine = site.engine(cfg)
    wait_until(lambda: site.files()["DONE"] == 2, 30, what="both files DONE")
    engine.signal(signal.SIGTERM)
    assert engine.wait(30) == 0
    log = next(site.output_dir.rglob("basecaller.log")).read_text()
    assert "model=sup port=5555" in log
    assert len(list((site.output_dir / "pass").glob("*.fastq"))) == 2


@pytest.mark.parametrize("after_outage", [False, True])
def test_first_request_after_an_outage_is_spread(tmp_path, restore_signals, after_outage):
    with ScriptedServer(lambda r, f: (200, {"batch_size": 0, "input_closed": True})) as srv:
        conf = from_mapping({
            "manager": {"url": srv.url},
            "engine": {"input_dir": str(tmp_path), "output_dir": str(tmp_path),
                       "polling_interval": 0.05, "work_until_none_left": True},
            "runner": {"kind": "simulate"}})
        engine = BCEngine(None, 0, conf=conf, after_outage=after_outage)
        started = time.monotonic()
        assert engine.begin_working() == 0
    delay = srv.requests[0][0] - started
    if after_outage:
        assert 0 <= delay <= 3.0 + 0.5  # uniform in [0, polling_interval = 3 s)
    else:
        assert delay < 0.5


def test_engine_state_machine_refuses_illegal_moves(tmp_path):
    conf = from_mapping({"engine": {"input_dir": str(tmp_path), "output_dir": str(tmp_path)},
                         "runner": {"kind": "simulate"}})
    engine = BCEngine(None, 0, conf=conf)
    try:
        with pytest.raises(RuntimeError, match="STARTING -> REPORTING is not allowed"):
            engine._set_state(EngineState.REPORTING)
        engine._set_state(EngineState.REQUESTING)
        engine._set_state(EngineState.WORKING)
        assert engine.PROCESSING_STATE is EngineState.WORKING
    finally:
        engine._cleanup()


def test_basecaller_killed_with_its_engine_is_stopped_not_failed(tmp_path, procs):
    """The supervisor TERMs a hung engine's whole tree: the files must not lose an attempt."""
    site = Site(tmp_path, procs, n_files=1, reads=20)
    engine = site.engine(site.config(runner={"samples_per_s": 2_000}))
    caller = wait_until(lambda: basecaller_of(engine.pid), 30, what="basecaller")
    for pid in (caller.pid, engine.pid):
        os.kill(pid, signal.SIGTERM)
    assert engine.wait(30) == 0
    code, body = site.manager.get("/files", state="PENDING")
    assert code == 200 and [f["attempts"] for f in body["files"]] == [0], body
