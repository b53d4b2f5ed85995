"""A live run: POD5 files arrive one every --every-s seconds while the fleet basecalls them.

    python scripts/bench.py live [--gpus 4] [--minutes 10] [--every-s 2] [--file-s 1-7]
                                 [--startup-s 10] [--startup-per batch|engine] [--original]
                                 [--speed 1] [--out bench-out/live.json]

A real manager (subprocess, SQLite, open input) and a real `bcorch --gpus virtual:N` with the
simulate runner. A feeder thread hard-links pre-written POD5 files (each whole before it is
named *.pod5) into INPUT_DIR on a fixed schedule and notes when each became ready. Per file:

    lag = its job's DONE (jobs.finished in the manager's SQLite file) - the moment it was linked
          into INPUT_DIR (the reads are in OUTPUT_DIR when the job is DONE)

and for the run:

    useful     = sum over files of num_samples / samples_per_s (basecalling only)
    start-up   = startup_s x batches ("batch": dorado loads its model per batch), or
                 startup_s x engines used ("engine": a dorado-server loads it once)
    share      = start-up / useful            (issue 14 goal: at most 0.10)
    lag p95                                   (issue 14 goal: at most 2 min)

--original models the original pipeline's timing: engines ask for --request-size files,
pause busy_pause_s 30 after every batch and poll every polling_interval 1 minute after an
empty answer, against a manager that answers at once (the original manager had no long
poll: a proxy in this process drops `wait_s` from /assignwork).

--speed S runs the same schedule S times faster: files every every_s / S, S times the
samples per second (each file's basecalling takes 1/S as long), startup_s / S, and in the
--original model busy_pause_s / S and polling_interval / S. Every duration the policies
see shrinks by S, so the manager's batch sizes in files and the order of events are the
same; lags are printed multiplied back by S. What does not shrink is the machine's own
per-batch cost (process start, HTTP, output check: tens of ms), which weighs S times more,
so a scaled run is pessimistic for ours, and the manager's scan (every 0.2 s).
"""
from __future__ import annotations

import argparse
import http.client
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cluster import Cluster, free_port, samples_in, save_results, wait_for  # noqa: E402
from bench_fleet import SAMPLES_PER_FILE, write_mixed_files  # noqa: E402
from bench_args import BenchParser, positive_int  # noqa: E402


class NoLongPoll:
    """A forwarding proxy that drops /assignwork's wait_s: the original manager answered
    at once, so an engine with nothing to do waited its polling_interval."""

    def __init__(self, upstream_port: int):
        upstream = upstream_port

        class _H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                parts = urlsplit(self.path)
                query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                         if not (parts.path == "/assignwork" and k == "wait_s")]
                path = parts.path + (f"?{urlencode(query)}" if query else "")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() in ("content-type", "authorization")}
                conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=60)
                try:
                    conn.request(self.command, path, body=body, headers=headers)
                    resp = conn.getresponse()
                    raw, status = resp.read(), resp.status
                    ctype = resp.getheader("Content-Type", "application/json")
                finally:
                    conn.close()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = _forward

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


