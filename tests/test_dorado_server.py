"""The dorado-server runner: one fake dorado_basecall_server per engine (model loaded
once), a fake ont_basecaller_supervisor per batch, real POD5 files, the real manager."""
from __future__ import annotations

import signal
from pathlib import Path

import psutil

from dorado_helpers import FAKES, DoradoSite, argv_records, fake_env
from support import wait_until
from bcorch.protocol import JobState
from bcorch.workers.read_ids import read_ids_under, settings_under
from bcorch.orchestrator.pod5_dataset import write_dataset
from bcorch.workers.runners.dorado_server import DoradoServerRunner, ipc_port

CFG = "dna_r10.4.1_e8.2_400bps_5khz_hac.cfg"
SUP_CFG = "dna_r10.4.1_e8.2_400bps_5khz_sup.cfg"


def _runner(**extra) -> dict:
    return {"kind": "dorado-server", "server_path": str(FAKES / "dorado_basecall_server"),
            "supervisor_path": str(FAKES / "ont_basecaller_supervisor"), "num_clients": 2,
            "server_start_timeout_s": 30.0, **extra}


def _site(tmp: Path, procs, n_files: int, **kw) -> DoradoSite:
    models = tmp / "server-models"
    models.mkdir()
    (models / CFG).write_text("# fake basecall configuration\n")
    env = {"FAKE_DORADO_MODELS": str(models), "FAKE_SERVER_STARTUP_S": "0.5", **kw.pop("env", {})}
    return DoradoSite(tmp, procs, n_files, env=env, **kw)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_one_server_for_all_batches_and_a_bad_file_quarantined(tmp_path, procs):
    site = _site(tmp_path, procs, n_files=6, corrupt=1, max_attempts=1, batch_size=3)
    engine = site.engine(site.config(_runner(), engine={"model": CFG}))
    assert engine.wait(90) == 0, engine.log()[-3000:]
    assert site.files() == {"DONE": 6, "QUARANTINED": 1}
    assert "Failed to open file" in site.quarantined()["corrupt_0.pod5"]
    [server] = argv_records(tmp_path, "dorado_basecall_server")
    port = ipc_port("dorado-gpu0")
    assert server["argv"] == ["--config", CFG, "--device", "cuda:0", "--port", port,
                              "--log_path", str(site.output_dir / "SERVERLOG_dorado-gpu0")]
    clients = argv_records(tmp_path, "ont_basecaller_supervisor")
    assert len(clients) >= 2 and {c["server_pid"] for c in clients} == {server["pid"]}
    argv = clients[0]["argv"]
    assert argv[0] == "--input_path" and Path(argv[1]).parent == site.input_dir
    assert Path(argv[1]).name.startswith("ASSIGNED_")
    assert argv[2] == "--save_path" and Path(argv[3]).name.startswith("TMPOUTPUT_")
    assert argv[4:] == ["--config", CFG, "--port", port, "--num_clients", "2"]
    assert not _alive(server["pid"]), "the server is stopped when the engine exits"
    counts = read_ids_under([site.output_dir / "pass"])
    assert sorted(counts) == site.good_read_ids() and max(counts.values()) == 1


def test_server_dying_between_batches_is_restarted_and_the_batch_completes(tmp_path, procs):
    site = _site(tmp_path, procs, n_files=2, input_closed=False)
    engine = site.engine(site.config(_runner(), engine={"model": CFG,
                                                        "work_until_none_left": False}))
    wait_until(lambda: site.files() == {"DONE": 2}, 60, what="the first batch done")
    [first] = argv_records(tmp_path, "dorado_basecall_server")
    psutil.Process(first["pid"]).kill()
    wait_until(lambda: not _alive(first["pid"]), 30, what="the server gone")
    more = write_dataset(site.input_dir / "later", 2, reads_per_file=6, samples_per_read=2000,
                         seed=7)
    wait_until(lambda: site.files() == {"DONE": 4}, 60, what="the batch after the restart done")
    servers = argv_records(tmp_path, "dorado_basecall_server")
    assert len(servers) == 2
    assert argv_records(tmp_path, "ont_basecaller_supervisor")[-1]["server_pid"] == servers[1]["pid"]
    assert "dorado_basecall_server is dead" in engine.log()
    engine.signal(signal.SIGTERM)
    assert engine.wait(30) == 0, engine.log()[-3000:]
    assert not _alive(servers[1]["pid"])
    expected = site.good_read_ids() + [r for ids in more.values() for r in ids]
    assert sorted(read_ids_under([site.output_dir / "pass"])) == sorted(expected)


