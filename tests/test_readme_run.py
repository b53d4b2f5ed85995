"""README's "Running it for real", run as written; engines learn the shared dirs from the manager.

The README commands are taken from README.md and run through bash unchanged, except for
the paths (/etc/bcorch/config.toml, /data/run42/...). The config is the test's: the
manager's URL and port, virtual GPUs and the simulate runner (allowed by the manager).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from bcorch.orchestrator.pod5_dataset import write_dataset
from bcorch.workers.read_ids import read_ids_under
from manager_helpers import aged
from support import REPO, ManagedProcess, free_port, http_json, wait_until

TOKEN = "readme-run-token"
BIN = Path(sys.executable).parent


def readme_section_commands(title: str = "Running it for real") -> list[str]:
    """Each `$ ` command of the section's console blocks, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    commands: list[str] = []
    for block in re.findall(r"```console\n(.*?)\n\s*```", section, re.S):
        current = ""
        for raw in block.splitlines():
            line = raw.strip()
            if current:
                current += " " + line
            elif line.startswith("$ "):
                current = line[2:]
            else:
                continue
            if current.endswith("\\"):
                current = current[:-1].rstrip()
                continue
            commands.append(re.sub(r"\s+#.*$", "", current).strip())
            current = ""
    return commands


def test_the_readme_section_has_the_commands_this_test_runs():
    programs = [c.split()[:2] for c in readme_section_commands()]
    assert programs == [["bcmanager", "--config"], ["bcmanager", "status"],
                        ["bcmanager", "close-input"], ["bcorch", "--config"]]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, BCORCH_TOKEN=TOKEN, XDG_RUNTIME_DIR=str(tmp_path / "run"),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    (tmp_path / "run").mkdir(mode=0o700, exist_ok=True)
    return env


def _as_written(command: str, paths: dict[str, Path]) -> str:
    for literal, path in paths.items():
        command = command.replace(literal, str(path))
    return command


@pytest.mark.slow
def test_the_readme_real_run_commands_basecall_every_read_once(procs, tmp_path):
    inp, out = tmp_path / "data" / "pod5", tmp_path / "data" / "basecalls"
    written = write_dataset(inp, 8, reads_per_file=20, samples_per_read=2000, subdirs=2)
    for rel in written:
        aged(inp / rel)   # written by the sequencer a while ago
    expected = {r for reads in written.values() for r in reads}
    port = free_port()
    config = tmp_path / "etc" / "config.toml"
    config.parent.mkdir()
    config.write_text(f'[manager]\nurl = "http://127.0.0.1:{port}"\nport = {port}\n'
                      "allow_simulated = true\n\n"
                      '[runner]\nkind = "simulate"\n\n'
                      '[orchestrator]\ngpus = "virtual:2"\n')
    paths = {"/etc/bcorch/config.toml": config, "/data/run42/pod5": inp,
             "/data/run42/basecalls": out}
    serve, status, close, bcorch = (_as_written(c, paths) for c in readme_section_commands())
    env = _env(tmp_path)
    url = f"http://127.0.0.1:{port}"

    def files() -> dict:
        code, body = http_json(url + "/status", TOKEN, timeout=5)
        assert code == 200, body
        return body["files"]

    manager = ManagedProcess(["bash", "-c", "exec " + serve], tmp_path / "manager.log", env=env)
    procs.append(manager.start())

    def manager_up() -> bool:
        if manager.proc.poll() is not None:
            raise AssertionError(f"bcmanager exited {manager.proc.returncode}:\n{manager.log()}")
        try:
            return http_json(url + "/heartbeat", timeout=1)[0] == 200
        except OSError:
            return False
    wait_until(manager_up, 30, what=f"the manager\n{manager.log()}")
    wait_until(lambda: files()["PENDING"] == len(written), 60,
               what=f"every file PENDING\n{manager.log()}")

    host = ManagedProcess(["bash", "-c", "exec " + bcorch], tmp_path / "bcorch.log", env=env)
    procs.append(host.start())
    closed = subprocess.run(["bash", "-c", close], env=env, capture_output=True, text=True,
                            timeout=60)
    assert closed.returncode == 0, closed.stderr

    def all_done() -> bool:
        if host.proc.poll() is not None and files()["DONE"] < len(written):
            raise AssertionError(f"bcorch exited {host.proc.returncode} before the run was "
                                 f"done:\n{host.log()[-3000:]}")
        return files()["DONE"] == len(written)
    wait_until(all_done, 180, what="every file DONE (see bcorch.log, manager.log)")

    watcher = ManagedProcess(["bash", "-c", "exec " + status], tmp_path / "status.log", env=env)
    procs.append(watcher.start())
    wait_until(lambda: f"{len(written)} / {len(written)} files" in watcher.log(), 30,
               what="bcmanager status --watch to show the run done")
    watcher.signal(signal.SIGINT)
    assert watcher.wait(30) == 0, watcher.log()

    if host.proc.poll() is None:   # a host that keeps serving after the run: drain it
        host.signal(signal.SIGTERM)
    assert host.wait(120) == 0, host.log()
    found = read_ids_under([out / "pass", out / "fail"])
    assert set(found) == expected and not found.doubled()
    assert "engine.input_dir: required" not in host.log()
    manager.signal(signal.SIGTERM)
    assert manager.wait(60) == 0


# -- the engine's shared directories, against a stand-in manager --------------------------

