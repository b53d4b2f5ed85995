"""The slot state machine and the restart policy (pure logic, no processes)."""
from __future__ import annotations

import logging

import pytest

from bcorch.orchestrator.gpus import virtual_gpus
from bcorch.orchestrator.slot import (ALLOWED, IllegalTransition, RestartPolicy, Slot, SlotState,
                               transition)


def make_slot() -> Slot:
    return Slot(virtual_gpus(2)[1], "host-gpu1")


def test_transition_logs_with_gpu_and_engine_id(caplog):
    slot = make_slot()
    transition(slot, SlotState.STARTING, "first start", 10.0)
    transition(slot, SlotState.RUNNING, "engine ready", 11.0)
    assert (slot.state, slot.reason, slot.since) == (SlotState.RUNNING, "engine ready", 11.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "orchestrator.slot"]
    assert lines == ["[gpu1 host-gpu1] STOPPED -> STARTING (first start)",
                     "[gpu1 host-gpu1] STARTING -> RUNNING (engine ready)"]


def test_failed_is_logged_as_a_warning(caplog):
    slot = make_slot()
    transition(slot, SlotState.STARTING, "x", 0)
    transition(slot, SlotState.FAILED, "exit 78", 1)
    assert caplog.records[-1].levelno == logging.WARNING


@pytest.mark.parametrize("old, new", [
    (SlotState.FAILED, SlotState.RUNNING), (SlotState.STOPPED, SlotState.RUNNING),
    (SlotState.BACKOFF, SlotState.RUNNING), (SlotState.FAILED, SlotState.BACKOFF),
])
def test_illegal_transitions_raise(old, new):
    slot = make_slot()
    slot.state = old
    with pytest.raises(IllegalTransition):
        transition(slot, new, "no", 0)
    assert slot.state is old


def test_every_state_has_a_way_out():
    assert set(ALLOWED) == set(SlotState)
    assert all(ALLOWED[s] for s in SlotState)
    # only STARTING leads to a process: FAILED and STOPPED come back through it
    assert ALLOWED[SlotState.FAILED] == {SlotState.STARTING}


def test_backoff_doubles_from_half_a_second_and_is_capped():
    policy = RestartPolicy(backoff_max_s=3.0, max_restarts=100, window_s=600)
    slot = make_slot()
    delays = [slot.record_crash(float(t), policy) for t in range(6)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_too_many_crashes_in_the_window_fail_the_slot():
    policy = RestartPolicy(max_restarts=3, window_s=100)
    slot = make_slot()
    assert [slot.record_crash(t, policy) is not None for t in (0, 1, 2)] == [True] * 3
    assert slot.record_crash(3, policy) is None


def test_old_crashes_leave_the_window():
    policy = RestartPolicy(max_restarts=2, window_s=10, backoff_max_s=300)
    slot = make_slot()
    assert slot.record_crash(0, policy) is not None
    assert slot.record_crash(5, policy) is not None
    assert slot.record_crash(20, policy) is not None, "crashes older than the window do not count"
    assert len(slot.crash_times) == 1


def test_long_healthy_run_resets_the_backoff():
    policy = RestartPolicy(healthy_reset_s=60, max_restarts=100, window_s=10_000)
    slot = make_slot()
    for t in range(4):
        slot.record_crash(t, policy)
    assert slot.consecutive_crashes == 4
    slot.ready_at = 100.0
    assert slot.record_crash(130.0, policy) == 8.0, "30 s healthy is not enough"
    slot.ready_at = 200.0
    assert slot.record_crash(261.0, policy) == 0.5


def test_resume_forgets_failures_and_takes_a_new_ecc_baseline():
    from bcorch.orchestrator.gpus import GpuHealth
    slot = make_slot()
    policy = RestartPolicy(max_restarts=0)
    assert slot.record_crash(0, policy) is None
    slot.gpu_failure, slot.failed_by_config = "ECC", True
    slot.health = GpuHealth(ecc_uncorrected=7, xid_events=2)
    slot.clear_failures()
    assert (len(slot.crash_times), slot.consecutive_crashes, slot.gpu_failure,
            slot.failed_by_config, slot.ecc_baseline, slot.xid_baseline) == (0, 0, "", False, 7, 2)


def test_snapshot_carries_the_heartbeat():
    slot = make_slot()
    slot.heartbeat = {"job_id": "j7", "batch_size": 10, "batch_elapsed_s": 12.5, "files_done": 40}
    slot.last_message_at = 99.0
    snap = slot.snapshot(100.0)
    assert (snap["job_id"], snap["batch_size"], snap["files_done"], snap["heartbeat_age_s"]) == (
        "j7", 10, 40, 1.0)
    assert snap["uuid"] == "virtual-1" and snap["state"] == "STOPPED"
