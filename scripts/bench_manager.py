"""Manager benchmarks: input scan, /assignwork latency at scale, mixed protocol throughput.

    python scripts/bench.py manager [--scan-files 100000] [--big-scan-files 0]
                                    [--pending 1000000] [--assign-requests 2000]
                                    [--clients 64] [--mixed-seconds 10] [--threads 16]
                                    [--json OUT]

scan: empty files named *.pod5 in a tmp dir (1000 per sub-folder), scanned into a
real SQLite file; rescan with no change. assign: a real manager process serving a
database that holds --pending PENDING files; sequential /assignwork (batch 10) over
one keep-alive connection. mixed: --clients threads, each looping assign (batch 1)
-> keepalive -> completed DONE against a real manager; every request counts.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bcorch.config_writer import write_config  # noqa: E402
from bcorch.manager.scanner import Scanner  # noqa: E402
from bcorch.manager.store import Store  # noqa: E402
from bench_cluster import write_json  # noqa: E402
from bench_args import BenchParser, non_negative_int, positive_int  # noqa: E402


def make_files(root: Path, n: int, per_dir: int = 1000) -> None:
    for i in range(n):
        if i % per_dir == 0:
            d = root / f"d{i // per_dir:05d}"
            d.mkdir(parents=True)
        os.close(os.open(d / f"reads_{i:07d}.pod5", os.O_CREAT | os.O_WRONLY, 0o644))


def bench_scan(n: int, tmp: Path) -> dict:
    root = tmp / f"scan{n}"
    t0 = time.perf_counter()
    make_files(root, n)
    made = time.perf_counter() - t0
    store = Store(str(tmp / f"scan{n}.sqlite"), max_attempts=3)
    scanner = Scanner(root, 0, store.add_files, store.known_paths())
    t0 = time.perf_counter()
    added = scanner.scan_once()
    initial = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = scanner.scan_once()
    rescan = time.perf_counter() - t0
    store.close()
    assert added == n and again == 0, (added, again)
    return {"files": n, "create_s": made, "initial_scan_s": initial, "rescan_s": rescan}


class Server:
    """A manager process on a fresh SQLite file; `kind` other than "uvicorn" serves the same
    app with another HTTP server (scripts/bench_connections.py --serve, for comparison)."""

    def __init__(self, tmp: Path, name: str, threads: int = 16, kind: str = "uvicorn",
                 lease_s: float = 600):
        self.inp, self.out = tmp / f"{name}-in", tmp / f"{name}-out"
        self.inp.mkdir()
        self.out.mkdir()
        sock = __import__("socket").socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        cfg = tmp / f"{name}.toml"
        write_config(cfg, manager={"settle_s": 0, "scan_interval_s": 3600, "threads": threads,
                                   "report_back_interval": lease_s})
        args = ["--config", str(cfg), "--input-dir", str(self.inp), "--output-dir", str(self.out),
                "--db", self.db(), "--port", str(self.port), "--log-level", "WARNING"]
        if kind == "uvicorn":
            self.argv = [sys.executable, "-m", "bcorch.manager", *args]
        else:
            self.argv = [sys.executable, str(REPO / "scripts" / "bench_connections.py"),
                         "--serve", kind, *args]
        self.proc: subprocess.Popen | None = None

    def db(self) -> str:
        return str(self.out / "bcmanager.sqlite")

    def __enter__(self) -> "Server":
        self.proc = subprocess.Popen(self.argv, cwd=REPO)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if request(self.conn(), "GET", "/heartbeat")[0] == 200:
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("manager did not start")

    def __exit__(self, *exc) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)


def request(conn: http.client.HTTPConnection, method: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def bench_assign(pending: int, requests: int, tmp: Path) -> dict:
    server = Server(tmp, "assign")
    store = Store(server.db(), max_attempts=3)
    t0 = time.perf_counter()
    chunk = 100_000
    for start in range(0, pending, chunk):
        store.add_files((f"d{i // 1000:05d}/reads_{i:07d}.pod5", 4096)
                        for i in range(start, min(pending, start + chunk)))
    fill = time.perf_counter() - t0
    store.close()
    lat = []
    with server:
        conn = server.conn()
        for i in range(requests):
            t = time.perf_counter()
            code, body = request(conn, "GET", f"/assignwork?engineid=bench{i % 8}&batchsize=10")
            lat.append(time.perf_counter() - t)
            assert code == 200 and body["batch_size"] == 10, body
    ms = [x * 1000 for x in lat]
    return {"pending": pending, "requests": requests, "fill_s": fill,
            "p50_ms": statistics.median(ms), "p99_ms": percentile(ms, 99), "max_ms": max(ms)}


def bench_mixed(clients: int, seconds: float, tmp: Path, threads: int,
                kind: str = "uvicorn") -> dict:
    server = Server(tmp, f"mixed-{kind}", threads=threads, kind=kind)
    store = Store(server.db(), max_attempts=3)
    store.add_files((f"r{i:07d}.pod5", 1000) for i in range(200_000))
    store.close()
    counts = [0] * clients
    errors: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        conn = server.conn()
        try:
            while not stop.is_set():
                code, batch = request(conn, "GET", f"/assignwork?engineid=c{n}&batchsize=1")
                job = batch["jobid"]
                code2, _ = request(conn, "POST", "/keepalive", {"job_id": job, "job_state": "PROCESSING"})
                code3, ans = request(conn, "POST", "/completed", {"job_id": job, "job_state": "DONE"})
                if (code, code2, code3) != (200, 200, 200) or ans != {"ok": True}:
                    errors.append(f"{code} {code2} {code3} {ans}")
                counts[n] += 3
        except Exception as exc:  # reported below, not swallowed
            errors.append(repr(exc))
        finally:
            conn.close()

    import psutil

    with server:
        proc = psutil.Process(server.proc.pid)
        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        cpu0 = sum(proc.cpu_times()[:2])
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join(60)
        elapsed = time.perf_counter() - t0
        server_cpu = sum(proc.cpu_times()[:2]) - cpu0
    total = sum(counts)
    return {"server": kind, "clients": clients, "seconds": elapsed, "requests": total,
            "requests_per_s": total / elapsed, "errors": len(errors),
            "server_cpu_s": server_cpu,
            "server_cpu_ms_per_request": 1000 * server_cpu / max(total, 1),
            "load_average_1m": os.getloadavg()[0],
            "first_error": errors[0] if errors else None}


def main(argv: list[str]) -> int:
    p = BenchParser(prog="bench.py manager", description=__doc__.splitlines()[0])
    p.add_argument("--scan-files", type=positive_int, default=100_000)
    p.add_argument("--big-scan-files", type=non_negative_int, default=0,
                   help="e.g. 1000000 (slow to create)")
    p.add_argument("--pending", type=positive_int, default=1_000_000)
    p.add_argument("--assign-requests", type=positive_int, default=2000)
    p.add_argument("--clients", type=positive_int, default=64)
    p.add_argument("--mixed-seconds", type=float, default=10.0)
    p.add_argument("--threads", type=positive_int, default=16,
                   help="manager.threads of the served manager")
    p.add_argument("--json", default="bench_manager.json", help="where to write the results")
    p.add_argument("--tmp", default=None, help="scratch directory (default: a new tmp dir)")
    args = p.parse_args(argv)
    results: dict = {"machine": f"{os.cpu_count()} cores", "python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmpdir:
        tmp = Path(tmpdir)
        results["scan"] = [bench_scan(args.scan_files, tmp)]
        if args.big_scan_files:
            results["scan"].append(bench_scan(args.big_scan_files, tmp))
        results["assign"] = bench_assign(args.pending, args.assign_requests, tmp)
        results["mixed"] = bench_mixed(args.clients, args.mixed_seconds, tmp, args.threads)
    print(f"{'benchmark':34} {'result':>12}  goal")
    for s in results["scan"]:
        goal = 3.0 if s["files"] <= 100_000 else 30.0
        print(f"{'initial scan, %d files' % s['files']:34} {s['initial_scan_s']:10.2f} s  <= {goal:g} s")
        print(f"{'rescan no change, %d files' % s['files']:34} {s['rescan_s']:10.2f} s  "
              f"{'<= 1 s' if s['files'] <= 100_000 else ''}")
    a = results["assign"]
    print(f"{'/assignwork p50, %d pending' % a['pending']:34} {a['p50_ms']:9.2f} ms")
    print(f"{'/assignwork p99, %d pending' % a['pending']:34} {a['p99_ms']:9.2f} ms  <= 20 ms")
    mx = results["mixed"]
    print(f"{'mixed requests/s, %d clients' % mx['clients']:34} {mx['requests_per_s']:10.0f}    "
          f">= 500   ({mx['errors']} errors)")
    print(f"{'  server CPU per request':34} {mx['server_cpu_ms_per_request']:9.2f} ms"
          f"  (load average {mx['load_average_1m']:.1f} at the end)")
    write_json(args.json, results)
    print(f"results written to {args.json}")
    return 1 if mx["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
