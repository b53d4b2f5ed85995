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
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_manager(tmp: Path, input_dir: Path, output_dir: Path, closed: bool):
    port = _free_port()
    cfg = tmp / "manager.toml"
    cfg.write_text("[manager]\nsettle_s = 0\nscan_interval_s = 0.2\nbatch_size = 1\n")
    argv = [sys.executable, "-m", "bcorch.manager", "--config", str(cfg), "--input-dir", str(input_dir),
            "--output-dir", str(output_dir), "--port", str(port)] + (["--input-closed"] if closed else [])
    log = open(tmp / "manager.log", "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"manager exited with {proc.returncode}; see {tmp / 'manager.log'}")
        try:
            with urllib.request.urlopen(url + "/status", timeout=1) as resp:
                status = json.loads(resp.read())
            return proc, url, status
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("manager did not answer within 30 s")


def _wait_files(url: str, n: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/status", timeout=5) as resp:
            if sum(json.loads(resp.read())["files"].values()) >= n:
                return
        time.sleep(0.1)
    raise RuntimeError(f"manager did not find {n} files")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def bench_overhead(tmp: Path, batches: int) -> dict:
    from bcorch.workers.engine import BCEngine
    from bcorch.orchestrator.pod5_dataset import write_dataset
    from bcorch.config import from_mapping

    input_dir, output_dir = tmp / "in", tmp / "out"
    output_dir.mkdir(parents=True)
    write_dataset(input_dir, batches, reads_per_file=1, samples_per_read=4000)
    proc, url, _ = _start_manager(tmp, input_dir, output_dir, closed=True)
    try:
        _wait_files(url, batches)
        conf = from_mapping({
            "manager": {"url": url},
            "engine": {"input_dir": str(input_dir), "output_dir": str(output_dir),
                       "engine_id": "bench-gpu0", "work_until_none_left": True,
                       "optimal_request_size": 1},
            "runner": {"kind": "script", "bc_script": shutil.which("true") or "/bin/true"}})
        engine = BCEngine(None, 0, conf=conf)
        code = engine.begin_working()
        if code != 0:
            raise RuntimeError(f"engine exited with {code}")
    finally:
        _stop(proc)
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
    proc, url, _ = _start_manager(tmp, input_dir, output_dir, closed=False)
    cfg = tmp / "engine.toml"
    cfg.write_text(f'[manager]\nurl = "{url}"\n[engine]\ninput_dir = "{input_dir}"\n'
                   f'output_dir = "{output_dir}"\npolling_interval = {polling_interval}\n'
                   f'[runner]\nkind = "script"\nbc_script = "{shutil.which("true") or "/bin/true"}"\n')
    engine = subprocess.Popen([sys.executable, "-m", "bcorch.workers.engine_cli", "--gpu", "0",
                               "--config", str(cfg)], stdout=subprocess.DEVNULL,
                              stderr=open(tmp / "idle-engine.log", "ab"), cwd=REPO,
                              start_new_session=True)
    try:
        p = psutil.Process(engine.pid)
        time.sleep(3.0)  # start-up (imports) is not idling
        cpu0, t0 = sum(p.cpu_times()[:2]), time.monotonic()
        rss = []
        while time.monotonic() - t0 < seconds:
            rss.append(p.memory_info().rss)
            time.sleep(0.5)
        cpu1, t1 = sum(p.cpu_times()[:2]), time.monotonic()
        if engine.poll() is not None:
            raise RuntimeError(f"idle engine exited with {engine.returncode}")
    finally:
        _stop(engine)
        _stop(proc)
    return {"seconds": t1 - t0, "polling_interval_min": polling_interval,
            "cpu_percent_of_core": 100.0 * (cpu1 - cpu0) / (t1 - t0),
            "rss_mb_max": max(rss) / 2**20}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py engine", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
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
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\nwritten {args.json}")
    ok = overhead["total_overhead"]["median_ms"] <= 50 and idle["cpu_percent_of_core"] < 1 \
        and idle["rss_mb_max"] < 80
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
