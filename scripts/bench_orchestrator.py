"""Benchmark of bcorch itself: start-up, idle cost, crash restart and hang replacement.

    python scripts/bench.py orchestrator [--gpus 8] [--idle-s 10] [--trials 5] [--engine-start zygote|spawn]
                                         [--out bench-out/orchestrator.json]
    python scripts/bench.py orchestrator ready [--gpus 16] [--trials 3]        # issue 14 section 2
    python scripts/bench.py orchestrator fleet [--gpus 8,16] [--per-gpu-s 60]  # issue 14 section 3

`ready`: launch -> every engine READY, with real engines (a real manager with no input,
so they wait for work) and with the fake idle engines, for engine_start spawn and zygote.
`fleet`: scripts/bench_fleet.py's "ours" run (same workload and figures) once with each
engine_start, back to back, so that the two differ only in how engines start.

bcorch runs as its own process (the real CLI and supervisor) over virtual GPUs with a
*fake engine target* defined here: it sends READY, then a heartbeat every second, like
an idle engine, so the numbers are the orchestrator's own and not the basecaller's.
Measured from outside through the control pipe and psutil.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bcorch.config_writer import write_config  # noqa: E402
from bench_cluster import wait_for, write_json  # noqa: E402
from bench_args import BenchParser, positive_int  # noqa: E402


def idle_engine(conn, spec) -> None:
    """An engine that is up and idle: READY, then one heartbeat a second until told to go."""
    from bcorch.workers import channel
    from bcorch.workers.channel import Msg, message

    channel.send(conn, message(Msg.READY, engine_id=spec.engine_id, gpu=spec.gpu_index,
                               pid=os.getpid()))
    try:
        while True:
            channel.send(conn, message(Msg.HEARTBEAT, engine_id=spec.engine_id, state="WAITING",
                                       job_id=None, batch_size=0, batch_elapsed_s=None,
                                       basecaller_pid=None, batches_done=0, files_done=0,
                                       files_failed=0, last_error=""))
            if conn.poll(1.0) and conn.recv().get("cmd") in ("drain", "stop"):
                return
    except (EOFError, OSError):
        return


def serve(argv: list[str]) -> int:
    import bench_orchestrator
    from bcorch.orchestrator.cli import main
    return main(argv, target=bench_orchestrator.idle_engine)


def _wait(condition, timeout: float, what: str, interval: float = 0.01):
    """Polls every 10 ms by default: restarts are timed by it."""
    return wait_for(condition, timeout, what, interval=interval)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("ready", "fleet"):
        return (ready_main if argv[0] == "ready" else fleet_main)(argv[1:])
    import psutil
    from bcorch.orchestrator.control import request

    p = BenchParser(prog="bench.py orchestrator")
    p.add_argument("--gpus", type=positive_int, default=8)
    p.add_argument("--idle-s", type=float, default=10.0)
    p.add_argument("--trials", type=positive_int, default=5)
    p.add_argument("--hang-timeout-s", type=float, default=3.0)
    p.add_argument("--engine-start", choices=("zygote", "spawn"), default="zygote")
    p.add_argument("--out", default="bench-out/orchestrator.json")
    args = p.parse_args(argv)
    trials = min(args.trials, args.gpus)

    tmp = Path(tempfile.mkdtemp(prefix="bcorch-bench-"))
    sock = tmp / "ctl" / "c.sock"
    cfg = tmp / "bcorch.toml"
    write_config(cfg, orchestrator={"hang_timeout_s": args.hang_timeout_s, "healthy_reset_s": 1.0,
                                    "first_contact_timeout_s": 0,  # no manager here
                                    "engine_start": args.engine_start})
    cmd = [sys.executable, str(Path(__file__).resolve()), "serve", "--config", str(cfg),
           "--gpus", f"virtual:{args.gpus}", "--socket", str(sock), "--log-level", "WARNING"]
    log = open(tmp / "bcorch.log", "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    results: dict = {"gpus": args.gpus, "engine_start": args.engine_start, "engine_target": "fake idle engine (scripts/bench_orchestrator.py)",
                     "machine": f"{os.cpu_count()} cores", "python": sys.version.split()[0]}

    def slots():
        return request(sock, {"cmd": "status"}, timeout=5)["slots"]

    try:
        _wait(sock.exists, 30, "control socket")
        _wait(lambda: all(s["state"] == "RUNNING" for s in slots()), 30, "all READY")
        results["start_to_all_ready_s"] = round(time.monotonic() - t0, 3)

        parent = psutil.Process(proc.pid)
        time.sleep(1.0)
        cpu0, w0 = parent.cpu_times(), time.monotonic()
        time.sleep(args.idle_s)
        cpu1, w1 = parent.cpu_times(), time.monotonic()
        busy = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        results["idle_cpu_pct_of_one_core"] = round(100 * busy / (w1 - w0), 2)
        results["idle_rss_mb"] = round(parent.memory_info().rss / 1e6, 1)

        restart = []
        for gpu in range(trials):
            old = slots()[gpu]["pid"]
            os.kill(old, signal.SIGKILL)
            k = time.monotonic()
            _wait(lambda: slots()[gpu]["pid"] not in (None, old), 10, "restart")
            spawned = time.monotonic() - k
            _wait(lambda: slots()[gpu]["state"] == "RUNNING", 10, "ready again")
            restart.append((spawned, time.monotonic() - k))
        results["crash_to_restart_s"] = [round(a, 3) for a, _ in restart]
        results["crash_to_ready_s"] = [round(b, 3) for _, b in restart]

        hang = []
        for gpu in range(trials):
            old = slots()[gpu]["pid"]
            os.kill(old, signal.SIGSTOP)
            k = time.monotonic()
            _wait(lambda: (s := slots()[gpu])["pid"] != old and s["state"] == "RUNNING", 30,
                  "replacement", interval=0.02)
            hang.append(time.monotonic() - k)
        results["hang_to_replacement_s"] = [round(h, 3) for h in hang]
        results["hang_timeout_s"] = args.hang_timeout_s

        proc.send_signal(signal.SIGTERM)
        results["sigterm_exit_code"] = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()

    rows = [
        ("start -> all READY", f"{results['start_to_all_ready_s']:.2f} s", "<= 3 s"),
        ("idle CPU (parent)", f"{results['idle_cpu_pct_of_one_core']:.2f} % of a core", "< 1 %"),
        ("idle RSS (parent)", f"{results['idle_rss_mb']:.1f} MB", "< 60 MB"),
        ("crash -> new engine (max)", f"{max(results['crash_to_restart_s']):.2f} s "
         f"(median {statistics.median(results['crash_to_restart_s']):.2f})", "<= 1.5 s"),
        ("crash -> READY again (max)", f"{max(results['crash_to_ready_s']):.2f} s", "-"),
        ("hang -> replacement READY (max)", f"{max(results['hang_to_replacement_s']):.2f} s",
         f"<= {args.hang_timeout_s + 2:g} s"),
        ("SIGTERM -> exit code", str(results["sigterm_exit_code"]), "0"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"bcorch, {args.gpus} virtual GPUs, fake idle engines, engine_start {args.engine_start}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    for name, value, target in rows:
        print(f"  {name.ljust(width)}  {value.ljust(28)}  target {target}")
    write_json(args.out, results)
    print(f"  JSON: {args.out}")
    return 0


def _ready_once(gpus: int, engine_start: str, real: bool) -> float:
    """Seconds from launching bcorch to every slot RUNNING (its engine said READY)."""
    from bench_cluster import Cluster

    tmp = Path(tempfile.mkdtemp(prefix="bcorch-ready-"))
    (tmp / "in").mkdir()
    if real:
        cluster = Cluster(tmp, tmp / "in", gpus,
                          orchestrator={"engine_start": engine_start, "first_contact_timeout_s": 0},
                          runner={"kind": "simulate"}, engine={"work_until_none_left": False})
        try:
            cluster.start_manager(input_closed=False)
            t0 = time.monotonic()
            cluster.start_bcorch()
            _wait(lambda: len(s := cluster.slots()) == gpus
                  and all(x["state"] == "RUNNING" for x in s), 60, "all READY", interval=0.005)
            return time.monotonic() - t0
        finally:
            cluster.close()
    from bcorch.orchestrator.control import ControlError, request

    sock = tmp / "ctl" / "c.sock"
    cfg = tmp / "bcorch.toml"
    write_config(cfg, orchestrator={"first_contact_timeout_s": 0, "engine_start": engine_start})
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "serve", "--config",
                             str(cfg), "--gpus", f"virtual:{gpus}", "--socket", str(sock),
                             "--log-level", "WARNING"], cwd=REPO)

    def ready() -> bool:
        try:
            return all(x["state"] == "RUNNING"
                       for x in request(sock, {"cmd": "status"}, timeout=5)["slots"])
        except (OSError, ControlError):
            return False
    try:
        _wait(ready, 60, "all READY", interval=0.005)
        return time.monotonic() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ready_main(argv: list[str]) -> int:
    p = BenchParser(prog="bench.py orchestrator ready")
    p.add_argument("--gpus", type=positive_int, default=16)
    p.add_argument("--trials", type=positive_int, default=3)
    p.add_argument("--out", default="bench-out/engines-ready.json")
    args = p.parse_args(argv)
    results: dict = {"gpus": args.gpus, "machine": f"{os.cpu_count()} cores",
                     "python": sys.version.split()[0], "runs": []}
    print(f"launch -> {args.gpus} engines READY, {os.cpu_count()} cores")
    for real in (True, False):
        kind = "real" if real else "fake idle"
        for mode in ("spawn", "zygote"):
            times = []
            for _ in range(args.trials):
                load = os.getloadavg()[0]
                times.append(_ready_once(args.gpus, mode, real))
                results["runs"].append({"engines": kind, "engine_start": mode,
                                        "ready_s": round(times[-1], 3), "load_average": load})
            print(f"  {kind:9} engines, {mode:6}: median {statistics.median(times):.2f} s  (all: "
                  f"{', '.join(f'{t:.2f}' for t in times)}; load average {os.getloadavg()[0]:.2f})")
    write_json(args.out, results)
    print(f"  JSON: {args.out}")
    return 0


def _cluster_with(cluster: Any, orchestrator: dict, runner: dict, /, *args: Any, **sections: Any):
    return cluster(*args, **{**sections, "orchestrator": {**sections.get("orchestrator", {}), **orchestrator},
                             "runner": {**sections.get("runner", {}), **runner}})


def fleet_main(argv: list[str]) -> int:
    """bench_fleet's "ours" rows for engine_start spawn and zygote, interleaved."""
    import functools
    import shutil

    import bench_fleet
    from bench_cluster import Cluster

    p = BenchParser(prog="bench.py orchestrator fleet")
    p.add_argument("--gpus", type=bench_fleet._gpu_list, default=[8, 16])
    p.add_argument("--per-gpu-s", type=float, default=60.0)
    p.add_argument("--batch", type=positive_int, default=5, help="files of 1 s per batch")
    p.add_argument("--startup-s", type=float, default=0.0)
    p.add_argument("--startup-per", choices=("batch", "engine"), default="batch",
                   help="engine: the dorado-server model (start-up paid once per engine)")
    p.add_argument("--modes", default="spawn,zygote")
    p.add_argument("--startup-share", type=float, default=None,
                   help="manager.startup_share (default: the config's, 0.02)")
    p.add_argument("--out", default="bench-out/fleet-engine-start.json")
    args = p.parse_args(argv)
    files_per_gpu = max(args.batch, round(args.per_gpu_s / args.batch) * args.batch)
    share = {} if args.startup_share is None else {"startup_share": args.startup_share}
    root = Path(tempfile.mkdtemp(prefix="bench-fleet-start-"))
    rows = []
    try:
        bench_fleet.write_files(root / "dataset", files_per_gpu * max(args.gpus))
        for n in args.gpus:
            for mode in args.modes.split(","):
                bench_fleet.Cluster = functools.partial(
                    _cluster_with, Cluster, {"engine_start": mode}, {"startup_per": args.startup_per})
                load = os.getloadavg()[0]
                row = bench_fleet.run_once(root, root / "dataset", f"{mode}-{n}", n,
                                           files_per_gpu * n, file_s=1.0,
                                           request_size=args.batch, startup_s=args.startup_s,
                                           manager_extra=share)
                row.update(engine_start=mode, load_average_before=load, startup_per=args.startup_per,
                           startup_share=args.startup_share)
                if args.startup_per == "engine":     # bench_fleet counts startup_s per batch
                    busy = row["samples"] / row["samples_per_s"] + args.startup_s * row["engines_used"]
                    row["ideal_s"], row["ideal_per_gpu_s"] = busy, busy / n
                    row["efficiency"] = busy / n / row["wall_s"]
                rows.append(row)
                bench_fleet.print_table(f"engine_start {mode}, load average before {load:.2f}", [row])
    finally:
        bench_fleet.Cluster = Cluster
        shutil.rmtree(root, ignore_errors=True)
    write_json(args.out, {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                          "command": "python scripts/bench.py orchestrator fleet " + " ".join(argv),
                          "runs": rows})
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        sys.exit(serve(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
