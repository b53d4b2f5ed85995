"""Facility mode end to end: a real bcmanager --watch-root, a real bcorch with simulated
engines on virtual GPUs, three runs appearing over time, each with its own model; one is
paused and resumed, one ends by its final summary, and the priority-2 run gets at least the
GPU time of a priority-1 run while both have files waiting (/runs served_s)."""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

from bcorch.config_writer import write_config
from bcorch.orchestrator.control import ControlError, request
from bcorch.orchestrator.local_cluster import bcorch_argv, manager_argv
from bcorch.orchestrator.pod5_dataset import write_pod5
from bcorch.workers.read_ids import read_ids_under, settings_under
from support import ManagedProcess, free_port, http_json, wait_until

GROUP = "proto"
SHARED_FILES = 10   # the files of each of the two runs that share the GPUs (a file a batch)


def _run(root: Path, sample: str, n: int, files: int, toml: str | None = None) -> tuple[str, set]:
    name = f"20261126_1{n:03d}_P2S-0{n}-A_FLOW{n:03d}_abcd{n:04d}"
    run = root / GROUP / sample / name
    run.mkdir(parents=True)
    if toml is not None:
        (run / "bcorch.toml").write_text(toml)
    ids: set[str] = set()
    for i in range(files):
        path = run / "pod5" / f"f{i:03d}.pod5"
        part = path.with_name(path.name + ".tmp")
        ids.update(write_pod5(part, 3, 400, random.Random(n * 1000 + i)))
        os.rename(part, path)
    return name, ids


