"""Read counts (issue 16): engines report the reads a DONE batch wrote; the manager keeps them
with the job, sums them in /status, `bcmanager status`, /runs and bcorch_summary.json.

Real managers on loopback, real POD5 files, real SQLite files; the engine is the real one
(simulate runner) where the count itself is what is tested, and the test plays the engine
by hand where the wire is (an original engine's completion, bad values).
"""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bcorch.manager.cli import format_status
from bcorch.manager.read_counts import ReadCount, ReadTotals, describe
from bcorch.manager.states import JobState
from bcorch.manager.store import Store
from bcorch.orchestrator.pod5_dataset import write_dataset
from bcorch.workers.read_ids import read_ids_under
from manager_helpers import assign, basecall, start_manager
from support import REPO, wait_until
from test_engine import Site


def _cli_status(url: str) -> str:
    done = subprocess.run([sys.executable, "-m", "bcorch.manager", "status", "--url", url],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout


# -- the engine reports, the manager sums ------------------------------------------------

def test_status_counts_every_read_the_engine_wrote(tmp_path, procs):
    """A real engine (simulate runner, some reads to fail/) over real POD5 files: /status
    reads == the reads write_dataset wrote, split as they were merged into pass/ and fail/."""
    site = Site(tmp_path, procs, n_files=5, reads=7, batch_size=2, input_closed=True)
    engine = site.engine(site.config(engine={"work_until_none_left": True},
                                     runner={"fail_fraction": 0.3}))
    assert engine.wait(60) == 0, engine.log()
    written_pass = read_ids_under([site.output_dir / "pass"])
    written_fail = read_ids_under([site.output_dir / "fail"])
    assert written_fail, "the simulated q-score split put no read in fail/"
    reads = site.manager.status()["reads"]
    assert reads["total"] == len(site.read_ids()) == 35
    assert (reads["pass"], reads["fail"]) == (sum(written_pass.values()),
                                              sum(written_fail.values()))
    assert reads["jobs_counted"] == reads["jobs_done"] >= 1   # every DONE batch counted
    shown = _cli_status(site.manager.url)
    assert f"reads       35 ({reads['pass']} pass, {reads['fail']} fail)" in shown, shown


def test_an_original_engines_completion_is_accepted_and_its_reads_are_unknown(tmp_path, procs):
    """The original engine sends job_id and job_state only: DONE, counted as unknown (never
    as 0 reads); our completion afterwards is counted, and the totals say of how many."""
    m = start_manager(procs, tmp_path, batch_size=1)
    write_dataset(tmp_path / "in", 2, reads_per_file=4, samples_per_read=500)
    wait_until(lambda: m.status()["files"]["PENDING"] == 2, 20, what="files found")
    first = assign(m, size=1)
    basecall(first, tmp_path)
    code, body = m.get("/completed", job_id=first["jobid"], job_state="DONE")
    assert (code, body) == (200, {"ok": True})
    reads = m.status()["reads"]
    assert reads == {"pass": None, "fail": None, "total": None, "jobs_counted": 0,
                     "jobs_done": 1}
    assert "reads       unknown" in _cli_status(m.url)

    second = assign(m, size=1)
    ids = basecall(second, tmp_path)
    code, body = m.get("/completed", job_id=second["jobid"], job_state="DONE",
                       reads_pass=len(ids), reads_fail=0)
    assert (code, body) == (200, {"ok": True})
    reads = m.status()["reads"]
    assert reads == {"pass": 4, "fail": 0, "total": 4, "jobs_counted": 1, "jobs_done": 2}
    assert "at least 4 (4 pass, 0 fail): counted for 1 of 2 done batches" in _cli_status(m.url)


@pytest.mark.parametrize("fields, named", [
    ({"reads_pass": "-1", "reads_fail": "0"}, "reads_pass"),
    ({"reads_pass": "3", "reads_fail": "many"}, "reads_fail"),
    ({"reads_pass": "2.5", "reads_fail": "0"}, "reads_pass"),
    ({"reads_pass": "3"}, "reads_fail"),
    ({"reads_fail": "3"}, "reads_pass"),
])
def test_a_bad_read_count_is_a_400_naming_it_and_changes_nothing(tmp_path, procs, fields, named):
    m = start_manager(procs, tmp_path)
    write_dataset(tmp_path / "in", 1, reads_per_file=2, samples_per_read=500)
    wait_until(lambda: m.status()["files"]["PENDING"] == 1, 20, what="file found")
    batch = assign(m, size=1)
    code, body = m.get("/completed", job_id=batch["jobid"], job_state="DONE", **fields)
    assert code == 400 and f"parameter {named}" in body["error"], body
    assert "\n" not in body["error"]
    assert m.status()["files"]["ASSIGNED"] == 1          # the job is still live
    code, body = m.post("/completed", {"job_id": batch["jobid"], "job_state": "DONE",
                                       "reads_pass": True, "reads_fail": 0})
    assert code == 400 and "parameter reads_pass" in body["error"], body
    basecall(batch, tmp_path)
    code, body = m.post("/completed", {"job_id": batch["jobid"], "job_state": "DONE",
                                       "reads_pass": 2, "reads_fail": 0})
    assert (code, body) == (200, {"ok": True})
    assert m.status()["reads"]["total"] == 2


def test_reads_of_a_failed_batch_are_not_counted(tmp_path, procs):
    m = start_manager(procs, tmp_path, batch_size=1)
    write_dataset(tmp_path / "in", 1, reads_per_file=2, samples_per_read=500)
    wait_until(lambda: m.status()["files"]["PENDING"] == 1, 20, what="file found")
    batch = assign(m, size=1)
    code, _ = m.get("/completed", job_id=batch["jobid"], job_state="FAILED", reads_pass=2,
                    reads_fail=0)
    assert code == 200
    assert m.status()["reads"] == {"pass": 0, "fail": 0, "total": 0, "jobs_counted": 0,
                                   "jobs_done": 0}


# -- the store keeps them, and an older database learns to -----------------------------------

# The jobs table as managers before issue 16 made it (no reads columns).
OLD_SCHEMA = """
CREATE TABLE files(
    id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, size INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'PENDING', attempts INTEGER NOT NULL DEFAULT 0,
    retry_cap INTEGER, job_id TEXT, link TEXT, reason TEXT, updated REAL, fid TEXT, mtime REAL,
    failures INTEGER NOT NULL DEFAULT 0, retry_at REAL, dup_of INTEGER);
CREATE TABLE jobs(
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL UNIQUE,
    engine_id TEXT NOT NULL, state TEXT NOT NULL, fs_pending INTEGER NOT NULL DEFAULT 0,
    n_files INTEGER NOT NULL, created REAL NOT NULL, finished REAL, reason TEXT);
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _old_database(path: Path, written: dict[str, list[str]], input_dir: Path) -> None:
    """An old manager's database: the first file DONE by job j000001-old, the rest PENDING."""
    names = sorted(written)
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    now = time.time()
    db.execute("INSERT INTO jobs(job_id, engine_id, state, n_files, created, finished) "
               "VALUES ('j000001-old', 'gpu0', 'DONE', 1, ?, ?)", (now, now))
    for i, name in enumerate(names):
        done = i == 0
        db.execute("INSERT INTO files(path, size, state, job_id, link, updated) "
                   "VALUES (?, ?, ?, ?, ?, ?)",
                   (name, (input_dir / name).stat().st_size, "DONE" if done else "PENDING",
                    "j000001-old" if done else None, f"0000_{name}" if done else None, now))
    db.commit()
    db.close()


def test_an_old_database_gets_the_reads_columns_and_keeps_working(tmp_path):
    inp = tmp_path / "in"
    written = write_dataset(inp, 2, reads_per_file=3, samples_per_read=500)
    path = tmp_path / "old.db"
    _old_database(path, written, inp)
    store = Store(str(path), max_attempts=3)
    try:
        columns = {row[1] for row in store._db.execute("PRAGMA table_info(jobs)")}
        assert {"reads_pass", "reads_fail"} <= columns
        assert store.read_totals() == ReadTotals(0, 0, jobs_counted=0, jobs_done=1)
        job = store.assign("gpu0", 1)
        assert job is not None and [f.path for f in job.files] == [sorted(written)[1]]
        store.finish(job.job_id, JobState.DONE, reads=ReadCount(2, 1))
        assert store.read_totals() == ReadTotals(2, 1, jobs_counted=1, jobs_done=2)
    finally:
        store.close()
    reopened = Store(str(path), max_attempts=3)   # the migration is done once; sums from disk
    try:
        assert reopened.read_totals() == ReadTotals(2, 1, jobs_counted=1, jobs_done=2)
    finally:
        reopened.close()


def test_a_manager_on_an_old_database_serves_and_counts(tmp_path, procs):
    inp = tmp_path / "in"
    written = write_dataset(inp, 2, reads_per_file=3, samples_per_read=500)
    path = tmp_path / "old.db"
    _old_database(path, written, inp)
    m = start_manager(procs, tmp_path, extra=("--db", str(path)))
    assert m.status()["reads"] == {"pass": None, "fail": None, "total": None,
                                   "jobs_counted": 0, "jobs_done": 1}
    batch = assign(m, size=1)
    ids = basecall(batch, tmp_path)
    code, body = m.get("/completed", job_id=batch["jobid"], job_state="DONE",
                       reads_pass=len(ids), reads_fail=0)
    assert (code, body) == (200, {"ok": True})
    assert m.status()["reads"] == {"pass": 3, "fail": 0, "total": 3, "jobs_counted": 1,
                                   "jobs_done": 2}


# -- how people see them ----------------------------------------------------------------------

def test_read_totals_unknown_is_never_shown_as_zero():
    assert ReadTotals().to_dict()["total"] == 0                     # nothing done: 0 is true
    unknown = ReadTotals(jobs_done=3).to_dict()
    assert unknown["total"] is None and describe(unknown).startswith("unknown")
    assert describe(None).startswith("unknown")                     # an older manager
    assert describe(ReadTotals(10, 2, 3, 3).to_dict()) == "12 (10 pass, 2 fail)"
    summed = ReadTotals.summed([ReadTotals(10, 2, 3, 3), ReadTotals(jobs_done=1)])
    assert describe(summed.to_dict()) == "at least 12 (10 pass, 2 fail): counted for 3 of 4 " \
                                         "done batches"


def test_status_of_an_older_manager_without_reads_still_prints():
    status = {"files": {"DONE": 1}, "progress": {"files_done": 1, "files_total": 1,
                                                  "bytes_done": 5, "bytes_total": 5},
              "throughput": {"files_per_s": 0.0, "bytes_per_s": 0.0, "window_s": 1.0},
              "eta_s": None, "input_closed": True, "report_back_interval": 90,
              "engines": {}}
    assert "reads       unknown" in format_status(status)


# -- on the wire: the original's plain GET, extra query parameters ---------------------------

def test_the_reads_ride_on_the_plain_get_as_extra_query_parameters():
    """Like rate and startup_s: a DONE completion stays the original's GET with query
    parameters (a manager that does not know them, such as the original, ignores them);
    with failed_files it is a POST carrying them in the body."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread
    from urllib.parse import parse_qs, urlsplit

    from bcorch.protocol import JobState as WireState
    from bcorch.workers.client import ManagerClient

    seen: list[tuple[str, dict, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
            seen.append((self.command, query, self.rfile.read(length) if length else b""))
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = ManagerClient(f"http://127.0.0.1:{server.server_address[1]}", retries=0)
        reads = {"reads_pass": 30, "reads_fail": 4}
        assert client.completed("j1", WireState.DONE, reads=reads).ok
        assert client.completed("j2", WireState.DONE, {"a.pod5": "bad"}, reads=reads).ok
        assert client.completed("j3", WireState.DONE).ok
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    (m1, q1, b1), (m2, q2, b2), (m3, q3, _) = seen
    assert (m1, b1) == ("GET", b"")
    assert q1 == {"job_id": "j1", "job_state": "DONE", "reads_pass": "30", "reads_fail": "4"}
    assert m2 == "POST" and json.loads(b2)["reads_pass"] == 30
    assert m3 == "GET" and q3 == {"job_id": "j3", "job_state": "DONE"}   # as the original


# -- facility mode: per run, in /runs and bcorch_summary.json ----------------------------------

def test_a_facility_runs_summary_and_runs_route_have_its_reads(procs, tmp_path):
    """Run 1's batches report their reads, run 2's do not (an original engine): run 1's
    bcorch_summary.json and /runs count its reads, run 2 says unknown, and the facility's
    /status and `bcmanager runs` say of how many batches the total is."""
    from test_facility import GROUP, SAMPLE, basecall as fac_basecall, make_run, pending, \
        started, wait_runs

    root = tmp_path / "root"
    root.mkdir()
    fac = started(procs, tmp_path, root)
    counted, ids = make_run(root, 1, 3, reads=3)
    unknown, _ = make_run(root, 2, 1, reads=2)
    wait_runs(fac, lambda r: pending(r, counted) == 3 and pending(r, unknown) == 1,
              "both runs found")
    (root / GROUP / SAMPLE / counted / "final_summary_FLOW001_abcd0001.txt").write_text("x\n")
    wait_runs(fac, lambda r: r[counted]["state"] == "CLOSED", "run 1 CLOSED")
    batches = 0
    while True:
        code, batch = fac.get("/assignwork", engineid="gpu0", batchsize=2)
        assert code == 200, batch
        if not batch["batch_size"]:
            break
        written = fac_basecall(fac, batch)
        fields = {"job_id": batch["jobid"], "job_state": "DONE"}
        if batch["run_id"] == counted:
            fields.update(reads_pass=len(written), reads_fail=0)
            batches += 1
        code, body = fac.get("/completed", **fields)
        assert (code, body) == (200, {"ok": True})
    runs = wait_runs(fac, lambda r: r[counted]["state"] == "COMPLETE", "run 1 COMPLETE")
    summary_path = root / GROUP / SAMPLE / counted / "basecalls" / "bcorch_summary.json"
    summary = json.loads(summary_path.read_text())
    assert summary["reads"] == {"pass": len(ids), "fail": 0, "total": 9,
                                "jobs_counted": batches, "jobs_done": batches}
    assert runs[counted]["reads"] == summary["reads"]   # a settled run: from its summary
    assert runs[unknown]["reads"] == {"pass": None, "fail": None, "total": None,
                                      "jobs_counted": 0, "jobs_done": 1}
    reads = fac.get("/status")[1]["reads"]
    assert reads == {"pass": 9, "fail": 0, "total": 9, "jobs_counted": batches,
                     "jobs_done": batches + 1}
    shown = subprocess.run([sys.executable, "-m", "bcorch.manager", "runs", "--url", fac.url],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    assert shown.returncode == 0, shown.stderr
    lines = {line.split()[0]: line for line in shown.stdout.splitlines()[1:]}
    assert " 9 " in lines[counted[:24]] and " ? " in lines[unknown[:24]], shown.stdout
    assert "at least 9 (9 pass, 0 fail): counted for" in _cli_status(fac.url)


# -- what the output check counts -------------------------------------------------------------

def _job(tmp_path: Path, reads_per_file: int = 4) -> tuple[Path, Path, list[str], list[str]]:
    """A job's input dir of symlinks to real POD5 files and its empty output dir."""
    written = write_dataset(tmp_path / "run", 2, reads_per_file=reads_per_file,
                            samples_per_read=500)
    job_in, job_out = tmp_path / "ASSIGNED_j1_e1", tmp_path / "TMPOUTPUT_j1_e1"
    job_in.mkdir()
    names = []
    for rel in sorted(written):
        (job_in / Path(rel).name).symlink_to(tmp_path / "run" / rel)
        names.append(Path(rel).name)
    for sub in ("pass", "fail"):
        (job_out / sub).mkdir(parents=True)
    return job_in, job_out, names, [r for rel in sorted(written) for r in written[rel]]


def _fastq(path: Path, headers: list[str]) -> None:
    path.write_text("".join(f"@{h}\nACGT\n+\n!!!!\n" for h in headers))


def test_the_output_check_counts_the_records_in_pass_and_fail(tmp_path):
    from bcorch.protocol import JobState as WireState
    from bcorch.workers.output_check import OutputChecker, ReadsWritten
    from bcorch.workers.runners.base import RunResult

    job_in, job_out, names, ids = _job(tmp_path)
    _fastq(job_out / "pass" / "calls.fastq", ids[:5])
    # the last read was split in two: both children are records of the output
    _fastq(job_out / "fail" / "calls.fastq",
           ids[5:7] + [f"child{i} pi:Z:{ids[7]}" for i in (1, 2)])
    _fastq(job_out / "stray.fastq", ids[:1])   # not in pass/ or fail/: not merged, not counted
    checked = OutputChecker().checked(RunResult(WireState.DONE, 0), job_in, job_out, names)
    assert checked.result.state is WireState.DONE and not checked.result.failed_files
    assert checked.reads == ReadsWritten(passed=5, failed=4)
    assert checked.reads.fields() == {"reads_pass": 5, "reads_fail": 4}


def test_no_count_when_the_outputs_cannot_be_read_or_the_batch_failed(tmp_path):
    from bcorch.protocol import JobState as WireState
    from bcorch.workers.output_check import OutputChecker
    from bcorch.workers.runners.base import RunResult

    job_in, job_out, names, ids = _job(tmp_path)
    (job_out / "pass" / "calls.sam").write_text("@HD\tVN:1.6\n")   # read ids cannot be read
    checked = OutputChecker().checked(RunResult(WireState.DONE, 0), job_in, job_out, names)
    assert checked.result.state is WireState.DONE and checked.reads is None
    failed = OutputChecker().checked(RunResult(WireState.FAILED, 1), job_in, job_out, names)
    assert failed.reads is None
