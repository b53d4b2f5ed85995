"""Chaos: nothing is lost, nothing is doubled, whatever crashes on the way.

A real manager (SQLite, HTTP on loopback) behind a cuttable TCP proxy, two bcorch
"hosts" of three virtual GPUs each running the simulate runner over real POD5 files
(300 good, 2 corrupt), and a seeded driver that kills engines, basecallers and the
manager, stops an engine past the hang timeout, cuts the network and drains a GPU,
deletes the manager's database (the journal beside the outputs rebuilds it), renames a
finished input file (known by its POD5 identifier, not redone) and writes a new file
with a pause longer than settle_s (waited for, not failed). The input stays open during
the chaos and is closed by a final_summary_*.txt, as MinKNOW ends a run.
Seeds: BCORCH_CHAOS_SEEDS="1,2,3" (default: three seeds on CI, one elsewhere).

Facility mode (test_chaos_facility_...): three runs in the MinKNOW layout under a watch root,
each with its own model, two of them appearing during the chaos, one paused and resumed;
kill -9 of the manager, engines and basecallers, a hung engine, a cut network and a drained
GPU; the runs are closed by their final summaries. Every read of every run exactly once in
that run's output, basecalled with that run's model; every run COMPLETE with its
bcorch_summary.json. Seeds: BCORCH_CHAOS_FACILITY_SEEDS (default: one seed, CI included).
"""
from __future__ import annotations

import json
import os
import re
import sqlite3

import psutil
import pytest

from chaos.cluster import Cluster
from chaos.driver import FACILITY_PLAN, ChaosDriver
from chaos.facility import FacilitySite, SiteRun
from bcorch.orchestrator.control import request
from support import wait_until
from bcorch.workers.read_ids import read_ids_under, settings_under

N_FILES, N_CORRUPT = 300, 2
INTERVAL_S = 5.0
HANG_TIMEOUT_S = 3.0
MAX_ATTEMPTS = 5  # above the 3 basecaller kills of the plan: only a bad file can reach it


def _seeds() -> list[int]:
    raw = os.environ.get("BCORCH_CHAOS_SEEDS")
    if raw:
        return [int(s) for s in raw.split(",") if s.strip()]
    return [11, 22, 33] if os.environ.get("CI") == "true" else [11]


def _facility_seeds() -> list[int]:
    raw = os.environ.get("BCORCH_CHAOS_FACILITY_SEEDS")
    if raw:
        return [int(s) for s in raw.split(",") if s.strip()]
    return [11]


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("seed", _seeds(), ids=lambda s: f"seed={s}")
def test_chaos_every_read_exactly_once(tmp_path, procs, seed):
    cluster = Cluster(tmp_path, procs, n_files=N_FILES, corrupt=N_CORRUPT, seed=seed,
                      manager={"report_back_interval": INTERVAL_S, "batch_size": 4,
                               "max_attempts": MAX_ATTEMPTS})
    try:
        _run(cluster, seed)
    finally:
        cluster.close()


def _add_hosts(cluster: Cluster, gpus: int, samples_per_s: float = 15000.0) -> None:
    for name in ("hostA", "hostB"):
        cluster.add_host(
            name, gpus,
            engine={"polling_interval": 0.005, "request_retries": 1, "connect_timeout_s": 1.0,
                    "read_timeout_s": 3.0},
            runner={"samples_per_s": samples_per_s, "stop_grace_s": 2.0, "fail_fraction": 0.1},
            orchestrator={"hang_timeout_s": HANG_TIMEOUT_S, "max_restarts": 100,
                          "restart_backoff_max_s": 2.0, "drain_timeout_s": 30.0,
                          "on_manager_failure": "wait", "manager_down_timeout_s": 600.0,
                          "exit_when_done": False})   # the test stops the hosts itself


def _run(cluster: Cluster, seed: int) -> None:
    _add_hosts(cluster, 3)
    driver = ChaosDriver(cluster, seed, HANG_TIMEOUT_S)
    why = lambda: f"chaos seed {seed} (rerun: BCORCH_CHAOS_SEEDS={seed}); events: {driver.summary()}"

    def work_left() -> bool:
        try:
            files = cluster.manager.status()["files"]
        except (OSError, AssertionError):
            return True
        return files["PENDING"] + files["ASSIGNED"] > 0

    driver.run(work_left)
    injected = [e for e in driver.events if e.name != "stopped"]
    assert len(injected) >= 6, f"the work ended before the chaos did: {why()}"
    cluster.close_input()

    wait_until(lambda: _settled(cluster), 240, interval=0.5,
               what=f"every file DONE or QUARANTINED ({why()})")
    _stop_hosts(cluster, why)
    _check_outputs(cluster, why)


