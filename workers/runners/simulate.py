"""The simulated basecaller runner (no GPU, no dorado): see simulate_main."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from bcorch.protocol import JobState
from .base import FAILED_FILES_NAME, ProcessHandle, RunHandle, RunResult, Runner, batch_emit


class SimulateRunner(Runner):
    kind = "simulate"

    def __init__(self, samples_per_s: float, startup_s: float = 0.0, fail_fraction: float = 0.1,
                 stall_timeout_s: float = 0.0,
                 logger: logging.Logger | logging.LoggerAdapter | None = None,
                 startup_once: bool = False):
        """startup_once: startup_s is paid by the first batch only, as by a dorado-server
        that keeps its model loaded across batches (issue 14); otherwise by every batch.
        A batch with another model than the one loaded pays it again (a model switch)."""
        self.samples_per_s = samples_per_s
        self.startup_s = startup_s
        self.startup_once = startup_once
        self.batches_started = 0
        self.loaded_model: str | None = None
        self.model_switches = 0
        self.fail_fraction = fail_fraction
        self.stall_timeout_s = stall_timeout_s
        self.log = logger or logging.getLogger(__name__)

    def start(self, input_dir: Path, output_dir: Path, model: str, batch: Sequence[str], *,
              kit: str = "", emit: str = "") -> RunHandle:
        emit = batch_emit(emit, "fastq")
        if self.loaded_model is not None and model != self.loaded_model:
            self.model_switches += 1
            self.log.info("simulated model switch %s -> %s", self.loaded_model, model)
        loaded = self.startup_once and model == self.loaded_model
        startup_s = 0.0 if loaded else self.startup_s
        self.loaded_model = model
        self.batches_started += 1
        argv = [sys.executable, "-m", "bcorch.workers.runners.simulate_main",
                "--input-dir", str(input_dir), "--output-dir", str(output_dir),
                "--model", model, "--samples-per-s", repr(self.samples_per_s),
                "--startup-s", repr(startup_s), "--fail-fraction", repr(self.fail_fraction),
                "--started-at", repr(time.monotonic())]
        if kit:
            argv += ["--kit", kit]
        if emit != "fastq":
            argv += ["--emit", emit]
        count = len(batch)

        def interpret(code: int) -> RunResult:
            return self._interpret(code, output_dir, count)

        handle = ProcessHandle(argv, output_dir, interpret=interpret,
                               stall_timeout_s=self.stall_timeout_s, logger=self.log)
        handle.startup_s = startup_s
        return handle

    @staticmethod
    def _interpret(code: int, output_dir: Path, batch_size: int) -> RunResult:
        if code != 0:
            how = f"killed by signal {-code}" if code < 0 else f"exited with {code}"
            return RunResult(JobState.FAILED, code, reason=f"simulated basecaller {how}")
        try:
            failed = json.loads((output_dir / FAILED_FILES_NAME).read_text())
        except FileNotFoundError:
            failed = {}
        except ValueError as exc:
            return RunResult(JobState.FAILED, code, reason=f"{FAILED_FILES_NAME} unreadable: {exc}")
        if not isinstance(failed, dict):
            return RunResult(JobState.FAILED, code, reason=f"{FAILED_FILES_NAME} is not an object")
        failed = {str(k): str(v) for k, v in failed.items()}
        if failed and len(failed) >= batch_size:
            return RunResult(JobState.FAILED, code, failed,
                             reason=f"no file of the batch could be read ({len(failed)} failed)")
        return RunResult(JobState.DONE, code, failed)
