"""The output check's warm-up (issue 14 §3): pod5 is imported while the first basecaller
runs, in a thread of its own at a lower priority, so that it neither holds up the engine's
loop nor takes the CPU from the engines still starting on a host with fewer cores than GPUs;
the check waits for it."""
from __future__ import annotations

import os
import sys
import textwrap
import threading

import pytest

from bcorch.workers import output_check

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="a thread's own nice value is Linux's")


@pytest.fixture
def recording_module(tmp_path, monkeypatch):
    """A module that records, when imported, the importing thread and its nice value; it
    is the warm-up's only module, and every warm-up state is reset around the test."""
    name = "bcorch_test_warm_up_probe"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import os, threading
        seen = {"thread": threading.current_thread().name,
                "main": threading.current_thread() is threading.main_thread(),
                "nice": os.getpriority(os.PRIO_PROCESS, threading.get_native_id())}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(output_check, "WARM_UP_MODULES", (name,))
    monkeypatch.setattr(output_check, "_warm_up", None)
    monkeypatch.setattr(output_check, "_warm_up_nice", None)
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_warm_up_imports_in_a_lower_priority_thread(recording_module):
    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    output_check.OutputChecker.warm_up()
    output_check._warm_up.join(30)
    seen = sys.modules[recording_module].seen
    assert seen["main"] is False and seen["thread"] == "output-check-warm-up"
    assert seen["nice"] == min(19, main_nice + output_check.WARM_UP_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice


def test_warm_up_runs_once_per_process(recording_module):
    output_check.OutputChecker.warm_up()
    first = output_check._warm_up
    output_check.OutputChecker.warm_up()
    assert first is not None and output_check._warm_up is first
    first.join(30)


def test_the_check_waits_for_the_warm_up(recording_module, tmp_path, monkeypatch):
    """A DONE batch's check runs only once the warm-up's import is done (and the warm-up
    is put back to normal priority meanwhile: it is on the critical path now)."""
    from bcorch.protocol import JobState
    from bcorch.workers.runners.base import RunResult

    gate, waiting = threading.Event(), threading.Event()
    real_import = output_check.importlib.import_module
    real_wait = output_check.OutputChecker.warmed_up
    imported_when_checked: list[bool] = []

    def held_import(module):
        gate.wait(30)
        return real_import(module)

    def wait_noticed(timeout=output_check.WARM_UP_WAIT_S):
        waiting.set()
        real_wait(timeout)

    checker = output_check.OutputChecker()
    real_check = checker.check

    def recorded_check(*args):
        imported_when_checked.append(recording_module in sys.modules)
        return real_check(*args)

    monkeypatch.setattr(output_check.importlib, "import_module", held_import)
    monkeypatch.setattr(output_check.OutputChecker, "warmed_up", staticmethod(wait_noticed))
    monkeypatch.setattr(checker, "check", recorded_check)
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    output_check.OutputChecker.warm_up()
    worker = threading.Thread(target=checker.checked, daemon=True,
                              args=(RunResult(JobState.DONE, 0), tmp_path / "in", tmp_path / "out", []))
    try:
        worker.start()
        assert waiting.wait(30), "the check did not wait for the warm-up"
    finally:
        gate.set()
        worker.join(30)
        output_check._warm_up.join(30)
    assert imported_when_checked == [True]