def _stop_hosts(cluster: Cluster, why) -> None:
    """Stop every bcorch over its control socket: each exits 0 and leaves no process."""
    descendants = [p for h in cluster.hosts for p in h.descendants()]
    for host in cluster.hosts:
        assert request(host.socket, {"cmd": "stop"})["ok"], why()
    for host in cluster.hosts:
        code = host.process.wait(90)
        assert code == 0, f"{host.name} exited {code}: {why()}\n{host.process.log()[-3000:]}"
    _, alive = psutil.wait_procs(descendants, timeout=10)
    alive = [p for p in alive if _running(p)]
    assert not alive, f"processes left after bcorch stopped: {alive} ({why()})"


def _settled(cluster: Cluster) -> bool:
    files = cluster.manager.status()["files"]
    return files["DONE"] + files["QUARANTINED"] == len(cluster.written) + N_CORRUPT


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _check_outputs(cluster: Cluster, why) -> None:
    # every read of every good file exactly once in pass/ + fail/
    counts = read_ids_under([cluster.output_dir / "pass", cluster.output_dir / "fail"])
    expected = {r for ids in cluster.written.values() for r in ids}
    missing = expected - set(counts)
    doubled = sorted(r for r, n in counts.items() if n > 1)
    unknown = set(counts) - expected
    assert not missing, f"{len(missing)} reads lost, e.g. {sorted(missing)[:3]}: {why()}"
    assert not doubled, f"{len(doubled)} reads written twice, e.g. {doubled[:3]}: {why()}"
    assert not unknown, f"reads from nowhere: {sorted(unknown)[:3]}: {why()}"

    # the corrupt files, and only they, are QUARANTINED with a reason
    code, body = cluster.manager.get("/files", state="QUARANTINED")
    assert code == 200, body
    assert sorted(f["path"] for f in body["files"]) == sorted(cluster.corrupt), why()
    assert all(f["reason"] for f in body["files"]), f"{body['files']}: {why()}"

    # the manager's counts agree with its database and with the disk
    status = cluster.manager.status()["files"]
    assert status["DONE"] == len(cluster.written) and status["QUARANTINED"] == N_CORRUPT, why()
    in_db = dict(cluster.db_rows("SELECT state, COUNT(*) FROM files GROUP BY state"))
    assert {k: v for k, v in status.items() if v} == in_db, why()
    done_paths = {p for (p,) in cluster.db_rows("SELECT path FROM files WHERE state = 'DONE'")}
    assert done_paths == set(cluster.written), why()
    jobs = dict(cluster.db_rows("SELECT job_id, state FROM jobs"))
    assert "LIVE" not in jobs.values(), why()
    merged_from = {_job_of(p.name) for sub in ("pass", "fail")
                   for p in (cluster.output_dir / sub).iterdir()}
    assert merged_from <= {j for j, s in jobs.items() if s == "DONE"}, \
        f"outputs of jobs that are not DONE: {sorted(merged_from - set(jobs))[:5]}: {why()}"

    # no leftovers of finished jobs: every job is finished, so none at all
    leftovers = sorted(p.name for p in cluster.output_dir.iterdir()
                       if p.name.startswith("TMPOUTPUT_"))
    leftovers += sorted(p.name for p in cluster.input_dir.iterdir()
                        if p.name.startswith("ASSIGNED_"))
    assert not leftovers, f"leftovers {leftovers[:5]}: {why()}"


def _job_of(output_name: str) -> str:
    match = re.match(r"(j\d+-[0-9a-f]+)_", output_name)
    assert match, f"an output without its job id: {output_name}"
    return match.group(1)


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("seed", _facility_seeds(), ids=lambda s: f"seed={s}")
def test_chaos_facility_every_read_of_every_run_once_with_its_model(tmp_path, procs, seed):
    site = FacilitySite(tmp_path, procs, runs=3, files=40, corrupt=1, seed=seed,
                        manager={"report_back_interval": INTERVAL_S, "batch_size": 4,
                                 "max_attempts": MAX_ATTEMPTS})
    try:
        _run_facility(site, seed)
    finally:
        site.close()


