"""Soak: what grows, per batch, over a long sequencing run (compressed into minutes).

    python scripts/bench_soak.py [--minutes 3] [--facility-minutes 1.5] [--runs 3] [--gpus 4]
                                 [--every-s 0.15] [--sample-s 3] [--in-process-batches 20000]
                                 [--facility-in-process-batches 5500]
                                 [--horizon-batches 100000] [--out bench-out/soak.json]

Two live passes, each a real `bcmanager` (subprocess, SQLite, open input) and a real `bcorch --gpus
virtual:N` (simulate runner, startup_s 0, a very high samples_per_s, one file per batch:
optimal_request_size 1, so every file is one batch, the worst case for per-batch costs):

1. single-run mode (INPUT_DIR / OUTPUT_DIR) for --minutes;
2. facility mode (`--watch-root`) with --runs run directories, for --facility-minutes.

A feeder thread writes a tiny real POD5 file (pod5 library, 1 read of 200 samples, each file
its own file identifier) every --every-s seconds into the input, round robin over the runs.
Every --sample-s seconds a sampler records, against the number of batches DONE so far (the
managers' SQLite jobs tables):

    manager / bcorch / engines (sum, max): RSS, open fds (/proc/PID/fd), threads
    every SQLite file and its -wal under the state folder (bytes)
    manager.log and bcorch.log (bytes; both at their default level, INFO)
    OUTPUT_DIR: job log folders (LOGOUTPUT_*) and files under it
    /status and /metrics of the manager, /metrics of bcorch: response time and body size
    from /status: engines listed, jobs in flight, runs (facility), and every list's length

Growth per 1000 batches is the least-squares slope of each quantity against batches DONE,
fitted over the samples after the first --warmup share of the pass (start-up allocations
left out). The report extrapolates it to --horizon-batches (default 100,000: see the Soak
section of docs/benchmarks.md for why).

Then two passes in this process, far past what the live passes reach: the Manager class
alone (--in-process-batches, on a fake clock at the horizon's pace: heap, RSS, fds and the
length of every container it keeps, every 1000 batches), and a Facility alone
(--facility-in-process-batches over --runs runs: the length of every container at the end).

Memory figures are of a CPython process: RSS includes the allocator's arenas, so a slope
under ~1 MB per 1000 batches over a few thousand batches is within noise; a real leak shows
as a steady slope that does not flatten when the pass is run twice as long.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_args import BenchParser, non_negative_int, positive_int  # noqa: E402
from bench_cluster import Cluster, free_port, save_results, wait_for  # noqa: E402

SIMULATE_SAMPLES_PER_S = 1e12      # the config's maximum: a file's basecalling takes ~0 s
SAMPLES_PER_READ = 200


def run_dir_name(i: int) -> str:
    return f"20261126_1200_P2S-{i:05d}-A_PAW{i:05d}_{i:08x}"


class Feeder(threading.Thread):
    """Writes one tiny POD5 file every `every_s` seconds into the targets, round robin.

    Each file is written in a staging folder beside the targets and renamed in whole, so the
    scanner never sees half a file."""

    def __init__(self, targets: list[Path], staging: Path, every_s: float, seed: int = 5):
        super().__init__(daemon=True)
        self.targets, self.staging, self.every_s = targets, staging, every_s
        self.rng = random.Random(seed)
        self.written = 0
        self.late_s = 0.0
        self._halt = threading.Event()
        staging.mkdir(parents=True, exist_ok=True)

    def run(self) -> None:
        from bcorch.orchestrator.pod5_dataset import write_pod5

        start = time.monotonic()
        while True:
            due = start + self.written * self.every_s
            if self._halt.wait(max(0.0, due - time.monotonic())):
                return
            self.late_s = max(self.late_s, time.monotonic() - due)
            target = self.targets[self.written % len(self.targets)]
            name = f"soak_{self.written:07d}.pod5"
            staged = self.staging / name
            write_pod5(staged, 1, SAMPLES_PER_READ, self.rng)
            os.rename(staged, target / name)
            self.written += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


def _timed_get(url: str) -> tuple[float, int, bytes]:
    """(seconds, body bytes, body) of a GET; (nan, 0, b"") when it fails."""
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = resp.read()
    except OSError:
        return float("nan"), 0, b""
    return time.perf_counter() - t, len(body), body


def _proc_figures(pid: int) -> dict:
    import psutil
    try:
        p = psutil.Process(pid)
        return {"rss_mb": p.memory_info().rss / 2**20, "fds": len(os.listdir(f"/proc/{pid}/fd")),
                "threads": p.num_threads()}
    except (psutil.NoSuchProcess, FileNotFoundError, PermissionError):
        return {"rss_mb": float("nan"), "fds": float("nan"), "threads": float("nan")}


def _engines(bcorch_pid: int) -> list[int]:
    """bcorch's long-lived children (engines, the zygote), not the per-batch basecallers."""
    import psutil
    try:
        children = psutil.Process(bcorch_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    pids = []
    for c in children:
        try:
            if "simulate_main" not in " ".join(c.cmdline()):
                pids.append(c.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


def _batches_done(state_dir: Path) -> tuple[int, int]:
    """(jobs DONE, jobs of any state) over every run database in the state folder."""
    done = total = 0
    for db in state_dir.glob("*.sqlite"):
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
            try:
                rows = dict(con.execute("SELECT state, count(*) FROM jobs GROUP BY state"))
            finally:
                con.close()
        except sqlite3.Error:
            continue
        done += rows.get("DONE", 0)
        total += sum(rows.values())
    return done, total


def _dir_figures(output_roots: list[Path]) -> dict:
    job_dirs = files = size = 0
    for root in output_roots:
        for dirpath, dirnames, filenames in os.walk(root):
            job_dirs += sum(1 for d in dirnames if d.startswith("LOGOUTPUT_"))
            files += len(filenames)
            for f in filenames:
                try:
                    size += os.lstat(os.path.join(dirpath, f)).st_size
                except OSError:
                    pass
    return {"job_log_dirs": job_dirs, "output_files": files, "output_mb": size / 2**20}


def _status_lengths(status: dict, prefix: str = "") -> dict:
    """The length of every list and dict in /status (what is kept per batch shows here)."""
    out = {}
    for key, value in status.items():
        name = f"{prefix}{key}"
        if isinstance(value, (list, dict)):
            out[f"status.{name}.len"] = len(value)
        if isinstance(value, dict) and len(value) < 50:
            out.update(_status_lengths(value, name + "."))
    return out


def sample(cluster: Cluster, feeder: Feeder, state_dir: Path, output_roots: list[Path],
           bcorch_metrics: str, started: float) -> dict:
    row: dict = {"t_s": time.monotonic() - started, "files_written": feeder.written}
    row["batches_done"], row["jobs"] = _batches_done(state_dir)
    for name, proc in (("manager", cluster.manager), ("bcorch", cluster.bcorch)):
        for key, value in _proc_figures(proc.pid).items():
            row[f"{name}.{key}"] = value
    engines = [_proc_figures(pid) for pid in _engines(cluster.bcorch.pid)]
    for key in ("rss_mb", "fds", "threads"):
        values = [e[key] for e in engines]
        row[f"engines.{key}.sum"] = sum(values)
        row[f"engines.{key}.max"] = max(values, default=0)
    row["engines.count"] = len(engines)
    wal = db = 0
    for f in state_dir.iterdir():
        if f.name.endswith(".sqlite-wal"):
            wal += f.stat().st_size
        elif f.name.endswith(".sqlite"):
            db += f.stat().st_size
    row["sqlite_mb"], row["wal_mb"] = db / 2**20, wal / 2**20
    for name in ("manager.log", "bcorch.log"):
        path = cluster.workdir / name
        row[f"{name}_mb"] = path.stat().st_size / 2**20 if path.exists() else 0.0
    row.update(_dir_figures(output_roots))
    seconds, size, body = _timed_get(cluster.url + "/status")
    row["status_ms"], row["status_kb"] = seconds * 1e3, size / 1024
    if body:
        row.update(_status_lengths(json.loads(body)))
    seconds, size, _ = _timed_get(cluster.url + "/metrics")
    row["metrics_ms"], row["metrics_kb"] = seconds * 1e3, size / 1024
    seconds, size, _ = _timed_get(bcorch_metrics)
    row["bcorch_metrics_ms"], row["bcorch_metrics_kb"] = seconds * 1e3, size / 1024
    return row


def slope_per_1000(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of key against batches_done, times 1000."""
    pts = [(r["batches_done"], r[key]) for r in rows
           if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    if len(pts) < 3:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    return 1000 * sum((x - mx) * (y - my) for x, y in pts) / sxx


def summarise(rows: list[dict], warmup: float, horizon: int) -> dict:
    cut = rows[int(len(rows) * warmup):] if len(rows) > 6 else rows
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))}
                  - {"t_s", "batches_done", "jobs", "files_written"})
    last = rows[-1]
    out = {}
    for key in keys:
        slope = slope_per_1000(cut, key)
        first = next((r[key] for r in cut if key in r), None)
        values = [r[key] for r in cut if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
        half = len(values) // 2
        out[key] = {"first": first, "last": last.get(key), "per_1000": slope,
                    "median_halves": [statistics.median(values[:half]),
                                      statistics.median(values[half:])] if half else None,
                    "at_horizon": None if slope is None or last.get(key) is None else
                    last[key] + slope * (horizon - last["batches_done"]) / 1000}
    return out


def soak_pass(root: Path, args: argparse.Namespace, facility: bool) -> dict:
    name = "facility" if facility else "single-run"
    work = root / name
    work.mkdir(parents=True)
    metrics_port = free_port()
    sections = dict(
        manager={"report_back_interval": 60.0, "scan_interval_s": 0.2, "settle_s": 0.0,
                 "lock_refresh_s": 1.0},
        engine={"optimal_request_size": args.files_per_batch, "work_until_none_left": False,
                "polling_interval": 0.005},
        runner={"samples_per_s": SIMULATE_SAMPLES_PER_S, "startup_s": 0.0,
                "fail_fraction": 0.0},
        orchestrator={"metrics_port": metrics_port, "exit_when_done": False})
    if facility:
        watch = work / "facility"
        targets = []
        for i in range(args.runs):
            pod5 = watch / f"group{i % 2}" / f"sample{i:02d}" / run_dir_name(i) / "pod5"
            pod5.mkdir(parents=True)
            targets.append(pod5)
        cluster = Cluster(work, watch, args.gpus, watch_root=watch, **sections)
        output_roots = [watch]
    else:
        input_dir = work / "in"
        input_dir.mkdir()
        targets = [input_dir]
        cluster = Cluster(work, input_dir, args.gpus, **sections)
        output_roots = [cluster.output_dir]
    state_dir = cluster.db.parent
    feeder = Feeder(targets, work / "staging", args.every_s)
    rows: list[dict] = []
    minutes = args.facility_minutes if facility else args.minutes
    cpu_before = os.times()
    try:
        cluster.start_manager(input_closed=False)
        cluster.start_bcorch(log_level="INFO")
        wait_for(lambda: len([s for s in cluster.slots() if s.get("state") == "RUNNING"])
                 >= args.gpus, 120, "every engine RUNNING", interval=0.2)
        started = time.monotonic()
        feeder.start()
        bcorch_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        end = started + minutes * 60
        while time.monotonic() < end:
            for proc in (cluster.manager, cluster.bcorch):
                if not proc.running():
                    raise RuntimeError(f"{proc.argv[2:4]} exited with {proc.returncode}; "
                                       f"see {proc.log_path}")
            rows.append(sample(cluster, feeder, state_dir, output_roots, bcorch_metrics,
                               started))
            r = rows[-1]
            print(f"  {name} t={r['t_s']:5.0f}s batches={r['batches_done']:6d} "
                  f"written={r['files_written']:6d} mgr={r['manager.rss_mb']:.0f}MB/"
                  f"{r['manager.fds']}fd/{r['manager.threads']}thr bcorch="
                  f"{r['bcorch.rss_mb']:.0f}MB eng={r['engines.rss_mb.max']:.0f}MB "
                  f"wal={r['wal_mb']:.1f}MB status={r['status_ms']:.1f}ms/"
                  f"{r['status_kb']:.1f}kB metrics={r['metrics_ms']:.1f}ms/"
                  f"{r['metrics_kb']:.1f}kB", flush=True)
            time.sleep(args.sample_s)
        feeder.stop()
    finally:
        children_cpu = os.times()
        try:
            feeder.stop()
        finally:
            cluster.close()   # whatever failed: nothing this pass started keeps running
    cpu_after = os.times()
    backlog = feeder.written - rows[-1]["batches_done"] * args.files_per_batch if rows else 0
    result = {
        "name": name, "minutes": minutes, "runs": args.runs if facility else 1,
        "files_written": feeder.written, "batches_done": rows[-1]["batches_done"] if rows else 0,
        "backlog_files_at_end": backlog, "feeder_late_s": feeder.late_s,
        "cpu_s": (cpu_after.children_user + cpu_after.children_system + cpu_after.user
                  + cpu_after.system) - (cpu_before.children_user + cpu_before.children_system
                                         + cpu_before.user + cpu_before.system),
        "cpu_s_before_stop": (children_cpu.user + children_cpu.system)
        - (cpu_before.user + cpu_before.system),
        "growth": summarise(rows, args.warmup, args.horizon_batches),
        "samples": rows,
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        result["workdir"] = str(work)
    return result


def manager_in_process(root: Path, batches: int, seconds_per_batch: float,
                       every: int = 1000) -> dict:
    """The single-run Manager class alone, in this process, far past what the passes reach:
    one-file batches assigned and completed DONE back to back (real SQLite, journal and
    layout moves). Every `every` batches: this process's RSS, the Python heap (tracemalloc)
    and the length of every container the Manager keeps. Tells a leak (the heap grows) from
    caches that fill up (RSS grows, the heap does not). The Manager's clock is a fake one that
    moves seconds_per_batch per batch (the horizon's pace), so what it keeps for a time window
    holds what a real run's window would."""
    import gc
    import logging
    import tracemalloc

    import psutil

    from bcorch.manager.journal import Journal
    from bcorch.manager.layout import Layout
    from bcorch.manager.service import Manager
    from bcorch.manager.store import Store
    from bcorch.protocol import JobState as WireState

    work = root / "in-process"
    inp, out = work / "in", work / "out"
    inp.mkdir(parents=True)
    out.mkdir()
    names = [f"f{i:07d}.pod5" for i in range(batches)]
    for name in names:
        os.close(os.open(inp / name, os.O_CREAT | os.O_WRONLY, 0o644))
    store = Store(str(work / "db.sqlite"), max_attempts=3)
    now = [1000.0]
    store.add_files((name, 1000) for name in names)
    manager = Manager(store, Layout(inp, out), batch_size=1, report_back_interval=60,
                      input_closed=True, journal=Journal(out), clock=lambda: now[0])
    logging.disable(logging.INFO)
    me = psutil.Process()
    rows = []
    tracemalloc.start()
    try:
        manager.recover()
        for i in range(1, batches + 1):
            job_id = manager.assign("gpu0", 1).body["jobid"]
            manager.complete(job_id, WireState.DONE, {}, "", rate=1e6, startup_s=0.1)
            now[0] += seconds_per_batch
            if i % 50 == 0:
                manager.flush_moved()   # the reaper's tick
            if i % every == 0:
                manager.flush_moved()
                gc.collect()
                containers = {k: len(v) for k, v in vars(manager).items()
                              if isinstance(v, (dict, set, list, collections.deque))}
                containers["leases"] = len(manager.leases)
                rows.append({"batches_done": i, "rss_mb": me.memory_info().rss / 2**20,
                             "heap_mb": tracemalloc.get_traced_memory()[0] / 2**20,
                             "fds": len(os.listdir("/proc/self/fd")),
                             "wal_mb": os.path.getsize(f"{work / 'db.sqlite'}-wal") / 2**20,
                             "sqlite_mb": os.path.getsize(work / "db.sqlite") / 2**20,
                             "journal_mb": os.path.getsize(out / "bcmanager.journal") / 2**20,
                             **{f"containers.{k}": v for k, v in containers.items()}})
                r = rows[-1]
                print(f"  in-process batches={i:7d} rss={r['rss_mb']:.1f}MB heap="
                      f"{r['heap_mb']:.2f}MB fds={r['fds']} wal={r['wal_mb']:.1f}MB "
                      f"db={r['sqlite_mb']:.1f}MB journal={r['journal_mb']:.1f}MB "
                      f"largest container={max(containers.values(), default=0)}", flush=True)
    finally:
        tracemalloc.stop()
        logging.disable(logging.NOTSET)
        manager.close()
    return {"name": "in-process manager", "batches_done": batches, "samples": rows}


def manager_over_http(root: Path, batches: int, every: int = 1000, engines: int = 4) -> dict:
    """A real bcmanager process driven by a plain HTTP client in this process: no engines and
    no basecaller processes, so batches pass at the HTTP round trip's pace and the manager
    (server, scanner, live page sampler, metrics) is measured far past the live passes.
    Empty *.pod5 files (ready at once: settle_s 0) are created `every` at a time, ahead of
    the batches, so the scanner keeps finding new files. Every `every` batches: the manager's
    RSS, fds, threads, WAL and database, and a /status and a /metrics."""
    import http.client

    work = root / "over-http"
    input_dir = work / "in"
    input_dir.mkdir(parents=True)
    cluster = Cluster(work, input_dir, 1,
                      manager={"report_back_interval": 600.0, "scan_interval_s": 0.2,
                               "settle_s": 0.0})
    rows: list[dict] = []
    made = 0

    def make_files(n: int) -> None:
        nonlocal made
        for i in range(made, made + n):
            os.close(os.open(input_dir / f"f{i:07d}.pod5", os.O_CREAT | os.O_WRONLY, 0o644))
        made += n

    make_files(2 * every)
    try:
        cluster.start_manager(input_closed=False, wait_files=2 * every)
        conn = http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=30)

        def call(method: str, path: str, body: dict | None = None) -> dict:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data,
                         headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            raw = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{method} {path}: {resp.status} {raw[:200]!r}")
            return json.loads(raw)

        done = 0
        while done < batches:
            engine = f"soak-gpu{done % engines}"
            answer = call("GET", f"/assignwork?engineid={engine}&batchsize=1")
            if not answer.get("batch_size"):   # the scanner has not caught up yet
                time.sleep(0.05)
                continue
            call("POST", "/completed", {"job_id": answer["jobid"], "job_state": "DONE",
                                        "engineid": engine})
            done += 1
            if done % every == 0:
                make_files(every)
                figures = _proc_figures(cluster.manager.pid)
                seconds, size, _ = _timed_get(cluster.url + "/status")
                m_seconds, m_size, _ = _timed_get(cluster.url + "/metrics")
                state_dir = cluster.db.parent
                rows.append({
                    "batches_done": done, **{f"manager.{k}": v for k, v in figures.items()},
                    "sqlite_mb": cluster.db.stat().st_size / 2**20,
                    "wal_mb": sum(f.stat().st_size for f in state_dir.glob("*.sqlite-wal"))
                    / 2**20,
                    "status_ms": seconds * 1e3, "status_kb": size / 1024,
                    "metrics_ms": m_seconds * 1e3, "metrics_kb": m_size / 1024})
                r = rows[-1]
                print(f"  over-http batches={done:7d} rss={r['manager.rss_mb']:.1f}MB "
                      f"fds={r['manager.fds']} threads={r['manager.threads']} "
                      f"wal={r['wal_mb']:.1f}MB db={r['sqlite_mb']:.1f}MB "
                      f"status={r['status_ms']:.1f}ms/{r['status_kb']:.1f}kB "
                      f"metrics={r['metrics_ms']:.1f}ms/{r['metrics_kb']:.1f}kB", flush=True)
        conn.close()
    finally:
        cluster.close()
    return {"name": "manager over HTTP", "batches_done": len(rows) * every, "samples": rows}


def facility_in_process(root: Path, batches: int, runs: int = 3) -> dict:
    """A Facility alone, in this process: `batches` one-file batches over `runs` runs (empty
    *.pod5 files, ready at once), then the length of every container of the Facility, its
    fair share and each run's Manager (live jobs only, per engine or per run, or windowed)."""
    import logging

    from bench_facility import make_root

    from bcorch.config import FacilityConfig, ManagerConfig
    from bcorch.manager.facility import Facility
    from bcorch.protocol import JobState as WireState

    work = root / "facility-in-process"
    make_root(work / "root", runs, -(-batches // runs), ["hac"], [1.0])
    old_state = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(work / "state")
    now = [1000.0]
    logging.disable(logging.INFO)
    fac = Facility(ManagerConfig(watch_root=str(work / "root"), settle_s=0.0,
                                 report_back_interval=1e6), FacilityConfig(),
                   clock=lambda: now[0])
    try:
        fac.scan_tick()
        done = 0
        while done < batches:
            now[0] += 1.0
            answer = fac.assign("gpu0", 1)
            if not answer.body.get("batch_size"):
                break
            fac.complete(answer.body["jobid"], WireState.DONE, {}, "", engine_id="gpu0")
            fac.reap()
            done += 1

        def lengths(obj) -> dict:
            return {k: len(v) for k, v in vars(obj).items()
                    if isinstance(v, (dict, set, list, collections.deque))}
        containers = {f"facility.{k}": v for k, v in lengths(fac).items()}
        containers.update({f"fair_share.{k}": v for k, v in lengths(fac.fair).items()})
        for run in fac._runs.values():
            if run.part is not None:
                for k, v in lengths(run.part.manager).items():
                    key = f"run_manager.{k}"
                    containers[key] = max(containers.get(key, 0), v)
    finally:
        fac.close()
        logging.disable(logging.NOTSET)
        if old_state is None:
            os.environ.pop("XDG_STATE_HOME", None)
        else:
            os.environ["XDG_STATE_HOME"] = old_state
    print(f"\nin-process facility: {done} batches over {runs} runs; containers (the largest "
          f"run's for run_manager.*): {containers}")
    return {"name": "in-process facility", "batches_done": done, "containers": containers}


HEADLINE = ["manager.rss_mb", "manager.fds", "manager.threads", "bcorch.rss_mb", "bcorch.fds",
            "bcorch.threads", "engines.rss_mb.max", "engines.fds.max", "engines.threads.max",
            "sqlite_mb", "wal_mb", "manager.log_mb", "bcorch.log_mb", "job_log_dirs",
            "output_mb", "status_ms", "status_kb", "metrics_ms", "metrics_kb",
            "bcorch_metrics_ms", "bcorch_metrics_kb"]


def print_table(result: dict, horizon: int) -> None:
    print(f"\n{result['name']}: {result['batches_done']} batches DONE in "
          f"{result['minutes']:g} min ({result['files_written']} files written, backlog at the "
          f"end {result['backlog_files_at_end']}), CPU {result['cpu_s']:.0f} s")
    print(f"  {'quantity':<26}{'first':>10}{'last':>10}{'per 1000':>11}{'@' + str(horizon):>12}")
    growth = result["growth"]
    keys = HEADLINE + sorted(k for k in growth if k.startswith("status.") and k not in HEADLINE)
    for key in keys:
        g = growth.get(key)
        if g is None:
            continue
        fmt = lambda v: "-" if v is None or v != v else f"{v:.2f}"  # noqa: E731
        print(f"  {key:<26}{fmt(g['first']):>10}{fmt(g['last']):>10}{fmt(g['per_1000']):>11}"
              f"{fmt(g['at_horizon']):>12}")
        if key.endswith("_ms") and g["median_halves"]:   # timings: the slope is mostly noise
            print(f"  {'  median 1st/2nd half':<26}{fmt(g['median_halves'][0]):>10}"
                  f"{fmt(g['median_halves'][1]):>10}")


def with_growth(result: dict, title: str) -> dict:
    """`result` of a manager pass with its `growth`: for each sampled measure the first and
    last value and the slope per 1000 batches (the first fifth of the samples left out),
    printed as a table under `title`."""
    rows = result["samples"]
    keys = sorted(k for k in rows[0] if k != "batches_done")
    result["growth"] = {k: {"first": rows[0][k], "last": rows[-1][k],
                            "per_1000": slope_per_1000(rows[len(rows) // 5:], k)}
                        for k in keys}
    print(f"\n{title}")
    for k in keys:
        g = result["growth"][k]
        print(f"  {k:<32}{g['first']:>10.2f}{g['last']:>10.2f}{(g['per_1000'] or 0):>11.3f}")
    return result


def main(argv: list[str]) -> int:
    p = BenchParser(prog="bench_soak.py", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=3.0, help="single-run pass (0 = skip)")
    p.add_argument("--facility-minutes", type=float, default=1.5,
                   help="facility pass with --runs run directories (0 = skip)")
    p.add_argument("--runs", type=positive_int, default=3)
    p.add_argument("--gpus", type=positive_int, default=4)
    p.add_argument("--every-s", type=float, default=0.15, help="seconds between two new files")
    p.add_argument("--files-per-batch", type=positive_int, default=1,
                   help="engine.optimal_request_size")
    p.add_argument("--sample-s", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=0.2,
                   help="share of a pass's samples left out of the slopes")
    p.add_argument("--horizon-batches", type=positive_int, default=100_000)
    p.add_argument("--in-process-batches", type=non_negative_int, default=20_000,
                   help="batches through the Manager class alone, in this process (0 = skip)")
    p.add_argument("--http-batches", type=non_negative_int, default=20_000,
                   help="batches through a real bcmanager driven over HTTP, no engines (0 = skip)")
    p.add_argument("--facility-in-process-batches", type=non_negative_int, default=5_500,
                   help="batches through a Facility alone, in this process (0 = skip)")
    p.add_argument("--keep", action="store_true", help="keep the work folders")
    p.add_argument("--out", default="bench-out/soak.json")
    args = p.parse_args(argv)
    if args.minutes < 0 or args.facility_minutes < 0 or args.every_s <= 0 \
            or args.sample_s <= 0 or not 0 <= args.warmup < 1:
        p.error("--minutes, --facility-minutes >= 0; --every-s, --sample-s > 0; "
                "0 <= --warmup < 1")
    root = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                     "command": "python scripts/bench_soak.py " + " ".join(argv),
                     "horizon_batches": args.horizon_batches, "passes": []}
    try:
        for facility, minutes in ((False, args.minutes), (True, args.facility_minutes)):
            if minutes > 0:
                result = soak_pass(root, args, facility)
                results["passes"].append(result)
                print_table(result, args.horizon_batches)
        if args.in_process_batches > 0:
            result = manager_in_process(root, args.in_process_batches,
                                        72 * 3600 / args.horizon_batches)
            results["passes"].append(
                with_growth(result, f"in-process manager: {args.in_process_batches} batches"))
        if args.http_batches > 0:
            result = manager_over_http(root, args.http_batches)
            results["passes"].append(
                with_growth(result, f"manager over HTTP: {result['batches_done']} batches"))
        if args.facility_in_process_batches > 0:
            results["passes"].append(facility_in_process(root, args.facility_in_process_batches,
                                                         args.runs))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    save_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
