"""Recovery times with real engines: kill -9, SIGSTOP, lease expiry, manager restart.

    python scripts/bench.py recovery [--gpus 4] [--reps 5] [--hang-timeout-s 5]
                                     [--lease-s 6] [--manager-down-s 10] [--quick]
                                     [--out bench-out/recovery.json]

A real manager (subprocess, SQLite) and a real `bcorch --gpus virtual:N` whose engines run
the simulate runner on real POD5 files. Measured from outside: bcorch's control pipe
(slot pid and state), the manager's SQLite file (jobs.created / jobs.finished, wall clock)
and /heartbeat. Medians over --reps repetitions, each on another GPU where it matters.

1. kill -9 of a busy engine -> new engine spawned -> READY -> its next batch assigned.
2. SIGSTOP of a busy engine -> replacement READY (hang_timeout_s) -> its next batch.
3. lease expiry: a frozen engine's lease EXPIRED (jobs.finished) -> the same files
   assigned to another engine (idle engines poll every polling_interval).
4. manager kill -9, down --manager-down-s (longer than the lease, so engines lose their
   leases and exit 75), started again -> every engine working on a new batch.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cluster import Cluster, stop, wait_for, write_json  # noqa: E402
from bench_args import BenchParser, positive_int  # noqa: E402

SAMPLES_PER_FILE = 10 * 4000


def _dataset(directory: Path, n: int, first: int = 0) -> list[Path]:
    from bcorch.orchestrator.pod5_dataset import write_pod5
    import random
    rng = random.Random(first + 8)
    paths = []
    for i in range(first, first + n):
        path = directory / f"reads_{i:05d}.pod5"
        tmp = directory.parent / f".{path.name}"
        write_pod5(tmp, 10, 4000, rng)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def _new_job_of(cluster: Cluster, engine_id: str, after_wall: float) -> float | None:
    rows = cluster.query("SELECT min(created) FROM jobs WHERE engine_id = ? AND created > ?",
                         (engine_id, after_wall))
    return rows[0][0]


def bench_crash_and_hang(root: Path, args) -> dict:
    """Scenarios 1 and 2 on one cluster of busy engines (one-file batches of --file-s)."""
    work = root / "crash"
    input_dir = work / "in"
    input_dir.mkdir(parents=True)
    n_files = args.gpus * (2 * args.reps + 4)
    _dataset(input_dir, n_files)
    cluster = Cluster(work, input_dir, args.gpus,
                      manager={"batch_size": 1, "report_back_interval": args.lease_s},
                      engine={"optimal_request_size": 1},
                      runner={"samples_per_s": SAMPLES_PER_FILE / args.file_s},
                      orchestrator={"hang_timeout_s": args.hang_timeout_s, "healthy_reset_s": 1.0,
                                    "max_restarts": 100})
    crash, hang = [], []
    try:
        cluster.start_manager(input_closed=True, wait_files=n_files)
        cluster.start_bcorch()
        wait_for(lambda: len(s := cluster.slots()) == args.gpus
                 and all(x["state"] == "RUNNING" and x["job_id"] for x in s), 60,
                 "every engine busy")
        for rep in range(2 * args.reps):
            gpu = rep % args.gpus
            kind = "kill" if rep < args.reps else "stop"
            wait_for(lambda: (s := cluster.slots()) and s[gpu]["state"] == "RUNNING"
                     and s[gpu]["job_id"], 60, f"gpu{gpu} busy")
            slot = cluster.slots()[gpu]
            old, engine_id = slot["pid"], slot["engine_id"]
            t0, w0 = time.monotonic(), time.time()
            os.kill(old, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
            spawned = wait_for(lambda: (p := cluster.slots()[gpu]["pid"]) not in (None, old)
                               and time.monotonic(), 120, "a new engine", interval=0.01) - t0
            ready = wait_for(lambda: (s := cluster.slots()[gpu])["pid"] not in (None, old)
                             and s["state"] == "RUNNING" and time.monotonic(), 60,
                             "READY", interval=0.01) - t0
            at_work = wait_for(lambda: _new_job_of(cluster, engine_id, w0), 60,
                               "its next batch", interval=0.02) - w0
            row = {"gpu": gpu, "spawned_s": spawned, "ready_s": ready, "next_batch_s": at_work}
            (crash if kind == "kill" else hang).append(row)
            print(f"  {kind:<4} gpu{gpu}: new engine {spawned:.2f} s, READY {ready:.2f} s, "
                  f"next batch {at_work:.2f} s")
    finally:
        cluster.close()
    return {"kill9": crash, "sigstop": hang, "hang_timeout_s": args.hang_timeout_s}


def bench_lease_expiry(root: Path, args) -> list[dict]:
    """Scenario 3: idle engines, one file dropped in per repetition, its engine frozen."""
    work = root / "lease"
    input_dir = work / "in"
    input_dir.mkdir(parents=True)
    cluster = Cluster(work, input_dir, args.gpus,
                      manager={"batch_size": 1, "report_back_interval": args.lease_s},
                      engine={"optimal_request_size": 1, "work_until_none_left": False},
                      runner={"samples_per_s": SAMPLES_PER_FILE / 2.0},
                      orchestrator={"hang_timeout_s": 600.0})
    rows = []
    try:
        cluster.start_manager(input_closed=False)
        cluster.start_bcorch()
        for rep in range(args.reps):
            wait_for(lambda: len(s := cluster.slots()) == args.gpus
                     and all(x["state"] == "RUNNING" and not x["job_id"] for x in s), 120,
                     "every engine idle")
            _dataset(input_dir, 1, first=rep)
            name = f"reads_{rep:05d}.pod5"
            job = wait_for(lambda: cluster.query(
                "SELECT j.job_id, j.engine_id FROM files f JOIN jobs j ON j.job_id = f.job_id "
                "WHERE f.path = ? AND j.state = 'LIVE'", (name,)), 30, "the file assigned",
                interval=0.02)[0]
            slot = wait_for(lambda: [s for s in cluster.slots() if s["job_id"] == job[0]], 30,
                            "the engine of the job", interval=0.02)[0]
            os.kill(slot["pid"], signal.SIGSTOP)
            frozen = time.time()
            try:
                expired = wait_for(lambda: cluster.query(
                    "SELECT finished FROM jobs WHERE job_id = ? AND state = 'EXPIRED'", (job[0],)),
                    args.lease_s * 3 + 10, "lease expiry", interval=0.02)[0][0]
                again = wait_for(lambda: cluster.query(
                    "SELECT j.created, j.engine_id FROM files f JOIN jobs j ON j.job_id = f.job_id "
                    "WHERE f.path = ? AND j.job_id != ?", (name, job[0])),
                    60, "the batch assigned again", interval=0.02)[0]
            finally:
                os.kill(slot["pid"], signal.SIGCONT)
            row = {"frozen_to_expired_s": expired - frozen, "expired_to_reassigned_s": again[0] - expired,
                   "frozen_to_reassigned_s": again[0] - frozen}
            rows.append(row)
            print(f"  lease: frozen -> EXPIRED {row['frozen_to_expired_s']:.2f} s, EXPIRED -> "
                  f"assigned to {again[1]} {row['expired_to_reassigned_s']:.2f} s")
    finally:
        cluster.close()
    return rows


def bench_manager_restart(root: Path, args) -> list[dict]:
    """Scenario 4: busy engines; the manager is killed, stays down, and is started again."""
    work = root / "restart"
    input_dir = work / "in"
    input_dir.mkdir(parents=True)
    n_files = args.gpus * (3 * args.reps + 4)
    _dataset(input_dir, n_files)
    cluster = Cluster(work, input_dir, args.gpus,
                      manager={"batch_size": 1, "report_back_interval": args.lease_s},
                      engine={"optimal_request_size": 1, "request_retries": 1,
                              "connect_timeout_s": 1.0, "read_timeout_s": 2.0},
                      runner={"samples_per_s": SAMPLES_PER_FILE / args.file_s},
                      orchestrator={"max_restarts": 100, "manager_down_timeout_s": 600.0})
    rows = []
    try:
        cluster.start_manager(input_closed=True, wait_files=n_files)
        cluster.start_bcorch()
        for rep in range(args.reps):
            wait_for(lambda: len(s := cluster.slots()) == args.gpus
                     and all(x["state"] == "RUNNING" and x["job_id"] for x in s), 120,
                     "every engine busy")
            engines = [s["engine_id"] for s in cluster.slots()]
            stop(cluster.manager, signal.SIGKILL)
            time.sleep(max(0.0, args.manager_down_s))  # the outage being simulated, not a wait for a result
            up = cluster.start_manager(input_closed=True)
            up_wall = time.time() - (time.monotonic() - up)
            at_work = wait_for(lambda: (t := [_new_job_of(cluster, e, up_wall) for e in engines])
                               and all(t) and max(t), 300, "every engine at work again",
                               interval=0.05) - up_wall
            rows.append({"manager_down_s": args.manager_down_s, "all_at_work_s": at_work})
            print(f"  manager restart: up -> all {args.gpus} engines on a new batch {at_work:.2f} s")
    finally:
        cluster.close()
    return rows


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main(argv: list[str]) -> int:
    p = BenchParser(prog="bench.py recovery", description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=positive_int, default=4)
    p.add_argument("--reps", type=positive_int, default=5)
    p.add_argument("--hang-timeout-s", type=float, default=5.0, help="orchestrator.hang_timeout_s")
    p.add_argument("--lease-s", type=float, default=6.0, help="manager.report_back_interval")
    p.add_argument("--manager-down-s", type=float, default=10.0)
    p.add_argument("--file-s", type=float, default=30.0, help="ideal seconds of one batch")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 GPUs, 2 repetitions")
    p.add_argument("--out", default="bench-out/recovery.json")
    args = p.parse_args(argv)
    if args.quick:
        args.gpus, args.reps = 2, 2
    if args.hang_timeout_s < 1 or args.lease_s < 1 or args.manager_down_s < 0 or args.file_s <= 0:
        p.error("--hang-timeout-s and --lease-s must be >= 1, --manager-down-s >= 0, --file-s > 0")
    root = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                     "command": "python scripts/bench.py recovery " + " ".join(argv),
                     "gpus": args.gpus, "reps": args.reps, "lease_s": args.lease_s,
                     "load_average_at_start": os.getloadavg()}
    try:
        results.update(bench_crash_and_hang(root, args))
        results["lease"] = bench_lease_expiry(root, args)
        results["manager_restart"] = bench_manager_restart(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["load_average_at_end"] = os.getloadavg()
    table = [
        ("kill -9 -> new engine spawned", _median(results["kill9"], "spawned_s")),
        ("kill -9 -> replacement READY", _median(results["kill9"], "ready_s")),
        ("kill -9 -> its next batch assigned", _median(results["kill9"], "next_batch_s")),
        (f"SIGSTOP -> replacement READY (hang_timeout_s {args.hang_timeout_s:g})",
         _median(results["sigstop"], "ready_s")),
        ("SIGSTOP -> its next batch assigned", _median(results["sigstop"], "next_batch_s")),
        (f"frozen -> lease EXPIRED (lease {args.lease_s:g} s)",
         _median(results["lease"], "frozen_to_expired_s")),
        ("lease EXPIRED -> batch assigned again", _median(results["lease"], "expired_to_reassigned_s")),
        (f"manager up again (down {args.manager_down_s:g} s) -> all engines on a new batch",
         _median(results["manager_restart"], "all_at_work_s")),
    ]
    results["medians_s"] = {name: value for name, value in table}
    width = max(len(name) for name, _ in table)
    print(f"\nrecovery, {args.gpus} virtual GPUs, real engines (simulate runner), "
          f"median of {args.reps}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    for name, value in table:
        print(f"  {name.ljust(width)}  {value:7.2f} s")
    out = write_json(args.out, results)
    print(f"  JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
