"""Benchmark of bcorch itself: start-up, idle cost, crash restart and hang replacement.

    python scripts/bench.py orchestrator [--gpus 8] [--idle-s 10] [--trials 5] [--out bench-out/orchestrator.json]

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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bcorch.config_writer import write_config  # noqa: E402
from bench_cluster import wait_for, write_json  # noqa: E402


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
    import psutil
    from bcorch.orchestrator.control import request

    p = argparse.ArgumentParser(prog="bench.py orchestrator")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--idle-s", type=float, default=10.0)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--hang-timeout-s", type=float, default=3.0)
    p.add_argument("--out", default="bench-out/orchestrator.json")
    args = p.parse_args(argv)
    trials = min(args.trials, args.gpus)

    tmp = Path(tempfile.mkdtemp(prefix="bcorch-bench-"))
    sock = tmp / "ctl" / "c.sock"
    cfg = tmp / "bcorch.toml"
    write_config(cfg, orchestrator={"hang_timeout_s": args.hang_timeout_s, "healthy_reset_s": 1.0,
                                    "first_contact_timeout_s": 0})  # no manager here
    cmd = [sys.executable, str(Path(__file__).resolve()), "serve", "--config", str(cfg),
           "--gpus", f"virtual:{args.gpus}", "--socket", str(sock), "--log-level", "WARNING"]
    log = open(tmp / "bcorch.log", "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    results: dict = {"gpus": args.gpus, "engine_target": "fake idle engine (scripts/bench_orchestrator.py)",
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
    print(f"bcorch, {args.gpus} virtual GPUs, fake idle engines, {os.cpu_count()} cores")
    for name, value, target in rows:
        print(f"  {name.ljust(width)}  {value.ljust(28)}  target {target}")
    write_json(args.out, results)
    print(f"  JSON: {args.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        sys.exit(serve(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
