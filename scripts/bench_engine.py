"""Engine benchmarks: overhead per batch and the cost of an idle engine.

    python scripts/bench.py engine [--batches 40] [--idle-s 20] [--polling-interval 0.02]
                                   [--json bench-engine.json]

1. Overhead per batch: a real manager (loopback, SQLite) serves --batches one-file
   batches of real POD5 files; one engine (in this process) with the script runner
   running /bin/true works through them. Per batch the engine records: request
   (ask -> answer), keep-alive start, runner start (Popen), completion (basecaller exit
   seen -> /completed answered). Basecaller time is excluded.
2. Idle engine: `bcorch engine` as its own process polling a manager with no input for
   --idle-s seconds: CPU share of one core and RSS.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_cluster import write_json  # noqa: E402
from bcorch.config_writer import write_config  # noqa: E402
from bcorch.orchestrator.local_cluster import LocalCluster, LocalProcess  # noqa: E402
from bench_args import BenchParser, positive_int  # noqa: E402


def _start_manager(tmp: Path, input_dir: Path, output_dir: Path, closed: bool,
                   wait_files: int = 0) -> LocalCluster:
    """The manager alone (the engines here are not bcorch's), with one-file batches."""
    cluster = LocalCluster(tmp / ("manager-closed" if closed else "manager-open"),
                           input_dir=input_dir, output_dir=output_dir, manager={"batch_size": 1})
    cluster.start_manager(input_closed=closed, timeout=30, wait_files=wait_files)
    return cluster


def bench_overhead(tmp: Path, batches: int) -> dict:
    from bcorch.workers.engine import BCEngine
    from bcorch.orchestrator.pod5_dataset import write_dataset
    from bcorch.config import from_mapping

    input_dir, output_dir = tmp / "in", tmp / "out"
    output_dir.mkdir(parents=True)
    write_dataset(input_dir, batches, reads_per_file=1, samples_per_read=4000)
    cluster = _start_manager(tmp, input_dir, output_dir, closed=True, wait_files=batches)
    try:
        conf = from_mapping({
            "manager": {"url": cluster.url},
            "engine": {"input_dir": str(input_dir), "output_dir": str(output_dir),
                       "engine_id": "bench-gpu0", "work_until_none_left": True,
                       "optimal_request_size": 1},
            "runner": {"kind": "script", "bc_script": shutil.which("true") or "/bin/true"}})
        engine = BCEngine(None, 0, conf=conf)
        code = engine.begin_working()
        if code != 0:
            raise RuntimeError(f"engine exited with {code}")
    finally:
        cluster.close()
    parts = {
        "request": [t.received - t.requested for t in engine.batch_timings],
        "keepalive_start": [t.keepalive_started - t.received for t in engine.batch_timings],
        "runner_start": [t.runner_started - t.keepalive_started for t in engine.batch_timings],
        "completion": [t.reported - t.basecaller_ended for t in engine.batch_timings],
        "total_overhead": [t.overhead_s for t in engine.batch_timings],
    }
    return {name: {"median_ms": statistics.median(v) * 1000,
                   "p90_ms": sorted(v)[int(0.9 * (len(v) - 1))] * 1000,
                   "max_ms": max(v) * 1000, "n": len(v)} for name, v in parts.items()}


def bench_idle(tmp: Path, seconds: float, polling_interval: float) -> dict:
    import psutil

    input_dir, output_dir = tmp / "idle-in", tmp / "idle-out"
    input_dir.mkdir(parents=True)
    output_dir.mkdir(parents=True)
    cluster = _start_manager(tmp, input_dir, output_dir, closed=False)
    cfg = write_config(tmp / "engine.toml", simulate=False,
                       manager={"url": cluster.url},
                       engine={"input_dir": str(input_dir), "output_dir": str(output_dir),
                               "polling_interval": polling_interval},
                       runner={"kind": "script", "bc_script": shutil.which("true") or "/bin/true"})
    engine = LocalProcess([sys.executable, "-m", "bcorch.workers.engine_cli", "--gpu", "0",
                           "--config", str(cfg)], tmp / "idle-engine.log").start()
    try:
        p = psutil.Process(engine.pid)
        time.sleep(3.0)  # start-up (imports) is not idling
        cpu0, t0 = sum(p.cpu_times()[:2]), time.monotonic()
        rss = []
        while time.monotonic() - t0 < seconds:
            rss.append(p.memory_info().rss)
            time.sleep(0.5)
        cpu1, t1 = sum(p.cpu_times()[:2]), time.monotonic()
        if not engine.running():
            raise RuntimeError(f"idle engine exited with {engine.returncode}")
    finally:
        engine.stop(timeout=10)
        cluster.close()
    return {"seconds": t1 - t0, "polling_interval_min": polling_interval,
            "cpu_percent_of_core": 100.0 * (cpu1 - cpu0) / (t1 - t0),
            "rss_mb_max": max(rss) / 2**20}


def main(argv: list[str]) -> int:
    parser = BenchParser(prog="bench.py engine", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=positive_int, default=40)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--polling-interval", type=float, default=0.02,
                        help="engine.polling_interval (minutes) of the idle engine")
    parser.add_argument("--json", default="bench-engine.json", help="where to write the results")
    args = parser.parse_args(argv)
    if args.batches < 2 or args.idle_s <= 0 or args.polling_interval <= 0:
        parser.error("--batches must be >= 2, --idle-s and --polling-interval > 0")
    import logging
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmpdir:
        tmp = Path(tmpdir)
        overhead = bench_overhead(tmp, args.batches)
        idle = bench_idle(tmp, args.idle_s, args.polling_interval)
    print(f"engine overhead per batch ({args.batches} batches, basecaller time excluded)")
    print(f"{'phase':<16}{'median ms':>12}{'p90 ms':>10}{'max ms':>10}")
    for name, row in overhead.items():
        print(f"{name:<16}{row['median_ms']:>12.2f}{row['p90_ms']:>10.2f}{row['max_ms']:>10.2f}")
    print(f"\nidle engine ({idle['seconds']:.0f} s, polling_interval {args.polling_interval} min)")
    print(f"cpu {idle['cpu_percent_of_core']:.3f} % of one core, rss max {idle['rss_mb_max']:.1f} MB")
    result = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
              "command": "python scripts/bench.py engine " + " ".join(argv),
              "overhead": overhead, "idle": idle}
    write_json(args.json, result)
    print(f"\nwritten {args.json}")
    ok = overhead["total_overhead"]["median_ms"] <= 50 and idle["cpu_percent_of_core"] < 1 \
        and idle["rss_mb_max"] < 80
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
