"""The `dorado-server` runner: one long-lived dorado_basecall_server per engine, fed per
batch by ont_basecaller_supervisor (how the original pipeline ran).

    dorado_basecall_server --config <engine.model> --device cuda:<n> --port <port>
                           --log_path <OUTPUT_DIR>/SERVERLOG_<engine id> [--use_tcp] <extra_args>
    ont_basecaller_supervisor --input_path <job input dir> --save_path <job output dir>
                              --config <engine.model> --port <port> --num_clients <n>
                              [--use_tcp] [--bam_out] [--barcode_kits KIT]

The server loads the model once and stays up between batches. It is started (without
blocking the engine's loop) when the first batch arrives; the batch's supervisor starts
once the server says it is ready ("Starting server on port" / "Basecall Service started
on port" in its output or log dir) or its port accepts a connection. `<port>` is an IPC
socket path private to the engine, or with `runner.server_use_tcp` the TCP port
`runner.port + GPU index`.

A server that dies is started again at the next batch (a crash of the runner, not of
the engine); a batch whose server died under it is FAILED. Exit code 2 of the server
(bad configuration, model, device or memory) is a configuration error: the engine
reports the batch STOPPED and exits 78.

Per batch (facility mode): a batch's output format and kit go to its supervisor. A batch
whose model is not the one the server has loaded restarts the server with that model
(stop, then start with the new --config: a model switch, counted in `model_switches`;
the wait for the server is the batch's start-up, `startup_s`). The manager's fair share
keeps an engine on one model while it can, so switches are rare. A batch's model the
server refuses (exit 2) FAILS that batch instead of stopping the engine: the next batch
with another model restarts the server again.
"""
from __future__ import annotations

import ctypes
import enum
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

from bcorch.protocol import JobState
from bcorch.config import ConfigError
from ..read_ids import require_bam_reader
from .base import (LOG_NAME, BatchSettingsError, ProcessHandle, RunHandle, RunResult, Runner,
                   batch_emit)
from .dorado import describe_exit, find_executable, last_error_line

READY_MARKERS = ("Starting server on port", "Basecall Service started on port")
SERVER_OUT = "server.out"
SERVER_EXIT_CONFIG = 2
MAX_STARTS_PER_BATCH = 3
_PR_SET_PDEATHSIG = 1


class ServerState(str, enum.Enum):
    STOPPED = "STOPPED"     # never started, or stopped by us
    STARTING = "STARTING"   # process running, not ready yet
    READY = "READY"         # said it is ready (or its port answers)
    DEAD = "DEAD"           # exited on its own


