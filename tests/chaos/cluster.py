"""A small basecalling site for the chaos tests: real POD5 input (with corrupt files),
one real manager reached through a cuttable proxy, and several bcorch "hosts".

Every process is registered in the test's `procs` list, so it is stopped even when
the test fails; the proxy's threads are ended by close().
"""
from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import psutil

from bcorch.orchestrator.control import request
from support import ManagedProcess, ManagerProcess, wait_until
from bcorch.orchestrator.pod5_dataset import write_dataset

from .proxy import Proxy

SIMULATE = "bcorch.workers.runners.simulate_main"
TOKEN = "chaos-token-5b1f0e"


def _toml(sections: dict[str, dict]) -> str:
    return "".join(f"[{s}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                   for s, values in sections.items())


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
        self.manager_kw = dict(token=TOKEN, input_closed=True, **(manager or {}))
        self.manager = self._new_manager(None).start()
        wait_until(lambda: sum(self.manager.status()["files"].values()) == n_files + corrupt,
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

    def _new_manager(self, port: int | None) -> ManagerProcess:
        m = ManagerProcess(self.tmp, self.input_dir, self.output_dir, port=port,
                           **self.manager_kw)
        self.procs.append(m)
        return m

    def restart_manager(self) -> None:
        """Start the manager again on the same port and database (after a kill -9)."""
        self.manager = self._new_manager(self.manager.port).start(timeout=60)

    def add_host(self, name: str, gpus: int, *, engine: dict, runner: dict,
                 orchestrator: dict) -> Host:
        socket = self.tmp / f"ctl-{name}" / "control.sock"
        config = self.tmp / f"{name}.toml"
        config.write_text(_toml({
            "manager": {"url": self.proxy.url, "token": TOKEN},
            "engine": {"input_dir": str(self.input_dir), "output_dir": str(self.output_dir),
                       "engine_id": name, **engine},
            "runner": {"kind": "simulate", **runner},
            "orchestrator": orchestrator,
        }))
        process = ManagedProcess([sys.executable, "-m", "bcorch.orchestrator", "--config", str(config),
                                  "--gpus", f"virtual:{gpus}", "--socket", str(socket)],
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
        db = sqlite3.connect(f"file:{self.output_dir / 'bcmanager.sqlite'}?mode=ro", uri=True,
                             timeout=30)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()
