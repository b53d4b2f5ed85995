"""`bcorch demo`: the whole job on one machine, with no GPU, no dorado and no server to install.

Writes real POD5 files, starts a real manager (SQLite file, loopback port) and a real
orchestrator with virtual GPUs and the simulate runner, shows progress, and at the end
checks on disk that every input read appears exactly once in the output.

Ctrl-C (or SIGTERM) stops bcorch at once (its batches are reported STOPPED), then the
manager, and keeps the workspace for a look; nothing it started is left running.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from bcorch.terminal import Redraw
from bcorch.workers.read_ids import read_files_under, read_ids_in, read_ids_under

from .control import ControlError, request
from .pod5_dataset import write_dataset

READS_PER_FILE = 100
SAMPLES_PER_READ = (2000, 6000)
RUN_TIMEOUT_S = 600.0
EXIT_INTERRUPTED = 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--files", type=int, default=40, help="POD5 files to write (default 40)")
    parser.add_argument("--gpus", type=int, default=4, help="virtual GPUs (default 4)")
    parser.add_argument("--workdir", help="workspace (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the workspace and print where")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated reads")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout: float = 2.0) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def _write_config(path: Path, input_dir: Path, output_dir: Path, files: int, gpus: int) -> None:
    # Sized so the default 40 files take about 15 s of simulated basecalling, fewer less.
    total_samples = files * READS_PER_FILE * sum(SAMPLES_PER_READ) / 2
    rate = max(10_000.0, total_samples / gpus / max(3.0, 15.0 * files / 40))
    path.write_text(
        f"[manager]\ninput_dir = {json.dumps(str(input_dir))}\n"
        f"output_dir = {json.dumps(str(output_dir))}\nsettle_s = 0.0\nscan_interval_s = 0.2\nreport_back_interval = 15.0\n"
        "batch_size = 2\n\n"
        "[engine]\npolling_interval = 0.01\nwork_until_none_left = true\n\n"
        f"[runner]\nkind = \"simulate\"\nsamples_per_s = {rate:.1f}\nstop_grace_s = 2.0\n\n"
        "[orchestrator]\nhang_timeout_s = 30.0\ndrain_timeout_s = 30.0\n"
    )


def _progress_lines(status: dict, slots: list[dict], total_reads: int, started: float) -> list[str]:
    """The totals, then one line per GPU slot (from bcorch's control pipe)."""
    files = status.get("files", {})
    done = files.get("DONE", 0) + files.get("QUARANTINED", 0)
    total = sum(files.values()) or 1
    elapsed = time.monotonic() - started
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = f"{(total - done) / rate:.0f}s" if rate > 0 else "?"
    lines = [f"files {done}/{total} ({100 * done / total:.0f}%)  reads ~{total_reads * done // total}"
             f"/{total_reads}  {rate:.1f} files/s  elapsed {elapsed:.0f}s  left ~{eta}"]
    for s in slots:
        state = s["state"] + (f"/{s['engine_state']}" if s.get("engine_state") else "")
        job = (f"job {s['job_id']} ({s.get('batch_size')} files)" if s.get("job_id")
               else "no batch")
        lines.append(f"  gpu{s['gpu']}  {state:<20} {job:<28} {s.get('files_done') or 0:>4} files done"
                     f"  restarts {s.get('restarts', 0)}")
    return lines


def _slots(socket: Path) -> list[dict]:
    try:
        reply = request(socket, {"cmd": "status"}, timeout=2.0)
    except ControlError:
        return []
    return reply.get("slots", []) if reply.get("ok") else []


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def _start(argv: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen | None, timeout: float = 20.0, now: bool = False) -> None:
    """TERM (a drain; twice with now=True: stop at once, batches reported STOPPED), then KILL
    of the whole session if it does not end in time."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    if now:
        time.sleep(0.2)  # two distinct signals, so bcorch sees a second one
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def _reads_per_engine(output_dir: Path) -> Counter:
    """Reads in pass/ + fail/, attributed to engines through LOGOUTPUT_<job>_<engine> dirs."""
    engine_of_job = {}
    for log_dir in output_dir.glob("LOGOUTPUT_*"):
        job, _, engine = log_dir.name[len("LOGOUTPUT_"):].partition("_")
        engine_of_job[job] = engine
    per_engine: Counter = Counter()
    for path in read_files_under([output_dir / "pass", output_dir / "fail"]):
        job = path.name.partition("_")[0]
        per_engine[engine_of_job.get(job, "?")] += sum(1 for _ in read_ids_in(path))
    return per_engine


def run(args: argparse.Namespace) -> int:
    if args.files < 1 or args.gpus < 1:
        print("bcorch demo: --files and --gpus must be at least 1", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bcorch-demo-")).resolve()
    input_dir, output_dir = workdir / "input", workdir / "output"
    for d in (input_dir, output_dir):
        d.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.toml"
    _write_config(config, input_dir, output_dir, args.files, args.gpus)

    print(f"bcorch demo: writing {args.files} POD5 files into {input_dir}")
    expected = write_dataset(input_dir, args.files, READS_PER_FILE, SAMPLES_PER_READ,
                             seed=args.seed, subdirs=2)
    expected_reads = Counter(r for ids in expected.values() for r in ids)
    total_reads = sum(expected_reads.values())

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    socket = workdir / "control" / "control.sock"
    manager = orchestrator = None
    started = time.monotonic()
    code = 1
    interrupted = False
    previous_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        manager = _start([sys.executable, "-m", "bcorch.manager", "--config", str(config),
                          "--port", str(port), "--input-closed"], workdir / "manager.log")
        deadline = time.monotonic() + 30
        while _get_json(url + "/heartbeat") is None:
            if manager.poll() is not None or time.monotonic() > deadline:
                print(f"bcorch demo: the manager did not start; see {workdir / 'manager.log'}",
                      file=sys.stderr)
                return 1
            time.sleep(0.1)
        print(f"bcorch demo: manager on {url}, {args.gpus} virtual GPUs, simulate runner "
              "(a simulation: no GPU, no dorado)")
        orchestrator = _start([sys.executable, "-m", "bcorch.orchestrator", "--config", str(config),
                               "--gpus", f"virtual:{args.gpus}", "--manager-url", url,
                               "--socket", str(socket)],
                              workdir / "bcorch.log")
        progress = Redraw(plain_every_s=5.0)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while orchestrator.poll() is None and time.monotonic() < deadline:
            status = _get_json(url + "/status")
            if status:
                progress.show(_progress_lines(status, _slots(socket), total_reads, started))
            time.sleep(0.5)
        if status := _get_json(url + "/status"):
            progress.show(_progress_lines(status, [], total_reads, started), force=True)
        if orchestrator.poll() is None:
            print(f"bcorch demo: not finished after {RUN_TIMEOUT_S:.0f}s", file=sys.stderr)
            return 1
        elapsed = time.monotonic() - started
        code = _summary(output_dir, expected_reads, total_reads, len(expected), elapsed,
                        orchestrator.returncode, _get_json(url + "/status") or {})
        return code
    except KeyboardInterrupt:
        interrupted = True
        code = EXIT_INTERRUPTED
        print("\nbcorch demo: interrupted; stopping bcorch and the manager", file=sys.stderr)
        return code
    finally:
        # A second Ctrl-C must not cut the clean-up short: every wait in it is bounded.
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop(orchestrator, now=interrupted)
        _stop(manager)
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)
        if args.keep or code != 0:
            print(f"bcorch demo: workspace kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _summary(output_dir: Path, expected: Counter, total_reads: int, n_files: int,
             elapsed: float, bcorch_exit: int, status: dict) -> int:
    found = read_ids_under([output_dir / "pass", output_dir / "fail"])
    missing = [r for r in expected if r not in found]
    doubled = found.doubled()
    unknown = [r for r in found if r not in expected]
    files = status.get("files", {})
    print()
    print(f"basecalled {files.get('DONE', 0)} of {n_files} files, "
          f"{sum(found.values())} of {total_reads} reads in {elapsed:.1f}s "
          f"({sum(found.values()) / max(elapsed, 1e-9):.0f} reads/s)")
    for engine, reads in sorted(_reads_per_engine(output_dir).items()):
        print(f"  {engine:<28} {reads:>7} reads")
    ok = not missing and not doubled and not unknown and bcorch_exit == 0
    print(f"verification: every input read exactly once in the output: "
          f"{'yes' if ok else 'NO'} (missing {len(missing)}, doubled {len(doubled)}, "
          f"unknown {len(unknown)}; bcorch exit {bcorch_exit})")
    return 0 if ok else 1
