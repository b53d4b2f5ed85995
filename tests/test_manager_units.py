"""The manager's parts in-process: state machines, store, layout, scanner (real SQLite, real files)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from bcorch.manager.layout import Layout
from bcorch.manager.leases import Leases
from bcorch.manager.scanner import Scanner, walk_candidates
from bcorch.manager.states import (FileEvent, FileState, JobState, TransitionError, file_transition,
                            job_transition)
from bcorch.manager import store as store_mod
from bcorch.manager.store import Store, UnknownFailedFile, link_name
from bcorch.protocol import validate_file_name


def old(path: Path, age: float = 3600) -> Path:
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def touch(path: Path, data: bytes = b"x", age: float = 3600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return old(path, age)


# -- state machines ------------------------------------------------------------------

def test_failures_shrink_the_batch_then_quarantine():
    first = file_transition(FileState.ASSIGNED, FileEvent.FAIL, 0, max_attempts=3, batch_files=10)
    assert (first.state, first.attempts, first.retry_cap) == (FileState.PENDING, 1, 5)
    last_try = file_transition(FileState.ASSIGNED, FileEvent.FAIL, 1, max_attempts=3, batch_files=5)
    assert (last_try.state, last_try.attempts, last_try.retry_cap) == (FileState.PENDING, 2, 1)
    out = file_transition(FileState.ASSIGNED, FileEvent.FAIL, 2, max_attempts=3, batch_files=1)
    assert (out.state, out.attempts) == (FileState.QUARANTINED, 3)


def test_return_counts_no_attempt_and_finished_files_take_no_events():
    back = file_transition(FileState.ASSIGNED, FileEvent.RETURN, 2, max_attempts=3)
    assert (back.state, back.attempts) == (FileState.PENDING, 2)
    with pytest.raises(TransitionError):
        file_transition(FileState.DONE, FileEvent.FAIL, 0, max_attempts=3)
    with pytest.raises(TransitionError):
        file_transition(FileState.PENDING, FileEvent.SUCCEED, 0, max_attempts=3)


def test_a_job_ends_once():
    assert job_transition(JobState.LIVE, JobState.DONE) is JobState.DONE
    for final in (JobState.DONE, JobState.FAILED, JobState.STOPPED, JobState.EXPIRED):
        with pytest.raises(TransitionError):
            job_transition(final, JobState.FAILED)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                               blacklist_characters="\0"), min_size=1, max_size=300)
                .map(lambda s: s.replace("/", "_") + ".pod5"), min_size=1, max_size=3),
       st.integers(0, 9999))
def test_link_names_are_flat_valid_and_unique(parts, index):
    path = "/".join(parts)
    name = link_name(index, path)
    assert validate_file_name(name, "link") == name
    assert len(name.encode()) <= 200
    assert name.startswith(f"{index:04d}_")
    assert link_name(index, path) != link_name(index + 1, path)


def test_leases_use_the_managers_clock():
    now = [100.0]
    leases = Leases(10.0, clock=lambda: now[0])
    leases.grant("j1", "gpu0")
    now[0] = 109.0
    assert leases.refresh("j1") and leases.expired() == []
    now[0] = 119.5
    assert leases.expired() == ["j1"]
    leases.drop("j1")
    assert not leases.refresh("j1")


# -- store ----------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "db.sqlite"), max_attempts=3)
    yield s
    s.close()


def test_assign_finish_and_counts_survive_reopening(tmp_path, store, monkeypatch):
    assert store.add_files([(f"f{i}.pod5", 10 + i) for i in range(5)]) == 5
    assert store.add_files([("f0.pod5", 10), ("new.pod5", 7)]) == 1
    job = store.assign("gpu0", 3)
    assert job is not None and [f.path for f in job.files] == ["f0.pod5", "f1.pod5", "f2.pod5"]
    done = store.finish(job.job_id, JobState.DONE, {job.files[1].link: "bad read"})
    assert done.changed and done.files_done == 2 and done.bytes_done == 10 + 12
    again = store.finish(job.job_id, JobState.DONE)
    assert not again.changed and again.job.state is JobState.DONE
    snap = store.snapshot()
    assert snap.files == {"PENDING": 4, "ASSIGNED": 0, "DONE": 2, "QUARANTINED": 0,
                          "DUPLICATE": 0}
    store.close()
    reopened = Store(str(tmp_path / "db.sqlite"), max_attempts=3)
    try:
        assert reopened.snapshot().files == snap.files
        assert reopened.snapshot().bytes == snap.bytes
        monkeypatch.setattr(store_mod, "retry_clock", lambda: time.time() + 1.5)  # past its back-off
        retry = reopened.assign("gpu1", 10)
        # the file named as failed goes first, and alone
        assert [f.path for f in retry.files] == ["f1.pod5"]
        assert retry.job_id != job.job_id
    finally:
        reopened.close()


def test_unknown_failed_file_changes_nothing(store):
    store.add_files([("a.pod5", 1)])
    job = store.assign("gpu0", 1)
    with pytest.raises(UnknownFailedFile):
        store.finish(job.job_id, JobState.DONE, {"nope.pod5": ""})
    assert store.job(job.job_id).state is JobState.LIVE
    assert store.snapshot().files["ASSIGNED"] == 1


def test_job_ids_are_never_reused(tmp_path):
    ids = set()
    for _ in range(3):
        s = Store(str(tmp_path / "db.sqlite"), max_attempts=3)
        s.add_files([(f"{len(ids)}-{i}.pod5", 1) for i in range(2)])
        for _ in range(2):
            job = s.assign("gpu0", 1)
            ids.add(job.job_id)
            s.finish(job.job_id, JobState.STOPPED)
            s.mark_moved(job.job_id)
        s.close()
    assert len(ids) == 6


def test_picking_pending_files_uses_the_partial_index(store):
    plan = store._db.execute("EXPLAIN QUERY PLAN SELECT id, path, size, attempts FROM files "
                             "WHERE state = 'PENDING' ORDER BY id LIMIT 10").fetchall()
    assert any("files_pending" in row[-1] for row in plan), plan
    plan = store._db.execute("EXPLAIN QUERY PLAN SELECT id, path, size, attempts, retry_cap FROM "
                             "files WHERE state = 'PENDING' AND failures > 0 ORDER BY id LIMIT 10"
                             ).fetchall()
    assert any("files_retried" in row[-1] for row in plan), plan


# -- layout ---------------------------------------------------------------------------

def _job_with_outputs(tmp_path, store):
    inp, out = tmp_path / "in", tmp_path / "out"
    touch(inp / "a" / "reads.pod5", b"A")
    touch(inp / "b" / "reads.pod5", b"B")
    store.add_files([("a/reads.pod5", 1), ("b/reads.pod5", 1)])
    layout = Layout(inp, out)
    layout.create_roots()
    job = store.assign("gpu0", 2)
    layout.prepare(job)
    tmp = layout.tmp_output_dir(job)
    (tmp / "pass" / "x.fastq").write_text("@x\n")
    (tmp / "pass" / "y.fastq").write_text("@y\n")
    (tmp / "fail" / "z.fastq").write_text("@z\n")
    (tmp / "basecaller.log").write_text("log\n")
    return inp, out, layout, job


def test_equal_names_in_sub_folders_get_distinct_links(tmp_path, store):
    inp, out, layout, job = _job_with_outputs(tmp_path, store)
    links = sorted(layout.assigned_dir(job).iterdir())
    assert len(links) == 2 and len({p.name for p in links}) == 2
    assert sorted(p.read_bytes() for p in links) == [b"A", b"B"]


@pytest.mark.parametrize("crash_after", [0, 1, 2, 3])
def test_done_settle_finishes_a_half_done_move_without_doubling(tmp_path, store, crash_after):
    inp, out, layout, job = _job_with_outputs(tmp_path, store)
    tmp = layout.tmp_output_dir(job)
    # replay the first `crash_after` renames by hand, as a crashed manager would have left them
    steps = [("pass", "x.fastq"), ("pass", "y.fastq"), ("fail", "z.fastq")][:crash_after]
    for sub, name in steps:
        os.rename(tmp / sub / name, out / sub / f"{job.job_id}_{name}")
    store.finish(job.job_id, JobState.DONE)
    done = store.job(job.job_id)
    layout.settle(done)
    layout.settle(done)  # a second run (crash before mark_moved) changes nothing
    assert sorted(p.name for p in (out / "pass").iterdir()) == [f"{job.job_id}_x.fastq",
                                                                f"{job.job_id}_y.fastq"]
    assert [p.name for p in (out / "fail").iterdir()] == [f"{job.job_id}_z.fastq"]
    log_dir = out / f"LOGOUTPUT_{job.job_id}_gpu0"
    assert (log_dir / "basecaller.log").read_text() == "log\n"
    assert not tmp.exists() and not layout.assigned_dir(job).exists()
    assert (inp / "a" / "reads.pod5").read_bytes() == b"A"  # inputs untouched


def test_failed_settle_keeps_links_and_outputs_aside(tmp_path, store):
    inp, out, layout, job = _job_with_outputs(tmp_path, store)
    store.finish(job.job_id, JobState.FAILED, reason="dorado crashed")
    layout.settle(store.job(job.job_id))
    failed = inp / f"FAILED_{job.job_id}_gpu0"
    assert sorted(p.read_bytes() for p in failed.iterdir()) == [b"A", b"B"]
    assert (out / f"FAILEDOUTPUT_{job.job_id}_gpu0" / "pass" / "x.fastq").exists()
    assert list((out / "pass").iterdir()) == []


# -- scanner --------------------------------------------------------------------------

def test_scan_recurses_skips_own_dirs_unsettled_and_known(tmp_path):
    root = tmp_path / "in"
    for rel in ("a.pod5", "sub/b.pod5", "sub/deep/c.pod5", "dir.pod5/d.pod5"):
        touch(root / rel)
    touch(root / "notes.txt")
    touch(root / "ASSIGNED_j1_gpu0" / "x.pod5")
    touch(root / "FAILED_j2_gpu0" / "y.pod5")
    touch(root / "sub" / "ASSIGNED_kept" / "e.pod5")  # only the top level is ours
    touch(root / "fresh.pod5", age=0)
    (root / "loop").symlink_to(root, target_is_directory=True)
    touch(root / "sub" / "final_summary_x.txt")
    summaries: list[str] = []
    found = {rel: size for rel, size, _ in walk_candidates(root, set(), {}, summaries=summaries)}
    assert sorted(found) == ["a.pod5", "dir.pod5/d.pod5", "fresh.pod5",
                             "sub/ASSIGNED_kept/e.pod5", "sub/b.pod5", "sub/deep/c.pod5"]
    assert found["a.pod5"] == 1 and summaries == ["sub/final_summary_x.txt"]
    assert list(walk_candidates(root, set(found), {})) == []
    again = list(walk_candidates(root, set(found), {"fresh.pod5": None}))
    assert [(rel, size) for rel, size, _ in again] == [("fresh.pod5", 1)]


def test_scanner_inserts_incrementally(tmp_path, store):
    root = tmp_path / "in"
    for i in range(25):
        touch(root / f"s{i % 3}" / f"r{i}.pod5")
    scanner = Scanner(root, 0, store.add_files, store.known_paths(), chunk=10)
    assert scanner.scan_once() == 25
    assert scanner.scan_once() == 0
    touch(root / "late.pod5")
    assert scanner.scan_once() == 1
    assert store.snapshot().files["PENDING"] == 26
