"""The benchmarks' local cluster: bcorch.orchestrator.local_cluster.LocalCluster, plus what only
the benchmarks read.

`Cluster` is a LocalCluster (one config file, `bcmanager` on a loopback port, `bcorch --gpus
virtual:N` with the simulate runner) that also reads the manager's SQLite jobs table
(wall-clock `created` / `finished`). `write_json` is the one writer of the benchmarks' result
files. Every wait is bounded; `close()` stops everything it started.
"""
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bcorch.orchestrator.local_cluster import (LocalCluster, LocalProcess, free_port,  # noqa: E402,F401
                                               get_json, wait_for)


def write_json(path: str | Path, results: dict) -> Path:
    """Write a benchmark's results (creating the folder); return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return out


def save_results(path: str | Path, results: dict) -> None:
    """write_json, and say where on stdout (the last line of a benchmark's output)."""
    print(f"JSON: {write_json(path, results)}")


def stop(proc: LocalProcess | None, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
    """Send sig (SIGKILL: a crash) and wait; SIGKILL to its session after timeout."""
    if proc is None or not proc.running():
        return
    proc.signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill_session()
        proc.wait(10)


class Cluster(LocalCluster):
    """One manager and one bcorch over `gpus` virtual GPUs, in `workdir` (outputs in out/)."""

    def __init__(self, workdir: Path, input_dir: Path, gpus: int, **sections):
        super().__init__(workdir, gpus=gpus, input_dir=input_dir, output_dir=workdir / "out",
                         **sections)
        self.bcorch_started_wall: float | None = None

    def start_bcorch(self, log_level: str = "WARNING") -> LocalProcess:
        self.bcorch_started_wall = time.time()
        return super().start_bcorch("--log-level", log_level)

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Read the manager's SQLite file (WAL: readers never block the manager)."""
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def close(self) -> None:
        stop(self.bcorch)
        stop(self.manager)


def samples_in(directory: Path) -> int:
    """Total signal samples of the POD5 files in a directory (the ideal basecalling work)."""
    import pod5
    total = 0
    for path in sorted(directory.glob("*.pod5")):
        with pod5.Reader(path) as reader:
            total += sum(int(read.num_samples) for read in reader.reads())
    return total
