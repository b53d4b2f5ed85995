"""Facility mode (issue 13): many runs on one manager: scan cost, assign latency, model switches.

    python scripts/bench.py facility [--runs 48] [--files 2000] [--models hac sup sup,5mCG_5hmCG]
                                     [--priorities 1 2] [--engines 16 64] [--batches 3000]
                                     [--idle-s 30] [--sim-engines 16] [--slacks 600 0]
                                     [--skip-http] [--skip-sim] [--json OUT]

Runs in the MinKNOW layout, {root}/{group}/{sample}/{start}_{device}_{flow cell}_{id}/pod5/,
each with --files empty *.pod5 files (1,000 per folder is not needed: MinKNOW writes one flat
pod5/ folder) and a bcorch.toml giving it a model (runs take --models in turn) and a priority
(--priorities in turn). Empty files cannot be checked as POD5, so they are taken by the settle
timer (settle_s 0), as in bench_manager.py.

scan: a real manager process (`python -m bcorch.manager --watch-root`): time from its start
until /status counts every file PENDING; then its CPU while idle for --idle-s (a scan tick every
scan_interval_s, the lease reaper every second). rescan: the same root opened in process by a
Facility after the manager stopped; each scan_tick is timed (discovery + one scan per run, no
change). assign: the manager started again (its restart time is reported), then for each
--engines count, that many threads each loop GET /assignwork (batchsize --batch) -> POST
/completed DONE over HTTP until --batches batches are done; every request is timed.

fair share: in process, on a fake clock (the Facility charges a batch the facility clock's time
from its assignment to its completion, so simulated hours need a clock of our own; HTTP adds
nothing to which run is picked). --sim-engines engines take batches of --batch files from a
fresh tree; a batch lasts --model-load-s when the engine's model changes, plus the files' GPU
seconds (--file-s per model, in --models order). Reported per --slacks value: model switches per
simulated hour, and each run's GPU time over the time every run still had work, against its
priority weight.
"""
from __future__ import annotations

import argparse
import heapq
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bcorch.config import FacilityConfig, ManagerConfig  # noqa: E402
from bcorch.config_writer import write_config  # noqa: E402
from bench_cluster import write_json  # noqa: E402
from bench_manager import percentile, request  # noqa: E402
from bench_args import BenchParser, non_negative_int, positive_int  # noqa: E402

DEFAULT_MODELS = ["hac", "sup", "sup,5mCG_5hmCG"]
DEFAULT_FILE_S = [6.0, 18.0, 24.0]   # GPU seconds per file: sup ~3x hac, methylation on top


def run_name(i: int) -> str:
    return f"20261126_1200_P2S-{i // 4:05d}-{'ABCD'[i % 4]}_PAW{i:05d}_{i:08x}"


def make_root(root: Path, runs: int, files: int, models: list[str],
              priorities: list[float]) -> list[dict]:
    """The runs' directories and files; returns each run's name, model and priority."""
    made = []
    for i in range(runs):
        group = f"group{i % 4}"
        run = root / group / f"sample{i:02d}" / run_name(i)
        pod5 = run / "pod5"
        pod5.mkdir(parents=True)
        model, priority = models[i % len(models)], priorities[i % len(priorities)]
        (run / "bcorch.toml").write_text(f'[run]\nmodel = "{model}"\npriority = {priority}\n')
        for j in range(files):
            os.close(os.open(pod5 / f"PAW{i:05d}_pass_{j:05d}.pod5",
                             os.O_CREAT | os.O_WRONLY, 0o644))
        made.append({"run_id": run.name, "model": model, "priority": priority})
    return made


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load() -> float:
    return round(os.getloadavg()[0], 2)


