"""Facility mode: a POD5 file is basecalled once in the whole facility, whatever run
directory it is copied into, and what the facility decided about a run outlives its
database (issue 13, with issue 11's promise across runs).

An in-process Facility on real directories, real POD5 files and real SQLite; the test plays
the engine, as in test_facility_hostile.py.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest

from bcorch.config import FacilityConfig, ManagerConfig
from bcorch.manager.facility import Facility
from bcorch.manager import store as store_mod
from bcorch.manager.facility_states import RunEvent
from bcorch.manager.states import FileState
from bcorch.orchestrator.pod5_dataset import write_pod5
from test_facility import GROUP as GROUP_E2E, SAMPLE as SAMPLE_E2E
from test_facility import assign as fac_assign, done, drain as fac_drain
from test_facility import make_run as fac_make_run, output_reads, pending, started, wait_runs
from test_facility_hostile import (GROUP, SAMPLE, assert_each_read_once, basecall_and_close,
                                   batches_out_while_away, drain, facility, finish, make_run, reads_in, report_unreadable,
                                   runs, take)

NAME = "20261126_1200_P2S-01-A_FLOW001_abcd0001"


def _duplicates(fac, run_id: str) -> list[dict]:
    return fac.files_in_state(FileState.DUPLICATE, 100, run_id)


def _mirror(tmp_path: Path, root: Path, state: str = "state"):
    return facility(tmp_path / state, root, output="mirror", output_root=str(tmp_path / "out"))


def _one_batch_done(tmp_path: Path, files: int, output: str = "mirror", name: str = NAME
                    ) -> tuple[Path, set[str], Facility]:
    """Run `name` of `files` files with one batch done: (root, read ids, the facility)."""
    root = tmp_path / "root"
    ids = make_run(root, name, files, 1)
    fac = _mirror(tmp_path, root) if output == "mirror" else facility(tmp_path, root)
    try:
        fac.scan_tick()
        finish(fac, take(fac))
    except BaseException:
        fac.close()
        raise
    return root, ids, fac


@pytest.mark.parametrize("where", ["same sample", "another group"])
def test_a_run_copied_under_another_name_is_not_basecalled_again(tmp_path, where):
    """`cp -r RUN RUN_copy` (or into another protocol group under a new name): the same-name
    check does not see it, and it used to be a new run, every read basecalled twice. Its
    files' POD5 identities are known in the original: they are DUPLICATE, each naming the
    run and file where it is basecalled, and the copy's batches are none."""
    root, ids, fac = _one_batch_done(tmp_path, 3)
    try:
        copy_rel = (f"{GROUP}/{SAMPLE}/{NAME}_copy" if where == "same sample"
                    else f"other_group/{SAMPLE}/copied_run")
        shutil.copytree(root / GROUP / SAMPLE / NAME, root / copy_rel)
        fac.scan_tick()
        view = runs(fac)
        copy = next(r for r in view.values() if r["rel"] == copy_rel)
        assert copy["files"]["DUPLICATE"] == 3 and copy["files"]["PENDING"] == 0, copy
        dups = _duplicates(fac, copy["run_id"])
        assert all(NAME in d["reason"] for d in dups), dups
        assert drain(fac) == [NAME, NAME]
    finally:
        fac.close()
    assert_each_read_once(tmp_path / "out", ids)


def test_a_run_copied_with_its_beside_output_is_not_basecalled_again(tmp_path):
    """With `beside` output the copy brings the original's journal and bcorch_run.json:
    its finished files are known from the journal, and the rest are DUPLICATE of the
    original's (they used to be basecalled in both runs)."""
    root, _, fac = _one_batch_done(tmp_path, 3, "beside")
    try:
        shutil.copytree(root / GROUP / SAMPLE / NAME, root / GROUP / SAMPLE / "backup_run")
        fac.scan_tick()
        view = runs(fac)
        copy = next(r for r in view.values() if r["rel"].endswith("/backup_run"))
        assert copy["run_id"] != NAME
        assert copy["files"]["PENDING"] == 0, copy
        assert drain(fac) == [NAME, NAME]
    finally:
        fac.close()
    copied_out = root / GROUP / SAMPLE / "backup_run" / "basecalls"
    assert len(reads_in(copied_out)) == 2   # the copied FASTQ of the one batch done before


