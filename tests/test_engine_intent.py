"""The engine's one intent (workers/intent.py) and its pipe to the parent (parent_pipe.py).

The engine is built in this process with a real multiprocessing pipe as its parent;
its `_service()` is what the loop calls between waits.
"""
from __future__ import annotations

import logging
import multiprocessing
import signal

import pytest

from bcorch.config import from_mapping
from bcorch.workers.channel import (Cmd, EngineState, HEARTBEAT_KEYS, HEARTBEAT_OPTIONAL_KEYS,
                                    Msg, command)
from bcorch.workers.engine import BCEngine
from bcorch.workers.intent import Cause, Goal, Intent
from bcorch.workers.parent_pipe import ParentPipe

LOG = logging.getLogger("test")


# -- Intent -----------------------------------------------------------------------------------

def test_a_stop_is_final():
    stop = Intent().change(Goal.STOP, Cause.STOP_COMMAND)
    assert stop is not None and stop.stopping and stop.reason == "stop requested by the parent"
    for goal, cause in [(Goal.WORK, Cause.RESUME_COMMAND), (Goal.DRAIN, Cause.SIGNAL),
                        (Goal.STOP, Cause.PARENT_GONE)]:
        assert stop.change(goal, cause) is None


def test_a_second_drain_keeps_the_first_reason_and_resume_cancels_it():
    drain = Intent().change(Goal.DRAIN, Cause.DRAIN_COMMAND)
    assert drain is not None and drain.exit_reason == "drained"
    assert drain.change(Goal.DRAIN, Cause.SIGNAL) is None
    resumed = drain.change(Goal.WORK, Cause.RESUME_COMMAND)
    assert resumed is not None and resumed.working
    assert Intent().change(Goal.WORK, Cause.RESUME_COMMAND) is None


def test_exit_reasons():
    assert Intent().change(Goal.DRAIN, Cause.NOTHING_LEFT).exit_reason == "nothing left to basecall"
    gone = Intent().change(Goal.STOP, Cause.PARENT_GONE, "the parent process is gone: stopping")
    assert gone.exit_reason == "the parent process is gone: stopping"


# -- ParentPipe -------------------------------------------------------------------------------

def test_parent_pipe_reads_commands_and_drops_unknown_messages():
    parent, child = multiprocessing.Pipe()
    pipe = ParentPipe(child, LOG)
    try:
        for msg in (command(Cmd.DRAIN), {"cmd": "dance"}, "not a dict", command(Cmd.STOP)):
            parent.send(msg)
        assert pipe.receive() == [Cmd.DRAIN, Cmd.STOP] and not pipe.gone
        pipe.send(Msg.JOB_START, job_id="j1", batch_size=2)
        assert parent.recv() == {"type": "job_start", "job_id": "j1", "batch_size": 2}
    finally:
        parent.close()
        pipe.close()


def test_parent_pipe_notices_a_closed_pipe_and_then_stays_silent():
    parent, child = multiprocessing.Pipe()
    pipe = ParentPipe(child, LOG)
    parent.close()
    assert pipe.receive() == [] and pipe.gone == "the pipe to the parent is closed"
    assert not pipe.connected and pipe.fileno() is None
    pipe.send(Msg.READY, engine_id="e", gpu=0, pid=1)   # no error: nobody to tell
    pipe.close()


def test_no_parent_is_never_gone():
    pipe = ParentPipe(None, LOG)
    pipe.send(Msg.READY, engine_id="e", gpu=0, pid=1)
    assert pipe.receive() == [] and pipe.gone == "" and pipe.fileno() is None


# -- the engine acting on them ------------------------------------------------------------------

@pytest.fixture
def engine_and_parent(tmp_path):
    parent, child = multiprocessing.Pipe()
    conf = from_mapping({"manager": {"url": "http://127.0.0.1:9"},
                         "engine": {"input_dir": str(tmp_path), "output_dir": str(tmp_path)},
                         "runner": {"kind": "simulate"}})
    engine = BCEngine(None, 0, conn=child, conf=conf)
    yield engine, parent
    engine._cleanup()
    parent.close()
    child.close()


def _beats(parent) -> list[dict]:
    out = []
    while parent.poll(0):
        out.append(parent.recv())
    return [m for m in out if m.get("type") == Msg.HEARTBEAT.value]


def test_drain_shows_as_draining_and_resume_as_working(engine_and_parent):
    engine, parent = engine_and_parent
    engine._set_state(EngineState.REQUESTING)
    engine._set_state(EngineState.WORKING)
    parent.send(command(Cmd.DRAIN))
    engine._service()
    beat = _beats(parent)[-1]
    assert set(beat) == HEARTBEAT_KEYS | HEARTBEAT_OPTIONAL_KEYS and beat["state"] == "DRAINING"
    assert engine.intent.goal is Goal.DRAIN and engine.shutdown
    assert engine.PROCESSING_STATE is EngineState.WORKING   # what it does; the intent says why
    parent.send(command(Cmd.RESUME))
    engine._next_heartbeat = 0.0
    engine._service()
    assert _beats(parent)[-1]["state"] == "WORKING" and engine.intent.working


def test_signals_drain_then_stop(engine_and_parent):
    engine, _parent = engine_and_parent
    engine._on_signal(signal.SIGTERM, None)
    engine._service()
    assert engine.intent.goal is Goal.DRAIN and engine.intent.cause is Cause.SIGNAL
    engine._on_signal(signal.SIGTERM, None)
    engine._service()
    assert engine.intent.stopping and engine.intent.reason == "signal SIGTERM received twice"
    assert engine._cancel.is_set()   # a request in flight stops retrying


def test_parent_gone_is_a_stop_with_its_reason(engine_and_parent):
    engine, parent = engine_and_parent
    parent.close()
    engine._service()
    assert engine.intent.stopping and engine.intent.cause is Cause.PARENT_GONE
    assert engine.intent.reason == "the pipe to the parent is closed: stopping"
    assert engine._grace() <= 2.0


def test_engine_without_a_parent_keeps_working(tmp_path):
    conf = from_mapping({"manager": {"url": "http://127.0.0.1:9"},
                         "engine": {"input_dir": str(tmp_path), "output_dir": str(tmp_path)},
                         "runner": {"kind": "simulate"}})
    engine = BCEngine(None, 0, conf=conf)
    try:
        engine._service()
        assert engine.intent.working and engine.parent.gone == ""
    finally:
        engine._cleanup()
