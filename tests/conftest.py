from __future__ import annotations

import logging

import psutil
import pytest

from support import ManagedProcess, kill_tree


@pytest.fixture
def procs():
    """Register real processes here; every one is killed with its tree at teardown."""
    started: list[ManagedProcess] = []
    yield started
    for p in reversed(started):
        p.close()


@pytest.fixture
def bcorch(tmp_path, procs):
    """A factory of real bcorch processes over fake engines (test_orch_fakes.FakeBcorch),
    started and registered for teardown. A test module may define its own `bcorch`."""
    from test_orch_fakes import FakeBcorch

    def make(**kw) -> FakeBcorch:
        b = FakeBcorch(tmp_path, **kw)
        procs.append(b)
        return b.start()
    return make


@pytest.fixture(scope="session", autouse=True)
def _resource_tracker():
    """multiprocessing's spawn context starts one tracker process for the whole pytest run;
    start it up front so the per-test leftover check does not count it."""
    from multiprocessing import resource_tracker
    resource_tracker.ensure_running()


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory, monkeypatch):
    """bcmanager's default database lives in the user's state directory: one per test."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Fail a test that leaves a child process of pytest running (and kill it)."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    me = psutil.Process()
    leftovers = [p for p in me.children(recursive=True) if p.pid not in before]
    if leftovers:
        _, alive = psutil.wait_procs(leftovers, timeout=5)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        names = []
        for p in alive:
            try:
                names.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            except psutil.Error:
                continue
            kill_tree(p.pid)
        if names:
            pytest.fail("test left processes running: " + "; ".join(names))


@pytest.fixture(autouse=True)
def _quiet_logging(caplog):
    caplog.set_level(logging.DEBUG)