def test_a_run_nested_inside_another_run_is_basecalled_once(tmp_path):
    """A run directory copied into another run's directory (a backup put in the wrong
    place): the outer run's scanner finds the nested files, which used to be basecalled in
    both runs. They are DUPLICATE of the run where they are basecalled."""
    root = tmp_path / "root"
    outer = "20261126_1300_P2S-02-A_FLOW002_abcd0002"
    ids = make_run(root, NAME, 2, 1) | make_run(root, outer, 1, 2)
    fac = _mirror(tmp_path, root)
    try:
        fac.scan_tick()
        shutil.copytree(root / GROUP / SAMPLE / NAME,
                        root / GROUP / SAMPLE / outer / "pod5" / "old" / NAME)
        fac.scan_tick()
        view = runs(fac)
        assert view[outer]["files"]["DUPLICATE"] == 2, view[outer]
        assert view[outer]["files"]["PENDING"] == 1, view[outer]
        assert sorted(drain(fac)) == sorted([NAME, NAME, outer])
    finally:
        fac.close()
    assert_each_read_once(tmp_path / "out", ids)


def test_a_copy_of_a_complete_run_found_after_a_new_state_directory_is_not_basecalled(tmp_path):
    """The original completed and the manager moved to another host (a new state
    directory): the copy appears afterwards. The original's identities come back from its
    journal, so the copy's files are still DUPLICATE."""
    root = tmp_path / "root"
    ids = make_run(root, NAME, 2, 1)
    fac = _mirror(tmp_path, root)
    try:
        basecall_and_close(fac, NAME)
    finally:
        fac.close()
    shutil.copytree(root / GROUP / SAMPLE / NAME, root / GROUP / SAMPLE / "copied_later")
    elsewhere = _mirror(tmp_path, root, "other_host")
    try:
        elsewhere.scan_tick()
        view = runs(elsewhere)
        assert view["copied_later"]["files"]["DUPLICATE"] == 2, view["copied_later"]
        assert drain(elsewhere) == []
    finally:
        elsewhere.close()
    assert_each_read_once(tmp_path / "out", ids)


def test_a_new_state_directory_keeps_a_pause_and_the_gpu_seconds(tmp_path):
    """Issue 11: progress survives the loss of the database. A paused run stayed paused
    only in the facility database: on a new state directory it was served again, and the
    GPU seconds of an unfinished run were lost from its view and its summary. Both are in
    bcorch_run.json beside its output now."""
    root, _, fac = _one_batch_done(tmp_path, 3, "beside")
    try:
        fac.command(NAME, RunEvent.PAUSE)
        served = runs(fac)[NAME]["served_s"]
        assert served > 0
        record = json.loads((Path(fac._runs[NAME].row.output_dir) / "bcorch_run.json")
                            .read_text())
    finally:
        fac.close()
    assert record["paused"] is True and record["gpu_s"] == pytest.approx(served, abs=1e-3)
    elsewhere = facility(tmp_path / "other_host", root)
    try:
        elsewhere.scan_tick()
        view = runs(elsewhere)[NAME]
        assert view["state"] == "PAUSED", view
        assert view["served_s"] == pytest.approx(served, abs=1e-3), view
        assert take(elsewhere)["batch_size"] == 0
        elsewhere.command(NAME, RunEvent.RESUME)
        assert drain(elsewhere) == [NAME, NAME]
        elsewhere.command(NAME, RunEvent.CLOSE)
        elsewhere.scan_tick()
        summary = json.loads((Path(elsewhere._runs[NAME].row.output_dir)
                              / "bcorch_summary.json").read_text())
        assert summary["gpu_s"] >= served
        assert summary["first_batch_at"] is not None
    finally:
        elsewhere.close()


