"""A settled run's machinery is closed (issue 13 follow-up): a facility manager that sees
hundreds of runs over months holds files open only for the runs it still serves, and a
settled run still answers for itself, from its summary, across a restart.

A real `bcmanager --watch-root` on loopback (its open descriptors read from /proc), real
POD5 files, real SQLite; the late-file check runs a Facility in process so that its scan
ticks are counted.
"""
from __future__ import annotations

import logging
import os
import random
import signal
from pathlib import Path

from bcorch.config import FacilityConfig, ManagerConfig
from bcorch.manager.facility import Facility
from bcorch.manager.facility_states import RunEvent, RunState
from bcorch.orchestrator.pod5_dataset import write_pod5
from bcorch.protocol import JobState
from support import wait_until
from test_facility import (GROUP, SAMPLE, FacilityProcess, basecall, drain, make_run, pending,
                           started, wait_runs)
from test_facility import root  # noqa: F401 - the fixture

RUNS = 12
FILES = 2
FD_SLACK = 3   # a request's socket or two that the server has not closed yet


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def finish_run(fac: FacilityProcess, run_id: str) -> None:
    """Basecall what is left, close the run by command, and wait until it is COMPLETE."""
    drain(fac)
    code, body = fac.post("/runs/close", {"run": run_id})
    assert code == 200, body
    wait_runs(fac, lambda r: r[run_id]["state"] == "COMPLETE", f"{run_id} COMPLETE")


def settled_answers(fac: FacilityProcess, run_id: str) -> dict:
    """Everything the facility says about one run: its /runs and /status entries, its
    files DONE, and its metric lines."""
    code, runs = fac.get("/runs")
    assert code == 200, runs
    code, status = fac.get("/status")
    assert code == 200, status
    code, files = fac.get("/files", state="DONE", run=run_id)
    assert code == 200, files
    code, metrics = fac.get("/metrics")
    assert code == 200
    return {"run": next(r for r in runs["runs"] if r["run_id"] == run_id),
            "status": next(r for r in status["runs"] if r["run_id"] == run_id),
            "files": sorted(f["path"] for f in files["files"]),
            "metrics": sorted(line for line in metrics.splitlines()
                              if f'run="{run_id}"' in line and "gpu_seconds" not in line)}


def test_settled_runs_hold_no_open_files(procs, tmp_path, root):
    """12 runs complete one after another: the manager's open descriptors after the 12th
    are what they were after the first (today each kept its SQLite files and journal)."""
    fac = started(procs, tmp_path, root)
    first, _ = make_run(root, 1, FILES)
    wait_runs(fac, lambda r: pending(r, first) == FILES, "run 1 found")
    finish_run(fac, first)
    after_first = open_fds(fac.proc.pid)

    for n in range(2, RUNS + 1):
        run_id, _ = make_run(root, n, FILES)
        wait_runs(fac, lambda r, run_id=run_id: pending(r, run_id) == FILES, f"run {n} found")
        finish_run(fac, run_id)

    runs = fac.runs()
    assert len(runs) == RUNS
    assert {r["state"] for r in runs.values()} == {"COMPLETE"}
    assert all(r["files"]["DONE"] == FILES for r in runs.values())
    wait_until(lambda: open_fds(fac.proc.pid) <= after_first + FD_SLACK, 15,
               what=f"open descriptors back to {after_first} (+{FD_SLACK}) after {RUNS} "
                    f"settled runs; now {open_fds(fac.proc.pid)}")


def test_a_settled_run_answers_the_same_once_closed_and_after_a_restart(procs, tmp_path, root):
    """Its /runs and /status entries, its files in a state and its metrics come from its
    summary (and its store, opened for /files) once its part is closed, and are the same
    after a restart; commands on it are answered as before."""
    fac = started(procs, tmp_path, root)
    run_id, _ = make_run(root, 1, 3)
    other, _ = make_run(root, 2, 2)
    wait_runs(fac, lambda r: pending(r, run_id) == 3 and pending(r, other) == 2, "runs found")
    finish_run(fac, run_id)

    before = settled_answers(fac, run_id)
    assert before["run"]["files"]["DONE"] == 3 and before["run"]["progress"]["files_done"] == 3
    assert before["status"] == before["run"]
    assert len(before["files"]) == 3
    assert f'bcmanager_files{{run="{run_id}",state="DONE"}} 3.0' in before["metrics"]
    assert f'bcmanager_run_state{{run="{run_id}",state="COMPLETE"}} 1.0' in before["metrics"]

    code, body = fac.post("/runs/close", {"run": run_id})   # closing it again changes nothing
    assert code == 200 and body["run"]["state"] == "COMPLETE", body
    code, body = fac.post("/runs/pause", {"run": run_id})
    assert code == 409 and "COMPLETE" in body["error"] and "\n" not in body["error"], body

    fac.proc.send_signal(signal.SIGTERM)
    fac.proc.wait(timeout=30)
    again = fac.start()   # the same command line, the same databases
    assert settled_answers(again, run_id) == before
    assert again.runs()[other]["state"] == "ACTIVE"
    assert again.get("/status")[1]["progress"]["files_total"] == 5


def _pod5_file(path: Path, seed: int) -> None:
    write_pod5(path, 2, 200, random.Random(seed))


def test_a_file_appearing_in_a_complete_run_is_not_taken_and_is_logged_once(tmp_path, caplog):
    """Today's behaviour is kept (a COMPLETE run takes no new file) but not silently."""
    root = tmp_path / "root"
    pod5 = root / GROUP / SAMPLE / "run1" / "pod5"
    pod5.mkdir(parents=True)
    for i in range(2):
        _pod5_file(pod5 / f"f{i}.pod5", i)
    cfg = ManagerConfig(watch_root=str(root), settle_s=0.0, report_back_interval=3600.0,
                        db=str(tmp_path / "state" / "facility.sqlite"))
    fac = Facility(cfg, FacilityConfig())
    try:
        fac.scan_tick()
        answer = fac.assign("gpu0", 2)
        assert answer.body["batch_size"] == 2, answer.body
        basecall(None, answer.body)
        assert fac.complete(answer.body["jobid"], JobState.DONE, {}, "").body.get("ok")
        fac.command("run1", RunEvent.CLOSE)
        fac.scan_tick()
        assert fac._runs["run1"].state is RunState.COMPLETE
        assert fac._runs["run1"].part is None   # settled: closed and dropped
        view = fac.runs()
        with caplog.at_level(logging.WARNING, logger="bcmanager.facility"):
            for i in (7, 8):
                _pod5_file(pod5 / f"late{i}.pod5", i)
                fac.scan_tick()
                fac.scan_tick()
        warned = [r.getMessage() for r in caplog.records
                  if "will NOT be basecalled" in r.getMessage()]
        assert len(warned) == 1 and "late7.pod5" in warned[0] and "run1" in warned[0], warned
        assert fac._runs["run1"].part is None and fac.runs() == view
        assert fac.assign("gpu0", 2).body["batch_size"] == 0
    finally:
        fac.close()
