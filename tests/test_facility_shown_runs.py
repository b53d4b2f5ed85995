"""/status and the per-run metrics of a facility that has run for months (soak finding:
0.7 kB of /status and 2 kB of /metrics for every run ever found): a run settled longer than
facility.shown_settled_s ago (7 days by default) drops off them, and stays in /runs, in
/status?runs=all and in the facility-wide totals.

A real `bcmanager --watch-root` on loopback, real run directories, summaries and POD5 files.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from test_facility import GROUP, SAMPLE, make_run, pending, run_name, started, wait_runs
from test_facility import root  # noqa: F401 - the fixture

DAY = 24 * 3600.0


def settled_run(root: Path, n: int, age_s: float) -> str:
    """A COMPLETE run with its summary (2 files DONE, 1 job) written age_s ago."""
    run = root / GROUP / SAMPLE / run_name(n)
    (run / "pod5").mkdir(parents=True)
    (run / "basecalls").mkdir()
    (run / "basecalls" / "bcorch_summary.json").write_text(json.dumps({
        "run_id": run_name(n), "state": "COMPLETE", "settings": {}, "written_at":
        time.time() - age_s, "files": {"DONE": 2}, "bytes": {"DONE": 100},
        "jobs": {"DONE": 1}, "gpu_s": 5.0}))
    return run_name(n)


def test_runs_settled_long_ago_leave_status_and_metrics_but_not_runs(procs, tmp_path, root):
    old = [settled_run(root, n, 30 * DAY) for n in (1, 2, 3)]
    recent = settled_run(root, 4, 3600.0)
    active, _ = make_run(root, 5, 2)
    fac = started(procs, tmp_path, root)
    wait_runs(fac, lambda r: len(r) == 5 and pending(r, active) == 2, "the 5 runs found")

    code, status = fac.get("/status")
    assert code == 200, status
    assert {r["run_id"] for r in status["runs"]} == {recent, active}
    assert status["runs_not_shown"] == 3
    assert status["files"]["DONE"] == 4 * 2 and status["files"]["PENDING"] == 2

    code, every = fac.get("/status", runs="all")
    assert code == 200, every
    assert {r["run_id"] for r in every["runs"]} == {*old, recent, active}
    assert every["runs_not_shown"] == 0 and every["files"] == status["files"]
    assert len(json.dumps(status)) < len(json.dumps(every))

    code, body = fac.get("/status", runs="everything")
    assert code == 400 and "runs" in body["error"] and "\n" not in body["error"], body

    assert set(fac.runs()) == {*old, recent, active}

    code, metrics = fac.get("/metrics")
    assert code == 200
    for run_id in old:
        assert f'run="{run_id}"' not in metrics, run_id
    for run_id in (recent, active):
        assert f'bcmanager_run_state{{run="{run_id}",state=' in metrics, run_id
    assert f'bcmanager_files_done_total{{run="{recent}"}} 2.0' in metrics
    assert "bcmanager_assignments_total 4.0" in metrics   # the old runs' jobs still count

    code, every_metrics = fac.get("/metrics", runs="all")
    assert code == 200, every_metrics
    for run_id in (*old, recent, active):
        assert f'bcmanager_run_state{{run="{run_id}",state=' in every_metrics, run_id
        assert f'bcmanager_run_gpu_seconds{{run="{run_id}"}}' in every_metrics, run_id
    for run_id in (*old, recent):
        assert f'bcmanager_files_done_total{{run="{run_id}"}} 2.0' in every_metrics, run_id
    assert "bcmanager_assignments_total 4.0" in every_metrics
    assert "bcmanager_request_duration_seconds_bucket" in every_metrics

    code, body = fac.get("/metrics", runs="everything")
    assert code == 400 and "parameter runs" in body["error"] and "\n" not in body["error"], body


def test_shown_settled_s_zero_shows_no_settled_run(procs, tmp_path, root):
    recent = settled_run(root, 1, 60.0)
    active, _ = make_run(root, 2, 1)
    fac = started(procs, tmp_path, root, facility={"shown_settled_s": 0})
    wait_runs(fac, lambda r: len(r) == 2 and pending(r, active) == 1, "both runs found")
    code, status = fac.get("/status")
    assert code == 200, status
    assert [r["run_id"] for r in status["runs"]] == [active]
    assert recent in fac.runs()