class FacilityServer:
    """A real manager process serving the facility under root."""

    def __init__(self, tmp: Path, root: Path, threads: int, scan_interval_s: float):
        self.root, self.port = root, free_port()
        self.env = {**os.environ, "XDG_STATE_HOME": str(tmp / "state")}
        cfg = tmp / "facility.toml"
        write_config(cfg, manager={"settle_s": 0, "scan_interval_s": scan_interval_s,
                                   "threads": threads, "report_back_interval": 600})
        self.argv = [sys.executable, "-m", "bcorch.manager", "--config", str(cfg),
                     "--watch-root", str(root), "--port", str(self.port),
                     "--log-level", "WARNING"]
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def __enter__(self) -> "FacilityServer":
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=self.env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"manager exited with {self.proc.returncode}")
            try:
                if request(self.conn(), "GET", "/heartbeat")[0] == 200:
                    self.serving_s = time.perf_counter() - self.started
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("manager did not start")

    def __exit__(self, *exc) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def status(self) -> dict:
        code, body = request(self.conn(), "GET", "/status")
        assert code == 200, body
        return body

    def wait_pending(self, total: int, runs: int, timeout: float = 900) -> float:
        """Seconds from the process start until every file is PENDING in every run."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if len(st["runs"]) == runs and st["files"]["PENDING"] >= total:
                return time.perf_counter() - self.started
            time.sleep(0.2)
        raise RuntimeError("the files did not all become PENDING")


def bench_scan(server: FacilityServer, total: int, runs: int, idle_s: float) -> dict:
    import psutil

    load_before = load()
    with server:
        serving = server.serving_s
        pending = server.wait_pending(total, runs)
        proc = psutil.Process(server.proc.pid)
        time.sleep(2)   # the tick that found the last files may still be finishing
        cpu0, t0 = sum(proc.cpu_times()[:2]), time.perf_counter()
        time.sleep(idle_s)
        idle_cpu = sum(proc.cpu_times()[:2]) - cpu0
        idle_wall = time.perf_counter() - t0
        st_lat = []
        for _ in range(20):
            t = time.perf_counter()
            server.status()
            st_lat.append((time.perf_counter() - t) * 1000)
        rss = proc.memory_info().rss
    return {"serving_s": serving, "all_pending_s": pending, "idle_s": idle_wall,
            "idle_cpu_s": idle_cpu, "idle_cpu_percent": 100 * idle_cpu / idle_wall,
            "status_p50_ms": statistics.median(st_lat), "status_max_ms": max(st_lat),
            "rss_mib": rss / 2**20, "load_before": load_before, "load_after": load()}


def bench_rescan(tmp: Path, root: Path, ticks: int = 3) -> dict:
    """The root opened in process after the manager stopped: every tick finds nothing new."""
    from bcorch.manager.facility import Facility

    os.environ["XDG_STATE_HOME"] = str(tmp / "state")
    cfg = ManagerConfig(watch_root=str(root), settle_s=0.0, report_back_interval=600.0)
    t0 = time.perf_counter()
    fac = Facility(cfg, FacilityConfig())
    opened = time.perf_counter() - t0
    times = []
    try:
        for _ in range(ticks):
            t = time.perf_counter()
            fac.scan_tick()
            times.append(time.perf_counter() - t)
    finally:
        fac.close()
    return {"open_s": opened, "tick_s": times, "tick_median_s": statistics.median(times),
            "load": load()}


def bench_assign(server: FacilityServer, engines: int, batches: int, batch: int,
                 think_s: float = 0.0) -> dict:
    """engines threads loop assign -> completed; think_s > 0: each then waits a random
    0..2*think_s (a fleet whose batches take time), else none (the manager saturated)."""
    import psutil

    assign_ms: list[float] = []
    done_ms: list[float] = []
    errors: list[str] = []
    per_engine = max(1, batches // engines)
    lock = threading.Lock()

    def engine(n: int) -> None:
        conn = server.conn()
        mine_a, mine_d = [], []
        if think_s:   # engines that started at different times
            time.sleep(random.uniform(0, 2 * think_s))
        try:
            for _ in range(per_engine):
                t = time.perf_counter()
                code, ans = request(conn, "GET",
                                    f"/assignwork?engineid=e{engines}-{n}&batchsize={batch}")
                mine_a.append((time.perf_counter() - t) * 1000)
                if code != 200 or not ans.get("batch_size"):
                    errors.append(f"assign {code} {str(ans)[:200]}")
                    return
                t = time.perf_counter()
                code, done = request(conn, "POST", "/completed",
                                     {"job_id": ans["jobid"], "job_state": "DONE"})
                mine_d.append((time.perf_counter() - t) * 1000)
                if code != 200 or not done.get("ok"):
                    errors.append(f"completed {code} {str(done)[:200]}")
                    return
                if think_s:
                    time.sleep(random.uniform(0, 2 * think_s))
        except Exception as exc:  # reported below, not swallowed
            errors.append(repr(exc))
        finally:
            conn.close()
            with lock:
                assign_ms.extend(mine_a)
                done_ms.extend(mine_d)

    proc = psutil.Process(server.proc.pid)
    load_before = load()
    threads = [threading.Thread(target=engine, args=(n,)) for n in range(engines)]
    cpu0, t0 = sum(proc.cpu_times()[:2]), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    elapsed = time.perf_counter() - t0
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    if not done_ms:
        raise RuntimeError(f"no batch completed: {errors[:1]}")
    return {"engines": engines, "think_s": think_s, "batch": batch, "batches": len(done_ms),
            "seconds": elapsed, "batches_per_s": len(done_ms) / elapsed,
            "assign_p50_ms": statistics.median(assign_ms),
            "assign_p99_ms": percentile(assign_ms, 99),
            "assign_max_ms": max(assign_ms),
            "completed_p50_ms": statistics.median(done_ms),
            "completed_p99_ms": percentile(done_ms, 99),
            "server_cpu_ms_per_batch": 1000 * cpu / max(1, len(done_ms)),
            "errors": len(errors), "first_error": errors[0] if errors else None,
            "load_before": load_before, "load_after": load()}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def simulate(tmp: Path, root: Path, runs: list[dict], engines: int, batch: int, slack: float,
             file_s: dict[str, float], model_load_s: float,
             arrivals: list[tuple[float, Path, Path]] = ()) -> dict:
    """Engines on a fake clock take batches from an in-process Facility until all is done.

    arrivals: (hours after the start, staged run dir, its place under root): each is moved
    in at its time and found by the next scan tick.
    """
    from bcorch.manager.facility import Facility
    from bcorch.protocol import JobState

    os.environ["XDG_STATE_HOME"] = str(tmp / f"state-{root.name}")
    clock = FakeClock()
    cfg = ManagerConfig(watch_root=str(root), settle_s=0.0, report_back_interval=1e6)
    fac = Facility(cfg, FacilityConfig(switch_slack_s=slack), clock=clock)
    real0 = time.perf_counter()
    try:
        start = clock.now
        waiting = sorted((start + h * 3600, staged, place) for h, staged, place in arrivals)

        def arrive(now: float) -> None:
            while waiting and waiting[0][0] <= now:
                _, staged, place = waiting.pop(0)
                place.parent.mkdir(parents=True, exist_ok=True)
                os.rename(staged, place)
            fac.scan_tick()

        arrive(start)
        free: list[tuple[float, int]] = [(start, n) for n in range(engines)]
        jobs: dict[int, str] = {}
        model_of: dict[int, str] = {}
        loads = 0
        backlogged: dict | None = None
        while free:
            t, n = heapq.heappop(free)
            clock.now = t
            if waiting and waiting[0][0] <= t:
                arrive(t)
            if n in jobs:
                done = fac.complete(jobs.pop(n), JobState.DONE, {}, "", engine_id=f"gpu{n}")
                assert done.body.get("ok"), done.body
            ans = fac.assign(f"gpu{n}", batch)
            assert ans.status == 200, ans.body
            size = ans.body.get("batch_size", 0)
            if not size:   # ask again when another batch ends or the next run arrives
                retry = ([min(f[0] for f in free)] if jobs else []) + [w[0] for w in waiting[:1]]
                if retry:
                    heapq.heappush(free, (max(t + 1.0, min(retry)), n))
                continue
            if backlogged is None and not waiting and any(
                    snap.files["PENDING"] == 0 for _, snap in fac.counters()):
                backlogged = {"at_h": (t - start) / 3600, "served": fac.served(),
                              "switches": sum(fac.fair.switches().values())}
            model = ans.body["model"]
            duration = size * file_s[model]
            if model_of.get(n) != model:
                duration += model_load_s
                loads += 1
            model_of[n] = model
            jobs[n] = ans.body["jobid"]
            heapq.heappush(free, (t + duration, n))
        end = clock.now
        status = fac.status()
        served_at_end = fac.served()
        if backlogged is None:
            backlogged = {"at_h": (end - start) / 3600, "served": served_at_end,
                          "switches": status["facility"]["model_switches_total"]}
    finally:
        fac.close()
    hours = (end - start) / 3600
    switches = status["facility"]["model_switches_total"]
    files_done = status["files"]["DONE"]
    served = backlogged["served"]
    if sum(served.values()) <= 0:   # a run ran out of work before any batch finished
        served = served_at_end
    shares = shares_of(runs, served)
    by_priority = {}
    for p in sorted({r["priority"] for r in shares}):
        ratios = [s["ratio"] for s in shares if s["priority"] == p]
        by_priority[f"{p:g}"] = {"runs": len(ratios), "share": sum(
            s["share"] for s in shares if s["priority"] == p),
            "weighted_share": sum(s["weighted_share"] for s in shares if s["priority"] == p),
            "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return {"slack_s": slack, "arrive_over_h": max((a[0] for a in arrivals), default=0.0),
            "engines": engines, "batch": batch, "files_done": files_done,
            "simulated_h": hours, "switches": switches,
            "switches_per_hour": switches / hours if hours else 0.0,
            "switches_per_engine_hour": switches / hours / engines if hours else 0.0,
            "facility_switches_per_hour": status["facility"]["model_switches_per_hour"],
            "model_loads": loads, "backlogged_h": backlogged["at_h"],
            "backlogged_switches_per_hour": (backlogged["switches"] / backlogged["at_h"]
                                             if backlogged["at_h"] else 0.0),
            "share_by_priority": by_priority,
            "share_ratio_min": min((s["ratio"] for s in shares), default=None),
            "share_ratio_max": max((s["ratio"] for s in shares), default=None),
            "shares": shares, "real_s": time.perf_counter() - real0, "load": load()}


def shares_of(runs: list[dict], served: dict[str, float]) -> list[dict]:
    """Each run's share of the GPU time served against its priority's share; [] when no GPU
    time was served at all (nothing to divide)."""
    gpu_total = sum(served.values())
    weight_total = sum(r["priority"] for r in runs)
    if gpu_total <= 0 or weight_total <= 0:
        return []
    shares = []
    for r in runs:
        got = served.get(r["run_id"], 0.0) / gpu_total
        due = r["priority"] / weight_total
        shares.append({"run_id": r["run_id"], "model": r["model"], "priority": r["priority"],
                       "share": got, "weighted_share": due, "ratio": got / due})
    return shares


def files_needed_for_http(args: argparse.Namespace) -> int:
    """Files the HTTP assign measurements take in all (bench_assign: every engine does
    max(1, batches // engines) batches of --batch files; the files are not refilled)."""
    plans = [(n, args.batches) for n in args.engines]
    if args.paced_engines:
        plans.append((args.paced_engines, max(args.paced_engines, args.batches // 2)))
    return sum(n * max(1, batches // n) * args.batch for n, batches in plans)


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line errors for inputs the measurements cannot use."""
    if min(args.priorities) <= 0:
        p.error(f"--priorities must be above 0, got {args.priorities}")
    if len(args.file_s) != len(args.models):
        p.error("--file-s: give one value per --models entry")
    if args.idle_s <= 0 or args.scan_interval_s <= 0:
        p.error("--idle-s and --scan-interval-s must be above 0")
    needed, have = files_needed_for_http(args), args.runs * args.files
    if not args.skip_http and needed > have:
        p.error(f"--files: the HTTP assign measurements take {needed} files but --runs x "
                f"--files makes {have}; raise --files, lower --batches, --engines or "
                f"--paced-engines, or pass --skip-http")


def main(argv: list[str]) -> int:
    p = BenchParser(prog="bench.py facility", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=positive_int, default=48)
    p.add_argument("--files", type=positive_int, default=2000, help="files per run")
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--file-s", nargs="+", type=float, default=DEFAULT_FILE_S,
                   help="simulated GPU seconds per file of each model, in --models order")
    p.add_argument("--priorities", nargs="+", type=float, default=[1.0, 2.0])
    p.add_argument("--batch", type=positive_int, default=10, help="files per batch (batchsize)")
    p.add_argument("--engines", nargs="+", type=positive_int, default=[1, 16, 64],
                   help="concurrent HTTP engines without pause, one measurement each")
    p.add_argument("--batches", type=positive_int, default=2000,
                   help="batches per HTTP measurement")
    p.add_argument("--paced-engines", type=non_negative_int, default=64,
                   help="then this many engines that pause --think-s on average (0: none)")
    p.add_argument("--think-s", type=float, default=1.0)
    p.add_argument("--threads", type=positive_int, default=16, help="manager.threads")
    p.add_argument("--scan-interval-s", type=float, default=10.0, help="manager.scan_interval_s")
    p.add_argument("--idle-s", type=float, default=30.0)
    p.add_argument("--sim-engines", type=positive_int, default=16)
    p.add_argument("--slacks", nargs="+", type=float, default=[600.0, 0.0],
                   help="facility.switch_slack_s values to simulate")
    p.add_argument("--model-load-s", type=float, default=30.0)
    p.add_argument("--arrive-over-h", type=float, default=12.0,
                   help="also simulate the runs arriving one by one over this many hours "
                        "(0: only all at once)")
    p.add_argument("--skip-http", action="store_true")
    p.add_argument("--skip-sim", action="store_true")
    p.add_argument("--json", default="bench_facility.json", help="where to write the results")
    p.add_argument("--tmp", default=None, help="scratch directory (default: a new tmp dir)")
    args = p.parse_args(argv)
    check_args(p, args)
    file_s = dict(zip(args.models, args.file_s))
    total = args.runs * args.files
    results: dict = {"machine": f"{os.cpu_count()} cores", "python": sys.version.split()[0],
                     "runs": args.runs, "files_per_run": args.files, "models": args.models,
                     "priorities": args.priorities}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmpdir:
        tmp = Path(tmpdir)
        if not args.skip_http:
            root = tmp / "root"
            t0 = time.perf_counter()
            make_root(root, args.runs, args.files, args.models, args.priorities)
            results["create_s"] = time.perf_counter() - t0
            server = FacilityServer(tmp, root, args.threads, args.scan_interval_s)
            results["scan"] = bench_scan(server, total, args.runs, args.idle_s)
            print(f"scan: {json.dumps(results['scan'])}", flush=True)
            results["rescan"] = bench_rescan(tmp, root)
            print(f"rescan: {json.dumps(results['rescan'])}", flush=True)
            with server:
                results["restart_serving_s"] = server.serving_s
                results["assign"] = []
                for n in args.engines:
                    results["assign"].append(bench_assign(server, n, args.batches, args.batch))
                    print(f"assign: {json.dumps(results['assign'][-1])}", flush=True)
                if args.paced_engines:
                    n = args.paced_engines
                    results["assign"].append(bench_assign(server, n, max(n, args.batches // 2),
                                                          args.batch, args.think_s))
                    print(f"assign: {json.dumps(results['assign'][-1])}", flush=True)
        if not args.skip_sim:
            results["fair_share"] = []
            plans = [(slack, 0.0) for slack in args.slacks] + \
                [(slack, args.arrive_over_h) for slack in args.slacks if args.arrive_over_h]
            for slack, over_h in plans:
                root = tmp / f"sim-{slack:g}-{over_h:g}"
                staging = tmp / f"staging-{slack:g}-{over_h:g}"
                runs = make_root(staging if over_h else root, args.runs, args.files,
                                 args.models, args.priorities)
                arrivals = []
                if over_h:
                    for i, run_dir in enumerate(sorted(staging.glob("*/*/*"),
                                                           key=lambda d: d.name.split("_")[3])):
                        arrivals.append((over_h * i / max(1, args.runs - 1), run_dir,
                                         root / run_dir.relative_to(staging)))
                    root.mkdir()
                sim = simulate(tmp, root, runs, args.sim_engines, args.batch, slack, file_s,
                               args.model_load_s, arrivals)
                results["fair_share"].append(sim)
                print(f"fair share: {json.dumps({k: v for k, v in sim.items() if k != 'shares'})}",
                      flush=True)
    report(results, args)
    write_json(args.json, results)
    print(f"results written to {args.json}")
    errors = sum(a["errors"] for a in results.get("assign", []))
    return 1 if errors else 0


def report(results: dict, args: argparse.Namespace) -> None:
    runs, files = args.runs, args.files
    print(f"\nfacility: {runs} runs x {files} files, models {args.models}, "
          f"priorities {args.priorities}; {results['machine']}")
    if "scan" in results:
        s, r = results["scan"], results["rescan"]
        print(f"{'first scan: serving after':40} {s['serving_s']:9.2f} s")
        print(f"{'first scan: all %d files PENDING' % (runs * files):40} "
              f"{s['all_pending_s']:9.2f} s"
              f"  (load {s['load_before']} -> {s['load_after']})")
        print(f"{'rescan tick, no change (in process)':40} {1000 * r['tick_median_s']:9.0f} ms")
        print(f"{'idle manager CPU (scan every %gs)' % args.scan_interval_s:40} "
              f"{s['idle_cpu_percent']:9.1f} %")
        print(f"{'/status p50 (HTTP, idle)':40} {s['status_p50_ms']:9.1f} ms")
        print(f"{'restart: serving after':40} {results['restart_serving_s']:9.2f} s")
        for a in results["assign"]:
            paced = f", pause ~{a['think_s']:g}s" if a["think_s"] else ""
            print(f"{'/assignwork p50 / p99, %d engines%s' % (a['engines'], paced):40} "
                  f"{a['assign_p50_ms']:6.1f} / {a['assign_p99_ms']:.1f} ms  "
                  f"({a['batches_per_s']:.0f} batches/s, /completed p99 "
                  f"{a['completed_p99_ms']:.1f} ms, {a['errors']} errors, "
                  f"load {a['load_before']} -> {a['load_after']})")
    for f in results.get("fair_share", []):
        how = f"arriving over {f['arrive_over_h']:g} h" if f["arrive_over_h"] else "all at once"
        print(f"{'switches/h, slack %gs, runs %s' % (f['slack_s'], how):40} "
              f"{f['switches_per_hour']:9.1f}    ({f['switches']} in {f['simulated_h']:.1f} "
              f"simulated h" + ("" if f["arrive_over_h"] else
                                 f"; {f['backlogged_switches_per_hour']:.1f}/h while every run "
                                 f"had work, the first {f['backlogged_h']:.1f} h") + ")")
        if not f["share_by_priority"]:
            print(f"{'  GPU shares':40}       n/a    (no GPU time was served)")
        for p, c in (f["share_by_priority"] if not f["arrive_over_h"] else {}).items():
            print(f"{'  priority %s: GPU share / weighted share' % p:40} {c['share']:9.3f} / "
                  f"{c['weighted_share']:.3f}  (per run {c['ratio_min']:.2f}..{c['ratio_max']:.2f}"
                  f" of its weighted share)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