_TRANSITIONS = {
    ServerState.STOPPED: {ServerState.STARTING},
    ServerState.STARTING: {ServerState.READY, ServerState.DEAD, ServerState.STOPPED},
    ServerState.READY: {ServerState.DEAD, ServerState.STOPPED},
    ServerState.DEAD: {ServerState.STARTING, ServerState.STOPPED},
}


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """The server must not outlive a killed engine: TERM it when its parent dies (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class BasecallServer:
    """The engine's dorado_basecall_server process and its state machine."""

    def __init__(self, argv: Sequence[str], log_dir: Path, *, port: str, use_tcp: bool,
                 start_timeout_s: float,
                 logger: logging.Logger | logging.LoggerAdapter | None = None):
        self.argv = list(argv)   # argv[2] is the --config (the model)
        self.log_dir = log_dir
        self.port = port
        self.use_tcp = use_tcp
        self.start_timeout_s = start_timeout_s
        self.log = logger or logging.getLogger(__name__)
        self.state = ServerState.STOPPED
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.last_exit: int | None = None
        self._started_at = 0.0
        self._offsets: dict[Path, int] = {}

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def config(self) -> str:
        """The model (--config) it runs, or will run at its next start."""
        return self.argv[2]

    def reconfigure(self, config: str) -> None:
        """Use `config` from the next start on; only while stopped or dead."""
        if self.state in (ServerState.STARTING, ServerState.READY):
            raise RuntimeError("reconfigure a running dorado_basecall_server: stop it first")
        self.argv[2] = config

    def _set(self, new: ServerState) -> None:
        if new is self.state:
            return
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"server state {self.state.value} -> {new.value} is not allowed")
        self.log.debug("dorado_basecall_server %s -> %s", self.state.value, new.value)
        self.state = new

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not self.use_tcp:
            Path(self.port).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                os.unlink(self.port)  # a socket left by a killed server
            except FileNotFoundError:
                pass
        out_path = self.log_dir / SERVER_OUT
        # What earlier starts wrote does not count: read only what is added from now on.
        self._offsets = {p: p.stat().st_size for p in self._log_files()}
        with open(out_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         close_fds=True, preexec_fn=_die_with_parent)
        self.starts += 1
        self._started_at = time.monotonic()
        self._set(ServerState.STARTING)
        self.log.info("dorado_basecall_server pid %d starting (start %d, port %s, log %s)",
                      self.proc.pid, self.starts, self.port, self.log_dir)

    def poll(self) -> ServerState:
        """Update and return the state; ConfigError for exit 2, TimeoutError for a slow start."""
        if self.proc is None or self.state is ServerState.STOPPED:
            return self.state
        code = self.proc.poll()
        if code is not None and self.state is not ServerState.DEAD:
            self.last_exit = code
            self._kill_group()
            self._set(ServerState.DEAD)
            detail = describe_exit("dorado_basecall_server", code, self.log_dir / SERVER_OUT)
            if code == SERVER_EXIT_CONFIG:
                raise ConfigError(f"runner.kind dorado-server: {detail} (exit 2: bad "
                                  f"configuration, model, device or memory; "
                                  f"config {self.argv[2]!r})")
            self.log.error("%s", detail)
        elif self.state is ServerState.STARTING:
            if self._said_ready() or self._port_answers():
                self._set(ServerState.READY)
                self.log.info("dorado_basecall_server pid %d ready after %.1fs", self.proc.pid,
                              time.monotonic() - self._started_at)
            elif time.monotonic() - self._started_at > self.start_timeout_s:
                self.stop(5.0)
                raise TimeoutError(f"dorado_basecall_server not ready after "
                                   f"{self.start_timeout_s:g}s (runner.server_start_timeout_s)")
        return self.state

    def _log_files(self) -> list[Path]:
        return [p for p in [self.log_dir / SERVER_OUT, *sorted(self.log_dir.glob("*.log"))]
                if p.exists()]

    def _said_ready(self) -> bool:
        for path in self._log_files():
            try:
                with open(path, "rb") as fh:
                    fh.seek(self._offsets.get(path, 0))
                    text = fh.read().decode("utf-8", errors="replace")
            except OSError:
                continue
            if any(marker in text for marker in READY_MARKERS):
                return True
        return False

    def _port_answers(self) -> bool:
        family, address = ((socket.AF_INET, ("127.0.0.1", int(self.port))) if self.use_tcp
                           else (socket.AF_UNIX, self.port))
        if not self.use_tcp and not os.path.exists(self.port):
            return False
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            try:
                sock.connect(address)
            except OSError:
                return False
        return True

    def stop(self, grace: float) -> None:
        if self.proc is None or self.state is ServerState.STOPPED:
            return
        if self.proc.poll() is None:
            self._kill_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.log.warning("dorado_basecall_server pid %d ignored TERM; sending KILL",
                                 self.proc.pid)
        self._kill_group(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._set(ServerState.STOPPED)
        self.log.info("dorado_basecall_server pid %d stopped", self.proc.pid)

    def _kill_group(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class ServerBatchHandle:
    """One batch: wait (polled) for the server, then run the supervisor.

    A RunHandle; `pid` is the supervisor's once it runs, the server's before.
    """

    def __init__(self, server: BasecallServer, supervisor_argv: Sequence[str], output_dir: Path,
                 *, stall_timeout_s: float, model_from_batch: bool = False,
                 logger: logging.Logger | logging.LoggerAdapter | None = None):
        """model_from_batch: the server runs the batch's own model, not the engine's; a
        server that refuses it (exit 2) fails this batch instead of stopping the engine."""
        self.server = server
        self.model_from_batch = model_from_batch
        self.startup_s: float | None = None   # the wait for the server (loading its model)
        self._created = time.monotonic()
        self.supervisor_argv = list(supervisor_argv)
        self.output_dir = output_dir
        self.log_path = output_dir / LOG_NAME
        self.log = logger or logging.getLogger(__name__)
        self.stall_timeout_s = stall_timeout_s
        self.result: RunResult | None = None
        self.supervisor: ProcessHandle | None = None
        self._stopping = False
        self._starts_here = 0
        output_dir.mkdir(parents=True, exist_ok=True)
        self._advance()
        self.pid = self.supervisor.pid if self.supervisor else (server.pid or 0)

    def fileno(self) -> int | None:
        return self.supervisor.fileno() if self.supervisor is not None else None

    def poll(self) -> RunResult | None:
        if self.result is None:
            self._advance()
        return self.result

    def _advance(self) -> None:
        try:
            state = self.server.poll()
        except TimeoutError as exc:
            self._finish(RunResult(JobState.FAILED, reason=str(exc)))
            return
        except ConfigError as exc:
            if not self.model_from_batch:
                raise
            self._finish(RunResult(JobState.FAILED, self.server.last_exit,
                                   reason=f"the batch's model: {exc}"))
            return
        if self.supervisor is not None:
            result = self.supervisor.poll()
            if result is None and state is ServerState.DEAD:
                self.supervisor.stop(5.0)
                result = RunResult(JobState.FAILED, self.supervisor.proc.returncode,
                                   reason=f"dorado_basecall_server died during the batch "
                                          f"(exit {self.server.last_exit})")
            if result is not None:
                self._finish(result)
            return
        if self._stopping:
            self._finish(RunResult(JobState.STOPPED, reason="stopped by the engine"))
        elif state in (ServerState.STOPPED, ServerState.DEAD):
            if self._starts_here >= MAX_STARTS_PER_BATCH:
                self._finish(RunResult(JobState.FAILED, self.server.last_exit,
                                       reason=f"dorado_basecall_server died at start "
                                              f"{self._starts_here} times: "
                                              f"{last_error_line(self.server.log_dir / SERVER_OUT)}"))
                return
            if state is ServerState.DEAD:
                self.log.warning("dorado_basecall_server is dead (exit %s); starting it again",
                                 self.server.last_exit)
            self._starts_here += 1
            self.server.start()
        elif state is ServerState.READY:
            self.startup_s = time.monotonic() - self._created
            self.supervisor = ProcessHandle(self.supervisor_argv, self.output_dir,
                                        interpret=self._interpret,
                                        stall_timeout_s=self.stall_timeout_s, logger=self.log)
            self.pid = self.supervisor.pid

    def _interpret(self, code: int) -> RunResult:
        if code == 0:
            return RunResult(JobState.DONE, code)
        return RunResult(JobState.FAILED, code,
                         reason=describe_exit("ont_basecaller_supervisor", code, self.log_path))

    def _finish(self, result: RunResult) -> None:
        self.result = result

    def terminate(self) -> None:
        self._stopping = True
        if self.supervisor is not None:
            self.supervisor.terminate()

    def stop(self, grace: float, reason: str = "stopped by the engine") -> RunResult:
        if self.result is None:
            if self.supervisor is not None:
                self.result = self.supervisor.stop(grace, reason)
            else:
                self.result = RunResult(JobState.STOPPED, reason=reason)
        return self.result


def ipc_port(engine_id: str) -> str:
    """An IPC socket path only this user can reach, one per engine id."""
    return str(Path(tempfile.gettempdir()) / f"bcorch-{os.getuid()}" / f"basecall_{engine_id}")


class DoradoServerRunner(Runner):
    kind = "dorado-server"

    def __init__(self, *, server_path: str, supervisor_path: str, model: str, output_root: str,
                 engine_id: str, device_index: int = 0, gpu_index: int = 0, base_port: int = 5555,
                 use_tcp: bool = False, num_clients: int = 4, extra_args: Sequence[str] = (),
                 emit: str = "fastq", start_timeout_s: float = 600.0,
                 stall_timeout_s: float = 0.0, stop_grace_s: float = 10.0,
                 logger: logging.Logger | logging.LoggerAdapter | None = None):
        self.server_exe = find_executable(server_path, "runner.server_path")
        self.supervisor_exe = find_executable(supervisor_path, "runner.supervisor_path")
        if not model:
            raise ConfigError("engine.model: required (the server's --config, e.g. "
                              "dna_r10.4.1_e8.2_400bps_5khz_hac.cfg)")
        if os.sep in model and not Path(model).is_file():
            raise ConfigError(f"engine.model: server config file {model!r} does not exist")
        if not output_root:
            raise ConfigError("engine.output_dir: required (or manager.output_dir)")
        if use_tcp and not 0 < base_port + gpu_index <= 65535:
            raise ConfigError(f"runner.port: {base_port} + GPU {gpu_index} is not a TCP port")
        if emit == "bam":
            require_bam_reader("runner.emit")
        self.model = model
        self.model_switches = 0
        self.port = str(base_port + gpu_index) if use_tcp else ipc_port(engine_id)
        self.use_tcp = use_tcp
        self.num_clients = num_clients
        self.emit = emit
        self.stall_timeout_s = stall_timeout_s
        self.stop_grace_s = stop_grace_s
        self.log = logger or logging.getLogger(__name__)
        argv = [self.server_exe, "--config", model, "--device", f"cuda:{device_index}",
                "--port", self.port, "--log_path",
                str(Path(output_root) / f"SERVERLOG_{engine_id}")]
        if use_tcp:
            argv.append("--use_tcp")
        self.server = BasecallServer(argv + list(extra_args),
                                     Path(output_root) / f"SERVERLOG_{engine_id}",
                                     port=self.port, use_tcp=use_tcp,
                                     start_timeout_s=start_timeout_s, logger=self.log)

    def supervisor_argv(self, input_dir: Path, output_dir: Path, model: str, *, kit: str = "",
                        emit: str = "") -> list[str]:
        argv = [self.supervisor_exe, "--input_path", str(input_dir), "--save_path",
                str(output_dir), "--config", model, "--port", self.port,
                "--num_clients", str(self.num_clients)]
        if self.use_tcp:
            argv.append("--use_tcp")
        if (emit or self.emit) == "bam":
            argv.append("--bam_out")
        if kit:
            argv += ["--barcode_kits", kit]
        return argv

    def start(self, input_dir: Path, output_dir: Path, model: str, batch: Sequence[str], *,
              kit: str = "", emit: str = "") -> RunHandle:
        emit = batch_emit(emit, self.emit)
        if emit == "bam" and emit != self.emit:
            try:
                require_bam_reader("runner.emit")
            except ConfigError as exc:
                raise BatchSettingsError(str(exc)) from None
        if model != self.server.config:
            self._switch_model(model)
        return ServerBatchHandle(self.server,
                                 self.supervisor_argv(input_dir, output_dir, model, kit=kit,
                                                      emit=emit),
                                 output_dir, stall_timeout_s=self.stall_timeout_s,
                                 model_from_batch=model != self.model, logger=self.log)

    def _switch_model(self, model: str) -> None:
        """Stop the server (if it runs) so that the batch's handle starts it with `model`."""
        if not model or (os.sep in model and not Path(model).is_file()):
            raise BatchSettingsError(f"the batch's model {model!r} is not a server config "
                                     f"(file or name)")
        self.model_switches += 1
        self.log.info("model switch %d: %s -> %s; restarting dorado_basecall_server",
                      self.model_switches, self.server.config, model)
        self.server.stop(self.stop_grace_s)
        self.server.reconfigure(model)

    def close(self) -> None:
        self.server.stop(self.stop_grace_s)
