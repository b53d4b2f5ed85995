"""`bcorch demo`: the whole job on one machine, with no GPU, no dorado and no server to install.

Writes real POD5 files, starts a real manager (SQLite file, loopback port) and a real
orchestrator with virtual GPUs and the simulate runner, shows progress, and at the end
checks on disk that every input read appears exactly once in the output. With --runs N
the manager serves a facility instead (orchestrator/demo_runs.py).

Ctrl-C (or SIGTERM) stops bcorch at once (its batches are reported STOPPED), then the
manager, and keeps the workspace for a look; nothing it started is left running.
"""
from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bcorch.terminal import Redraw, stop_on_ctrl_c
from bcorch.workers.read_ids import read_files_under, read_ids_in, read_ids_under

from .local_cluster import LocalCluster
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
    parser.add_argument("--runs", type=int, metavar="N",
                        help="facility mode: N sequencing runs in the MinKNOW layout under one "
                             "root, appearing over time, each with its own model, on one manager "
                             "(--files is then the total over the runs)")


def samples_per_s(files: int, gpus: int) -> float:
    """The simulated basecaller's pace: the default 40 files take about 15 s, fewer less."""
    total_samples = files * READS_PER_FILE * sum(SAMPLES_PER_READ) / 2
    return round(max(10_000.0, total_samples / gpus / max(3.0, 15.0 * files / 40)), 1)


def _cluster(workdir: Path, files: int, gpus: int) -> LocalCluster:
    return LocalCluster(workdir, gpus=gpus, manager={"report_back_interval": 15.0, "batch_size": 2},
                        runner={"kind": "simulate", "samples_per_s": samples_per_s(files, gpus)})


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
    return lines + slot_lines(slots)


def slot_lines(slots: list[dict]) -> list[str]:
    """One line per GPU slot: its state, its batch and the files it has done."""
    lines = []
    for s in slots:
        state = s["state"] + (f"/{s['engine_state']}" if s.get("engine_state") else "")
        n = s.get("batch_size")
        job = (f"job {s['job_id']} ({n} file{'' if n == 1 else 's'})" if s.get("job_id")
               else "no batch")
        lines.append(f"  gpu{s['gpu']}  {state:<20} {job:<28} {s.get('files_done') or 0:>4} files done"
                     f"  restarts {s.get('restarts', 0)}")
    return lines


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


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
    if args.runs is not None and args.runs < 1:
        print("bcorch demo: --runs must be at least 1", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bcorch-demo-")).resolve()
    if args.runs is not None:
        from .demo_runs import FacilityDemo
        scenario: SingleRunDemo | FacilityDemo = FacilityDemo(workdir, args)
    else:
        scenario = SingleRunDemo(workdir, args)
    cluster = scenario.cluster
    scenario.prepare()

    started = scenario.started = time.monotonic()
    code = 1
    interrupted = False
    stop_on_ctrl_c()
    previous_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            cluster.start_manager(timeout=30, input_closed=scenario.input_closed)
        except (RuntimeError, TimeoutError):
            print(f"bcorch demo: the manager did not start; see {workdir / 'manager.log'}",
                  file=sys.stderr)
            return 1
        print(f"bcorch demo: manager on {cluster.url}, {args.gpus} virtual GPUs, simulate runner "
              "(a simulation: no GPU, no dorado)")
        orchestrator = cluster.start_bcorch()
        progress = Redraw(plain_every_s=5.0)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while orchestrator.running() and time.monotonic() < deadline:
            scenario.tick()
            status, slots = cluster.status(), cluster.slots()
            if status:
                progress.show(scenario.progress_lines(status, slots))
            if slots and all(slot.get("state") == "FAILED" for slot in slots):
                print(f"bcorch demo: every engine failed; see {workdir / 'bcorch.log'}",
                      file=sys.stderr)
                return 1
            time.sleep(0.5)
        if status := cluster.status():
            progress.show(scenario.progress_lines(status, []), force=True)
        if orchestrator.running():
            print(f"bcorch demo: not finished after {RUN_TIMEOUT_S:.0f}s", file=sys.stderr)
            return 1
        elapsed = time.monotonic() - started
        code = scenario.summary(elapsed, orchestrator.returncode, cluster.status() or {})
        return code
    except KeyboardInterrupt:
        interrupted = True
        code = EXIT_INTERRUPTED
        print("\nbcorch demo: interrupted; stopping bcorch and the manager", file=sys.stderr)
        return code
    finally:
        # A second Ctrl-C must not cut the clean-up short: every wait in it is bounded.
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        cluster.close(now=interrupted)
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)
        if args.keep or code != 0:
            print(f"bcorch demo: workspace kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


class SingleRunDemo:
    """One input directory (today's single-run manager): the demo without --runs."""

    input_closed = True

    def __init__(self, workdir: Path, args: argparse.Namespace):
        self.args = args
        self.cluster = _cluster(workdir, args.files, args.gpus)
        self.started = time.monotonic()
        self.expected: dict[str, list[str]] = {}
        self.expected_reads: Counter = Counter()
        self.total_reads = 0

    def prepare(self) -> None:
        print(f"bcorch demo: writing {self.args.files} POD5 files into {self.cluster.input_dir}")
        self.expected = write_dataset(self.cluster.input_dir, self.args.files, READS_PER_FILE,
                                      SAMPLES_PER_READ, seed=self.args.seed, subdirs=2)
        self.expected_reads = Counter(r for ids in self.expected.values() for r in ids)
        self.total_reads = sum(self.expected_reads.values())

    def tick(self) -> None:
        """Nothing arrives later: every file is written before the manager starts."""

    def progress_lines(self, status: dict, slots: list[dict]) -> list[str]:
        return _progress_lines(status, slots, self.total_reads, self.started)

    def summary(self, elapsed: float, bcorch_exit: int, status: dict) -> int:
        return _summary(self.cluster.output_dir, self.expected_reads, self.total_reads,
                        len(self.expected), elapsed, bcorch_exit, status)


def _summary(output_dir: Path, expected: Counter, total_reads: int, n_files: int,
             elapsed: float, bcorch_exit: int, status: dict) -> int:
    found = read_ids_under([output_dir / "pass", output_dir / "fail"])
    missing = [r for r in expected if r not in found]
    doubled = found.doubled()
    unknown = [r for r in found if found.origin(r) not in expected]
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