def test_a_batch_failed_after_its_missing_run_directory_came_back_counts_no_attempt(tmp_path):
    """A flapping mount: the run's directory vanishes while a batch is out (a scan sees it
    missing) and is back by the time the engine reports the batch FAILED. The failure was
    the mount's, not the files': no attempt is counted (four such used to QUARANTINE the
    file for good)."""
    root = tmp_path / "root"
    ids = make_run(root, "run1", 1, 1)
    run_path = root / GROUP / SAMPLE / "run1"
    away = tmp_path / "away"
    fac = facility(tmp_path, root)
    try:
        for batch in batches_out_while_away(fac, run_path, away):
            fac.scan_tick()
            assert runs(fac)["run1"]["reason"].startswith("its directory is missing")
            os.rename(away, run_path)
            fac.scan_tick()
            report_unreadable(fac, batch)
            job = fac._runs["run1"].part.store.job(batch["jobid"])
            assert job.state.value == "STOPPED", job
        view = runs(fac)["run1"]
        assert view["files"]["QUARANTINED"] == 0, view
        assert drain(fac) == ["run1"]
    finally:
        fac.close()
    assert_each_read_once(root, ids)


@pytest.mark.parametrize("output", ["beside", "mirror"])
def test_a_run_folder_renamed_mid_run_is_a_new_run_that_redoes_nothing_and_loses_nothing(
        tmp_path, output):
    """Renaming the run folder itself (`mv run1 run1_redo`) makes a new run; its files'
    identities are known in the old run (now missing). What the old run basecalled is
    DUPLICATE in the new one (with `mirror` output it used to be basecalled again); what it
    had not is the new run's to basecall (not DUPLICATE of a run that can no longer read
    it, which would lose it)."""
    root, ids, fac = _one_batch_done(tmp_path, 3, output, "run1")
    out = tmp_path / "out"
    try:
        (root / GROUP / SAMPLE / "run1").rename(root / GROUP / SAMPLE / "run1_redo")
        fac.scan_tick()
        view = runs(fac)
        assert view["run1"]["reason"].startswith("its directory is missing"), view["run1"]
        redo = next(r for r in view.values() if r["rel"].endswith("/run1_redo"))
        assert redo["files"]["PENDING"] == 2, redo
        assert drain(fac) == [redo["run_id"]] * 2
    finally:
        fac.close()
    assert_each_read_once(out if output == "mirror" else root, ids)


def test_a_copy_quarantined_while_incomplete_is_not_basecalled_once_complete(tmp_path):
    """A copy into another run that stayed incomplete past the grace (a `cp` stalled) is
    QUARANTINED; when it is completed it is examined again. It is the other run's file:
    it must not go back to PENDING (and be basecalled a second time)."""
    root = tmp_path / "root"
    ids = make_run(root, NAME, 1, 1) | make_run(root, "run2", 1, 2)
    cfg = ManagerConfig(watch_root=str(root), settle_s=0.0, report_back_interval=3600.0,
                        incomplete_grace_s=0.0, db=str(tmp_path / "state" / "facility.sqlite"))
    fac = Facility(cfg, FacilityConfig(output="mirror", output_root=str(tmp_path / "out")))
    original = root / GROUP / SAMPLE / NAME / "pod5" / "f00.pod5"
    copy = root / GROUP / SAMPLE / "run2" / "pod5" / "copied.pod5"
    try:
        fac.scan_tick()
        copy.write_bytes(original.read_bytes()[:100])
        fac.scan_tick()
        fac.scan_tick()
        assert runs(fac)["run2"]["files"]["QUARANTINED"] == 1, runs(fac)["run2"]
        shutil.copyfile(original, copy)
        os.utime(copy, (1, 1))   # a change the scanner sees whatever the clock's grain
        fac.scan_tick()
        fac.scan_tick()
        assert runs(fac)["run2"]["files"]["PENDING"] == 1, runs(fac)["run2"]   # its own file
        assert sorted(drain(fac)) == sorted([NAME, "run2"])
    finally:
        fac.close()
    assert_each_read_once(tmp_path / "out", ids)


