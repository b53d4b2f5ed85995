"""A small basecalling site for the chaos tests: real POD5 input (with corrupt files),
one real manager reached through a cuttable proxy, and several bcorch "hosts".

Every process is registered in the test's `procs` list, so it is stopped even when
the test fails; the proxy's threads are ended by close().
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import psutil

from bcorch.config_writer import write_config
from bcorch.orchestrator.control import request
from bcorch.orchestrator.local_cluster import bcorch_argv
from bcorch.manager.statedir import default_db_path
from support import ManagedProcess, ManagerProcess, wait_until
from bcorch.orchestrator.pod5_dataset import write_dataset

from .proxy import Proxy

SIMULATE = "bcorch.workers.runners.simulate_main"
SETTLE_S = 1.0            # a paused writer pauses longer than this
INCOMPLETE_GRACE_S = 3.0  # a file without its POD5 footer is waited for this long
TOKEN = "chaos-token-5b1f0e"


class Host:
    """One `bcorch --gpus virtual:N` process with its own config and control socket."""

    def __init__(self, name: str, process: ManagedProcess, socket: Path, gpus: int):
        self.name, self.process, self.socket, self.gpus = name, process, socket, gpus

    def status(self) -> dict:
        return request(self.socket, {"cmd": "status"}, timeout=5)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def basecallers(self) -> list[psutil.Process]:
        found = []
        for p in self.descendants():
            try:
                if SIMULATE in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.Error:
                continue
        return found


class Cluster:
    def __init__(self, tmp: Path, procs: list, *, n_files: int, corrupt: int = 2, reads: int = 5,
                 samples: int = 2000, seed: int = 0, manager: dict | None = None):
        self.tmp, self.procs = tmp, procs
        self.input_dir, self.output_dir = tmp / "input", tmp / "output"
        self.input_dir.mkdir()
        self.output_dir.mkdir()
        self.written = write_dataset(self.input_dir, n_files, reads_per_file=reads,
                                     samples_per_read=samples, seed=seed)
        self.corrupt = self._write_corrupt(corrupt)
        # The input stays open (a run still writing) until close_input(): files written
        # during the chaos are taken, and a half-written one is waited for, not failed.
        self.manager_config = write_config(tmp / "manager.toml", manager={
            "settle_s": SETTLE_S, "scan_interval_s": 0.2,
            "incomplete_grace_s": INCOMPLETE_GRACE_S, "allow_simulated": True,
            **(manager or {})})
        self.db = default_db_path(self.output_dir)
        self.manager = self._new_manager(None).start()
        wait_until(lambda: self._seen() == n_files + corrupt,
                   30, what="the manager to find every input file")
        self.proxy = Proxy(self.manager.port).start()
        self.hosts: list[Host] = []

    def _write_corrupt(self, n: int) -> list[str]:
        """Garbage with a .pod5 name, and a real POD5 file cut in half."""
        names = []
        good = sorted(self.input_dir.glob("*.pod5"))
        for i in range(n):
            path = self.input_dir / f"corrupt_{i}.pod5"
            if i % 2 == 0:
                path.write_bytes(b"this is not a POD5 file\n" * 64)
            else:
                data = good[0].read_bytes()
                path.write_bytes(data[: len(data) // 2])
            names.append(path.name)
        return names

    def _seen(self) -> int:
        status = self.manager.status()
        return sum(status["files"].values()) + status["files_waiting"]

    def close_input(self) -> None:
        """As MinKNOW ends a run: a final summary in the run's directory closes the input."""
        (self.input_dir / "final_summary_PAW00000_chaos.txt").write_text("chaos run done\n")
        wait_until(lambda: self.manager.status()["input_closed"], 60,
                   what="the final summary to close the input")

    def _new_manager(self, port: int | None) -> ManagerProcess:
        m = ManagerProcess(self.tmp, self.input_dir, self.output_dir, port=port,
                           token=TOKEN, config=self.manager_config)
        self.procs.append(m)
        return m

    def restart_manager(self) -> None:
        """Start the manager again on the same port and database (after a kill -9)."""
        self.manager = self._new_manager(self.manager.port).start(timeout=60)

    def add_host(self, name: str, gpus: int, *, engine: dict, runner: dict,
                 orchestrator: dict) -> Host:
        socket = self.tmp / f"ctl-{name}" / "control.sock"
        config = write_config(
            self.tmp / f"{name}.toml",
            manager={"url": self.proxy.url, "token": TOKEN},
            engine={"input_dir": str(self.input_dir), "output_dir": str(self.output_dir),
                    "engine_id": name, **engine},
            runner=runner, orchestrator=orchestrator)
        process = ManagedProcess(bcorch_argv(config, gpus, "--socket", str(socket)),
                                 self.tmp / f"{name}.log")
        self.procs.append(process)
        process.start()
        wait_until(lambda: socket.exists() or process.proc.poll() is not None, 30,
                   what=f"{name}'s control socket")
        assert process.proc.poll() is None, process.log()[-3000:]
        host = Host(name, process, socket, gpus)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        self.proxy.close()

    # -- what the manager recorded -----------------------------------------------------

    def db_rows(self, sql: str) -> list[tuple]:
        db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True,
                             timeout=30)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()