class Feeder(threading.Thread):
    """Links files[i] into input_dir at start + i * every_s; ready[name] = wall time."""

    def __init__(self, files: list[Path], input_dir: Path, every_s: float):
        super().__init__(daemon=True)
        self.files, self.input_dir, self.every_s = files, input_dir, every_s
        self.ready: dict[str, float] = {}
        self.late_s = 0.0          # how far behind its schedule the feeder fell, at most
        self._halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        for i, path in enumerate(self.files):
            due = start + i * self.every_s
            if self._halt.wait(max(0.0, due - time.monotonic())):
                return
            self.late_s = max(self.late_s, time.monotonic() - due)
            os.link(path, self.input_dir / path.name)
            self.ready[path.name] = time.time()

    def stop(self) -> None:
        self._halt.set()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_live(root: Path, dataset: Path, args: argparse.Namespace, original: bool) -> dict:
    speed = args.speed
    name = "original" if original else "ours"
    work = root / name
    input_dir = work / "in"
    input_dir.mkdir(parents=True)
    files = sorted(dataset.glob("mixed_*.pod5"))
    rate = SAMPLES_PER_FILE * speed            # a file of k s of work takes k / speed s
    startup = args.startup_s / speed
    engine = ({"optimal_request_size": args.request_size, "busy_pause_s": 30.0 / speed,
               "polling_interval": 1.0 / speed} if original else {})
    port = free_port()
    proxy = NoLongPoll(port) if original else None
    cluster = Cluster(work, input_dir, args.gpus, port=port,
                      manager={"report_back_interval": 90.0,
                               **({"url": proxy.url} if proxy else {})},
                      engine=engine,
                      runner={"samples_per_s": rate, "startup_s": startup,
                              "startup_per": args.startup_per, "fail_fraction": 0.0})
    feeder = Feeder(files, input_dir, args.every_s / speed)
    load_before = os.getloadavg()[0]
    try:
        cluster.start_manager(input_closed=False)
        cluster.start_bcorch()
        wait_for(lambda: len([s for s in cluster.slots() if s.get("state") == "RUNNING"])
                 >= args.gpus, 60, "every engine RUNNING", interval=0.1)
        feeder.start()
        schedule_s = len(files) * args.every_s / speed
        wait_for(lambda: cluster.all_done(len(files)), schedule_s * 4 + 600,
                 f"{name}: all {len(files)} files DONE", interval=0.5)
        rows = cluster.query(
            "SELECT f.path, j.finished, j.job_id FROM files f JOIN jobs j ON j.job_id = f.job_id "
            "WHERE f.state = 'DONE'")
        jobs = cluster.query("SELECT engine_id, created, finished, n_files FROM jobs "
                             "WHERE state = 'DONE' ORDER BY created")
        other = cluster.query("SELECT state, count(*) FROM jobs WHERE state != 'DONE' "
                              "GROUP BY state")
    finally:
        feeder.stop()
        cluster.close()
        if proxy is not None:
            proxy.close()
    samples = samples_in(input_dir)
    shutil.rmtree(work, ignore_errors=True)
    lags = [(finished - feeder.ready[Path(path).name]) * speed for path, finished, _ in rows]
    useful = samples / rate * speed
    engines_used = len({j[0] for j in jobs})
    paid = args.startup_s * (len(jobs) if args.startup_per == "batch" else engines_used)
    sizes = sorted(j[3] for j in jobs)
    first_ready = min(feeder.ready.values())
    return {
        "name": name, "original": original, "gpus": args.gpus, "files": len(files),
        "every_s": args.every_s, "speed": speed, "startup_s": args.startup_s,
        "startup_per": args.startup_per,
        "request_size": args.request_size if original else 0,
        "batches": len(jobs), "not_done_jobs": dict(other), "engines_used": engines_used,
        "batch_files": {"min": sizes[0], "median": statistics.median(sizes), "max": sizes[-1]},
        "useful_s": useful, "startup_paid_s": paid, "startup_share": paid / useful,
        "lag_s": {"p50": _percentile(lags, 0.5), "p95": _percentile(lags, 0.95),
                  "max": max(lags), "n": len(lags)},
        "run_s": (max(j[2] for j in jobs) - first_ready) * speed,
        "feeder_late_s": feeder.late_s * speed,
        "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
    }


def _seconds_range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH whole seconds, got {text!r}")
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected 1 <= LOW <= HIGH, got {text!r}")
    return low, high


def print_row(r: dict) -> None:
    lag = r["lag_s"]
    print(f"{r['name']:>8}: {r['files']} files, {r['batches']} batches (files min/median/max "
          f"{r['batch_files']['min']}/{r['batch_files']['median']:g}/{r['batch_files']['max']}), "
          f"useful {r['useful_s']:.0f} s, start-up paid {r['startup_paid_s']:.0f} s "
          f"= {r['startup_share']:.3f} of useful, lag p50/p95/max {lag['p50']:.1f}/"
          f"{lag['p95']:.1f}/{lag['max']:.1f} s, run {r['run_s']:.0f} s, load "
          f"{r['load_average_before']:.1f} -> {r['load_average_after']:.1f}", flush=True)


def main(argv: list[str]) -> int:
    p = BenchParser(prog="bench.py live", description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=positive_int, default=4)
    p.add_argument("--minutes", type=float, default=10.0, help="how long files keep arriving")
    p.add_argument("--every-s", type=float, default=2.0, help="seconds between two files")
    p.add_argument("--file-s", type=_seconds_range, default=(1, 7),
                   help="a file's basecalling seconds, uniform whole seconds LOW-HIGH")
    p.add_argument("--startup-s", type=float, default=10.0)
    p.add_argument("--startup-per", choices=("batch", "engine"), default="batch",
                   help="engine: the dorado-server model (start-up paid once per engine)")
    p.add_argument("--modes", default="ours",
                   help="comma-separated: ours, original (the original's timing)")
    p.add_argument("--request-size", type=positive_int, default=10,
                   help="files per batch the original's engines ask for")
    p.add_argument("--speed", type=float, default=1.0,
                   help="run the schedule this many times faster (see the module doc)")
    p.add_argument("--out", default="bench-out/live.json")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"ours", "original"}:
        p.error(f"--modes: ours and/or original, got {args.modes!r}")
    if args.minutes <= 0 or args.every_s <= 0 or args.speed <= 0 or args.startup_s < 0:
        p.error("--minutes, --every-s, --speed > 0; --startup-s >= 0")
    n_files = max(1, round(args.minutes * 60 / args.every_s))
    root = Path(tempfile.mkdtemp(prefix="bench-live-"))
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                     "command": "python scripts/bench.py live " + " ".join(argv), "runs": []}
    try:
        t = time.monotonic()
        write_mixed_files(root / "dataset", n_files, seconds=args.file_s)
        print(f"wrote {n_files} POD5 files of {args.file_s[0]} to {args.file_s[1]} s in "
              f"{time.monotonic() - t:.1f} s; load average {os.getloadavg()[0]:.2f}", flush=True)
        for mode in modes:
            row = run_live(root, root / "dataset", args, original=mode == "original")
            results["runs"].append(row)
            print_row(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    save_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