def test_a_same_name_copy_resumed_basecalls_only_files_of_its_own(tmp_path):
    """A copy QUARANTINED for its MinKNOW name and then resumed by an operator used to be
    basecalled whole (every read twice). Resumed, it is served: the original's files are
    DUPLICATE naming it, a file added to the copy alone is basecalled."""
    root, ids, fac = _one_batch_done(tmp_path, 2)
    try:
        shutil.copytree(root / GROUP / SAMPLE / NAME, root / GROUP / "backup" / NAME)
        fac.scan_tick()
        copy = next(r for r in runs(fac).values() if r["rel"] == f"{GROUP}/backup/{NAME}")
        assert copy["state"] == "QUARANTINED", copy
        own = root / GROUP / "backup" / NAME / "pod5" / "own.pod5"
        ids |= set(write_pod5(own, 2, 200, random.Random(77)))
        fac.command(copy["run_id"], RunEvent.RESUME)
        fac.scan_tick()
        view = runs(fac)[copy["run_id"]]
        assert view["files"]["DUPLICATE"] == 2 and view["files"]["PENDING"] == 1, view
        assert sorted(drain(fac)) == sorted([NAME, copy["run_id"]])
    finally:
        fac.close()
    assert_each_read_once(tmp_path / "out", ids)


def test_a_batch_failed_while_its_files_are_missing_counts_no_attempt(tmp_path, monkeypatch):
    """A flapping mount of the run's pod5 folder alone (its own mount point, or a link
    farm re-made): the run's directory is there, its files are not, and the engine reports
    FAILED. A file that is not there says nothing about itself: while the input is open no
    attempt is counted (four such used to QUARANTINE it for good, as it came back
    unchanged)."""
    root = tmp_path / "root"
    ids = make_run(root, "run1", 1, 1)
    fac = facility(tmp_path, root)
    ahead = 0.0
    try:
        for batch in batches_out_while_away(fac, root / GROUP / SAMPLE / "run1" / "pod5",
                                            tmp_path / "away"):
            report_unreadable(fac, batch)
            files = fac._runs["run1"].part.store.files_in_state(FileState.QUARANTINED, 10)
            assert files == [], files
            ahead += 3600.0   # past the file's retry back-off
            monkeypatch.setattr(store_mod, "retry_clock", lambda a=ahead: time.time() + a)
        assert drain(fac) == ["run1"]
    finally:
        fac.close()
    assert_each_read_once(root, ids)


@pytest.mark.slow
def test_a_manager_killed_and_started_on_another_host_keeps_the_pause_and_gpu_time(
        procs, tmp_path):
    """Real `bcmanager --watch-root` processes: the first, with its state directory on
    host 1, basecalls a batch of a run that is then paused, and is killed (`kill -9`).
    The second starts with a new state directory (host 2) on the same root: the run is
    still PAUSED with its GPU seconds; resumed and closed, it completes and its summary
    counts the GPU time from both hosts; every read once."""
    root = tmp_path / "root"
    root.mkdir()
    run, ids = fac_make_run(root, 1, 3)
    first = started(procs, tmp_path, root,
                    manager={"db": str(tmp_path / "host1" / "facility.sqlite")})
    wait_runs(first, lambda r: pending(r, run) == 3, "run found")
    done(first, fac_assign(first, size=1))
    code, body = first.post("/runs/pause", {"run": run})
    assert code == 200 and body["run"]["state"] == "PAUSED", body
    served = first.runs()[run]["served_s"]
    assert served > 0
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=30)
    second = started(procs, tmp_path, root,
                     manager={"db": str(tmp_path / "host2" / "facility.sqlite")})
    view = wait_runs(second, lambda r: r.get(run, {}).get("files", {}).get("DONE") == 1,
                     "run found again")[run]
    assert view["state"] == "PAUSED" and view["served_s"] == pytest.approx(served, abs=1e-3)
    assert fac_assign(second)["batch_size"] == 0
    for command in ("resume", "close"):
        code, body = second.post(f"/runs/{command}", {"run": run})
        assert code == 200, body
    fac_drain(second)
    wait_runs(second, lambda r: r[run]["state"] == "COMPLETE", "run complete")
    summary = json.loads((root / GROUP_E2E / SAMPLE_E2E / run / "basecalls"
                          / "bcorch_summary.json").read_text())
    assert summary["gpu_s"] > served and summary["files_done"] == 3
    reads = [rid for rid, _ in output_reads(root / GROUP_E2E / SAMPLE_E2E / run / "basecalls")]
    assert sorted(reads) == sorted(ids)


