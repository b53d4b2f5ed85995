"""The seed's runner: `bc_script INPUT_DIR OUTPUT_DIR MODEL PORT`; exit 0 = DONE.

A batch's kit and output format (facility mode) are in $BCORCH_KIT and $BCORCH_EMIT."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from bcorch.protocol import JobState
from bcorch.config import ConfigError
from .base import ProcessHandle, RunHandle, RunResult, Runner


class ScriptRunner(Runner):
    kind = "script"

    def __init__(self, bc_script: str, port: int, stall_timeout_s: float = 0.0,
                 logger: logging.Logger | logging.LoggerAdapter | None = None):
        if not bc_script:
            raise ConfigError("runner.bc_script: required when runner.kind is \"script\"")
        path = Path(bc_script)
        if not path.is_file():
            raise ConfigError(f"runner.bc_script: no such file {bc_script!r}")
        if not os.access(path, os.X_OK):
            raise ConfigError(f"runner.bc_script: {bc_script!r} is not executable")
        self.bc_script = str(path.resolve())
        self.port = port
        self.stall_timeout_s = stall_timeout_s
        self.log = logger or logging.getLogger(__name__)

    def start(self, input_dir: Path, output_dir: Path, model: str, batch: Sequence[str], *,
              kit: str = "", emit: str = "") -> RunHandle:
        """The seed's command line has no place for a kit or an output format: a batch's
        own are in the environment, BCORCH_KIT and BCORCH_EMIT (unset when it has none)."""
        argv = [self.bc_script, str(input_dir), str(output_dir), model, str(self.port)]
        env = None
        if kit or emit:
            env = dict(os.environ)
            env.update({k: v for k, v in (("BCORCH_KIT", kit), ("BCORCH_EMIT", emit)) if v})
        return ProcessHandle(argv, output_dir, env=env, interpret=self._interpret,
                         stall_timeout_s=self.stall_timeout_s, logger=self.log)

    @staticmethod
    def _interpret(code: int) -> RunResult:
        if code == 0:
            return RunResult(JobState.DONE, code)
        how = f"killed by signal {-code}" if code < 0 else f"exited with {code}"
        return RunResult(JobState.FAILED, code, reason=f"bc_script {how}")