def _run_facility(site: FacilitySite, seed: int) -> None:
    site.appear()
    _add_hosts(site, 2, samples_per_s=6000.0)   # ~1.7 s a file: work through the whole plan
    driver = ChaosDriver(site, seed, HANG_TIMEOUT_S, faults=dict(FACILITY_PLAN))
    why = lambda: (f"facility chaos seed {seed} (rerun: BCORCH_CHAOS_FACILITY_SEEDS={seed}); "
                   f"events: {driver.summary()}")

    def work_left() -> bool:
        try:
            files = site.manager.status()["files"]
        except (OSError, AssertionError):
            return True
        return files["PENDING"] + files["ASSIGNED"] > 0

    # The plan goes on while a run is still to appear or to be paused, or work is left.
    driver.run(lambda: bool(site.to_appear()) or not driver.pauses or work_left(),
               between=site.trickle)
    injected = [e for e in driver.events if e.name != "stopped"]
    assert len(injected) >= 6, f"the work ended before the chaos did: {why()}"
    assert driver.pauses and all(held for _, held in driver.pauses), \
        f"a paused run got new batches, or did not resume: {driver.pauses}: {why()}"
    site.end_runs()
    site.close_input()

    def all_complete() -> bool:
        views = site.runs_view()
        return len(views) == len(site.runs) and \
            all(v["state"] == "COMPLETE" for v in views.values())

    wait_until(all_complete, 240, interval=0.5,
               what=f"every run COMPLETE ({why()})")
    assert site.manager.status()["complete"] is True, why()
    _stop_hosts(site, why)
    views = site.runs_view()
    for run in site.runs:
        _check_run(site, run, views[run.rel], why)
    for db in site.state_dir.glob("bcmanager-*.sqlite"):
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
            live = conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'LIVE'").fetchone()[0]
        assert live == 0, f"{db.name}: {live} LIVE jobs left: {why()}"


def _check_run(site: FacilitySite, run: SiteRun, view: dict, why) -> None:
    """Every read of the run exactly once in its own output, with its model; COMPLETE, with
    its summary; only its corrupt file QUARANTINED; nothing of a batch left behind."""
    out = site.output(run)
    dirs = [out / "pass", out / "fail"]
    written = read_ids_under(dirs)
    origins = {written.origin(r) for r in written}
    missing, unknown = run.reads - origins, origins - run.reads
    where = f"run {run.rel} ({run.kind.model})"
    assert not missing, f"{where}: {len(missing)} reads lost, e.g. {sorted(missing)[:3]}: {why()}"
    assert not written.doubled(), f"{where}: reads written twice {written.doubled()[:3]}: {why()}"
    assert not unknown, f"{where}: reads of another run or nowhere {sorted(unknown)[:3]}: {why()}"
    models = {s.get("model") for s in settings_under(dirs).values()}
    assert models == {run.kind.model}, f"{where}: basecalled with {models}: {why()}"

    assert view["state"] == "COMPLETE", f"{where}: {view}: {why()}"
    summary = json.loads((out / "bcorch_summary.json").read_text())
    assert summary["state"] == "COMPLETE", f"{where}: {summary}: {why()}"
    assert summary["files_done"] == len(run.written), f"{where}: {summary}: {why()}"
    assert summary["files_quarantined"] == len(run.corrupt), f"{where}: {summary}: {why()}"
    code, body = site.manager.get("/files", state="QUARANTINED", run=view["run_id"])
    assert code == 200, body
    assert sorted(os.path.basename(f["path"]) for f in body["files"]) == sorted(run.corrupt), \
        f"{where}: {body['files']}: {why()}"
    assert all(f["reason"] for f in body["files"]), f"{where}: {body['files']}: {why()}"

    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("TMPOUTPUT_"))
    leftovers += sorted(p.name for d in (site.run_dir(run), site.run_dir(run) / "pod5")
                        for p in d.iterdir() if p.name.startswith("ASSIGNED_"))
    assert not leftovers, f"{where}: leftovers {leftovers[:5]}: {why()}"