def _cancel_and_copy_into_redo(fac: Facility, root: Path) -> dict:
    """Cancel run NAME, copy its POD5 files into a new run "redo", scan: redo's view."""
    fac.command(NAME, RunEvent.CANCEL)
    shutil.copytree(root / GROUP / SAMPLE / NAME / "pod5", root / GROUP / SAMPLE / "redo" / "pod5")
    fac.scan_tick()
    return runs(fac)["redo"]


def test_files_of_a_cancelled_run_copied_into_a_new_run_are_basecalled_there(tmp_path):
    """The documented way to change a started run's settings: cancel it and copy its POD5
    files into a new run directory. What the cancelled run basecalled is DUPLICATE there;
    the rest is basecalled in the new run (not DUPLICATE of a run that will never
    basecall it)."""
    root, ids, fac = _one_batch_done(tmp_path, 3)
    try:
        view = _cancel_and_copy_into_redo(fac, root)
        assert view["files"]["DUPLICATE"] == 1 and view["files"]["PENDING"] == 2, view
        assert drain(fac) == ["redo", "redo"]
    finally:
        fac.close()
    assert_each_read_once(tmp_path / "out", ids)


def test_a_file_a_cancelled_run_still_has_out_is_not_basecalled_in_the_copy(tmp_path):
    """A cancelled run finishes the batches it had out: a copy of a file in one of them is
    DUPLICATE in the new run, as a file it basecalled is; only the rest is basecalled there."""
    root, ids, fac = _one_batch_done(tmp_path, 3)
    try:
        out = take(fac)
        assert out["batch_size"] == 1 and out["run_id"] == NAME, out
        view = _cancel_and_copy_into_redo(fac, root)
        assert view["files"]["DUPLICATE"] == 2 and view["files"]["PENDING"] == 1, view
        finish(fac, out)
        assert drain(fac) == ["redo"]
    finally:
        fac.close()
    assert_each_read_once(tmp_path / "out", ids)


def test_a_settled_run_whose_journal_cannot_be_read_is_still_found(tmp_path):
    """On a new state directory a settled run's journal is read for its file identities;
    one that is not a regular file (here a directory) only leaves them out of the index:
    the run is still found from its summary and the scan goes on."""
    root = tmp_path / "root"
    make_run(root, NAME, 1, 1)
    fac = _mirror(tmp_path, root)
    try:
        fac.scan_tick()
        drain(fac)
        fac.command(NAME, RunEvent.CLOSE)
        fac.scan_tick()
        journal = Path(fac._runs[NAME].row.output_dir) / "bcmanager.journal"
    finally:
        fac.close()
    journal.unlink()
    journal.mkdir()
    elsewhere = _mirror(tmp_path, root, "other_host")
    try:
        elsewhere.scan_tick()
        assert runs(elsewhere)[NAME]["state"] == "COMPLETE"
    finally:
        elsewhere.close()


