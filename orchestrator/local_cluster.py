"""A manager and bcorch on this machine as real subprocesses: the demo, the benchmarks, the tests.

`LocalCluster(workdir, gpus=...)` writes one config file (simulation by default, see
bcorch.config_writer), starts `bcmanager` on a loopback port the manager chooses itself
(`--port 0 --port-file`) and `bcorch --gpus virtual:N`, and stops both. With `watch_root=`
the manager serves a facility (every run directory under that root; `facility` and
`facility_rules` give the runs' settings).
Every child runs in its own session with its output in a log file; every wait is bounded;
`close()` leaves nothing running. The cluster's children also die with the process that
started them, should it be killed with SIGKILL and run no clean-up (die_with_parent).
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from bcorch.config_writer import toml_value, write_config

from .control import MAX_SOCKET_PATH, ControlError, request

STOP_TIMEOUT_S = 20.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:  # pragma: no cover - in the child, fork to exec
    """SIGTERM this child when its parent dies (Linux), the way an engine's dorado server is
    tied to its engine (workers/runners/dorado_server.py). If the parent is already gone
    (it died between fork and here), the signal would never come: end at once."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def free_port() -> int:
    """A port free now; another process may take it before it is used (LocalCluster lets
    the manager choose instead). For scripts that need a port for something else."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    """condition()'s first truthy value; TimeoutError naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def get_json(url: str, timeout: float = 2.0) -> dict | None:
    """The JSON answer of a GET, or None when there is no (valid) answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def manager_argv(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bcorch.manager", "--config", str(config), *extra]


def bcorch_argv(config: Path, gpus: int | str, *extra: str) -> list[str]:
    """bcorch over `gpus` virtual GPUs (an int), or a --gpus spec as given (a str: "all")."""
    spec = gpus if isinstance(gpus, str) else f"virtual:{gpus}"
    return [sys.executable, "-m", "bcorch.orchestrator", "--config", str(config),
            "--gpus", spec, *extra]


class LocalProcess:
    """A child process in its own session, its stdout and stderr appended to a log file.

    die_with_parent: the child is sent SIGTERM when this process dies, even by SIGKILL
    (PR_SET_PDEATHSIG). The kernel sends it when the *thread* that started the child ends,
    so start such a child from a thread that lives as long as the process (the main one).
    """

    def __init__(self, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None, die_with_parent: bool = False):
        self.argv = list(argv)
        self.die_with_parent = die_with_parent
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LocalProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        parent = os.getpid()
        preexec = (lambda: _die_with_parent(parent)) if self.die_with_parent else None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd,
                                         start_new_session=True, preexec_fn=preexec)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, timeout: float) -> int:
        assert self.proc is not None, "not started"
        return self.proc.wait(timeout=timeout)

    def signal(self, sig: int) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT_S, now: bool = False) -> int | None:
        """SIGTERM (bcorch drains; with now=True a second SIGTERM: stop at once), then SIGKILL
        to the whole session if it has not ended within timeout. Returns the exit code."""
        if not self.running():
            return self.returncode
        self.signal(signal.SIGTERM)
        if now:
            try:
                self.wait(0.2)  # two distinct signals, so bcorch sees a second one
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_session()
            return self.wait(10)

    def kill_session(self) -> None:
        """SIGKILL to every process of the child's session (its process group)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        """Kill the child and everything it started, now (a clean-up, not a drain).

        Only while the child is not yet reaped: once it has been, its pid (and process group
        id) may already belong to a new process, another test's bcorch say, which a kill by
        that number would take down."""
        if self.proc is None or self.proc.poll() is not None:
            return
        kill_tree(self.proc.pid)
        self.kill_session()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - the kernel did not reap
            pass


def kill_tree(pid: int, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
    """Send sig to pid and its descendants (even those that left its session), and wait up to
    timeout for each to be gone.

    A zombie counts as gone: a killed grandchild is re-parented to PID 1, which may reap it
    only seconds later (in containers, often not at once), and it runs no code any more.
    """
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    wait_gone(procs, timeout)


def wait_gone(procs: list, timeout: float) -> list:
    """Wait up to timeout for the psutil processes to end; return those still running
    (a zombie has ended: it waits only for its parent, or PID 1, to reap it)."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        _, procs = psutil.wait_procs(procs, timeout=0.05)
        procs = [p for p in procs if not _zombie(p)]
        if not procs or time.monotonic() >= deadline:
            return procs


def _zombie(proc) -> bool:
    import psutil

    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def rules_toml(rules: Sequence[Mapping[str, Any]]) -> str:
    """[[facility.rules]] tables, to append to a config file."""
    return "".join("\n[[facility.rules]]\n" + "".join(
        f"{key} = {toml_value(value, f'facility.rules.{key}')}\n" for key, value in rule.items())
        for rule in rules)


