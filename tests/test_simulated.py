"""A real host never produces simulated basecalls (issue 12, §3): the default runner is dorado,
`--gpus virtual:N` does not imply the simulate runner, and a manager refuses a simulate
engine's work unless it was started for simulation (manager.allow_simulated)."""
from __future__ import annotations

import os
import sys

from bcorch.config_writer import write_config
from bcorch.orchestrator.pod5_dataset import write_dataset
from manager_helpers import assign
from support import ManagedProcess, ManagerProcess, wait_until


def _manager(tmp_path, procs, allow_simulated: bool, files: int = 2) -> ManagerProcess:
    for d in ("in", "out"):
        (tmp_path / d).mkdir(exist_ok=True)
    write_dataset(tmp_path / "in", files, reads_per_file=2, samples_per_read=1000)
    m = ManagerProcess(tmp_path, tmp_path / "in", tmp_path / "out", batch_size=1,
                       input_closed=True, allow_simulated=allow_simulated)
    procs.append(m)
    m.start()
    wait_until(lambda: m.status()["files"]["PENDING"] == files, 30, what="files found")
    return m


def _config(tmp_path, url: str, runner: dict) -> str:
    path = tmp_path / "engine.toml"
    sections = {
        "manager": {"url": url},
        "engine": {"input_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / "out"),
                   "polling_interval": 0.005, "work_until_none_left": True},
        "runner": runner,
    }
    write_config(path, simulate=False, **{s: kv for s, kv in sections.items() if kv})
    return str(path)


def _engine(tmp_path, procs, config: str, env: dict | None = None) -> ManagedProcess:
    p = ManagedProcess([sys.executable, "-m", "bcorch.workers.engine_cli", "--gpu", "0",
                        "--config", config], tmp_path / "engine.log", env=env)
    procs.append(p)
    return p.start()


def test_simulate_engine_exits_78_on_a_manager_not_started_for_simulation(tmp_path, procs):
    m = _manager(tmp_path, procs, allow_simulated=False)
    engine = _engine(tmp_path, procs, _config(tmp_path, m.url, {"kind": "simulate"}))
    assert engine.wait(60) == 78, engine.log()[-2000:]
    last = [line for line in engine.log().splitlines() if "engine exits with 78" in line]
    assert last and "manager.allow_simulated" in last[0], engine.log()[-2000:]
    files = m.status()["files"]
    assert files["PENDING"] == 2 and files["DONE"] == 0
    assert not list((tmp_path / "out").rglob("*.fastq"))


def test_simulate_engine_works_on_a_manager_started_for_simulation(tmp_path, procs):
    m = _manager(tmp_path, procs, allow_simulated=True)
    engine = _engine(tmp_path, procs, _config(tmp_path, m.url, {"kind": "simulate"}))
    assert engine.wait(60) == 0, engine.log()[-2000:]
    assert m.status()["files"]["DONE"] == 2


def test_simulated_completion_is_refused_and_its_batch_returned(tmp_path, procs):
    """An engine that says it simulated (e.g. the manager was restarted without
    allow_simulated while it worked): 403 naming the key, files back without an attempt."""
    m = _manager(tmp_path, procs, allow_simulated=False)
    code, answer = m.get("/assignwork", engineid="sim-gpu0", batchsize=1, simulated="true")
    assert code == 403 and "manager.allow_simulated" in answer["error"], answer
    assert m.status()["files"]["ASSIGNED"] == 0
    job = assign(m, "sim-gpu0", 1)["jobid"]
    code, answer = m.post("/completed", {"job_id": job, "job_state": "DONE", "simulated": True})
    assert code == 403 and "manager.allow_simulated" in answer["error"], answer
    files = m.status()["files"]
    assert files["DONE"] == 0 and files["PENDING"] == 2 and files["ASSIGNED"] == 0
    code, pending = m.get("/files", state="PENDING")
    assert [f["attempts"] for f in pending["files"]] == [0, 0]
    assert m.get("/assignwork", engineid="x", simulated="perhaps")[0] == 400


def test_default_runner_is_dorado_and_virtual_gpus_do_not_imply_simulate(tmp_path, procs):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    config = _config(tmp_path, "http://127.0.0.1:9", {})  # runner.kind left out
    env = {"PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                   if not os.path.exists(os.path.join(p, "dorado")))}
    b = ManagedProcess([sys.executable, "-m", "bcorch.orchestrator", "--config", config,
                        "--gpus", "virtual:1", "--socket", str(tmp_path / "ctl" / "c.sock")],
                       tmp_path / "bcorch.log", env=env)
    procs.append(b.start())
    assert b.wait(60) == 78, b.log()[-2000:]
    assert "runner.dorado_path: 'dorado' is not on PATH" in b.log()
    assert not list((tmp_path / "out").rglob("*.fastq"))


def test_simulated_done_after_a_restart_without_allow_simulated_is_refused(tmp_path, procs):
    """The manager is restarted without manager.allow_simulated while a simulate engine works:
    its DONE is refused, the batch goes back to PENDING (no attempt), the engine exits 78."""
    m = _manager(tmp_path, procs, allow_simulated=True, files=1)
    config = _config(tmp_path, m.url, {"kind": "simulate", "samples_per_s": 500.0})  # ~4 s
    engine = _engine(tmp_path, procs, config)
    wait_until(lambda: m.status()["files"]["ASSIGNED"] == 1, 30, what="the batch assigned")
    m.signal(15)
    assert m.wait(30) == 0
    strict = ManagerProcess(tmp_path, tmp_path / "in", tmp_path / "out", port=m.port,
                            batch_size=1, input_closed=True, allow_simulated=False)
    procs.append(strict)
    strict.start()
    assert engine.wait(60) == 78, engine.log()[-2000:]
    last = [line for line in engine.log().splitlines() if "engine exits with 78" in line]
    assert last and "manager.allow_simulated" in last[0], engine.log()[-2000:]
    files = strict.status()["files"]
    assert files["DONE"] == 0 and files["PENDING"] == 1
    code, pending = strict.get("/files", state="PENDING")
    assert pending["files"][0]["attempts"] == 0
    assert not list((tmp_path / "out" / "pass").glob("*"))
