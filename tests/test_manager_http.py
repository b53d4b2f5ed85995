"""The manager as a real process on loopback: protocol, layout on disk, leases, retries."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter

from manager_helpers import (aged, assign, basecall, complete, keepalive, start_manager,
                             wait_counts, write_files)
from support import REPO, wait_until
from bcorch.orchestrator.pod5_dataset import write_dataset


def test_full_round_trip_with_real_pod5_files(procs, tmp_path):
    inp = tmp_path / "in"
    written = write_dataset(inp, 7, reads_per_file=4, samples_per_read=200, subdirs=2)
    for rel in written:
        aged(inp / rel)
    m = start_manager(procs, tmp_path, batch_size=3, input_closed=True)
    wait_counts(m, PENDING=7)
    seen: list[str] = []
    jobs = []
    while True:
        batch = assign(m)
        if batch["batch_size"] == 0:
            assert batch["input_closed"] is True
            break
        assert batch["input_closed"] is True  # the flag; only an empty answer means "stop"
        assert keepalive(m, batch["jobid"], "STARTED") == {"late": False}
        seen += basecall(batch, tmp_path)
        assert complete(m, batch["jobid"], "DONE") == (200, {"ok": True})
        jobs.append(batch["jobid"])
    assert len(set(jobs)) == len(jobs) == 3
    expected = sorted(r for ids in written.values() for r in ids)
    assert sorted(seen) == expected
    out = tmp_path / "out"
    merged = []
    for fq in (out / "pass").iterdir():
        assert fq.name.split("_")[0] in {j.split("_")[0] for j in jobs}
        assert any(fq.name.startswith(j + "_") for j in jobs)
        merged += [line[1:] for line in fq.read_text().splitlines() if line.startswith("@")]
    assert sorted(merged) == expected  # every read exactly once
    for j in jobs:
        assert (out / f"LOGOUTPUT_{j}_gpu0" / "basecaller.log").exists()
        assert not (out / f"TMPOUTPUT_{j}_gpu0").exists()
        assert not (inp / f"ASSIGNED_{j}_gpu0").exists()
    assert all((inp / rel).is_file() for rel in written)  # inputs untouched
    st = m.status()
    assert st["files"] == {"PENDING": 0, "ASSIGNED": 0, "DONE": 7, "QUARANTINED": 0, "DUPLICATE": 0}
    assert st["progress"]["bytes_done"] == st["progress"]["bytes_total"] == sum(
        (inp / rel).stat().st_size for rel in written)
    assert st["throughput"]["files_per_s"] > 0 and st["eta_s"] == 0


def test_failed_batch_layout_and_attempts(procs, tmp_path):
    write_files(tmp_path / "in", ["a/r.pod5", "b/r.pod5"])
    m = start_manager(procs, tmp_path, batch_size=2)
    wait_counts(m, PENDING=2)
    batch = assign(m)
    job = batch["jobid"]
    out_dir = tmp_path / "out" / batch["job_output_dir"]
    (out_dir / "dorado.log").write_text("segfault\n")
    assert complete(m, job, "FAILED", reason="dorado exited 139") == (200, {"ok": True})
    failed_links = tmp_path / "in" / f"FAILED_{job}_gpu0"
    assert sorted(p.name for p in failed_links.iterdir()) == sorted(batch["batch"])
    assert all(p.is_symlink() and p.resolve().is_file() for p in failed_links.iterdir())
    assert (tmp_path / "out" / f"FAILEDOUTPUT_{job}_gpu0" / "dorado.log").exists()
    assert not (tmp_path / "in" / batch["job_input_dir"]).exists()
    code, listing = m.get("/files", state="PENDING")
    assert code == 200
    assert [(f["attempts"], "dorado exited 139" in f["reason"]) for f in listing["files"]] == [
        (1, True), (1, True)]
    # the FAILED_ dir is never scanned as input
    wait_counts(m, PENDING=2, ASSIGNED=0, DONE=0)


def test_lease_expiry_and_late_answers(procs, tmp_path):
    write_files(tmp_path / "in", ["r1.pod5", "r2.pod5"])
    m = start_manager(procs, tmp_path, report_back_interval=1, batch_size=2)
    wait_counts(m, PENDING=2)
    batch = assign(m)
    job = batch["jobid"]
    assert keepalive(m, job) == {"late": False}
    last = time.monotonic()
    wait_counts(m, PENDING=2, ASSIGNED=0)
    assert time.monotonic() - last < 1 + 9.0  # interval + a tick; a backstop on a loaded machine
    assert keepalive(m, job) == {"late": True}
    (tmp_path / "out" / batch["job_output_dir"] / "pass").mkdir(parents=True, exist_ok=True)
    (tmp_path / "out" / batch["job_output_dir"] / "pass" / "late.fastq").write_text("@x\n")
    assert complete(m, job, "DONE") == (200, {"ok": False, "late": True})
    assert complete(m, job, "FAILED") == (200, {"ok": False, "late": True})
    assert list((tmp_path / "out" / "pass").iterdir()) == []
    late_dirs = [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("LATEOUTPUT_")]
    assert late_dirs and all(job in n for n in late_dirs)
    assert not (tmp_path / "in" / batch["job_input_dir"]).exists()
    again = assign(m, "gpu1")
    assert again["jobid"] != job and again["batch_size"] == 2
    assert m.status()["files"]["DONE"] == 0


def test_completion_is_idempotent_and_conflicts_are_409(procs, tmp_path):
    write_files(tmp_path / "in", ["r1.pod5", "r2.pod5", "r3.pod5"])
    m = start_manager(procs, tmp_path, batch_size=3)
    wait_counts(m, PENDING=3)
    batch = assign(m)
    job = batch["jobid"]
    failed = {batch["batch"][0]: "unreadable"}
    first = complete(m, job, "DONE", failed_files=failed)
    counts = m.status()["files"]
    assert first == (200, {"ok": True})
    assert counts == {"PENDING": 1, "ASSIGNED": 0, "DONE": 2, "QUARANTINED": 0, "DUPLICATE": 0}
    # repeated (GET form as well) with the same state: same answer, nothing changes
    assert complete(m, job, "DONE", failed_files=failed) == first
    assert m.get("/completed", job_id=job, job_state="DONE") == first
    assert m.status()["files"] == counts
    code, body = complete(m, job, "FAILED")
    assert code == 409 and "DONE" in body["error"]
    assert keepalive(m, job) == {"late": True}
    # the file named as failed comes back alone (after its back-off)
    retry = wait_until(lambda: (b := assign(m))["batch_size"] and b, 30, what="the retry")
    assert retry["batch_size"] == 1 and retry["batch"][0].endswith(batch["batch"][0][5:])


def test_bad_file_is_retried_in_smaller_batches_then_quarantined(procs, tmp_path):
    names = [f"r{i}.pod5" for i in range(8)]
    write_files(tmp_path / "in", names)
    bad = "r5.pod5"
    m = start_manager(procs, tmp_path, batch_size=8, max_attempts=3, input_closed=True)
    wait_counts(m, PENDING=8)
    sizes_with_bad = []
    for _ in range(50):
        batch = assign(m)
        if batch["batch_size"] == 0 and m.status()["files"]["PENDING"]:
            batch = wait_until(lambda: (b := assign(m))["batch_size"] and b, 20,
                               what="the bad file after its back-off")
        if batch["batch_size"] == 0:
            assert batch["input_closed"]
            break
        has_bad = any(name.endswith("_" + bad) for name in batch["batch"])
        if has_bad:
            sizes_with_bad.append(batch["batch_size"])
        assert complete(m, batch["jobid"], "FAILED" if has_bad else "DONE",
                        reason="cannot open r5") == (200, {"ok": True})
    else:
        raise AssertionError("the manager kept handing out work")
    assert sizes_with_bad[0] == 8 and sizes_with_bad[-1] == 1
    assert sizes_with_bad == sorted(sizes_with_bad, reverse=True) and len(sizes_with_bad) == 3
    st = m.status()
    assert st["files"] == {"PENDING": 0, "ASSIGNED": 0, "DONE": 7, "QUARANTINED": 1, "DUPLICATE": 0}
    code, listing = m.get("/files", state="QUARANTINED")
    assert code == 200 and [(f["path"], f["attempts"]) for f in listing["files"]] == [(bad, 3)]
    assert "cannot open r5" in listing["files"][0]["reason"]


def test_stopped_counts_no_attempt(procs, tmp_path):
    write_files(tmp_path / "in", ["r1.pod5"])
    m = start_manager(procs, tmp_path, max_attempts=1)
    wait_counts(m, PENDING=1)
    for _ in range(3):
        batch = assign(m)
        assert complete(m, batch["jobid"], "STOPPED") == (200, {"ok": True})
        assert not (tmp_path / "in" / batch["job_input_dir"]).exists()
        assert not (tmp_path / "out" / batch["job_output_dir"]).exists()
    code, listing = m.get("/files", state="PENDING")
    assert [f["attempts"] for f in listing["files"]] == [0]


def test_scan_waits_for_settle_time_and_finds_sub_folders(procs, tmp_path):
    m = start_manager(procs, tmp_path, settle_s=60)
    inp = tmp_path / "in"
    write_files(inp, ["run1/fastq_pass/a.pod5", "run1/b.pod5"])
    (inp / "run1" / "writing.pod5").write_bytes(b"still being written")
    (inp / "run1" / "notes.txt").write_bytes(b"not pod5")
    wait_counts(m, PENDING=2)
    # several more scans see the fresh file and still leave it alone
    first = m.status()["files"]["PENDING"]
    write_files(inp, ["run2/c.pod5"])
    wait_counts(m, PENDING=3)
    assert first == 2
    aged(inp / "run1" / "writing.pod5")
    wait_counts(m, PENDING=4)
    code, listing = m.get("/files", state="PENDING")
    assert sorted(f["path"] for f in listing["files"]) == [
        "run1/b.pod5", "run1/fastq_pass/a.pod5", "run1/writing.pod5", "run2/c.pod5"]


def test_input_closed_by_command_is_persisted(procs, tmp_path):
    m = start_manager(procs, tmp_path, token="s3cret")
    empty = assign(m)
    assert empty["batch_size"] == 0 and empty["input_closed"] is False
    cli = [sys.executable, "-m", "bcorch.manager"]
    done = subprocess.run(cli + ["close-input", "--url", m.url], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "BCORCH_TOKEN": "s3cret"})
    assert done.returncode == 0, done.stderr
    assert assign(m)["input_closed"] is True
    status = subprocess.run(cli + ["status", "--url", m.url, "--token", "s3cret"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "input       closed" in status.stdout
    refused = subprocess.run(cli + ["status", "--url", m.url, "--json"], cwd=REPO,
                             capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if k != "BCORCH_TOKEN"})
    assert refused.returncode == 78 and "401" in refused.stderr  # a configuration error
    m.signal(15)
    assert m.wait(30) == 0
    again = start_manager(procs, tmp_path, token="s3cret", port=m.port)
    assert again.status()["input_closed"] is True
    assert "s3cret" not in again.log() and "s3cret" not in str(again.status())


def test_status_command_json(procs, tmp_path):
    write_files(tmp_path / "in", ["a.pod5", "b.pod5"])
    m = start_manager(procs, tmp_path)
    wait_counts(m, PENDING=2)
    assign(m, "gpu7", 1)
    import json
    out = subprocess.run([sys.executable, "-m", "bcorch.manager", "status", "--url", m.url, "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["files"]["ASSIGNED"] == 1 and st["jobs_in_flight"] == {"gpu7": 1}
    assert "gpu7" in st["engines"]
    unreachable = subprocess.run([sys.executable, "-m", "bcorch.manager", "status", "--url",
                                  "http://127.0.0.1:9"], cwd=REPO, capture_output=True, text=True,
                                 timeout=60)
    assert unreachable.returncode == 75 and "--url" in unreachable.stderr


def test_sigterm_stops_cleanly(procs, tmp_path):
    m = start_manager(procs, tmp_path)
    m.signal(15)
    assert m.wait(30) == 0
    assert "stopped" in m.log()


def test_bad_config_exits_78_with_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[manager]\nbatch_size = 'ten'\n")
    out = subprocess.run([sys.executable, "-m", "bcorch.manager", "--config", str(bad), "--input-dir",
                          str(tmp_path), "--output-dir", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 78 and out.stderr.count("\n") == 1 and "manager.batch_size" in out.stderr
    out = subprocess.run([sys.executable, "-m", "bcorch.manager", "--output-dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 78 and "--input-dir" in out.stderr


def test_many_engines_never_share_a_file(procs, tmp_path):
    write_files(tmp_path / "in", [f"d{i % 4}/r{i}.pod5" for i in range(40)])
    m = start_manager(procs, tmp_path, batch_size=3, input_closed=True)
    wait_counts(m, PENDING=40)
    from concurrent.futures import ThreadPoolExecutor

    def engine(n):
        got = []
        while True:
            batch = assign(m, f"gpu{n}")
            if batch["batch_size"] == 0:
                return got
            links = tmp_path / "in" / batch["job_input_dir"]
            got += [os.path.realpath(links / name) for name in batch["batch"]]
            assert complete(m, batch["jobid"], "DONE") == (200, {"ok": True})
    with ThreadPoolExecutor(8) as pool:
        results = [p for r in pool.map(engine, range(8)) for p in r]
    assert Counter(results).most_common(1)[0][1] == 1 and len(results) == 40