def _quarantined_before_its_first_batch(tmp_path: Path, files: int
                                        ) -> tuple[Path, Path, set[str], Facility]:
    """A run found and its files claimed, then QUARANTINED by a bad bcorch.toml before it
    basecalled anything: (root, the run's directory, read ids, the facility)."""
    root = tmp_path / "root"
    ids = make_run(root, NAME, files, 1)
    fac = _mirror(tmp_path, root)
    run = root / GROUP / SAMPLE / NAME
    try:
        fac.scan_tick()
        (run / "bcorch.toml").write_text('model = "sup"\n')   # not in a [run] table
        fac.scan_tick()
        assert runs(fac)[NAME]["state"] == "QUARANTINED", runs(fac)[NAME]
    except BaseException:
        fac.close()
        raise
    return root, run, ids, fac


def test_a_copy_of_a_quarantined_run_says_how_to_have_it_basecalled(tmp_path):
    """Copied out of a QUARANTINED run, a file is DUPLICATE of it (the run may be fixed and
    resumed); its reason tells the operator what to do, not that it was basecalled."""
    root, run, _, fac = _quarantined_before_its_first_batch(tmp_path, 1)
    try:
        shutil.copytree(run / "pod5", root / GROUP / SAMPLE / "redo" / "pod5")
        fac.scan_tick()
        [dup] = _duplicates(fac, "redo")
        assert f"run {NAME}" in dup["reason"] and "QUARANTINED" in dup["reason"], dup
        assert "bcorch.toml" in dup["reason"] and f"bcmanager run resume {NAME}" in \
            dup["reason"] and f"bcmanager run cancel {NAME}" in dup["reason"], dup
        assert "not again" not in dup["reason"], dup
    finally:
        fac.close()


@pytest.mark.parametrize("order", ["cancel, then copy", "copy, then cancel"])
def test_files_of_a_cancelled_quarantined_run_are_basecalled_in_the_copy(tmp_path, order):
    """docs/facility.md: a QUARANTINED run never fixed is cancelled and its files copied
    into a new run, which basecalls them; also when the copy was made first (its files
    DUPLICATE of the quarantined run until the cancel releases them)."""
    root, run, ids, fac = _quarantined_before_its_first_batch(tmp_path, 3)
    try:
        if order == "cancel, then copy":
            fac.command(NAME, RunEvent.CANCEL)
        shutil.copytree(run / "pod5", root / GROUP / SAMPLE / "redo" / "pod5")
        fac.scan_tick()
        if order == "copy, then cancel":
            assert runs(fac)["redo"]["files"]["DUPLICATE"] == 3, runs(fac)["redo"]
            fac.command(NAME, RunEvent.CANCEL)
        view = runs(fac)["redo"]
        assert view["files"]["PENDING"] == 3 and view["files"]["DUPLICATE"] == 0, view
        assert drain(fac) == ["redo"] * 3
        shutil.copytree(run / "pod5", root / GROUP / SAMPLE / "third" / "pod5")
        fac.scan_tick()   # a third copy: DUPLICATE of redo, where they were basecalled
        assert runs(fac)["third"]["files"]["DUPLICATE"] == 3, runs(fac)["third"]
        assert drain(fac) == []
    finally:
        fac.close()
    assert_each_read_once(tmp_path / "out", ids)


def test_a_quarantined_run_fixed_and_resumed_basecalls_its_files_once(tmp_path):
    """The other documented way: fix the run's bcorch.toml and resume it. A copy made
    meanwhile stays DUPLICATE: each read is basecalled once, in the original run."""
    root, run, ids, fac = _quarantined_before_its_first_batch(tmp_path, 2)
    try:
        shutil.copytree(run / "pod5", root / GROUP / SAMPLE / "redo" / "pod5")
        fac.scan_tick()
        (run / "bcorch.toml").write_text('[run]\nmodel = "sup"\n')
        fac.command(NAME, RunEvent.RESUME)
        fac.scan_tick()
        assert runs(fac)[NAME]["state"] == "ACTIVE", runs(fac)[NAME]
        assert drain(fac) == [NAME] * 2
        assert runs(fac)["redo"]["files"]["DUPLICATE"] == 2, runs(fac)["redo"]
    finally:
        fac.close()
    assert_each_read_once(tmp_path / "out", ids)