def test_server_exit_2_is_a_configuration_error_78(tmp_path, procs):
    site = _site(tmp_path, procs, n_files=2)
    engine = site.engine(site.config(_runner(), engine={"model": "no_such_model.cfg"}))
    assert engine.wait(60) == 78, engine.log()[-3000:]
    log = engine.log()
    assert "dorado_basecall_server exited with 2" in log and "could not be found" in log
    assert "no_such_model.cfg" in log
    assert site.files() == {"PENDING": 2}, "STOPPED: the files were given back, no attempt"
    assert argv_records(tmp_path, "ont_basecaller_supervisor") == []


def test_server_over_tcp_on_base_port_plus_gpu(tmp_path, procs):
    from support import free_port
    port = free_port()
    site = _site(tmp_path, procs, n_files=2)
    engine = site.engine(site.config(_runner(server_use_tcp=True, port=port),
                                     engine={"model": CFG}))
    assert engine.wait(60) == 0, engine.log()[-3000:]
    assert site.files() == {"DONE": 2}
    [server] = argv_records(tmp_path, "dorado_basecall_server")
    assert server["argv"][server["argv"].index("--port") + 1] == str(port)
    assert "--use_tcp" in server["argv"]


def test_a_batch_of_another_model_restarts_the_server_with_it(tmp_path, monkeypatch):
    """Facility mode: a batch whose model is not the loaded one stops the server and starts it
    with that model (a model switch; the wait is the batch's start-up); the same model again
    reuses it. A model the server refuses (exit 2) fails that batch only."""
    models = tmp_path / "server-models"
    models.mkdir()
    for cfg in (CFG, SUP_CFG):
        (models / cfg).write_text("# fake basecall configuration\n")
    env = fake_env(tmp_path, FAKE_DORADO_MODELS=str(models), FAKE_SERVER_STARTUP_S="0.5")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    written = write_dataset(tmp_path / "in", 2, reads_per_file=4, samples_per_read=2000)
    runner = DoradoServerRunner(
        server_path=str(FAKES / "dorado_basecall_server"),
        supervisor_path=str(FAKES / "ont_basecaller_supervisor"), model=CFG,
        output_root=str(tmp_path / "out"), engine_id="switch", num_clients=1,
        start_timeout_s=30.0, stop_grace_s=5.0)
    handles = []

    def batch(model: str, **settings):
        out = tmp_path / f"TMPOUTPUT_{len(handles)}"
        handle = runner.start(tmp_path / "in", out, model, list(written), **settings)
        handles.append(handle)
        return wait_until(handle.poll, 60, what=f"the batch with {model}"), out

    try:
        assert batch(CFG)[0].state is JobState.DONE
        result, out = batch(SUP_CFG, kit="SQK-NBD114-24")
        assert result.state is JobState.DONE
        assert batch(SUP_CFG, emit="bam")[0].state is JobState.DONE
        refused, _ = batch("no_such_model.cfg")
        assert refused.state is JobState.FAILED and "could not be found" in refused.reason
        assert batch(CFG)[0].state is JobState.DONE
    finally:
        runner.close()
    servers = argv_records(tmp_path, "dorado_basecall_server")
    assert [s["argv"][1] for s in servers] == [CFG, SUP_CFG, "no_such_model.cfg", CFG]
    assert runner.model_switches == 3
    assert not any(_alive(s["pid"]) for s in servers)
    clients = argv_records(tmp_path, "ont_basecaller_supervisor")
    assert [c["server_pid"] for c in clients] == [servers[0]["pid"], servers[1]["pid"],
                                                  servers[1]["pid"], servers[3]["pid"]]
    assert clients[1]["argv"][-2:] == ["--barcode_kits", "SQK-NBD114-24"]
    assert "--bam_out" in clients[2]["argv"] and "--bam_out" not in clients[1]["argv"]
    startups = [h.startup_s for h in handles]
    assert startups[0] >= 0.5 and startups[1] >= 0.5 and startups[4] >= 0.5, startups
    assert startups[2] < 0.5, "the loaded model is not loaded again"
    calls = settings_under([out / "pass"])
    assert sorted(calls) == sorted(r for ids in written.values() for r in ids)
    assert all(c == {"model": SUP_CFG, "kit": "SQK-NBD114-24"} for c in calls.values())