class LocalCluster:
    """One manager and one bcorch over `gpus` virtual GPUs, with their files in `workdir`.

    `manager`, `engine`, `runner` and `orchestrator` are config sections merged over the
    cluster's defaults (a fast local run of the simulate runner).
    """

    def __init__(self, workdir: Path, *, gpus: int | str = 1, input_dir: Path | None = None,
                 output_dir: Path | None = None, port: int | None = None,
                 manager: Mapping[str, Any] | None = None, engine: Mapping[str, Any] | None = None,
                 runner: Mapping[str, Any] | None = None,
                 orchestrator: Mapping[str, Any] | None = None,
                 watch_root: Path | None = None, facility: Mapping[str, Any] | None = None,
                 facility_rules: Sequence[Mapping[str, Any]] = ()):
        self.workdir = Path(workdir)
        self.gpus = gpus
        self.watch_root = Path(watch_root) if watch_root else None
        self.input_dir = self.watch_root or (Path(input_dir) if input_dir
                                             else self.workdir / "input")
        self.output_dir = self.watch_root or (Path(output_dir) if output_dir
                                              else self.workdir / "output")
        for d in (self.input_dir, self.output_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.port: int | None = port  # None: the manager picks one at its first start
        self.port_file = self.workdir / "manager.port"
        self.db = self.workdir / "bcmanager.sqlite"  # in the workspace, not ~/.local/state
        self.socket = self.workdir / "control" / "control.sock"
        self._short_socket_dir: Path | None = None
        if len(os.fsencode(str(self.socket))) > MAX_SOCKET_PATH:  # a deep TMPDIR
            self._short_socket_dir = Path(tempfile.mkdtemp(prefix="bcorch-ctl-", dir="/tmp"))
            self.socket = self._short_socket_dir / "control.sock"
        self._sections = dict(manager=manager, engine=engine, runner=runner,
                              orchestrator=orchestrator, facility=facility,
                              facility_rules=facility_rules)
        self.config = self.workdir / "bcorch.toml"
        self._write_config()
        self.manager: LocalProcess | None = None
        self.bcorch: LocalProcess | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the manager's port is not known before its first start "
                               "(start_manager)")
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        """bcorch.toml for both processes; manager.url only once the port is known (before
        the first start the manager is told --port 0 and says which port it got)."""
        s = self._sections
        where = ({"watch_root": str(self.watch_root)} if self.watch_root else
                 {"input_dir": str(self.input_dir), "output_dir": str(self.output_dir)})
        known = {"url": self.url, "port": self.port} if self.port is not None else {}
        write_config(
            self.config,
            manager={**known, **where, "db": str(self.db),
                     "settle_s": 0.0, "scan_interval_s": 0.2, **(s["manager"] or {})},
            engine={"polling_interval": 0.01, "work_until_none_left": True,
                    **(s["engine"] or {})},
            runner={"stop_grace_s": 2.0, **(s["runner"] or {})},
            orchestrator={"hang_timeout_s": 30.0, "drain_timeout_s": 30.0,
                          "control_socket": str(self.socket), **(s["orchestrator"] or {})},
            **({"facility": dict(s["facility"])} if s["facility"] else {}))
        if s["facility_rules"]:
            with open(self.config, "a") as fh:
                fh.write(rules_toml(s["facility_rules"]))

    def start_manager(self, *extra: str, input_closed: bool = True, timeout: float = 60.0,
                      wait_files: int | None = None) -> float:
        """Start bcmanager; return the monotonic time it first answered /heartbeat.

        The first start without a port given: the manager listens on --port 0 and writes
        the port it got to --port-file (no other process can take it between a choice and
        the bind); the config then names it, so bcorch and later restarts use it."""
        choose = self.port is None
        port_args: list[str] = []
        if choose:
            self.port_file.unlink(missing_ok=True)
            port_args = ["--port", "0", "--port-file", str(self.port_file)]
        argv = manager_argv(self.config, *port_args, *extra,
                            *(["--input-closed"] if input_closed else []))
        self.manager = LocalProcess(argv, self.workdir / "manager.log",
                                    die_with_parent=True).start()

        def alive() -> None:
            if not self.manager.running():
                raise RuntimeError(f"the manager exited with {self.manager.returncode}; "
                                   f"see {self.manager.log_path}")

        def port_written() -> int | None:
            alive()
            try:
                return int(self.port_file.read_text())
            except (OSError, ValueError):
                return None

        if choose:
            self.port = wait_for(port_written, timeout, f"the manager's port in {self.port_file}",
                                 interval=0.02)
            self._write_config()

        def up() -> bool:
            alive()
            return get_json(self.url + "/heartbeat", timeout=0.5) is not None

        wait_for(up, timeout, f"the manager on {self.url}", interval=0.02)
        answered = time.monotonic()
        if wait_files:
            wait_for(lambda: sum((self.status() or {}).get("files", {}).values()) >= wait_files,
                     120, f"the manager to find {wait_files} files", interval=0.1)
        return answered

    def start_bcorch(self, *extra: str) -> LocalProcess:
        self.bcorch = LocalProcess(bcorch_argv(self.config, self.gpus, *extra),
                                   self.workdir / "bcorch.log", die_with_parent=True).start()
        return self.bcorch

    def status(self) -> dict | None:
        """The manager's /status, or None while it does not answer."""
        return get_json(self.url + "/status")

    def slots(self) -> list[dict]:
        """bcorch's GPU slots from its control pipe ([] while it does not answer)."""
        try:
            reply = request(self.socket, {"cmd": "status"}, timeout=2.0)
        except (ControlError, OSError):
            return []
        return reply.get("slots", []) if reply.get("ok") else []

    def runs(self) -> list[dict]:
        """The facility's runs (GET /runs); [] while the manager does not answer."""
        return (get_json(self.url + "/runs") or {}).get("runs", [])

    def close_input(self) -> bool:
        """POST /close-input (a facility: no new runs); whether the manager took it."""
        request_ = urllib.request.Request(self.url + "/close-input", data=b"{}", method="POST",
                                          headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request_, timeout=5) as resp:
                return resp.status == 200
        except OSError:
            return False

    def all_done(self, total: int) -> bool:
        files = (self.status() or {}).get("files", {})
        return files.get("DONE", 0) + files.get("QUARANTINED", 0) >= total

    def close(self, now: bool = False) -> None:
        """Stop bcorch (a drain; at once with now=True), then the manager."""
        for proc, immediately in ((self.bcorch, now), (self.manager, False)):
            if proc is not None:
                proc.stop(now=immediately)
        if self._short_socket_dir is not None:
            shutil.rmtree(self._short_socket_dir, ignore_errors=True)
