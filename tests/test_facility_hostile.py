"""Facility mode tried the way a careless or hostile facility user would (issue 13, with
issue 11's promise per run): every read basecalled once, in its run's output, and one run's
trouble never stops the others.

An in-process Facility on real directories, real POD5 files and real SQLite; the test plays
the engine (reads through the batch's run directories, writes FASTQ, completes the job).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from bcorch.config import FacilityConfig, FacilityRule, ManagerConfig
from bcorch.manager.facility import Facility
from bcorch.manager.facility_states import RunEvent, RunState
from bcorch.orchestrator.pod5_dataset import write_pod5
from bcorch.protocol import JobState
from test_facility import basecall, started, wait_runs

GROUP, SAMPLE = "proto", "sample"


def make_run(root: Path, name: str, files: int, seed: int, *, sample: str = SAMPLE) -> set[str]:
    """A run directory root/GROUP/sample/name/pod5 with `files` POD5 files: its read ids."""
    pod5 = root / GROUP / sample / name / "pod5"
    pod5.mkdir(parents=True, exist_ok=True)
    ids: set[str] = set()
    for i in range(files):
        tmp = pod5 / f"f{i:02d}.pod5.tmp"
        ids.update(write_pod5(tmp, 2, 200, random.Random(seed * 1000 + i)))
        os.rename(tmp, pod5 / f"f{i:02d}.pod5")
    return ids


def facility(tmp: Path, root: Path, **fcfg) -> Facility:
    cfg = ManagerConfig(watch_root=str(root), settle_s=0.0, report_back_interval=3600.0,
                        db=str(tmp / "state" / "facility.sqlite"))
    return Facility(cfg, FacilityConfig(**fcfg))


def take(fac: Facility, size: int = 1) -> dict:
    answer = fac.assign("gpu0", size)
    assert answer.status == 200, answer.body
    return answer.body


def finish(fac: Facility, batch: dict) -> None:
    basecall(None, batch)
    answer = fac.complete(batch["jobid"], JobState.DONE, {}, "", engine_id="gpu0")
    assert answer.status == 200 and answer.body.get("ok"), answer.body


def drain(fac: Facility, limit: int = 100) -> list[str]:
    """Take and finish 1-file batches until none is left: the run ids served."""
    served = []
    for _ in range(limit):
        batch = take(fac)
        if not batch["batch_size"]:
            return served
        finish(fac, batch)
        served.append(batch["run_id"])
    raise AssertionError("never ran dry")


def reads_in(base: Path) -> collections.Counter:
    """How often each read id appears in the merged FASTQ (*/pass/*.fastq) under base."""
    counts: collections.Counter = collections.Counter()
    for fq in base.rglob("*.fastq"):
        if fq.parent.name == "pass":
            counts.update(line[1:].split()[0] for line in fq.read_text().splitlines()[::4])
    return counts


def runs(fac: Facility) -> dict[str, dict]:
    return {r["run_id"]: r for r in fac.runs()}


def basecall_and_close(fac: Facility, name: str) -> None:
    """Scan, basecall all of run `name` and close it: it is COMPLETE."""
    fac.scan_tick()
    drain(fac)
    fac.command(name, RunEvent.CLOSE)
    fac.scan_tick()
    assert fac._runs[name].state is RunState.COMPLETE


def assert_each_read_once(base: Path, ids: set[str]) -> None:
    """Every read of `ids`, and no other, is in the FASTQ under base exactly once."""
    counts = reads_in(base)
    assert set(counts) == ids and set(counts.values()) == {1}, counts


def report_unreadable(fac: Facility, batch: dict) -> None:
    """The engine reports `batch` FAILED: it could not open the POD5 files."""
    answer = fac.complete(batch["jobid"], JobState.FAILED, {}, "cannot open the POD5 files",
                          engine_id="gpu0")
    assert answer.status == 200, answer.body


def batches_out_while_away(fac: Facility, path: Path, away: Path, rounds: int = 4):
    """A flapping mount, `rounds` times: scan, take the run's one-file batch, move `path` to
    `away` and yield the batch; `path` is moved back after the round unless the round did."""
    for _ in range(rounds):
        fac.scan_tick()
        batch = take(fac)
        assert batch["batch_size"] == 1, runs(fac)
        os.rename(path, away)
        yield batch
        if not path.exists():
            os.rename(away, path)


def test_a_run_directory_that_vanishes_does_not_stop_the_other_runs(tmp_path):
    """A run's directory deleted, moved out of the root or unmounted while it has files
    left: the other runs are still served (it used to answer every /assignwork 503, for
    good, as fair share kept picking the starved run), it says its directory is missing,
    and once back it is served again: every read once."""
    root = tmp_path / "root"
    gone = make_run(root, "run_gone", 4, 1)
    stays = make_run(root, "run_stays", 4, 2)
    fac = facility(tmp_path, root)
    try:
        fac.scan_tick()
        finish(fac, take(fac))
        away = tmp_path / "away"
        os.rename(root / GROUP / SAMPLE / "run_gone", away)
        fac.scan_tick()

        served = drain(fac)
        assert served.count("run_stays") >= 3 and "run_gone" not in served, served
        view = runs(fac)
        assert view["run_stays"]["files"]["DONE"] == 4
        assert "missing" in view["run_gone"]["reason"], view["run_gone"]
        assert view["run_gone"]["state"] == "ACTIVE" and not fac.nothing_left()

        os.rename(away, root / GROUP / SAMPLE / "run_gone")
        fac.scan_tick()
        drain(fac)
        view = runs(fac)
        assert view["run_gone"]["files"]["DONE"] == 4 and view["run_gone"]["reason"] == ""
        assert set(view) == {"run_gone", "run_stays"}
    finally:
        fac.close()
    assert_each_read_once(root, gone | stays)


def test_assigning_skips_a_run_whose_directory_vanished_since_the_last_scan(tmp_path):
    """Between two scans the facility does not know yet: the batch it cannot prepare is
    withdrawn and the next run is asked, instead of a 503 to the engine."""
    root = tmp_path / "root"
    make_run(root, "run_a", 3, 1)
    make_run(root, "run_b", 3, 2)
    fac = facility(tmp_path, root)
    try:
        fac.scan_tick()
        first = take(fac)
        other = "run_b" if first["run_id"] == "run_a" else "run_a"
        shutil.rmtree(root / GROUP / SAMPLE / other)
        for _ in range(2):
            batch = take(fac)
            assert batch["batch_size"] == 1 and batch["run_id"] == first["run_id"], batch
            finish(fac, batch)
        finish(fac, first)
        assert take(fac)["batch_size"] == 0
        assert "missing" in runs(fac)[other]["reason"]
    finally:
        fac.close()


@pytest.mark.parametrize("output", ["beside", "mirror"])
def test_a_run_moved_to_another_sample_mid_run_keeps_its_id_and_nothing_is_redone(
        tmp_path, output):
    """A run directory moved within the root (its sample folder renamed) while a batch of
    it is out: it stays the same run (id, store, output), the batch still completes, and
    no read is basecalled twice (mirror output used to start it over as a new run)."""
    root = tmp_path / "root"
    out = tmp_path / "out"
    ids = make_run(root, "20261126_1200_P2S-01-A_FLOW001_abcd0001", 4, 1)
    fac = facility(tmp_path, root, output=output, output_root=str(out))
    run_id = "20261126_1200_P2S-01-A_FLOW001_abcd0001"
    try:
        fac.scan_tick()
        finish(fac, take(fac))
        out_job = take(fac)
        (root / GROUP / SAMPLE).rename(root / GROUP / "sample_renamed")
        fac.scan_tick()
        fac.scan_tick()
        view = runs(fac)
        assert set(view) == {run_id}, view
        assert view[run_id]["rel"] == f"{GROUP}/sample_renamed/{run_id}"
        out_job["run_input_dir"] = view[run_id]["rel"]   # the engine finds it where it is now
        if output == "beside":
            out_job["run_output_dir"] = view[run_id]["rel"] + "/basecalls"
        finish(fac, out_job)
        served = drain(fac)
        assert served == [run_id, run_id], served
        fac.command(run_id, RunEvent.CLOSE)
        fac.scan_tick()
        assert fac._runs[run_id].state is RunState.COMPLETE
        assert runs(fac)[run_id]["files"]["DONE"] == 4
    finally:
        fac.close()
    assert_each_read_once(tmp_path, ids)


def test_a_run_whose_last_outputs_could_not_be_moved_is_not_settled_until_they_are(tmp_path):
    """The last batch of a closed run is DONE but its FASTQ cannot be moved into the run's
    output (here `pass` is a file, as a careless operator or a full disk makes it): the run
    must not be summarised and retired then (its part, which retries the move, used to be
    closed and never opened again: the reads never reached the output). It settles once
    the move is done, with every read in pass/ once."""
    root = tmp_path / "root"
    ids = make_run(root, "run1", 2, 1)
    fac = facility(tmp_path, root)
    try:
        fac.scan_tick()
        batch = take(fac, 2)
        fac.command("run1", RunEvent.CLOSE)
        out = Path(fac._runs["run1"].row.output_dir)
        shutil.rmtree(out / "pass", ignore_errors=True)
        (out / "pass").write_text("not a directory")
        finish(fac, batch)
        fac.reap()
        fac.scan_tick()
        assert fac._runs["run1"].state is RunState.CLOSED
        assert not (out / "bcorch_summary.json").exists()

        (out / "pass").unlink()
        fac.reap()
        fac.scan_tick()
        assert fac._runs["run1"].state is RunState.COMPLETE
        assert fac._runs["run1"].part is None
    finally:
        fac.close()
    assert_each_read_once(root, ids)


def test_a_run_reachable_twice_through_symlinks_is_one_run(tmp_path, caplog):
    """A run directory linked under another name, a sample folder linked into another
    group, and a link back to the root (a loop): the run is found once, under its real
    path, and each read basecalled once (each name used to be a run of its own: every read
    four times, two of them sharing one output directory). Also after a restart."""
    root = tmp_path / "root"
    ids = make_run(root, "run_real", 2, 1)
    sample = root / GROUP / SAMPLE
    os.symlink(sample / "run_real", sample / "run_a_link")   # sorts before the real one
    (root / "group2").mkdir()
    os.symlink(sample, root / "group2" / SAMPLE)
    os.symlink(root, root / "loop")
    fac = facility(tmp_path, root)
    try:
        with caplog.at_level(logging.WARNING, logger="bcmanager.facility"):
            fac.scan_tick()
            fac.scan_tick()
        assert set(runs(fac)) == {"run_real"}, runs(fac)
        assert fac._runs["run_real"].row.rel == f"{GROUP}/{SAMPLE}/run_real"
        said = [r.getMessage() for r in caplog.records if "symlink" in r.getMessage()]
        assert len(said) == 3 and all("as run run_real" in line for line in said), said
        assert drain(fac) == ["run_real", "run_real"]
    finally:
        fac.close()
    again = facility(tmp_path, root)
    try:
        again.scan_tick()
        assert set(runs(again)) == {"run_real"}
        assert take(again)["batch_size"] == 0
    finally:
        again.close()
    assert_each_read_once(root / GROUP / SAMPLE / "run_real", ids)


def test_a_restart_while_the_watch_root_is_not_mounted_hands_out_nothing_and_loses_nothing(
        tmp_path):
    """The manager restarts while the shared filesystem is not mounted yet (the root is an
    empty mount point): no run's directory is re-created on the mount point and no batch
    of files that are not there is handed out (each failed, and after three attempts the
    files were QUARANTINED for good: their reads lost). Once mounted, every read once."""
    root = tmp_path / "root"
    ids = make_run(root, "run1", 3, 1) | make_run(root, "run2", 3, 2)
    fac = facility(tmp_path, root)
    try:
        fac.scan_tick()
        finish(fac, take(fac))
    finally:
        fac.close()
    mounted = tmp_path / "mounted"
    os.rename(root, mounted)
    root.mkdir()

    again = facility(tmp_path, root)
    try:
        again.scan_tick()
        again.reap()
        for _ in range(4):
            batch = take(again)
            assert batch["batch_size"] == 0, batch
        assert all("missing" in r["reason"] for r in runs(again).values()), runs(again)
        assert os.listdir(root) == []

        root.rmdir()
        os.rename(mounted, root)
        again.scan_tick()
        assert len(drain(again)) == 5
        assert all(r["files"]["DONE"] == 3 and r["reason"] == "" for r in runs(again).values())
    finally:
        again.close()
    assert_each_read_once(root, ids)


def test_a_run_whose_pod5_folder_is_a_symlink_is_quarantined_not_silently_empty(tmp_path):
    """A run's `pod5` folder linked to another directory (another run's, or another disk):
    the run's scanner does not follow links, so the run was served with no file at all and
    would have closed COMPLETE with none basecalled, saying nothing. It is QUARANTINED with
    a reason naming the link; the run it points to is served once."""
    root = tmp_path / "root"
    ids = make_run(root, "run_real", 2, 1)
    linked = root / GROUP / SAMPLE / "run_linked"
    linked.mkdir(parents=True)
    os.symlink(root / GROUP / SAMPLE / "run_real" / "pod5", linked / "pod5")
    fac = facility(tmp_path, root)
    try:
        fac.scan_tick()
        view = runs(fac)
        assert view["run_linked"]["state"] == "QUARANTINED", view["run_linked"]
        assert "pod5" in view["run_linked"]["reason"] and "link" in view["run_linked"]["reason"]
        assert drain(fac) == ["run_real", "run_real"]
    finally:
        fac.close()
    assert_each_read_once(root, ids)


def test_a_bcorch_toml_written_after_the_run_was_found_is_used_until_its_first_batch(
        tmp_path, caplog):
    """MinKNOW makes the run directory, the operator drops bcorch.toml in a little later.
    Before the run's first batch it is read again (the whole run gets the model asked for:
    it used to be basecalled with the default, silently). After that, a change is not
    applied (the run is basecalled with one model, never a mix) and not ignored silently:
    one warning naming the model kept; a new priority is taken."""
    root = tmp_path / "root"
    make_run(root, "run1", 3, 1)
    toml = root / GROUP / SAMPLE / "run1" / "bcorch.toml"
    fac = facility(tmp_path, root)
    try:
        fac.scan_tick()
        toml.write_text('[run]\nmodel = "sup"\n')
        fac.scan_tick()
        first = take(fac)
        assert first["model"] == "sup", first
        finish(fac, first)

        toml.write_text('[run]\nmodel = "fast"\npriority = 3\n')
        os.utime(toml, ns=(1, 1))   # a change even on a coarse-grained clock
        with caplog.at_level(logging.WARNING, logger="bcmanager.facility"):
            fac.scan_tick()
            fac.scan_tick()
        assert [b["model"] for b in (take(fac), take(fac))] == ["sup", "sup"]
        said = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and "bcorch.toml" in r.getMessage()]
        assert len(said) == 1 and "sup" in said[0], said
        assert runs(fac)["run1"]["model"] == "sup" and runs(fac)["run1"]["priority"] == 3.0
    finally:
        fac.close()


def test_a_bcorch_toml_broken_before_the_first_batch_quarantines_the_run(tmp_path):
    root = tmp_path / "root"
    make_run(root, "run1", 1, 1)
    fac = facility(tmp_path, root)
    try:
        fac.scan_tick()
        (root / GROUP / SAMPLE / "run1" / "bcorch.toml").write_text('[run]\nmodel = "-x"\n')
        fac.scan_tick()
        view = runs(fac)["run1"]
        assert view["state"] == "QUARANTINED" and "run.model" in view["reason"], view
        assert take(fac)["batch_size"] == 0
    finally:
        fac.close()


def _kill(fac) -> None:
    fac.proc.send_signal(signal.SIGKILL)
    fac.proc.wait(timeout=30)


def _answers(fac, route: str, **params) -> dict | None:
    """The manager's answer, or None when it was killed meanwhile."""
    try:
        code, body = fac.get(route, **params) if route != "/completed" else \
            fac.post(route, params)
    except OSError:
        return None
    return body if code == 200 else None


@pytest.mark.slow
def test_kill_9_just_after_discovery_and_while_runs_settle_keeps_every_read_once(procs, tmp_path):
    """A real `bcmanager --watch-root`, killed with SIGKILL a random few milliseconds after
    a run appears (while it is being recorded and its part opened) and after a run is
    closed (while its summary is written and the run retired), then restarted on the same
    databases, eight times: every run is found once, completes once with a summary that
    counts all its files, and every read is in its run's output exactly once."""
    root = tmp_path / "root"
    root.mkdir()
    rng = random.Random(13)
    fac = started(procs, tmp_path, root, manager={"report_back_interval": 60})
    expected: dict[str, set[str]] = {}
    staged = tmp_path / "staged"
    (root / GROUP / SAMPLE).mkdir(parents=True)
    for n in range(1, 9):
        name = f"20261126_1{n:03d}_P2S-0{n}-A_FLOW{n:03d}_abcd{n:04d}"
        expected[name] = make_run(staged, name, 3, n)
        os.rename(staged / GROUP / SAMPLE / name, root / GROUP / SAMPLE / name)   # appears whole
        time.sleep(rng.uniform(0, 0.25))   # not a wait: the kill's random point in discovery
        _kill(fac)
        fac = fac.start()
        wait_runs(fac, lambda r, name=name: r.get(name, {}).get("files", {}).get("PENDING")
                  == 3, f"{name} found with its 3 files")
        for _ in range(3):
            batch = _answers(fac, "/assignwork", engineid="gpu0", batchsize=1)
            assert batch and batch["batch_size"] == 1, batch
            basecall(None, batch)
            assert _answers(fac, "/completed", job_id=batch["jobid"], job_state="DONE")
        assert fac.post("/runs/close", {"run": name})[0] == 200
        time.sleep(rng.uniform(0, 0.25))   # ... and of its settling and retirement
        _kill(fac)
        fac = fac.start()
        wait_runs(fac, lambda r, name=name: r[name]["state"] == "COMPLETE", f"{name} COMPLETE")

    view = fac.runs()
    assert set(view) == set(expected), view
    for name, run in view.items():
        assert run["state"] == "COMPLETE" and run["files"]["DONE"] == 3, run
        summary = json.loads((root / GROUP / SAMPLE / name / "basecalls" /
                              "bcorch_summary.json").read_text())
        assert summary["files_done"] == 3 and summary["state"] == "COMPLETE", summary
        counts = reads_in(root / GROUP / SAMPLE / name)
        assert set(counts) == expected[name] and set(counts.values()) == {1}, (name, counts)


def test_a_rule_changed_between_restarts_applies_to_new_runs_only(tmp_path):
    """The operator edits [[facility.rules]] and restarts: a run found before keeps the model
    it started with (recorded in the facility database); a run found after gets the rule."""
    root = tmp_path / "root"
    make_run(root, "run_old", 2, 1)
    fac = facility(tmp_path, root)
    try:
        fac.scan_tick()
        finish(fac, take(fac))
    finally:
        fac.close()
    make_run(root, "run_new", 1, 2)
    again = facility(tmp_path, root, rules=(FacilityRule(sample=SAMPLE, model="sup"),))
    try:
        again.scan_tick()
        models = {}
        for _ in range(2):
            batch = take(again)
            models[batch["run_id"]] = batch["model"]
            finish(again, batch)
        assert models == {"run_old": "hac", "run_new": "sup"}, models
    finally:
        again.close()


@pytest.mark.parametrize("name,run_id", [("-rf", "rf"), ("--help", "help"), ("- x", "x"),
                                         ("a b", "a_b"), ("ünï run", "n_run")])
def test_a_run_id_never_reads_as_a_command_line_option(tmp_path, name, run_id):
    """A run directory named "-rf" or "--help" got that id, which `bcmanager run pause ID`
    read as an option (a usage error, or help instead of the pause)."""
    from bcorch.manager.run_discovery import propose_run_id
    assert propose_run_id(name) == run_id
    root = tmp_path / "root"
    make_run(root, name, 1, 1)
    fac = facility(tmp_path, root)
    try:
        fac.scan_tick()
        assert set(runs(fac)) == {run_id}
        assert fac.command(run_id, RunEvent.PAUSE)["state"] == "PAUSED"
    finally:
        fac.close()


def test_a_new_run_named_like_a_deleted_one_is_not_taken_for_it_unless_minknow_named(tmp_path):
    """Moves are recognised by MinKNOW's unique run directory names only: a run called
    `run1` in another sample, after a `run1` was deleted, is a run of its own (its own id,
    store, settings and output), not the deleted one moved."""
    root = tmp_path / "root"
    make_run(root, "run1", 2, 1)
    fac = facility(tmp_path, root)
    try:
        fac.scan_tick()
        finish(fac, take(fac))
        shutil.rmtree(root / GROUP / SAMPLE / "run1")
        fac.scan_tick()
        ids = make_run(root, "run1", 2, 2, sample="other_sample")
        fac.scan_tick()
        view = runs(fac)
        assert set(view) == {"run1", "run1-2"}, view
        assert view["run1-2"]["rel"] == f"{GROUP}/other_sample/run1"
        assert drain(fac) == ["run1-2", "run1-2"]
    finally:
        fac.close()
    assert_each_read_once(root / GROUP / "other_sample" / "run1", ids)


def test_a_complete_run_moved_within_the_root_is_not_basecalled_again(tmp_path):
    """Finished runs reorganised under the root (a sample folder renamed): a COMPLETE run
    found at its new place is the same run, still COMPLETE (mirror output used to
    basecall all of it again as a new run)."""
    root = tmp_path / "root"
    out = tmp_path / "out"
    name = "20261126_1200_P2S-01-A_FLOW001_abcd0001"
    ids = make_run(root, name, 2, 1)
    fac = facility(tmp_path, root, output="mirror", output_root=str(out))
    try:
        basecall_and_close(fac, name)
        (root / GROUP / SAMPLE).rename(root / GROUP / "archived")
        fac.scan_tick()
        view = runs(fac)
        assert set(view) == {name} and view[name]["state"] == "COMPLETE", view
        assert view[name]["rel"] == f"{GROUP}/archived/{name}"
        assert take(fac)["batch_size"] == 0
    finally:
        fac.close()
    again = facility(tmp_path, root, output="mirror", output_root=str(out))
    try:
        again.scan_tick()
        assert set(runs(again)) == {name} and take(again)["batch_size"] == 0
    finally:
        again.close()
    assert_each_read_once(out, ids)


def test_batches_failed_while_their_run_directory_is_missing_count_no_attempt(tmp_path):
    """A flapping mount: each time a batch of the run is out its directory vanishes and the
    engine reports FAILED (it cannot read the files). That says nothing about the files: no
    attempt is counted (three such failures used to QUARANTINE them, for good: once back,
    unchanged, they were never looked at again)."""
    root = tmp_path / "root"
    ids = make_run(root, "run1", 1, 1)
    fac = facility(tmp_path, root)
    try:
        for batch in batches_out_while_away(fac, root / GROUP / SAMPLE / "run1",
                                            tmp_path / "away"):
            report_unreadable(fac, batch)
        fac.scan_tick()
        assert runs(fac)["run1"]["files"]["QUARANTINED"] == 0
        assert drain(fac) == ["run1"]
    finally:
        fac.close()
    assert_each_read_once(root, ids)


def test_a_new_state_directory_redoes_nothing_and_finishes_closed_runs(tmp_path):
    """The manager moves to another host (or its state directory is lost): a new facility
    database and new run stores. Each run is rebuilt from its journal beside its output, so
    nothing is basecalled again. A COMPLETE run is taken from its summary, not summarised
    again (that lost its GPU time and batch times); a run that was closed is closed again
    (its journal says so) and completes, rather than staying ACTIVE for ever with its input
    closed, so the facility can finish."""
    root = tmp_path / "root"
    settled = "20261126_1100_P2S-01-A_FLOW001_abcd0001"
    closed = "20261126_1200_P2S-02-A_FLOW002_abcd0002"
    open_run = "20261126_1300_P2S-03-A_FLOW003_abcd0003"
    ids = make_run(root, settled, 2, 1) | make_run(root, closed, 2, 2) | \
        make_run(root, open_run, 2, 3)
    fac = facility(tmp_path, root)
    try:
        fac.scan_tick()
        fac.command(closed, RunEvent.PAUSE)
        drain(fac)
        fac.command(settled, RunEvent.CLOSE)
        fac.command(closed, RunEvent.CLOSE)
        fac.scan_tick()
        assert fac._runs[settled].state is RunState.COMPLETE
        summary_path = Path(fac._runs[settled].row.output_dir) / "bcorch_summary.json"
        summary = summary_path.read_text()
        assert json.loads(summary)["gpu_s"] > 0
    finally:
        fac.close()
    elsewhere = facility(tmp_path / "other_host", root)
    try:
        elsewhere.scan_tick()
        elsewhere.scan_tick()
        view = runs(elsewhere)
        assert view[settled]["state"] == "COMPLETE" and elsewhere._runs[settled].part is None
        assert view[settled]["served_s"] == json.loads(summary)["gpu_s"]
        assert summary_path.read_text() == summary
        assert view[closed]["state"] == "PAUSED", view[closed]   # bcorch_run.json keeps it
        assert view[open_run]["state"] == "ACTIVE" and view[open_run]["files"]["DONE"] == 2
        assert elsewhere.command(closed, RunEvent.RESUME)["state"] == "CLOSED"
        assert drain(elsewhere) == [closed, closed]
        elsewhere.command(open_run, RunEvent.CLOSE)
        elsewhere.close_input("test")
        elsewhere.scan_tick()
        assert elsewhere.nothing_left()
        assert {r["state"] for r in runs(elsewhere).values()} == {"COMPLETE"}
    finally:
        elsewhere.close()
    assert_each_read_once(root, ids)


def test_a_new_state_directory_keeps_each_runs_model_and_its_cancel(tmp_path):
    """Settings and a cancel are recorded beside the run's output (bcorch_run.json): on a
    new state directory with the rules changed meanwhile, a half-done run keeps its model
    (it used to take the new rule's: a run basecalled with two models), and a cancelled
    run stays cancelled (its files used to be basecalled after all)."""
    root = tmp_path / "root"
    half = "20261126_1100_P2S-01-A_FLOW001_abcd0001"
    cancelled = "20261126_1200_P2S-02-A_FLOW002_abcd0002"
    make_run(root, half, 2, 1)
    make_run(root, cancelled, 2, 2)
    fac = facility(tmp_path, root, rules=(FacilityRule(sample=SAMPLE, model="sup"),))
    try:
        fac.scan_tick()
        fac.command(cancelled, RunEvent.CANCEL)
        batch = take(fac)
        assert (batch["run_id"], batch["model"]) == (half, "sup")
        finish(fac, batch)
    finally:
        fac.close()
    elsewhere = facility(tmp_path / "other_host", root)   # no rule: the default is hac
    try:
        elsewhere.scan_tick()
        batch = take(elsewhere)
        assert (batch["run_id"], batch["model"]) == (half, "sup"), batch
        finish(elsewhere, batch)
        assert take(elsewhere)["batch_size"] == 0
        view = runs(elsewhere)
        assert view[cancelled]["state"] == "CANCELLED", view[cancelled]
        assert view[cancelled]["files_not_basecalled"] == 2
    finally:
        elsewhere.close()


def test_a_bcorch_toml_that_is_a_fifo_quarantines_the_run_and_blocks_nothing(tmp_path):
    """A named pipe called bcorch.toml: opening it waits for a writer, and the scan held the
    facility's lock while it read run settings, so discovery, scans and every /assignwork
    stopped for good. The run is QUARANTINED naming the file; the other runs go on."""
    root = tmp_path / "root"
    make_run(root, "run_ok", 1, 1)
    fifo = root / GROUP / SAMPLE / "run_pipe" / "bcorch.toml"
    make_run(root, "run_pipe", 1, 2)
    os.mkfifo(fifo)
    fac = facility(tmp_path, root)
    tick = threading.Thread(target=fac.scan_tick, daemon=True)
    try:
        tick.start()
        tick.join(timeout=20)
        assert not tick.is_alive(), "the scan tick hangs on the pipe"
        view = runs(fac)
        assert view["run_pipe"]["state"] == "QUARANTINED", view["run_pipe"]
        assert "bcorch.toml" in view["run_pipe"]["reason"]
        assert drain(fac) == ["run_ok"]
    finally:
        if tick.is_alive():   # let the stuck reader go: a writer opens and closes the pipe
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            tick.join(timeout=20)
        fac.close()


def test_a_batch_failed_because_its_run_moved_meanwhile_counts_no_attempt(tmp_path):
    """The engine had the run's old path: its batch FAILED only because the run moved under
    it. No attempt is counted, and the file is handed out again at once."""
    root = tmp_path / "root"
    name = "20261126_1200_P2S-01-A_FLOW001_abcd0001"
    ids = make_run(root, name, 1, 1)
    fac = facility(tmp_path, root)
    try:
        fac.scan_tick()
        batch = take(fac)
        (root / GROUP / SAMPLE).rename(root / GROUP / "renamed")
        fac.scan_tick()
        answer = fac.complete(batch["jobid"], JobState.FAILED, {}, "cannot open the files",
                              engine_id="gpu0")
        assert answer.status == 200, answer.body
        assert drain(fac) == [name]
        assert fac._runs[name].part.store.job(batch["jobid"]).state.value == "STOPPED"
    finally:
        fac.close()
    assert_each_read_once(root, ids)


def _one_batch_done_then_copied(tmp_path: Path, files: int, sample: str
                                ) -> tuple[Path, str, set[str], Facility]:
    """A run of `files` files (mirror output) with one batch done, then `cp -r` of its
    directory into `sample`: (root, run name, read ids, the facility, not yet rescanned)."""
    root = tmp_path / "root"
    name = "20261126_1200_P2S-01-A_FLOW001_abcd0001"
    ids = make_run(root, name, files, 1)
    fac = facility(tmp_path, root, output="mirror", output_root=str(tmp_path / "out"))
    try:
        fac.scan_tick()
        finish(fac, take(fac))
        shutil.copytree(root / GROUP / SAMPLE / name, root / GROUP / sample / name)
    except BaseException:
        fac.close()
        raise
    return root, name, ids, fac


def test_a_copy_of_a_run_under_another_sample_is_not_basecalled_again(tmp_path):
    """`cp -r` of a run directory into another sample (a backup, or sorting runs by hand):
    MinKNOW run names are unique, so a second live directory with a known run's name is a
    copy. It is QUARANTINED naming the run it copies (it used to be a new run: every read
    basecalled twice); `run resume` basecalls it if that is really wanted."""
    root, name, ids, fac = _one_batch_done_then_copied(tmp_path, 2, "backup")
    try:
        fac.scan_tick()
        view = runs(fac)
        copy = next(r for r in view.values() if r["rel"] == f"{GROUP}/backup/{name}")
        assert copy["state"] == "QUARANTINED" and "copy" in copy["reason"], copy
        assert name in copy["reason"]
        assert drain(fac) == [name]
    finally:
        fac.close()
    assert_each_read_once(tmp_path / "out", ids)


def test_a_run_copied_then_deleted_is_a_move(tmp_path):
    """`mv` between two filesystems copies, then deletes: for a moment there are two
    directories of the run (the new one quarantined as a copy), then only the new one. It
    is then the run, moved: served from its new place, nothing redone."""
    root, name, ids, fac = _one_batch_done_then_copied(tmp_path, 3, "moved")
    try:
        fac.scan_tick()
        shutil.rmtree(root / GROUP / SAMPLE / name)
        fac.scan_tick()
        fac.scan_tick()
        view = runs(fac)
        assert set(view) == {name}, view
        assert view[name]["rel"] == f"{GROUP}/moved/{name}" and view[name]["reason"] == ""
        assert drain(fac) == [name, name]
    finally:
        fac.close()
    assert_each_read_once(tmp_path / "out", ids)
