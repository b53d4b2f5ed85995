"""Issue 11, holes 1-3 (and issue 12's footer readiness and final_summary), over real processes.

A lost database redoes nothing (the journal beside the outputs), files are known by their
POD5 file identifier (a moved file is not redone, a copy is a DUPLICATE), and a file still
being written is neither taken nor failed until it is complete.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from bcorch.manager.layout import Layout
from bcorch.manager.service import Manager
from bcorch.manager.statedir import default_db_path
from bcorch.manager.store import Store
from bcorch.orchestrator.pod5_dataset import write_dataset, write_pod5
from manager_helpers import assign, basecall, complete, start_manager, wait_counts
from support import REPO, ManagerProcess, wait_until


def _config(tmp_path: Path, **keys) -> Path:
    keys = {"settle_s": 30.0, "scan_interval_s": 0.2, **keys}
    lines = ["[manager]"]
    lines += [f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in keys.items()]
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _manager(procs, tmp_path: Path, port: int | None = None, extra=(), **keys) -> ManagerProcess:
    m = ManagerProcess(tmp_path, tmp_path / "in", tmp_path / "out", port=port,
                       config=_config(tmp_path, **keys), extra=list(extra))
    procs.append(m)
    return m.start()


def _dirs(tmp_path: Path) -> tuple[Path, Path]:
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    return inp, out


def _work_all(m: ManagerProcess, tmp_path: Path) -> list[str]:
    """Play an engine until no batch is left; return every read id it basecalled."""
    reads: list[str] = []
    while True:
        batch = assign(m, "gpu0", 4)
        if not batch["batch_size"]:
            return reads
        reads += basecall(batch, tmp_path)
        assert complete(m, batch["jobid"], "DONE") == (200, {"ok": True})


def _reads_in_output(out: Path) -> Counter:
    found: Counter = Counter()
    for path in (out / "pass").glob("*.fastq"):
        found.update(line[1:].strip() for line in path.read_text().splitlines()[::4])
    return found


# -- hole 1: a lost database -----------------------------------------------------------

@pytest.mark.parametrize("loss", ["deleted", "truncated", "new --db"])
def test_a_lost_database_redoes_nothing(procs, tmp_path, loss):
    inp, out = _dirs(tmp_path)
    written = write_dataset(inp, 6, reads_per_file=3, samples_per_read=400, seed=5)
    m = start_manager(procs, tmp_path, settle_s=30.0)
    wait_counts(m, PENDING=6)
    first = _work_all(m, tmp_path)
    assert len(first) == 18
    m.close()
    db = default_db_path(out)
    assert db.exists() and not (out / "bcmanager.sqlite").exists(), "the database is local"
    extra: list[str] = []
    if loss == "deleted":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    elif loss == "truncated":
        db.write_bytes(b"")
        for suffix in ("-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    else:  # a manager on another host: same shared dirs, its own database
        extra = ["--db", str(tmp_path / "other-host.sqlite")]
    again = ManagerProcess(tmp_path, inp, out, port=m.port, settle_s=30.0, extra=extra)
    procs.append(again)
    again.start()
    st = again.status()
    assert st["files"]["DONE"] == 6 and st["files"]["PENDING"] == 0, st["files"]
    assert _work_all(again, tmp_path) == []
    counts = _reads_in_output(out)
    assert set(counts) == {r for ids in written.values() for r in ids}
    assert max(counts.values()) == 1
    assert "rebuilt from the journal" in again.log()


def _start_fails(tmp_path: Path, db: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bcorch.manager", "--input-dir",
                           str(tmp_path / "in"), "--output-dir", str(tmp_path / "out"),
                           "--db", str(db), "--port", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def _errors(result: subprocess.CompletedProcess) -> list[str]:
    """The error lines (log lines, which carry a timestamp, are not errors)."""
    return [line for line in result.stderr.splitlines() if line.startswith("bcmanager:")]


def test_a_database_that_cannot_be_opened_is_exit_78_in_one_line(tmp_path):
    _dirs(tmp_path)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database, it is a note\n" * 200)
    result = _start_fails(tmp_path, garbage)
    assert result.returncode == 78, result.stderr
    lines = _errors(result)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(garbage) in lines[0] and "move it aside" in lines[0]


def test_a_half_truncated_database_is_exit_78_in_one_line(procs, tmp_path):
    inp, out = _dirs(tmp_path)
    for i in range(400):
        (inp / f"r{i:03d}_{'x' * 60}.pod5").write_bytes(b"pod5?")
    db = tmp_path / "db.sqlite"
    m = start_manager(procs, tmp_path, extra=["--db", str(db)])
    wait_counts(m, PENDING=400)
    m.signal(15)
    assert m.wait(30) == 0
    data = db.read_bytes()
    assert len(data) > 8192
    db.write_bytes(data[: len(data) // 2])
    result = _start_fails(tmp_path, db)
    assert result.returncode == 78, result.stderr
    assert len(_errors(result)) == 1 and "Traceback" not in result.stderr
    assert str(db) in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_state_directory_is_exit_78(tmp_path):
    _dirs(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        result = _start_fails(tmp_path, ro / "db.sqlite")
    finally:
        ro.chmod(0o700)
    assert result.returncode == 78 and len(_errors(result)) == 1


# -- hole 2: identity, not path ----------------------------------------------------------

def test_a_moved_done_file_is_not_redone_and_a_copy_is_a_duplicate(procs, tmp_path):
    inp, out = _dirs(tmp_path)
    written = write_dataset(inp, 4, reads_per_file=3, samples_per_read=400, seed=9)
    m = start_manager(procs, tmp_path, settle_s=30.0)
    wait_counts(m, PENDING=4)
    assert len(_work_all(m, tmp_path)) == 12
    (inp / "archived").mkdir()
    os.rename(inp / "reads_00001.pod5", inp / "archived" / "r_01.pod5")
    (inp / "copies").mkdir()
    (inp / "copies" / "again.pod5").write_bytes((inp / "reads_00002.pod5").read_bytes())
    st = wait_until(lambda: (s := m.status())["files"]["DUPLICATE"] == 1 and s, 30,
                    what="the copy to be seen")
    code, done = m.get("/files", state="DONE")
    wait_until(lambda: "archived/r_01.pod5" in
               {f["path"] for f in m.get("/files", state="DONE")[1]["files"]}, 30,
               what="the moved file to be known at its new place")
    st = m.status()
    assert st["files"]["DONE"] == 4 and st["files"]["PENDING"] == 0, st["files"]
    assert st["progress"]["files_total"] == 4
    assert st["duplicates"][0]["path"] == "copies/again.pod5"
    assert "reads_00002.pod5" in st["duplicates"][0]["reason"]
    assert _work_all(m, tmp_path) == []
    assert max(_reads_in_output(out).values()) == 1
    shown = subprocess.run([sys.executable, "-m", "bcorch.manager", "status", "--url", m.url],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "DUPLICATE 1" in shown.stdout, shown.stdout + shown.stderr
    assert len(written) == 4


def test_two_copies_found_together_are_basecalled_once(procs, tmp_path):
    inp, out = _dirs(tmp_path)
    write_pod5(inp / "a.pod5", 3, 300, random.Random(1))
    (inp / "sub").mkdir()
    (inp / "sub" / "a.pod5").write_bytes((inp / "a.pod5").read_bytes())
    m = start_manager(procs, tmp_path, settle_s=30.0)
    wait_counts(m, PENDING=1, DUPLICATE=1)
    assert len(_work_all(m, tmp_path)) == 3


# -- hole 3 and issue 12 §1: files still being written ---------------------------------

def _half_then_whole(path: Path, rng_seed: int = 4) -> bytes:
    """Write a complete POD5 elsewhere; put its first half at path; return the whole."""
    whole = path.parent.parent / f"whole-{path.name}"
    write_pod5(whole, 40, 2000, random.Random(rng_seed))
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data


def test_a_complete_pod5_is_taken_at_once_without_waiting_for_settle(procs, tmp_path):
    inp, _ = _dirs(tmp_path)
    m = _manager(procs, tmp_path, settle_s=3600.0)
    write_pod5(inp / "fresh.pod5", 2, 300, random.Random(2))
    wait_counts(m, PENDING=1)


def test_a_paused_writer_is_waited_for_and_its_file_is_basecalled(procs, tmp_path):
    inp, out = _dirs(tmp_path)
    m = _manager(procs, tmp_path, settle_s=0.0, incomplete_grace_s=600.0)
    growing = inp / "growing.pod5"
    data = _half_then_whole(growing)
    # many scans pass; a settle_s of 0 would have taken it (and failed it three times)
    wait_until(lambda: m.status()["files_waiting"] == 1, 30, what="the file to be seen waiting")
    # a complete file that comes later is taken while the paused one still waits
    write_pod5(inp / "later.pod5", 3, 300, random.Random(5))
    st = wait_counts(m, PENDING=1)
    assert sum(st["files"].values()) == 1 and st["files_waiting"] == 1, st
    assert len(_work_all(m, tmp_path)) == 3
    growing.write_bytes(data)  # the writer comes back and closes the file
    wait_counts(m, PENDING=1)
    assert len(_work_all(m, tmp_path)) == 40
    assert sum(_reads_in_output(out).values()) == 43


def test_incomplete_past_the_grace_is_quarantined_until_it_changes(procs, tmp_path):
    inp, _ = _dirs(tmp_path)
    m = _manager(procs, tmp_path, settle_s=0.0, incomplete_grace_s=1.0)
    growing = inp / "growing.pod5"
    data = _half_then_whole(growing)
    wait_counts(m, QUARANTINED=1)
    code, listing = m.get("/files", state="QUARANTINED")
    assert "incomplete POD5" in listing["files"][0]["reason"]
    growing.write_bytes(data)
    wait_counts(m, QUARANTINED=0, PENDING=1)


def test_close_input_quarantines_incomplete_files_at_once(procs, tmp_path):
    inp, _ = _dirs(tmp_path)
    m = _manager(procs, tmp_path, settle_s=0.0, incomplete_grace_s=3600.0)
    _half_then_whole(inp / "growing.pod5")
    wait_until(lambda: m.status()["files_waiting"] == 1, 30, what="the file to be seen waiting")
    assert m.post("/close-input", {})[0] == 200
    wait_counts(m, QUARANTINED=1)
    assert assign(m)["input_closed"] and m.status()["files_waiting"] == 0


def test_a_failure_while_the_file_changes_counts_no_attempt(procs, tmp_path):
    inp, _ = _dirs(tmp_path)
    m = _manager(procs, tmp_path, settle_s=0.0, max_attempts=1)
    (inp / "odd.pod5").write_bytes(b"not framed as POD5, so the settle timer decides")
    wait_counts(m, PENDING=1)
    batch = assign(m)
    with open(inp / "odd.pod5", "ab") as fh:  # still being written
        fh.write(b"more")
    assert complete(m, batch["jobid"], "FAILED", reason="cannot open") == (200, {"ok": True})
    st = m.status()["files"]
    assert st["QUARANTINED"] == 0 and st["PENDING"] == 1, st


def test_three_failures_of_one_file_take_at_least_two_seconds(procs, tmp_path):
    inp, _ = _dirs(tmp_path)
    (inp / "bad.pod5").write_bytes(b"garbage")
    os.utime(inp / "bad.pod5", (time.time() - 7200, time.time() - 7200))
    m = _manager(procs, tmp_path, settle_s=0.0, max_attempts=3, incomplete_grace_s=60.0)
    wait_counts(m, PENDING=1)
    failed_at = []
    for _ in range(3):
        batch = wait_until(lambda: (b := assign(m))["batch_size"] and b, 30, interval=0.01,
                           what="the file to come back")
        failed_at.append(time.monotonic())
        assert complete(m, batch["jobid"], "FAILED", reason="cannot open")[0] == 200
    assert failed_at[-1] - failed_at[0] >= 2.0
    wait_counts(m, QUARANTINED=1)


# -- issue 12 §2: the run ends by itself ------------------------------------------------

def test_final_summary_closes_the_input(procs, tmp_path):
    inp, _ = _dirs(tmp_path)
    m = _manager(procs, tmp_path, settle_s=0.0)
    assert not m.status()["input_closed"]
    (inp / "run1" / "pod5").mkdir(parents=True)
    (inp / "run1" / "final_summary_PAW00000_1234abcd.txt").write_text("instrument=PC24B\n")
    wait_until(lambda: m.status()["input_closed"], 30, what="the input to be closed")
    assert "final_summary_PAW00000_1234abcd.txt" in m.log()


def test_final_summary_is_ignored_when_switched_off(procs, tmp_path):
    inp, _ = _dirs(tmp_path)
    m = _manager(procs, tmp_path, settle_s=0.0, close_on_final_summary=False)
    (inp / "final_summary_x.txt").write_text("done\n")
    write_pod5(inp / "a.pod5", 1, 300, random.Random(3))
    wait_counts(m, PENDING=1)  # a scan went past the summary
    assert not m.status()["input_closed"]


def test_a_job_live_when_the_database_was_lost_is_set_aside(procs, tmp_path):
    inp, out = _dirs(tmp_path)
    written = write_dataset(inp, 2, reads_per_file=3, samples_per_read=400, seed=6)
    m = start_manager(procs, tmp_path, settle_s=30.0)
    wait_counts(m, PENDING=2)
    done = assign(m, "gpu0", 1)
    basecall(done, tmp_path)
    assert complete(m, done["jobid"], "DONE") == (200, {"ok": True})
    live = assign(m, "gpu1", 1)
    basecall(live, tmp_path)  # written, never reported: the manager dies first
    os.kill(m.pid, 9)
    m.wait(30)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{default_db_path(out)}{suffix}").unlink(missing_ok=True)
    again = ManagerProcess(tmp_path, inp, out, port=m.port, settle_s=30.0)
    procs.append(again)
    again.start()
    assert complete(again, live["jobid"], "DONE") == (200, {"ok": False, "late": True})
    assert not (out / live["job_output_dir"]).exists()
    assert (out / ("LATEOUTPUT_" + live["job_output_dir"][len("TMPOUTPUT_"):])).is_dir()
    assert not (inp / live["job_input_dir"]).exists()
    wait_counts(again, DONE=1, PENDING=1)
    assert len(_work_all(again, tmp_path)) == 3
    counts = _reads_in_output(out)
    assert set(counts) == {r for ids in written.values() for r in ids}
    assert max(counts.values()) == 1


def test_nothing_left_is_said_only_after_a_whole_scan_since_the_start(tmp_path):
    """A manager restarted on a lost database with the input closed knows of its unfinished
    files only once it has scanned: before that, an engine asking must not be told that
    nothing is left (it would exit, and bcorch with it, leaving the files unbasecalled)."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    (inp / "unfinished.pod5").write_bytes(b"x")
    store = Store(str(tmp_path / "fresh.sqlite"), max_attempts=3)
    try:
        manager = Manager(store, Layout(inp, out), batch_size=3, report_back_interval=60,
                          input_closed=True)
        manager.recover()
        empty = manager.assign("e-gpu0", 3).body
        assert empty["batch_size"] == 0 and empty["input_closed"] is False
        assert manager.status()["complete"] is False
        manager.input_scanned()   # a scan that found nothing: now nothing is left
        assert manager.assign("e-gpu0", 3).body["input_closed"] is True
        assert manager.status()["complete"] is True
    finally:
        store.close()