@pytest.fixture
def socket_dir():
    """A short folder for bcorch's control socket (UNIX socket paths are short)."""
    path = Path(tempfile.mkdtemp(prefix="bcf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_three_runs_share_the_gpus_each_basecalled_with_its_own_model(procs, tmp_path,
                                                                      socket_dir):
    root = tmp_path / "root"
    root.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = write_config(
        tmp_path / "bcorch.toml",
        manager={"url": url, "port": port, "settle_s": 0.0, "scan_interval_s": 0.2,
                 "batch_size": 2},
        facility={"model": "hac", "switch_slack_s": 0.0},   # the share, not model affinity
        engine={"polling_interval": 0.05, "work_until_none_left": True,
                "optimal_request_size": 1},   # one file a batch: many batches to share
        runner={"stop_grace_s": 2.0, "samples_per_s": 200_000.0},
        orchestrator={"hang_timeout_s": 30.0, "drain_timeout_s": 30.0,
                      "control_socket": str(socket_dir / "c.sock")})
    with open(cfg, "a") as fh:
        fh.write('\n[[facility.rules]]\nsample = "methyl*"\nmodel = "sup,5mCG_5hmCG"\n'
                 'priority = 2.0\n')
    manager = ManagedProcess(manager_argv(cfg, "--watch-root", str(root)),
                             tmp_path / "manager.log")
    procs.append(manager)
    manager.start()
    wait_until(lambda: _get(url, "/heartbeat")[0] == 200, 30, what="manager up")
    expected: dict[str, tuple[set, str]] = {}
    name, ids = _run(root, "plain", 1, 6)
    expected[name] = (ids, "hac")
    bcorch = ManagedProcess(bcorch_argv(cfg, 2), tmp_path / "bcorch.log")
    procs.append(bcorch)
    bcorch.start()
    first = name
    wait_until(lambda: _runs(url).get(first, {}).get("files", {}).get("DONE", 0) >= 1, 60,
               what="the first run under way")
    code, paused = _post(url, "/runs/pause", {"run": first})
    assert code == 200, paused
    at_pause = paused["run"]["files"]
    most = at_pause["DONE"] + at_pause["ASSIGNED"]   # batches running when paused may finish
    # The GPUs are parked while runs 2 and 3 appear, so that both wait for the engines
    # when they come back: which run gets them is then the fair share's choice alone.
    control = socket_dir / "c.sock"
    assert request(control, {"cmd": "drain"}, timeout=30)["ok"]
    wait_until(lambda: _slot_states(control) == {"STOPPED"}, 60, what="the GPUs parked")
    staging = tmp_path / "staging"
    second, ids = _run(staging, "methylation", 2, SHARED_FILES)
    expected[second] = (ids, "sup,5mCG_5hmCG")
    third, ids = _run(staging, "other", 3, SHARED_FILES, toml='[run]\nmodel = "fast"\n')
    expected[third] = (ids, "fast")
    for sample in ("methylation", "other"):   # both appear at once: neither has a head start
        os.rename(staging / GROUP / sample, root / GROUP / sample)
    wait_until(lambda: all(sum(_runs(url).get(r, {}).get("files", {}).values()) == SHARED_FILES
                           for r in (second, third)), 30, what="runs 2 and 3 found")
    assert request(control, {"cmd": "resume"}, timeout=30)["ok"]
    # While both have files waiting, the priority-2 run gets at least the GPU time of the
    # priority-1 run (its weighted share is twice as much; equal work, found together).
    shared = wait_until(lambda: _first_to_run_out(url, (second, third)), 120, interval=0.05,
                        what="one of runs 2 and 3 with no file PENDING")
    assert shared[second]["served_s"] >= shared[third]["served_s"], shared
    wait_until(lambda: len(_runs(url)) == 3, 30, what="three runs found")
    (root / GROUP / "other" / third / "final_summary_FLOW003_abcd0003.txt").write_text("done\n")
    wait_until(lambda: _runs(url)[third]["state"] == "COMPLETE", 120, what="run 3 COMPLETE")
    assert _runs(url)[first]["files"]["DONE"] <= most   # no batch of the paused run since
    assert _post(url, "/runs/resume", {"run": first})[0] == 200
    for run_id in expected:
        if run_id != third:
            assert _post(url, "/runs/close", {"run": run_id})[0] == 200
    assert _post(url, "/close-input", {})[0] == 200
    wait_until(lambda: not bcorch.running(), 180, what="bcorch done (nothing left)")
    runs = _runs(url)
    st = _get(url, "/status")[1]
    for run_id, (ids, model) in expected.items():
        assert runs[run_id]["state"] == "COMPLETE", runs[run_id]
        out = root / runs[run_id]["rel"] / "basecalls"
        written = read_ids_under([out / "pass", out / "fail"])
        assert not written.doubled(), run_id
        assert {written.origin(r) for r in written} == ids, run_id     # every read, once
        models = {s.get("model") for s in settings_under([out / "pass", out / "fail"]).values()}
        assert models == {model}, run_id
        summary = json.loads((out / "bcorch_summary.json").read_text())
        assert summary["files_done"] == len(list((out.parent / "pod5").glob("*.pod5")))
        reads = summary["reads"]   # as the engines counted them: every record merged
        assert reads["total"] == sum(written.values()), (run_id, reads)
        assert reads["jobs_counted"] == reads["jobs_done"] > 0, (run_id, reads)
    assert st["complete"] is True and sum(st["facility"]["model_switches"].values()) >= 1


def _first_to_run_out(url: str, run_ids: tuple[str, ...]) -> dict[str, dict] | None:
    """The runs' views at the first look where every one has all its files found and one of
    them has none PENDING; None before."""
    runs = _runs(url)
    views = [runs.get(run_id) for run_id in run_ids]
    if any(v is None or sum(v["files"].values()) < SHARED_FILES for v in views):
        return None
    if all(v["files"]["PENDING"] > 0 for v in views):
        return None
    return {v["run_id"]: {"served_s": v["served_s"], "files": v["files"]} for v in views}


def _slot_states(control: Path) -> set[str]:
    try:
        return {s["state"] for s in request(control, {"cmd": "status"}, timeout=5)["slots"]}
    except ControlError:
        return set()


def _get(url: str, route: str):
    try:
        return http_json(url + route, timeout=5)
    except OSError:
        return 0, None


def _post(url: str, route: str, body: dict):
    return http_json(url + route, data=body)


def _runs(url: str) -> dict[str, dict]:
    code, body = _get(url, "/runs")
    return {r["run_id"]: r for r in body["runs"]} if code == 200 else {}
