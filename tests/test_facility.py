"""Facility mode (issue 13): one manager serving every run under a watch root.

A real `bcmanager --watch-root` on loopback, real POD5 files in the MinKNOW layout, real
SQLite; the test plays the engines by hand (tests/manager_helpers.py style).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bcorch.config_writer import write_config
from bcorch.orchestrator.local_cluster import manager_argv
from bcorch.orchestrator.pod5_dataset import write_pod5
from manager_helpers import write_fastq
from support import REPO, ServingProcess, free_port, wait_until

GROUP, SAMPLE = "proto", "sample"


class FacilityProcess(ServingProcess):
    """`bcmanager --watch-root ROOT` on a free loopback port."""

    def __init__(self, tmp: Path, root: Path, *, facility: dict | None = None,
                 manager: dict | None = None, extra: tuple[str, ...] = ()):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = dict(facility or {})
        rules = settings.pop("rules", [])
        cfg = write_config(tmp / f"facility-{self.port}.toml",
                           manager={"settle_s": 0.0, "scan_interval_s": 0.2,
                                    "allow_simulated": True, **(manager or {})},
                           facility=settings)
        with open(cfg, "a") as fh:   # [[facility.rules]]: tables the writer does not do
            for rule in rules:
                fh.write("\n[[facility.rules]]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                                         for k, v in rule.items()))
        self.config = cfg
        super().__init__(manager_argv(cfg, "--watch-root", str(root), "--port", str(self.port),
                                      *extra), tmp / f"facility-{self.port}.log")

    def runs(self) -> dict[str, dict]:
        code, body = self.get("/runs")
        assert code == 200, body
        return {r["run_id"]: r for r in body["runs"]}


def started(procs: list, tmp_path: Path, root: Path, **kwargs) -> FacilityProcess:
    """A FacilityProcess, registered with the `procs` fixture (stopped even when the test
    fails) and serving."""
    fac = FacilityProcess(tmp_path, root, **kwargs)
    procs.append(fac)
    return fac.start()


def two_runs_one_batch(fac: FacilityProcess, root: Path) -> tuple[dict, str, str]:
    """Two runs of 3 files, found; one 1-file batch assigned: (the batch, its run, the other)."""
    one, _ = make_run(root, 1, 3)
    two, _ = make_run(root, 2, 3)
    wait_runs(fac, lambda r: pending(r, one) == 3 and pending(r, two) == 3, "both runs found")
    batch = assign(fac, size=1)
    return batch, batch["run_id"], two if batch["run_id"] == one else one


def run_name(n: int) -> str:
    return f"20261126_1{n:03d}_P2S-0{n}-A_FLOW{n:03d}_abcd{n:04d}"


def make_run(root: Path, n: int, files: int, *, group: str = GROUP, sample: str = SAMPLE,
             reads: int = 2, sub: str = "pod5",
             bcorch_toml: str | None = None) -> tuple[str, set[str]]:
    """A MinKNOW run dir with `files` POD5 files; returns (run id, the read ids)."""
    run = root / group / sample / run_name(n)
    if bcorch_toml is not None:
        run.mkdir(parents=True, exist_ok=True)
        (run / "bcorch.toml").write_text(bcorch_toml)
    ids: set[str] = set()
    for i in range(files):
        path = run / sub / f"f{i:03d}.pod5"
        part = path.with_name(path.name + ".tmp")
        ids.update(write_pod5(part, reads, 200, random.Random(n * 1000 + i)))
        os.rename(part, path)
    return run_name(n), ids


def assign(fac: FacilityProcess, engine: str = "gpu0", size: int = 2) -> dict:
    code, body = fac.get("/assignwork", engineid=engine, batchsize=size)
    assert code == 200, body
    return body


def basecall(fac: FacilityProcess, batch: dict) -> list[str]:
    """What an engine does with a facility batch: read through the run's job dir, write FASTQ
    (with the batch's model in each header) into the run's job output dir."""
    return write_fastq(
        batch, Path(batch["input_root"]) / batch["run_input_dir"] / batch["job_input_dir"],
        Path(batch["output_root"]) / batch["run_output_dir"] / batch["job_output_dir"],
        f" model={batch['model']}")


def done(fac: FacilityProcess, batch: dict) -> None:
    basecall(fac, batch)
    code, body = fac.post("/completed", {"job_id": batch["jobid"], "job_state": "DONE"})
    assert code == 200 and body.get("ok"), body


def output_reads(output_dir: Path) -> list[tuple[str, str]]:
    """(read id, model) of every FASTQ record merged into output_dir/pass."""
    found = []
    for fq in sorted((output_dir / "pass").glob("*.fastq")):
        for line in fq.read_text().splitlines()[::4]:
            rid, _, model = line[1:].partition(" model=")
            found.append((rid, model))
    return found


def drain(fac: FacilityProcess, engine: str = "gpu0", limit: int = 200) -> list[dict]:
    """Take and finish batches until the answer is empty; returns the batches."""
    batches = []
    for _ in range(limit):
        batch = assign(fac, engine)
        if not batch["batch_size"]:
            return batches
        done(fac, batch)
        batches.append(batch)
    raise AssertionError("never ran dry")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


def wait_runs(fac: FacilityProcess, predicate, what: str) -> dict[str, dict]:
    def check():
        runs = fac.runs()
        return runs if predicate(runs) else None
    return wait_until(check, 30, what=what)  # type: ignore[return-value]


def pending(runs: dict, run_id: str) -> int:
    return runs.get(run_id, {}).get("files", {}).get("PENDING", 0)


def test_runs_appearing_over_time_each_get_their_own_output_and_every_file_once(
        procs, tmp_path, root):
    """Three runs found one after another, each with its own model (bcorch.toml, a rule,
    the default): every read of every run is in that run's own output exactly once, with
    that run's model; the batch answer names the run's directories and settings."""
    fac = started(procs, tmp_path, root, facility={
        "model": "hac", "rules": [{"sample": "methyl*", "model": "sup,5mCG_5hmCG"}]})
    expected: dict[str, tuple[set[str], str]] = {}
    first, ids = make_run(root, 1, 4)
    expected[first] = (ids, "hac")
    wait_runs(fac, lambda r: pending(r, first) == 4, "run 1 found")
    batch = assign(fac)
    assert batch["run_id"] == first and batch["model"] == "hac"
    assert batch["run_input_dir"] == f"{GROUP}/{SAMPLE}/{first}"
    assert batch["run_output_dir"] == f"{GROUP}/{SAMPLE}/{first}/basecalls"
    assert batch["input_root"] == batch["output_root"] == str(root)
    assert batch["emit"] == "fastq" and "kit" not in batch
    done(fac, batch)

    second, ids = make_run(root, 2, 3, sample="methylation")
    expected[second] = (ids, "sup,5mCG_5hmCG")
    third, ids = make_run(root, 3, 3, bcorch_toml='[run]\nmodel = "fast"\nkit = "SQK-NBD114-24"\n')
    expected[third] = (ids, "fast")
    wait_runs(fac, lambda r: pending(r, second) == 3 and pending(r, third) == 3,
              "runs 2 and 3 found")
    batches = drain(fac)
    assert {b["run_id"] for b in batches} == {first, second, third}
    assert all(b["kit"] == "SQK-NBD114-24" for b in batches if b["run_id"] == third)
    runs = fac.runs()
    for run_id, (ids, model) in expected.items():
        rel = runs[run_id]["rel"]
        assert runs[run_id]["output_dir"] == str(root / rel / "basecalls")
        reads = output_reads(root / rel / "basecalls")
        assert sorted(r for r, _ in reads) == sorted(ids), run_id   # each read exactly once
        assert {m for _, m in reads} == {model}, run_id
        assert runs[run_id]["files"]["DONE"] == len(list((root / rel).glob("pod5/*.pod5")))
    st = fac.get("/status")[1]
    assert st["progress"]["files_done"] == 10 and {r["run_id"] for r in st["runs"]} == set(expected)
    assert st["complete"] is False   # the facility is open: runs may still come


def test_pause_stops_new_batches_from_that_run_and_resume_restarts_them(procs, tmp_path, root):
    fac = started(procs, tmp_path, root)
    running, paused_run, other = two_runs_one_batch(fac, root)
    code, body = fac.post("/runs/pause", {"run": paused_run})
    assert code == 200 and body["run"]["state"] == "PAUSED", body
    taken = drain(fac, "gpu1")
    assert taken and {b["run_id"] for b in taken} == {other}
    done(fac, running)   # a batch that was running when paused finishes normally
    assert fac.runs()[paused_run]["files"]["DONE"] == 1
    code, body = fac.get("/runs/resume", run=paused_run)
    assert code == 200 and body["run"]["state"] == "ACTIVE", body
    resumed = drain(fac, "gpu1")
    assert {b["run_id"] for b in resumed} == {paused_run}
    assert fac.runs()[paused_run]["files"]["DONE"] == 3


def test_cancel_leaves_unfinished_files_and_says_so(procs, tmp_path, root):
    fac = started(procs, tmp_path, root)
    run_id, _ = make_run(root, 1, 5)
    wait_runs(fac, lambda r: pending(r, run_id) == 5, "run found")
    running = assign(fac, size=2)
    code, body = fac.post("/runs/cancel", {"run": run_id})
    assert code == 200 and body["run"]["state"] == "CANCELLED", body
    assert assign(fac, "gpu1")["batch_size"] == 0
    done(fac, running)   # running batches may finish
    run = fac.runs()[run_id]
    assert run["files"]["DONE"] == 2 and run["files_not_basecalled"] == 3
    links = list(root.glob(f"{GROUP}/{SAMPLE}/{run_id}/ASSIGNED_*"))
    assert links == []   # no batch dir made after the cancel
    summary = wait_until(lambda: _summary(root, run_id), 30, what="summary of the cancelled run")
    assert summary["state"] == "CANCELLED" and summary["files_not_basecalled"] == 3
    code, body = fac.post("/runs/resume", {"run": run_id})
    assert code == 409 and "CANCELLED" in body["error"] and "\n" not in body["error"]


def _summary(root: Path, run_id: str) -> dict | None:
    path = root / GROUP / SAMPLE / run_id / "basecalls" / "bcorch_summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_final_summary_closes_a_run_and_its_summary_appears_when_settled(procs, tmp_path, root):
    fac = started(procs, tmp_path, root)
    run_id, ids = make_run(root, 1, 3, reads=3)
    wait_runs(fac, lambda r: pending(r, run_id) == 3, "run found")
    running = assign(fac, size=1)
    (root / GROUP / SAMPLE / run_id / "final_summary_FLOW001_abcd0001.txt").write_text("x\n")
    wait_runs(fac, lambda r: r[run_id]["state"] == "CLOSED", "run CLOSED by its final summary")
    assert _summary(root, run_id) is None   # a batch is still running
    drain(fac)
    done(fac, running)
    runs = wait_runs(fac, lambda r: r[run_id]["state"] == "COMPLETE", "run COMPLETE")
    summary = _summary(root, run_id)
    assert summary is not None and summary["files_done"] == 3 and summary["files_quarantined"] == 0
    assert summary["first_batch_at"] <= summary["last_batch_at"] and summary["gpu_s"] >= 0
    assert runs[run_id]["progress"]["files_done"] == 3
    # The facility is still open: engines are not told that nothing is left...
    assert assign(fac)["input_closed"] is False
    code, body = fac.post("/close-input", {})
    assert code == 200 and body.get("facility") is True
    # ...until it is closed and every run is over.
    wait_until(lambda: assign(fac)["input_closed"] is True, 30, what="nothing left")
    assert fac.get("/status")[1]["complete"] is True


def test_a_bad_bcorch_toml_quarantines_only_that_run(procs, tmp_path, root):
    fac = started(procs, tmp_path, root)
    bad, _ = make_run(root, 1, 2, bcorch_toml='[run]\nmodel = "sup; rm -rf /"\n')
    good, _ = make_run(root, 2, 2)
    runs = wait_runs(fac, lambda r: pending(r, good) == 2 and bad in r, "both runs found")
    assert runs[bad]["state"] == "QUARANTINED"
    assert "model" in runs[bad]["reason"] and "bcorch.toml" in runs[bad]["reason"]
    batches = drain(fac)
    assert {b["run_id"] for b in batches} == {good}
    assert not (root / GROUP / SAMPLE / bad / "basecalls").exists()
    code, body = fac.post("/runs/resume", {"run": bad})   # still bad: refused, says why
    assert code == 409 and "model" in body["error"]
    (root / GROUP / SAMPLE / bad / "bcorch.toml").write_text('[run]\nmodel = "sup"\n')
    code, body = fac.post("/runs/resume", {"run": bad})
    assert code == 200 and body["run"]["state"] == "ACTIVE", body
    wait_runs(fac, lambda r: pending(r, bad) == 2, "the fixed run's files found")
    assert {(b["run_id"], b["model"]) for b in drain(fac)} == {(bad, "sup")}


def test_a_restart_after_kill_9_keeps_runs_states_and_leases(procs, tmp_path, root):
    fac = started(procs, tmp_path, root, manager={"report_back_interval": 60})
    live, held, other = two_runs_one_batch(fac, root)
    assert fac.post("/runs/pause", {"run": other})[0] == 200
    assert fac.post("/runs/close", {"run": held})[0] == 200
    before = fac.runs()
    fac.proc.send_signal(signal.SIGKILL)
    fac.proc.wait(timeout=30)
    again = fac.start()   # the same command line, the same databases
    runs = again.runs()
    assert {r: v["state"] for r, v in runs.items()} == {held: "CLOSED", other: "PAUSED"}
    assert runs[held]["files"] == before[held]["files"]
    # the lease survived: its keep-alive is not late, and its completion counts
    code, body = again.get("/keepalive", job_id=live["jobid"], job_state="PROCESSING")
    assert code == 200 and body["late"] is False, body
    done(again, live)
    assert {b["run_id"] for b in drain(again)} == {held}
    wait_runs(again, lambda r: r[held]["state"] == "COMPLETE", "the closed run completes")
    assert again.runs()[other]["files"]["PENDING"] == 3
    fac.proc.send_signal(signal.SIGKILL)   # once more: a COMPLETE run is shown from its summary
    fac.proc.wait(timeout=30)
    third = fac.start()
    runs = third.runs()
    assert runs[held]["state"] == "COMPLETE" and runs[held]["files"]["DONE"] == 3
    assert runs[held]["progress"]["files_done"] == 3
    assert third.get("/status")[1]["progress"]["files_total"] == 6


@pytest.mark.parametrize("route,params,status,names", [
    ("/runs/pause", {}, 400, "run"),
    ("/runs/pause", {"run": "nope"}, 400, "run"),
    ("/runs/cancel", {"run": "../x"}, 400, "run"),
    ("/runs/close", {"run": ""}, 400, "run"),
    ("/files", {"state": "DONE", "run": "nope"}, 400, "run"),
])
def test_bad_route_input_is_a_400_of_one_line_naming_the_parameter(procs, tmp_path, root, route,
                                                                   params, status, names):
    fac = started(procs, tmp_path, root)
    code, body = fac.get(route, **params)
    assert code == status and names in body["error"] and "\n" not in body["error"], body
    code, body = fac.post(route, params) if route != "/files" else (code, body)
    assert code == status and names in body["error"], body


def test_a_run_that_is_not_a_string_is_named_as_such(procs, tmp_path, root):
    fac = started(procs, tmp_path, root)
    for run in (5, ["a"], {"a": 1}, True):
        code, body = fac.post("/runs/pause", {"run": run})
        assert code == 400 and "parameter run must be a string" in body["error"], (run, body)


def test_watch_root_and_input_dir_together_is_a_config_error(tmp_path, root):
    cfg = write_config(tmp_path / "c.toml", manager={})
    proc = subprocess.run(manager_argv(cfg, "--watch-root", str(root), "--input-dir",
                                       str(tmp_path)), cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 78, proc.stderr
    assert "--input-dir and --watch-root" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_cli_runs_and_run_commands(procs, tmp_path, root):
    fac = started(procs, tmp_path, root)
    run_id, _ = make_run(root, 1, 2)
    wait_runs(fac, lambda r: pending(r, run_id) == 2, "run found")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bcorch.manager", *args, "--url", fac.url],
                              cwd=REPO, capture_output=True, text=True, timeout=60)

    listed = cli("runs")
    assert listed.returncode == 0 and run_id in listed.stdout and "ACTIVE" in listed.stdout
    assert json.loads(cli("runs", "--json").stdout)["runs"][0]["run_id"] == run_id
    paused = cli("run", "pause", run_id)
    assert paused.returncode == 0 and "PAUSED" in paused.stdout, paused.stderr
    unknown = cli("run", "cancel", "nope")
    assert unknown.returncode == 1 and "run" in unknown.stderr
    status = cli("status")
    assert status.returncode == 0 and run_id in status.stdout and "PAUSED" in status.stdout


def test_metrics_have_a_run_label(procs, tmp_path, root):
    fac = started(procs, tmp_path, root)
    run_id, _ = make_run(root, 1, 2)
    wait_runs(fac, lambda r: pending(r, run_id) == 2, "run found")
    code, text = fac.get("/metrics")
    assert code == 200
    assert f'bcmanager_files{{run="{run_id}",state="PENDING"}} 2.0' in text
    assert f'bcmanager_run_state{{run="{run_id}",state="ACTIVE"}} 1.0' in text


def test_a_held_long_poll_wakes_when_a_new_run_brings_work(procs, tmp_path, root):
    import threading
    import time

    fac = started(procs, tmp_path, root, manager={"scan_interval_s": 0.5})
    got: dict = {}

    def poll():
        t0 = time.monotonic()
        got["answer"] = fac.get("/assignwork", engineid="gpu0", batchsize=1, wait_s=20)
        got["took"] = time.monotonic() - t0

    waiter = threading.Thread(target=poll)
    waiter.start()
    wait_until(lambda: fac.get("/status")[1]["runs"] == [], 10, what="status answers")
    run_id, _ = make_run(root, 1, 1)
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    code, body = got["answer"]
    assert code == 200 and body["run_id"] == run_id and body["batch_size"] == 1, body
    assert got["took"] < 15   # answered by the new run's files, not by the end of the wait


def test_mirror_output_puts_each_run_under_the_output_root(procs, tmp_path, root):
    out = tmp_path / "out"
    fac = started(procs, tmp_path, root, facility={"output": "mirror",
                                                    "output_root": str(out)})
    run_id, ids = make_run(root, 1, 2, sub="pod5_pass")
    wait_runs(fac, lambda r: pending(r, run_id) == 2, "run found")
    batches = drain(fac)
    rel = f"{GROUP}/{SAMPLE}/{run_id}"
    assert {(b["output_root"], b["run_output_dir"]) for b in batches} == {(str(out), rel)}
    assert sorted(r for r, _ in output_reads(out / rel)) == sorted(ids)
    assert not (root / rel / "basecalls").exists()


def test_single_run_mode_has_no_run_routes_and_no_run_fields(procs, tmp_path):
    from manager_helpers import start_manager

    m = start_manager(procs, tmp_path)
    make_run(tmp_path / "in", 1, 1)
    wait_until(lambda: m.status()["files"]["PENDING"] == 1, 30, what="file found")
    code, body = m.get("/runs")
    assert code == 404, body
    batch = m.get("/assignwork", engineid="gpu0", batchsize=1)[1]
    assert batch["batch_size"] == 1
    assert not {"run_id", "run_input_dir", "run_output_dir", "model", "kit", "emit"} & set(batch)
    assert "runs" not in m.status() and "facility" not in m.status()


def test_a_run_whose_path_cannot_be_sent_to_engines_is_quarantined(procs, tmp_path, root):
    fac = started(procs, tmp_path, root)
    odd, _ = make_run(root, 1, 1, sample="back\\slash")
    spaced, _ = make_run(root, 2, 1, sample="with space")
    runs = wait_runs(fac, lambda r: odd in r and pending(r, spaced) == 1, "both runs found")
    assert runs[odd]["state"] == "QUARANTINED" and "relative path" in runs[odd]["reason"]
    assert {b["run_id"] for b in drain(fac)} == {spaced}
    assert fac.post("/runs/resume", {"run": odd})[0] == 409
