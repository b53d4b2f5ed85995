"""A real manager and a real bcorch as subprocesses, for the fleet, recovery and overhead benchmarks.

`Cluster` writes one config file, starts `bcmanager` (SQLite file, loopback port) and
`bcorch --gpus virtual:N` with the simulate runner, and reads the results where they are
kept: the manager's SQLite jobs table (wall-clock `created` / `finished`) and bcorch's
control pipe. Every wait is bounded; `close()` stops everything it started.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def write_json(path: str | Path, results: dict) -> Path:
    """Write a benchmark's results (creating the folder); return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return out


def get_json(url: str, timeout: float = 2.0) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def write_config(path: Path, sections: dict[str, dict]) -> None:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class Cluster:
    """One manager and one bcorch over `gpus` virtual GPUs, in `workdir`."""

    def __init__(self, workdir: Path, input_dir: Path, gpus: int, *, manager: dict | None = None,
                 engine: dict | None = None, runner: dict | None = None,
                 orchestrator: dict | None = None):
        self.workdir = workdir
        self.gpus = gpus
        self.input_dir = input_dir
        self.output_dir = workdir / "out"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = self.output_dir / "bcmanager.sqlite"
        self.socket = workdir / "ctl" / "control.sock"
        self.config = workdir / "bcorch.toml"
        write_config(self.config, {
            "manager": {"url": self.url, "port": self.port, "input_dir": str(input_dir),
                        "output_dir": str(self.output_dir), "settle_s": 0.0,
                        "scan_interval_s": 0.2, "allow_simulated": True, **(manager or {})},
            "engine": {"polling_interval": 0.01, "work_until_none_left": True, **(engine or {})},
            "runner": {"kind": "simulate", "stop_grace_s": 2.0, **(runner or {})},
            "orchestrator": {"hang_timeout_s": 30.0, "drain_timeout_s": 30.0,
                             "control_socket": str(self.socket), **(orchestrator or {})},
        })
        self.manager: subprocess.Popen | None = None
        self.bcorch: subprocess.Popen | None = None
        self.bcorch_started_wall: float | None = None
        self._logs: list = []

    def _log(self, name: str):
        fh = open(self.workdir / f"{name}.log", "ab")
        self._logs.append(fh)
        return fh

    def start_manager(self, input_closed: bool = True, wait_files: int | None = None) -> float:
        """Start bcmanager; return the monotonic time it first answered /heartbeat."""
        argv = [sys.executable, "-m", "bcorch.manager", "--config", str(self.config)]
        argv += ["--input-closed"] if input_closed else []
        self.manager = subprocess.Popen(argv, stdout=self._log("manager"), stderr=subprocess.STDOUT,
                                        cwd=REPO, start_new_session=True)

        def up():
            if self.manager.poll() is not None:
                raise RuntimeError(f"manager exited with {self.manager.returncode}; "
                                   f"see {self.workdir / 'manager.log'}")
            return get_json(self.url + "/heartbeat", timeout=0.5) is not None
        wait_for(up, 60, "the manager to answer", interval=0.02)
        answered = time.monotonic()
        if wait_files:
            wait_for(lambda: sum((self.status() or {}).get("files", {}).values()) >= wait_files,
                     120, f"the manager to find {wait_files} files", interval=0.1)
        return answered

    def start_bcorch(self, log_level: str = "WARNING") -> None:
        argv = [sys.executable, "-m", "bcorch.orchestrator", "--config", str(self.config),
                "--gpus", f"virtual:{self.gpus}", "--log-level", log_level]
        self.bcorch_started_wall = time.time()
        self.bcorch = subprocess.Popen(argv, stdout=self._log("bcorch"), stderr=subprocess.STDOUT,
                                       cwd=REPO, start_new_session=True)

    def status(self) -> dict | None:
        return get_json(self.url + "/status")

    def slots(self) -> list[dict]:
        from bcorch.orchestrator.control import ControlError, request
        try:
            return request(self.socket, {"cmd": "status"}, timeout=5)["slots"]
        except (ControlError, OSError, KeyError):
            return []

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Read the manager's SQLite file (WAL: readers never block the manager)."""
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def all_done(self, total: int) -> bool:
        files = (self.status() or {}).get("files", {})
        return files.get("DONE", 0) + files.get("QUARANTINED", 0) >= total

    def close(self) -> None:
        stop(self.bcorch)
        stop(self.manager)
        for fh in self._logs:
            fh.close()


def samples_in(directory: Path) -> int:
    """Total signal samples of the POD5 files in a directory (the ideal basecalling work)."""
    import pod5
    total = 0
    for path in sorted(directory.glob("*.pod5")):
        with pod5.Reader(path) as reader:
            total += sum(int(read.num_samples) for read in reader.reads())
    return total
