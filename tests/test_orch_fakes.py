"""Fake engine targets for the orchestrator tests, and a bcorch runner that uses them.

`fake_engine` follows the engine's side of workers/channel.py; what it does is chosen
per GPU by a JSON file named in $FAKE_MODES ({"0": "crash", "default": "good"}), read
at every start, so a test can change a GPU's behaviour and then `bcorch resume` it.

    python tests/test_orch_fakes.py [bcorch flags]   runs bcorch with fake engines

Modes: good (READY, heartbeats, obeys drain/stop/resume), child (good, plus a fake
basecaller child in its own session), crash (READY, then exit 3), done (READY, exit 0), exit78, exit75,
silent (never says anything). The heartbeat's last_error carries the spec's manager_url,
so a test can see which manager an engine was started for.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bcorch.workers import channel  # noqa: E402
from bcorch.workers.channel import Msg, message  # noqa: E402

from bcorch.config_writer import write_config
from support import ManagedProcess, wait_until  # noqa: E402

HEARTBEAT_S = 0.2


def _mode(gpu: int) -> str:
    path = os.environ.get("FAKE_MODES")
    if not path:
        return "good"
    modes = json.loads(Path(path).read_text())
    return modes.get(str(gpu), modes.get("default", "good"))


def fake_engine(conn, spec: channel.SpawnSpec) -> None:
    os.environ.update(spec.env)
    gpu = spec.gpu_index
    mode = _mode(gpu)
    if mode in ("exit78", "exit75"):
        code = int(mode[-2:])
        channel.send(conn, message(Msg.EXITING, code=code, reason=f"fake {mode}"))
        sys.exit(code)
    if mode == "silent":
        _wait_for_parent_death(conn)
        sys.exit(0)
    _record_environment()
    channel.send(conn, message(Msg.READY, engine_id=spec.engine_id, gpu=gpu, pid=os.getpid()))
    if mode == "crash":
        time.sleep(0.1)
        os._exit(3)
    if mode == "done":
        channel.send(conn, message(Msg.EXITING, code=0, reason="nothing left"))
        return
    basecaller = None
    if mode == "child":
        basecaller = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                                      start_new_session=True)
    draining_since = None
    drain_s = float(os.environ.get("FAKE_DRAIN_S", "0.3"))
    done = 0
    try:
        while True:
            channel.send(conn, message(
                Msg.HEARTBEAT, engine_id=spec.engine_id, state="DRAINING" if draining_since else "WORKING",
                job_id=f"job{done}", batch_size=4, batch_elapsed_s=0.5, files_done=done,
                basecaller_pid=basecaller.pid if basecaller else None, batches_done=done,
                files_failed=0, last_error=f"manager_url={spec.manager_url}", cuda=os.environ.get("CUDA_VISIBLE_DEVICES")))
            done += 1
            if draining_since is not None and time.monotonic() - draining_since >= drain_s:
                channel.send(conn, message(Msg.EXITING, code=0, reason="drained"))
                return
            if conn.poll(HEARTBEAT_S):
                cmd = conn.recv().get("cmd")
                if cmd == "drain":
                    draining_since = time.monotonic()
                elif cmd == "resume":
                    draining_since = None
                elif cmd == "stop":
                    channel.send(conn, message(Msg.EXITING, code=0, reason="stopped"))
                    return
    except (EOFError, OSError):
        return     # the parent is gone
    finally:
        if basecaller is not None:
            basecaller.kill()
            basecaller.wait()


def _record_environment() -> None:
    """What the engine sees itself (a forked engine's /proc/PID/environ is its zygote's)."""
    where = os.environ.get("FAKE_ENV_DIR")
    if where:
        record = Path(where, f"{os.getpid()}.json")
        staging = record.with_suffix(".tmp")   # whole or absent: the test reads it once it exists
        staging.write_text(json.dumps(
            {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "ppid": os.getppid()}))
        os.replace(staging, record)


def _wait_for_parent_death(conn) -> None:
    while True:
        try:
            if conn.poll(0.2):
                conn.recv()
        except (EOFError, OSError):
            return


# --- helpers for the tests ---------------------------------------------------------------
class FakeBcorch(ManagedProcess):
    """bcorch (this file as a script) with fake engines, a temp config and its own socket."""

    def __init__(self, tmp: Path, gpus: int = 2, modes: dict | None = None,
                 orchestrator: dict | None = None, extra: list[str] = (),
                 manager: dict | None = None):
        self.tmp = tmp
        self.socket = tmp / "ctl" / "c.sock"
        self.modes_path = tmp / "modes.json"
        self.set_modes(modes or {})
        # No manager listens: first_contact_timeout_s = 0 keeps bcorch from giving up on it.
        settings = {"hang_timeout_s": 3.0, "healthy_reset_s": 600.0, "drain_timeout_s": 20.0,
                    "first_contact_timeout_s": 0,
                    **(orchestrator or {})}
        self.config = tmp / "bcorch.toml"
        self.settings = settings
        self.write_config(orchestrator=settings, manager=manager or {})
        argv = [sys.executable, str(HERE / "test_orch_fakes.py"), "--config", str(self.config),
                "--gpus", f"virtual:{gpus}", "--socket", str(self.socket), *extra]
        self.env_dir = tmp / "engine-env"
        self.env_dir.mkdir(exist_ok=True)
        super().__init__(argv, tmp / "bcorch.log", env={"FAKE_MODES": str(self.modes_path),
                                                        "FAKE_ENV_DIR": str(self.env_dir)})

    def write_config(self, **sections: dict) -> None:
        write_config(self.config, **sections)

    def set_modes(self, modes: dict) -> None:
        self.modes_path.write_text(json.dumps(modes))

    def start(self) -> "FakeBcorch":
        super().start()
        wait_until(lambda: self.socket.exists() or self.proc.poll() is not None, 30,
                   what="control socket")
        assert self.proc.poll() is None, self.log()
        return self

    def ask(self, **request) -> dict:
        from bcorch.orchestrator.control import request as control_request
        return control_request(self.socket, request, timeout=10)

    def slots(self) -> list[dict]:
        return self.ask(cmd="status")["slots"]

    def slot(self, gpu: int) -> dict:
        return self.slots()[gpu]

    def wait_state(self, gpu: int, state: str, timeout: float = 60) -> dict:
        return wait_until(lambda: (s := self.slot(gpu))["state"] == state and s, timeout,
                          what=f"gpu{gpu} {state}\n{self.log()[-3000:]}")

    def engine_env(self, pid: int) -> dict:
        """CUDA_VISIBLE_DEVICES and parent pid as engine `pid` saw them at its start."""
        path = self.env_dir / f"{pid}.json"
        wait_until(path.exists, 30, what=f"engine {pid} environment record")
        return json.loads(path.read_text())

    def tree(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


if __name__ == "__main__":
    import test_orch_fakes
    from bcorch.orchestrator.cli import main

    sys.exit(main(sys.argv[1:], target=test_orch_fakes.fake_engine))
