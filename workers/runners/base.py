"""The runner interface: start a basecaller on one batch as a child process.

Every basecaller is a real child process: never through a shell, in its own
process group (so a stop reaches everything it started), with stdout and stderr
in OUTPUT_DIR/<job output dir>/basecaller.log. The engine polls the handle; a
stop is TERM to the group, then KILL after a grace period.

`Runner.start` returns a `RunHandle`, a Protocol: `ProcessHandle` (one basecaller
process) and the dorado-server runner's `ServerBatchHandle` both honour it.

Per-batch settings (facility mode, issue 13): `start` gets the batch's model, and
keyword-only its kit (`--kit-name`, "" none) and output format (`emit`, "" the runner's
configured one). A setting of the batch that this runner cannot honour (a model not
installed on this host) raises `BatchSettingsError`: the batch FAILS with that reason and
the engine goes on with other runs' batches; a configuration error of the engine itself
stays a ConfigError (exit 78).
"""
from __future__ import annotations

import abc
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

from bcorch.protocol import JobState

LOG_NAME = "basecaller.log"
FAILED_FILES_NAME = "failed_files.json"


class BatchSettingsError(ValueError):
    """A batch's own setting (model, kit, emit) this runner cannot honour; str() is one line."""


EMITS = ("fastq", "bam")


def batch_emit(emit: str, configured: str) -> str:
    """The output format of a batch: its own, else the runner's configured one."""
    if emit and emit not in EMITS:
        raise BatchSettingsError(f"emit must be one of {', '.join(EMITS)}, got {emit!r}")
    return emit or configured


@dataclass
class RunResult:
    """How a basecaller run ended: DONE, FAILED or STOPPED, with per-file failures."""

    state: JobState
    returncode: int | None = None
    failed_files: dict[str, str] = field(default_factory=dict)
    reason: str = ""


@runtime_checkable
class RunHandle(Protocol):
    """One batch's basecaller as the engine sees it."""

    pid: int                      # the process to show (and to find in the process tree)
    log_path: Path                # its stdout and stderr
    result: RunResult | None      # set once it has ended

    def fileno(self) -> int | None:
        """A descriptor that becomes readable when it ends (None: poll instead)."""

    def poll(self) -> RunResult | None:
        """The result once it has ended; None while it runs."""

    def terminate(self) -> None:
        """Ask it to stop now and return at once (safe to call from another thread)."""

    def stop(self, grace: float, reason: str = "stopped by the engine") -> RunResult:
        """Stop it, forcibly after `grace` seconds; returns a STOPPED result."""


class ProcessHandle:
    """A running basecaller process (a RunHandle)."""

    def __init__(self, argv: Sequence[str], output_dir: Path, *,
                 env: dict[str, str] | None = None,
                 interpret: Callable[[int], RunResult],
                 stall_timeout_s: float = 0.0,
                 logger: logging.Logger | logging.LoggerAdapter | None = None):
        self.argv = list(argv)
        self.output_dir = output_dir
        self.log_path = output_dir / LOG_NAME
        self.log = logger or logging.getLogger(__name__)
        self._interpret = interpret
        self._stall_timeout_s = stall_timeout_s
        # Checking walks the output dir: every 5 s, or often enough for a shorter timeout.
        self._stall_check_every_s = min(5.0, max(0.25, stall_timeout_s / 4))
        self.result: RunResult | None = None
        self.startup_s: float | None = None   # the runner's own start-up, where it knows it
        self._stopping = False
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(self.argv, stdout=log_file, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True, close_fds=True)
        self.pid = self.proc.pid
        self.started = time.monotonic()
        self._last_activity = self.started
        self._next_stall_check = self.started + self._stall_check_every_s
        try:
            self.pidfd: int | None = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: the engine falls back to polling
            self.pidfd = None

    def fileno(self) -> int | None:
        """A descriptor that becomes readable when the process exits (None: poll instead)."""
        return self.pidfd

    def poll(self) -> RunResult | None:
        """The result once the process has exited; None while it runs."""
        if self.result is not None:
            return self.result
        code = self.proc.poll()
        if code is None:
            self._check_stall()
            return None
        self._kill_group(signal.SIGKILL)  # grandchildren left behind by the leader
        self._close_pidfd()
        if self._stopping:
            self.result = RunResult(JobState.STOPPED, code, reason="stopped by the engine")
        else:
            self.result = self._interpret(code)
        return self.result

    def terminate(self) -> None:
        """Send TERM to the group now and return (safe to call from another thread)."""
        self._stopping = True
        self._kill_group(signal.SIGTERM)

    def stop(self, grace: float, reason: str = "stopped by the engine") -> RunResult:
        """TERM to the group, KILL after `grace` seconds; returns a STOPPED result."""
        if self.result is None:
            self.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.log.warning("basecaller pid %d ignored TERM for %.1fs; sending KILL",
                                 self.pid, grace)
                self._kill_group(signal.SIGKILL)
                self.proc.wait(timeout=10)
            code = self.proc.returncode
            self._kill_group(signal.SIGKILL)
            self._close_pidfd()
            self.result = RunResult(JobState.STOPPED, code, reason=reason)
        return self.result

    def _kill_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _close_pidfd(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def _check_stall(self) -> None:
        """Stop a basecaller that wrote nothing (log or output) for stall_timeout_s."""
        now = time.monotonic()
        if self._stall_timeout_s <= 0 or now < self._next_stall_check:
            return
        self._next_stall_check = now + self._stall_check_every_s
        newest = _newest_mtime(self.output_dir)
        age = time.time() - newest if newest else None
        if age is not None and age < self._stall_timeout_s:
            self._last_activity = now - age
        if now - self._last_activity >= self._stall_timeout_s:
            self.log.error("basecaller pid %d wrote nothing for %.0fs; stopping it",
                           self.pid, now - self._last_activity)
            self.stop(5.0)
            self.result = RunResult(JobState.FAILED, self.proc.returncode,
                                    reason=f"basecaller stalled (no output for "
                                           f"{self._stall_timeout_s:g}s)")


def _newest_mtime(root: Path) -> float:
    newest = 0.0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
            except OSError:
                continue
    return newest


class Runner(abc.ABC):
    """Starts one basecaller per batch."""

    kind: str = ""

    @abc.abstractmethod
    def start(self, input_dir: Path, output_dir: Path, model: str, batch: Sequence[str], *,
              kit: str = "", emit: str = "") -> RunHandle:
        """Start the basecaller on the batch's files in input_dir, writing into output_dir,
        with `model`, demultiplexing with `kit` ("" none), writing `emit` ("fastq" or
        "bam"; "" the runner's configured format). Raises BatchSettingsError for a
        setting it cannot honour."""

    def close(self) -> None:
        """Stop what the runner keeps between batches (a basecall server); called on exit."""
