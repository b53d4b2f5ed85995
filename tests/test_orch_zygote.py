"""Engines forked from the zygote (issue 14 §2): pinned to their GPU, bcorch's own children,
and a dead zygote or engine is handled as a spawned engine's death was."""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys

import psutil
import pytest

from support import wait_until
from test_orch_fakes import FakeBcorch

from bcorch.orchestrator import zygote
from bcorch.workers.channel import SpawnSpec


def gone(pid: int) -> bool:
    """Exited and waited for (a zombie still counts as there: nobody reaped it)."""
    return not psutil.pid_exists(pid)


def running_engines(b: FakeBcorch, n: int) -> list[dict]:
    return [b.wait_state(i, "RUNNING") for i in range(n)]


def others(b: FakeBcorch, engines: list[dict]) -> list[psutil.Process]:
    """bcorch's children started by multiprocessing that are not engines (the zygote;
    multiprocessing's resource tracker is not one of them)."""
    pids = {s["pid"] for s in engines}
    return [p for p in psutil.Process(b.pid).children()
            if p.pid not in pids and "spawn_main" in " ".join(p.cmdline())]


def test_engines_come_from_the_zygote_pinned_and_as_bcorch_children(bcorch):
    b = bcorch(gpus=3)
    engines = running_engines(b, 3)
    assert len({s["pid"] for s in engines}) == 3
    for s in engines:
        seen = b.engine_env(s["pid"])
        assert seen["CUDA_VISIBLE_DEVICES"] == s["uuid"]
        assert seen["ppid"] == b.pid == psutil.Process(s["pid"]).ppid()
        assert os.getpgid(s["pid"]) == s["pid"]
    [zyg] = others(b, engines)
    assert zyg.cmdline() == psutil.Process(engines[0]["pid"]).cmdline(), \
        "an engine is a fork of the zygote, not a new interpreter"


def test_spawn_start_still_works_and_makes_no_zygote(bcorch):
    b = bcorch(gpus=2, orchestrator={"engine_start": "spawn"})
    engines = running_engines(b, 2)
    for s in engines:
        assert b.engine_env(s["pid"])["CUDA_VISIBLE_DEVICES"] == s["uuid"]
    assert others(b, engines) == []


def test_a_killed_zygote_is_replaced_and_running_engines_carry_on(bcorch):
    b = bcorch(gpus=2)
    engines = running_engines(b, 2)
    [old] = others(b, engines)
    old.kill()
    wait_until(lambda: gone(old.pid), 30, what="the killed zygote reaped")
    beat = b.slot(1)["heartbeat_age_s"]
    wait_until(lambda: b.slot(1)["heartbeat_age_s"] is not None
               and b.slot(1)["heartbeat_age_s"] < 1.0, 30, what=f"gpu1 heartbeats ({beat})")
    assert [b.slot(i)["pid"] for i in range(2)] == [s["pid"] for s in engines]

    os.kill(engines[0]["pid"], signal.SIGKILL)
    new = wait_until(lambda: (s := b.slot(0))["state"] == "RUNNING"
                     and s["pid"] != engines[0]["pid"] and s, 60, what="gpu0 restarted")
    assert new["last_exit"] == "signal SIGKILL"
    assert b.engine_env(new["pid"]) == {"CUDA_VISIBLE_DEVICES": "virtual-0", "ppid": b.pid}
    [fresh] = others(b, [new, b.slot(1)])
    assert fresh.pid != old.pid
    assert "the zygote (pid" in b.log()


def test_a_killed_engines_orphans_are_stopped_and_reaped(bcorch):
    b = bcorch(gpus=1, modes={"0": "child"})
    first = b.wait_state(0, "RUNNING")
    orphan = wait_until(lambda: b.slot(0)["basecaller_pid"], 30, what="fake basecaller")
    os.kill(first["pid"], signal.SIGKILL)
    wait_until(lambda: gone(orphan), 30, what="the orphan stopped and waited for, no zombie")
    b.wait_state(0, "RUNNING")


def test_bcorch_killed_takes_the_zygote_and_its_engines_along(bcorch):
    b = bcorch(gpus=2)
    engines = running_engines(b, 2)
    tree = psutil.Process(b.pid).children(recursive=True)
    [zyg] = others(b, engines)
    assert {s["pid"] for s in engines} | {zyg.pid} <= {p.pid for p in tree}
    os.kill(b.pid, signal.SIGKILL)
    b.proc.wait(10)
    _, alive = psutil.wait_procs(tree, timeout=20)
    assert alive == [], f"left behind: {alive} (engines {[s['pid'] for s in engines]})"


# --- the launcher on its own ---------------------------------------------------------
def report_and_exit(conn, spec) -> None:
    conn.send({"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "ppid": os.getppid(),
               "pid": os.getpid()})
    sys.exit(7)


@pytest.fixture
def launcher():
    made = zygote.Launcher(multiprocessing.get_context("spawn"), report_and_exit)
    try:
        yield made
    finally:
        made.close()


def start(launcher, gpu: int):
    proc, conn = launcher.start(SpawnSpec(gpu_index=gpu, env={"CUDA_VISIBLE_DEVICES": f"GPU-{gpu}"}),
                                f"test-gpu{gpu}")
    try:
        assert conn.poll(60), "no word from the engine"
        said = conn.recv()
        proc.join(30)
    finally:
        if proc.exitcode is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
        conn.close()
    return proc, said


def test_launcher_forks_through_the_zygote_and_reads_the_exit_code(launcher):
    if not launcher.use_zygote:
        pytest.skip("no pidfd or child subreaper on this system")
    proc, said = start(launcher, 2)
    assert isinstance(proc, zygote.ForkedProcess)
    assert said == {"cuda": "GPU-2", "ppid": os.getpid(), "pid": proc.pid}
    assert proc.exitcode == 7 and gone(proc.pid)


def test_launcher_replaces_a_dead_zygote_then_falls_back_to_spawn(launcher):
    if not launcher.use_zygote:
        pytest.skip("no pidfd or child subreaper on this system")
    start(launcher, 0)
    for n in range(1, zygote.MAX_ZYGOTE_FAILURES):
        old = launcher.zygote.pid
        os.kill(old, signal.SIGKILL)
        launcher.zygote.process.join(10)
        proc, said = start(launcher, n)
        assert isinstance(proc, zygote.ForkedProcess) and launcher.zygote.pid != old
        assert said["cuda"] == f"GPU-{n}" and proc.exitcode == 7
    os.kill(launcher.zygote.pid, signal.SIGKILL)
    launcher.zygote.process.join(10)
    proc, said = start(launcher, 9)
    assert isinstance(proc, multiprocessing.process.BaseProcess), "spawned after too many failures"
    assert said["cuda"] == "GPU-9" and proc.exitcode == 7
