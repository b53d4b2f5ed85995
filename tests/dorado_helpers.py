"""Shared by the dorado tests: fake executables on PATH, a site with the real manager."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from bcorch.config_writer import write_config
from support import ManagedProcess, ManagerProcess, wait_until
from bcorch.orchestrator.pod5_dataset import write_corrupt, write_dataset

FAKES = Path(__file__).resolve().parent / "fakes"
HAC = "dna_r10.4.1_e8.2_400bps_hac@v5.2.0"


def fake_env(tmp: Path, **extra: str) -> dict[str, str]:
    """PATH with the venv first (the fakes' `#!/usr/bin/env python3` needs pod5) and the
    fakes' argv log."""
    venv_bin = str(Path(sys.executable).parent)
    return {"PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "FAKE_ARGV_LOG": str(tmp / "argv.jsonl"), **extra}


def argv_records(tmp: Path, program: str | None = None) -> list[dict]:
    path = tmp / "argv.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if program is None or r["program"] == program]


def models_dir(tmp: Path, *names: str) -> Path:
    root = tmp / "models"
    for name in names or (HAC,):
        (root / name).mkdir(parents=True, exist_ok=True)
    root.mkdir(exist_ok=True)
    return root


def write_toml(path: Path, sections: dict[str, dict]) -> Path:
    """A config for a real basecaller runner (no simulation defaults)."""
    return write_config(path, simulate=False, **sections)


class DoradoSite:
    """INPUT_DIR of real POD5 files (some corrupt), the real manager, engines with fakes."""

    def __init__(self, tmp: Path, procs, n_files: int, *, corrupt: int = 0, reads: int = 6,
                 max_attempts: int = 3, batch_size: int = 4, env: dict | None = None,
                 input_closed: bool = True):
        self.tmp, self.procs = tmp, procs
        self.input_dir, self.output_dir = tmp / "input", tmp / "output"
        self.input_dir.mkdir()
        self.output_dir.mkdir()
        self.written = write_dataset(self.input_dir, n_files, reads_per_file=reads,
                                     samples_per_read=2000)
        self.corrupt = [f"corrupt_{i}.pod5" for i in range(corrupt)]
        for i, name in enumerate(self.corrupt):
            write_corrupt(self.input_dir / name, seed=i)
        self.env = fake_env(tmp, **(env or {}))
        self.manager = ManagerProcess(tmp, self.input_dir, self.output_dir, batch_size=batch_size,
                                      max_attempts=max_attempts, report_back_interval=5.0,
                                      input_closed=input_closed)
        procs.append(self.manager)
        self.manager.start()
        total = n_files + corrupt
        wait_until(lambda: sum(self.manager.status()["files"].values()) == total, 20,
                   what="the manager to find the input files")

    def config(self, runner: dict, engine: dict | None = None, name: str = "engine.toml") -> Path:
        return write_toml(self.tmp / name, {
            "manager": {"url": self.manager.url},
            "engine": {"input_dir": str(self.input_dir), "output_dir": str(self.output_dir),
                       "engine_id": "dorado", "polling_interval": 0.005,
                       "work_until_none_left": True, "request_retries": 1,
                       "connect_timeout_s": 1.0, "read_timeout_s": 5.0, **(engine or {})},
            "runner": {"stop_grace_s": 2.0, **runner},
        })

    def engine(self, config: Path, log: str = "engine.log") -> ManagedProcess:
        p = ManagedProcess([sys.executable, "-m", "bcorch.workers.engine_cli", "--gpu", "0",
                            "--config", str(config)], self.tmp / log, env=self.env)
        self.procs.append(p)
        return p.start()

    def files(self) -> dict[str, int]:
        return {state: n for state, n in self.manager.status()["files"].items() if n}

    def quarantined(self) -> dict[str, str]:
        code, body = self.manager.get("/files", state="QUARANTINED")
        assert code == 200, body
        return {Path(f["path"]).name: f.get("reason", "") for f in body["files"]}

    def good_read_ids(self) -> list[str]:
        return sorted(r for ids in self.written.values() for r in ids)
