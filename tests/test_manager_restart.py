"""kill -9 of the manager in the middle of a run: the restarted one knows everything."""
from __future__ import annotations

import os
import signal
import time

from bcorch.manager.layout import Layout
from bcorch.manager.states import JobState
from bcorch.manager.statedir import default_db_path
from bcorch.manager.store import Store
from bcorch.protocol import short_job_id
from manager_helpers import assign, complete, keepalive, start_manager, wait_counts, write_files
from support import wait_until


def test_restart_after_kill_9_keeps_state_and_leases(procs, tmp_path):
    write_files(tmp_path / "in", [f"r{i:02d}.pod5" for i in range(12)])
    m = start_manager(procs, tmp_path, batch_size=3, max_attempts=1, report_back_interval=1)
    wait_counts(m, PENDING=12)
    done = assign(m, "gpu0")
    (tmp_path / "out" / done["job_output_dir"] / "pass" / "x.fastq").write_text("@x\n")
    assert complete(m, done["jobid"], "DONE") == (200, {"ok": True})
    bad = assign(m, "gpu1")
    assert complete(m, bad["jobid"], "FAILED", reason="bad") == (200, {"ok": True})  # quarantined
    live = assign(m, "gpu2")
    before = m.status()
    assert before["files"] == {"PENDING": 3, "ASSIGNED": 3, "DONE": 3, "QUARANTINED": 3, "DUPLICATE": 0}
    os.kill(m.pid, signal.SIGKILL)
    m.wait(30)
    killed = time.monotonic()
    # stay down longer than the lease: the restart must grant it a fresh interval anyway
    wait_until(lambda: time.monotonic() - killed > 1.5, 10, what="downtime past the lease")
    # The fresh lease starts at recovery, before the HTTP server answers: 4 s (not 1 s) leaves
    # a loaded machine time to serve and take the keep-alive below.
    again = start_manager(procs, tmp_path, batch_size=3, max_attempts=1,
                          report_back_interval=4, port=m.port)
    assert keepalive(again, live["jobid"]) == {"late": False}
    after = again.status()
    assert after["files"] == before["files"] and after["bytes"] == before["bytes"]
    assert after["jobs"] == {"gpu2": [short_job_id(live["jobid"])]}
    assert (tmp_path / "in" / live["job_input_dir"]).is_dir()
    assert (tmp_path / "out" / "pass" / f"{done['jobid']}_x.fastq").exists()
    # completions recorded before the crash are still answered the same
    assert complete(again, done["jobid"], "DONE") == (200, {"ok": True})
    code, listing = again.get("/files", state="QUARANTINED")
    assert len(listing["files"]) == 3 and all(f["attempts"] == 1 for f in listing["files"])
    # a job id is never handed out twice, even across the crash
    fresh = assign(again, "gpu3")
    assert fresh["jobid"] not in {done["jobid"], bad["jobid"], live["jobid"]}
    # and the restored lease still expires when its keep-alives stop
    wait_until(lambda: short_job_id(live["jobid"]) not in again.status()["jobs"].get("gpu2", []), 30,
               what="restored lease to expire")
    assert keepalive(again, live["jobid"]) == {"late": True}
    wait_counts(again, ASSIGNED=0, PENDING=6, DONE=3, QUARANTINED=3)


def test_interrupted_completion_is_finished_on_restart(procs, tmp_path):
    write_files(tmp_path / "in", ["a.pod5", "b.pod5"])
    m = start_manager(procs, tmp_path, batch_size=2)
    wait_counts(m, PENDING=2)
    batch = assign(m)
    job = batch["jobid"]
    out = tmp_path / "out"
    tmp_out = out / batch["job_output_dir"]
    for sub, name in [("pass", "a.fastq"), ("pass", "b.fastq"), ("fail", "c.fastq")]:
        (tmp_out / sub / name).write_text(f"@{name}\n")
    (tmp_out / "run.log").write_text("log\n")
    os.kill(m.pid, signal.SIGKILL)
    m.wait(30)
    # What a manager killed half-way through the DONE completion leaves behind: the outcome
    # committed (with its pending move) and the first of its renames done.
    store = Store(str(default_db_path(out)), max_attempts=3)
    try:
        assert store.finish(job, JobState.DONE).changed
    finally:
        store.close()
    os.rename(tmp_out / "pass" / "a.fastq", out / "pass" / f"{job}_a.fastq")
    again = start_manager(procs, tmp_path, batch_size=2, port=m.port)
    assert sorted(p.name for p in (out / "pass").iterdir()) == [f"{job}_a.fastq", f"{job}_b.fastq"]
    assert [p.name for p in (out / "fail").iterdir()] == [f"{job}_c.fastq"]
    assert (out / f"LOGOUTPUT_{job}_gpu0" / "run.log").exists()
    assert not tmp_out.exists() and not (tmp_path / "in" / batch["job_input_dir"]).exists()
    assert again.status()["files"]["DONE"] == 2
    assert complete(again, job, "DONE") == (200, {"ok": True})
    # finished moves are not redone by the next restart
    again.signal(signal.SIGTERM)
    assert again.wait(30) == 0
    reopened = Store(str(default_db_path(out)), max_attempts=3)
    try:
        assert reopened.unfinished_moves() == []
    finally:
        reopened.close()


def test_crash_while_assigning_recreates_the_job_dirs(procs, tmp_path):
    """A job committed but whose dirs were not made yet (crash in between) gets them on start."""
    write_files(tmp_path / "in", ["a.pod5"])
    m = start_manager(procs, tmp_path)
    wait_counts(m, PENDING=1)
    os.kill(m.pid, signal.SIGKILL)
    m.wait(30)
    store = Store(str(default_db_path(tmp_path / "out")), max_attempts=3)
    try:
        job = store.assign("gpu0", 5)
    finally:
        store.close()
    layout = Layout(tmp_path / "in", tmp_path / "out")
    assert not layout.assigned_dir(job).exists()
    again = start_manager(procs, tmp_path, port=m.port)
    links = list(layout.assigned_dir(job).iterdir())
    assert [p.resolve() for p in links] == [(tmp_path / "in" / "a.pod5").resolve()]
    assert (layout.tmp_output_dir(job) / "pass").is_dir()
    assert keepalive(again, job.job_id) == {"late": False}
