"""bcorch as a real process with fake engine targets: restarts, hangs, failures, signals,
the control pipe. The engines are spawned processes speaking the real channel protocol."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from bcorch.orchestrator.slot import FIRST_RESTART_DELAY_S
from support import wait_until
from test_orch_fakes import FakeBcorch


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_engines_get_their_gpu_and_engine_id(bcorch):
    b = bcorch(gpus=2)
    slots = [b.wait_state(i, "RUNNING") for i in range(2)]
    assert [s["uuid"] for s in slots] == ["virtual-0", "virtual-1"]
    assert all(s["engine_id"].endswith(f"-gpu{i}") for i, s in enumerate(slots))
    for s in slots:
        child = psutil.Process(s["pid"])
        assert child.ppid() == b.pid
        assert b.engine_env(s["pid"])["CUDA_VISIBLE_DEVICES"] == s["uuid"]
        assert os.getpgid(s["pid"]) == s["pid"], "each engine leads its own process group"


def test_crash_loop_fails_one_gpu_only_and_resume_brings_it_back(bcorch):
    b = bcorch(gpus=2, modes={"1": "crash"}, orchestrator={"max_restarts": 2})
    good = b.wait_state(0, "RUNNING")
    failed = b.wait_state(1, "FAILED", timeout=30)
    assert failed["restarts"] == 2 and "3 crashes within 600 s" in failed["reason"]
    assert failed["last_exit"] == "exit 3"
    assert b.slot(0)["pid"] == good["pid"] and b.slot(0)["state"] == "RUNNING"
    time.sleep(1.5)  # FAILED means no more restarts: look that nothing moves
    assert b.slot(1)["restarts"] == 2 and b.slot(1)["state"] == "FAILED"
    b.set_modes({})
    result = subprocess.run([sys.executable, "-m", "bcorch.orchestrator", "resume", "--gpu", "1",
                             "--socket", str(b.socket)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "gpu1: STARTING" in result.stdout
    assert b.wait_state(1, "RUNNING")["pid"] is not None


def test_exit_78_fails_at_once_without_a_restart(bcorch):
    b = bcorch(gpus=2, modes={"0": "exit78"})
    failed = b.wait_state(0, "FAILED")
    assert failed["restarts"] == 0 and "configuration error (exit 78: fake exit78)" in failed["reason"]
    b.wait_state(1, "RUNNING")
    time.sleep(1.0)
    assert b.slot(0)["restarts"] == 0


def test_every_engine_exiting_78_ends_bcorch_with_78(bcorch):
    b = bcorch(gpus=2, modes={"default": "exit78"})
    assert b.wait(30) == 78


def test_every_engine_finished_ends_bcorch_with_0(bcorch):
    b = bcorch(gpus=2, modes={"default": "done"})
    assert b.wait(30) == 0
    assert "every engine finished with nothing left" in b.log()


def test_killed_engine_is_restarted_fast_and_its_orphans_are_stopped(bcorch):
    b = bcorch(gpus=2, modes={"0": "child"})
    first = b.wait_state(0, "RUNNING")
    orphan = wait_until(lambda: b.slot(0)["basecaller_pid"], 30, what="fake basecaller")
    os.kill(first["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    wait_until(lambda: (s := b.slot(0))["pid"] not in (None, first["pid"]) and s, 30,
               interval=0.02, what="a new engine")
    # The supervisor's own decision is the first-restart delay; the wall clock, seen from a
    # test on a loaded machine, only bounds it loosely (a backoff of minutes would fail).
    assert f"restart in {FIRST_RESTART_DELAY_S:.1f} s" in b.log()
    assert time.monotonic() - t0 < 20
    wait_until(lambda: not alive(orphan), 30, what="the dead engine's basecaller to be stopped")
    slot = b.wait_state(0, "RUNNING")
    assert slot["restarts"] == 1 and slot["last_exit"] == "signal SIGKILL"


def test_a_stopped_engine_is_replaced_within_hang_timeout_plus_2s(bcorch):
    b = bcorch(gpus=2)
    first = b.wait_state(1, "RUNNING")
    os.kill(first["pid"], signal.SIGSTOP)
    t0 = time.monotonic()
    replaced = wait_until(lambda: (s := b.slot(1))["state"] == "RUNNING"
                          and s["pid"] != first["pid"] and s, 20, interval=0.05,
                          what="a replacement engine")
    assert time.monotonic() - t0 < 3.0 + 10.0   # hang_timeout_s 3, not the 60 s default
    assert not alive(first["pid"])
    assert replaced["restarts"] == 1
    assert replaced["last_exit"] in ("signal SIGTERM", "signal SIGKILL")
    log = b.log()
    assert "-> KILLING (no message for" in log
    assert "-> BACKOFF (crashed (hung (no heartbeat for hang_timeout_s), signal SIG" in log


def test_sigterm_drains_and_leaves_no_process(bcorch):
    b = bcorch(gpus=3, modes={"2": "child"})
    for i in range(3):
        b.wait_state(i, "RUNNING")
    wait_until(lambda: b.slot(2)["basecaller_pid"], 30, what="fake basecaller")
    tree = b.tree()
    assert len(tree) >= 4
    b.signal(signal.SIGTERM)
    assert b.wait(30) == 0
    _, still = psutil.wait_procs(tree, timeout=5)
    assert [p for p in still if p.status() != psutil.STATUS_ZOMBIE] == []
    log = b.log()
    assert log.count("-> DRAINING (bcorch drains: SIGTERM received)") == 3
    assert not b.socket.exists()


def test_second_signal_stops_batches_now(bcorch, tmp_path):
    b = FakeBcorch(tmp_path, gpus=2)
    b.env["FAKE_DRAIN_S"] = "120"          # a drain that would take two minutes
    try:
        b.start()
        for i in range(2):
            b.wait_state(i, "RUNNING")
        b.signal(signal.SIGTERM)
        b.wait_state(0, "DRAINING")
        t0 = time.monotonic()
        b.signal(signal.SIGINT)
        assert b.wait(60) == 0
        assert time.monotonic() - t0 < 40   # a backstop well below the 120 s drain
        assert "second signal (SIGINT)" in b.log()
    finally:
        b.close()


def test_drain_timeout_stops_the_batch(tmp_path):
    b = FakeBcorch(tmp_path, gpus=1, orchestrator={"drain_timeout_s": 1.0})
    b.env["FAKE_DRAIN_S"] = "120"
    try:
        b.start()
        b.wait_state(0, "RUNNING")
        t0 = time.monotonic()
        b.signal(signal.SIGTERM)
        assert b.wait(60) == 0
        assert time.monotonic() - t0 < 30        # the 1 s timeout, not the 120 s drain
        assert "drain_timeout_s (1) passed; stopping the batch" in b.log()
    finally:
        b.close()


def test_control_pipe_commands(bcorch):
    b = bcorch(gpus=2)
    first = [b.wait_state(i, "RUNNING") for i in range(2)]
    assert b.ask(cmd="drain", gpu=9) == {"ok": False, "error": "no GPU 9 here (GPUs: 0, 1)"}
    # drain one, then resume it while it is still draining (same process goes on)
    reply = b.ask(cmd="drain", gpu=0)
    assert reply["ok"] and reply["slots"][0]["state"] == "DRAINING"
    assert b.ask(cmd="resume", gpu=0)["slots"][0]["state"] == "RUNNING"
    time.sleep(0.6)  # longer than the fake drain: a cancelled drain must not end the engine
    assert b.slot(0)["pid"] == first[0]["pid"] and b.slot(0)["state"] == "RUNNING"
    # restart one: a new engine, the other untouched
    assert b.ask(cmd="restart", gpu=1)["ok"]
    wait_until(lambda: (s := b.slot(1))["state"] == "RUNNING" and s["pid"] != first[1]["pid"], 20,
               what="restarted engine")
    assert b.slot(0)["pid"] == first[0]["pid"]
    assert b.slot(1)["restarts"] == 0, "a restart an operator asked for is not a crash restart"
    # drain all: engines stop, bcorch stays for a resume
    assert b.ask(cmd="drain")["ok"]
    for i in range(2):
        b.wait_state(i, "STOPPED")
    assert b.proc.poll() is None
    assert b.ask(cmd="resume")["ok"]
    for i in range(2):
        b.wait_state(i, "RUNNING")
    # stop: the whole host drains and bcorch exits 0
    assert b.ask(cmd="stop") == {"ok": True, "state": "DRAINING"}
    assert b.wait(30) == 0


def test_status_table_and_json(bcorch):
    b = bcorch(gpus=2, modes={"1": "exit78"})
    b.wait_state(0, "RUNNING")
    b.wait_state(1, "FAILED")
    table = subprocess.run([sys.executable, "-m", "bcorch.orchestrator", "status", "--socket",
                            str(b.socket)], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert "RUNNING" in lines[0] and "manager" in lines[0]
    assert lines[1].split()[:4] == ["GPU", "STATE", "JOB", "FILES"]
    assert lines[2].startswith("0") and "RUNNING(WORKING)" in lines[2] and "virtual" in lines[2]
    assert lines[3].startswith("1") and "FAILED" in lines[3] and "exit 78" in lines[3]
    assert any("gpu1 FAILED: configuration error" in line for line in lines)
    raw = subprocess.run([sys.executable, "-m", "bcorch.orchestrator", "status", "--json", "--socket",
                          str(b.socket)], capture_output=True, text=True, timeout=60)
    import json
    data = json.loads(raw.stdout)
    assert data["ok"] and [s["state"] for s in data["slots"]] == ["RUNNING", "FAILED"]


def test_sighup_restarts_engines_one_by_one_with_the_new_config(bcorch):
    b = bcorch(gpus=2)
    first = [b.wait_state(i, "RUNNING")["pid"] for i in range(2)]
    b.config.write_text(b.config.read_text().replace("hang_timeout_s = 3.0", "hang_timeout_s = 4.0"))
    b.signal(signal.SIGHUP)
    wait_until(lambda: all(s["state"] == "RUNNING" and s["pid"] not in first for s in b.slots()),
               30, what="both engines restarted")
    log = b.log()
    assert "SIGHUP: configuration" in log and "restarting 2 engine(s) one by one" in log
    # one by one: gpu1 is drained only after gpu0's new engine is RUNNING
    gpu0_ready = log.index("STARTING -> RUNNING", log.index("graceful restart (previous engine"))
    gpu1_drain = log.index("[gpu1", log.index("SIGHUP: restarting"))
    assert gpu0_ready < log.index("RUNNING -> DRAINING (graceful restart (SIGHUP))", gpu1_drain)


def test_sighup_picks_up_a_new_manager_url(bcorch):
    """Regression: cli.py passed manager.url as if it were --manager-url, so a reload never
    changed the URL, and restarted engines went on calling the old manager."""
    b = bcorch(gpus=1, manager={"url": "http://127.0.0.1:9"})
    pid = b.wait_state(0, "RUNNING")["pid"]
    first = wait_until(lambda: b.slot(0)["last_error"], 30, what="a heartbeat")
    assert first == "manager_url=http://127.0.0.1:9"
    b.write_config(orchestrator=b.settings, manager={"url": "http://127.0.0.1:10"})
    b.signal(signal.SIGHUP)
    slot = wait_until(lambda: (s := b.slot(0))["pid"] not in (None, pid)
                      and s["state"] == "RUNNING" and s["last_error"] and s, 30,
                      what="the engine restarted after SIGHUP")
    assert slot["last_error"] == "manager_url=http://127.0.0.1:10"
    assert b.ask(cmd="status")["manager"]["url"] == "http://127.0.0.1:10"


def test_manager_url_flag_wins_over_a_reloaded_config(bcorch):
    b = bcorch(gpus=1, manager={"url": "http://127.0.0.1:9"},
               extra=["--manager-url", "http://127.0.0.1:11"])
    pid = b.wait_state(0, "RUNNING")["pid"]
    b.write_config(orchestrator=b.settings, manager={"url": "http://127.0.0.1:10"})
    b.signal(signal.SIGHUP)
    slot = wait_until(lambda: (s := b.slot(0))["pid"] not in (None, pid)
                      and s["state"] == "RUNNING" and s["last_error"] and s, 30,
                      what="the engine restarted after SIGHUP")
    assert slot["last_error"] == "manager_url=http://127.0.0.1:11"


def test_sighup_with_a_broken_config_keeps_engines_running(bcorch):
    b = bcorch(gpus=1)
    pid = b.wait_state(0, "RUNNING")["pid"]
    b.config.write_text("[orchestrator]\nhang_timeout_s = 'soon'\n")
    b.signal(signal.SIGHUP)
    wait_until(lambda: "configuration not reloaded" in b.log(), 30, what="reload refused")
    assert "orchestrator.hang_timeout_s: expected a number" in b.log()
    assert b.slot(0)["pid"] == pid and b.slot(0)["state"] == "RUNNING"


def test_manager_failure_with_drain_policy_exits_75(bcorch):
    from support import free_port
    url = f"http://127.0.0.1:{free_port()}"      # nobody listens
    b = bcorch(gpus=2, modes={"0": "exit75"}, orchestrator={"on_manager_failure": "drain"},
               extra=["--manager-url", url])
    assert b.wait(30) == 75
    assert "on_manager_failure = drain" in b.log()


def test_manager_failure_with_wait_policy_does_not_restart(bcorch):
    from support import free_port
    url = f"http://127.0.0.1:{free_port()}"
    b = bcorch(gpus=2, modes={"0": "exit75"}, extra=["--manager-url", url])
    wait_until(lambda: not b.ask(cmd="status")["manager"]["reachable"], 30, what="manager down")
    slot = b.slot(0)
    assert slot["state"] == "BACKOFF" and slot["waiting_for_manager"]
    time.sleep(1.5)
    assert b.slot(0)["restarts"] == 0, "no restart while the manager is down"
    assert b.slot(1)["state"] == "RUNNING"


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "virtual:0"], "--gpus: virtual:N needs N"),
    (["--gpus", "all"], "no NVIDIA driver"),
    (["--manager-url", "ftp://x"], "--manager-url: manager.url needs http:// or https://"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--config", "/nonexistent.toml"], "--config: no such file"),
])
def test_bad_flags_exit_78_with_one_line(argv, message, tmp_path):
    if "all" in argv:
        import pynvml
        try:
            pynvml.nvmlInit()
            pynvml.nvmlShutdown()
            pytest.skip("this machine has an NVIDIA driver")
        except pynvml.NVMLError:
            pass
    result = subprocess.run([sys.executable, "-m", "bcorch.orchestrator", "--socket",
                             str(tmp_path / "c" / "s.sock"), *argv],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 78, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_bad_config_value_exits_78(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[orchestrator]\non_manager_failure = 'panic'\n")
    result = subprocess.run([sys.executable, "-m", "bcorch.orchestrator", "--config", str(cfg),
                             "--gpus", "virtual:1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 78
    assert result.stderr.startswith("bcorch: orchestrator.on_manager_failure: expected one of")


def test_a_second_bcorch_on_the_same_socket_is_refused(bcorch, tmp_path):
    b = bcorch(gpus=1)
    b.wait_state(0, "RUNNING")
    result = subprocess.run([sys.executable, "-m", "bcorch.orchestrator", "--gpus", "virtual:1",
                             "--socket", str(b.socket)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 78 and "another bcorch is serving" in result.stderr
