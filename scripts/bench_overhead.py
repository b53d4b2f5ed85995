"""What bcorch and its engines cost the host: CPU and RSS at idle and under load.

    python scripts/bench.py overhead [--gpus 4] [--windows 5] [--window-s 5] [--batch-s 3]
                                     [--quick] [--out bench-out/overhead.json]

A real manager and a real `bcorch --gpus virtual:N` with real engines (simulate runner).
Idle: no input, engines at the default polling_interval (1 min). Load: every engine
working through one-file batches of --batch-s seconds (a new basecaller, output check and
completion every --batch-s seconds per engine, far more often than real batches).
CPU is each process's own (user + system, basecaller children excluded), per --window-s
window, as a share of one core; the table shows the median of --windows windows.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cluster import Cluster, wait_for, write_json  # noqa: E402
from bench_args import BenchParser, positive_int  # noqa: E402

SAMPLES_PER_FILE = 10 * 4000


def _cpu(proc) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def measure(cluster: Cluster, windows: int, window_s: float, busy: bool) -> dict:
    """CPU share and RSS of bcorch and of each engine over `windows` windows."""
    import psutil

    parent = psutil.Process(cluster.bcorch.pid)
    parent_cpu, parent_rss, engine_cpu, engine_rss = [], [], [], []
    for _ in range(windows):
        slots = cluster.slots()
        if busy and not all(s["job_id"] for s in slots):
            wait_for(lambda: all(s["job_id"] for s in cluster.slots()), 60, "every engine busy")
            slots = cluster.slots()
        engines = [psutil.Process(s["pid"]) for s in slots]
        c0, e0, t0 = _cpu(parent), [_cpu(e) for e in engines], time.monotonic()
        time.sleep(window_s)  # the measurement window itself
        c1, e1, t1 = _cpu(parent), [_cpu(e) for e in engines], time.monotonic()
        parent_cpu.append(100 * (c1 - c0) / (t1 - t0))
        parent_rss.append(parent.memory_info().rss / 2**20)
        engine_cpu += [100 * (b - a) / (t1 - t0) for a, b in zip(e0, e1)]
        engine_rss += [e.memory_info().rss / 2**20 for e in engines]
    return {"parent_cpu_pct": statistics.median(parent_cpu), "parent_cpu_pct_max": max(parent_cpu),
            "parent_rss_mb": statistics.median(parent_rss),
            "engine_cpu_pct": statistics.median(engine_cpu), "engine_cpu_pct_max": max(engine_cpu),
            "engine_rss_mb": statistics.median(engine_rss), "engine_rss_mb_max": max(engine_rss),
            "windows": windows, "window_s": window_s}


def run(root: Path, args, busy: bool) -> dict:
    from bcorch.orchestrator.pod5_dataset import write_dataset

    work = root / ("load" if busy else "idle")
    input_dir = work / "in"
    input_dir.mkdir(parents=True)
    n_files = 0
    if busy:
        n_files = int(args.gpus * (args.windows * args.window_s + 20) / args.batch_s) + args.gpus
        write_dataset(input_dir, n_files, reads_per_file=10, samples_per_read=4000, seed=8)
    cluster = Cluster(work, input_dir, args.gpus,
                      manager={"batch_size": 1},
                      engine={"optimal_request_size": 1, "work_until_none_left": False,
                              "polling_interval": 1.0},
                      runner={"samples_per_s": SAMPLES_PER_FILE / args.batch_s})
    try:
        cluster.start_manager(input_closed=busy, wait_files=n_files or None)
        cluster.start_bcorch()
        wait_for(lambda: len(s := cluster.slots()) == args.gpus
                 and all(x["state"] == "RUNNING" for x in s), 60, "every engine READY")
        if busy:
            wait_for(lambda: all(s["batches_done"] for s in cluster.slots()), 120,
                     "every engine past its first batch")
        else:
            wait_for(lambda: all(s["engine_state"] not in (None, "STARTING") for s in cluster.slots()),
                     60, "every engine polling")
            time.sleep(2.0)  # let start-up imports finish before the idle windows
        result = measure(cluster, args.windows, args.window_s, busy)
    finally:
        cluster.close()
    result["load_average"] = os.getloadavg()
    return result


def main(argv: list[str]) -> int:
    p = BenchParser(prog="bench.py overhead", description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=positive_int, default=4)
    p.add_argument("--windows", type=positive_int, default=5)
    p.add_argument("--window-s", type=float, default=5.0)
    p.add_argument("--batch-s", type=float, default=3.0, help="ideal seconds of one batch (load)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 GPUs, 2 windows of 2 s")
    p.add_argument("--out", default="bench-out/overhead.json")
    args = p.parse_args(argv)
    if args.quick:
        args.gpus, args.windows, args.window_s = 2, 2, 2.0
    if args.window_s <= 0 or args.batch_s <= 0:
        p.error("--window-s and --batch-s must be > 0")
    root = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    try:
        idle = run(root, args, busy=False)
        load = run(root, args, busy=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nbcorch + {args.gpus} real engines, median of {args.windows} windows of "
          f"{args.window_s:g} s, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    print(f"{'':<26}{'idle':>10}{f'load ({args.batch_s:g} s batches)':>26}")
    rows = [("bcorch CPU % of a core", "parent_cpu_pct", "{:.2f}"),
            ("bcorch RSS MB", "parent_rss_mb", "{:.1f}"),
            ("engine CPU % of a core", "engine_cpu_pct", "{:.2f}"),
            ("engine CPU % (max)", "engine_cpu_pct_max", "{:.2f}"),
            ("engine RSS MB", "engine_rss_mb", "{:.1f}"),
            ("engine RSS MB (max)", "engine_rss_mb_max", "{:.1f}")]
    for name, key, fmt in rows:
        print(f"{name:<26}{fmt.format(idle[key]):>10}{fmt.format(load[key]):>26}")
    out = write_json(args.out, {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                                "command": "python scripts/bench.py overhead " + " ".join(argv),
                                "gpus": args.gpus, "batch_s": args.batch_s,
                                "idle": idle, "load": load})
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