class _StandInManager:
    """One batch, then "nothing left"; records completions. Speaks the original routes."""

    def __init__(self, batch: dict):
        self.batch = batch
        self.completed: list[dict] = []
        self.assigned = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                route = urlparse(self.path).path
                query = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
                self._answer(outer.route(route, query))

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                self._answer(outer.route(urlparse(self.path).path, body))

            def _answer(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def route(self, route: str, params: dict) -> dict:
        if route == "/assignwork":
            self.assigned += 1
            if self.assigned == 1:
                return self.batch
            return {"jobid": "", "job_input_dir": "", "job_output_dir": "", "bc_engine_id": "",
                    "batch_size": 0, "batch": [], "report_back_interval": 30,
                    "input_closed": True}
        if route == "/keepalive":
            return {"late": False}
        if route == "/completed":
            self.completed.append(params)
            return {"ok": True}
        return {"status": "ok", "inactivity_interval": 60}

    def __enter__(self) -> "_StandInManager":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _one_batch(inp: Path, job: str = "j1-abc") -> tuple[dict, set[str]]:
    """A job's input dir of symlinks to one real POD5 file, and the batch answer naming it."""
    written = write_dataset(inp / "run", 1, reads_per_file=5, samples_per_read=1000)
    assigned = inp / f"ASSIGNED_{job}_e1"
    assigned.mkdir(parents=True)
    (assigned / "a.pod5").symlink_to(Path("..") / "run" / next(iter(written)))
    return ({"jobid": job, "job_input_dir": assigned.name, "job_output_dir": f"TMPOUTPUT_{job}_e1",
             "bc_engine_id": "e1", "batch_size": 1, "batch": ["a.pod5"],
             "report_back_interval": 30, "input_closed": True},
            {r for reads in written.values() for r in reads})


def _engine(procs, tmp_path: Path, url: str, engine_lines: str = "") -> ManagedProcess:
    cfg = tmp_path / "engine.toml"
    cfg.write_text(f'[manager]\nurl = "{url}"\n\n[engine]\nengine_id = "e1"\n'
                   f"work_until_none_left = true\n{engine_lines}\n"
                   '[runner]\nkind = "simulate"\n')
    engine = ManagedProcess([sys.executable, "-m", "bcorch.workers.engine_cli", "--gpu", "0",
                             "--config", str(cfg)], tmp_path / "engine.log")
    procs.append(engine.start())
    return engine


def test_an_engine_without_dirs_uses_the_ones_the_manager_names(procs, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    batch, reads = _one_batch(inp)
    out.mkdir()
    batch.update(input_root=str(inp), output_root=str(out))
    with _StandInManager(batch) as manager:
        engine = _engine(procs, tmp_path, manager.url)
        assert engine.wait(60) == 0, engine.log()
    assert [c.get("job_state") for c in manager.completed] == ["DONE"], engine.log()
    assert set(read_ids_under([out / batch["job_output_dir"]])) == reads


def test_a_manager_path_missing_on_this_host_is_a_config_error_and_nothing_is_written(
        procs, tmp_path):
    inp = tmp_path / "in"
    batch, _ = _one_batch(inp)
    elsewhere = tmp_path / "not-mounted-here"
    batch.update(input_root=str(elsewhere / "in"), output_root=str(elsewhere / "out"))
    with _StandInManager(batch) as manager:
        engine = _engine(procs, tmp_path, manager.url)
        assert engine.wait(60) == 78, engine.log()
    assert [c.get("job_state") for c in manager.completed] == ["STOPPED"]
    assert f"engine.input_dir: '{elsewhere / 'in'}' (from the manager's answer) does not exist" \
        in engine.log()
    assert not elsewhere.exists()


def test_a_hosts_own_mount_wins_over_the_managers_path(procs, tmp_path):
    inp, out = tmp_path / "mnt" / "in", tmp_path / "mnt" / "out"
    batch, reads = _one_batch(inp)
    out.mkdir()
    batch.update(input_root="/data/run42/pod5", output_root="/data/run42/basecalls")
    with _StandInManager(batch) as manager:
        engine = _engine(procs, tmp_path, manager.url,
                         f'input_dir = "{inp}"\noutput_dir = "{out}"\n')
        assert engine.wait(60) == 0, engine.log()
    assert [c.get("job_state") for c in manager.completed] == ["DONE"], engine.log()
    assert set(read_ids_under([out / batch["job_output_dir"]])) == reads


def test_against_the_original_manager_an_engine_without_dirs_says_which_key_to_set(
        procs, tmp_path):
    batch, _ = _one_batch(tmp_path / "in")     # the original's answer: no input_root
    with _StandInManager(batch) as manager:
        engine = _engine(procs, tmp_path, manager.url)
        assert engine.wait(60) == 78, engine.log()
    assert [c.get("job_state") for c in manager.completed] == ["STOPPED"]
    assert "engine.input_dir: required" in engine.log()


def test_the_batch_answer_carries_absolute_roots_and_the_originals_answer_has_none():
    from bcorch.protocol import Batch, ProtocolError

    answer = {"jobid": "j1-abc", "job_input_dir": "ASSIGNED_j1-abc_e1",
              "job_output_dir": "TMPOUTPUT_j1-abc_e1", "bc_engine_id": "e1", "batch_size": 1,
              "batch": ["a.pod5"], "report_back_interval": 30}
    original = Batch.from_answer(answer)
    assert (original.input_root, original.output_root) == ("", "")
    assert "input_root" not in original.to_dict()
    ours = Batch.from_answer({**answer, "input_root": "/data/in", "output_root": "/data/out"})
    assert ours.to_dict()["input_root"] == "/data/in" and ours.output_root == "/data/out"
    for bad in ("data/in", 5, "/data/\0in"):
        with pytest.raises(ProtocolError, match="input_root must be an absolute path"):
            Batch.from_answer({**answer, "input_root": bad})
