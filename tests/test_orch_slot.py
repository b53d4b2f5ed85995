"""The slot state machine and its policies, driven by a plain clock: no processes.

Each test plays events into a Slot (started, ready, heartbeat, exit, tick at a time) and
checks the state it reaches and the Decision it hands the loop. The last tests drive a
whole Supervisor the same way (`step(now)`, `handle(event, now)`), with spawning replaced.
"""
from __future__ import annotations

import logging
import signal

import pytest

from bcorch.config import from_mapping
from bcorch.orchestrator.gpu_policy import HealthWatch
from bcorch.orchestrator.gpus import GpuHealth, virtual_gpus
from bcorch.orchestrator.slot import (ALLOWED, AfterExit, Decision, Do, EngineProcess, Failure,
                                      IllegalTransition, RestartPolicy, Slot, SlotState, World,
                                      transition)
from bcorch.orchestrator.supervisor import Supervisor

from support import FakeClock

S = SlotState
UP = World()
DOWN = World(manager_down=True, manager_known_up=False)


def make_slot(**policy) -> Slot:
    return Slot(virtual_gpus(2)[1], "host-gpu1", RestartPolicy(**policy))


def run(slot: Slot, now: float, *, ready: bool = True, pid: int = 100) -> Slot:
    """Start an engine in the slot at `now` (and let it say READY)."""
    slot.started(EngineProcess(pid=pid, started_at=now), "start", counted=False, now=now)
    if ready:
        slot.on_message(now)
        slot.on_ready(now)
    return slot


def test_transition_logs_with_gpu_and_engine_id(caplog):
    slot = make_slot()
    transition(slot, S.STARTING, "first start", 10.0)
    transition(slot, S.RUNNING, "engine ready", 11.0)
    assert (slot.state, slot.reason, slot.since) == (S.RUNNING, "engine ready", 11.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "orchestrator.slot"]
    assert lines == ["[gpu1 host-gpu1] STOPPED -> STARTING (first start)",
                     "[gpu1 host-gpu1] STARTING -> RUNNING (engine ready)"]


def test_failed_is_logged_as_a_warning(caplog):
    slot = make_slot()
    transition(slot, S.STARTING, "x", 0)
    transition(slot, S.FAILED, "exit 78", 1)
    assert caplog.records[-1].levelno == logging.WARNING


@pytest.mark.parametrize("old, new", [
    (S.FAILED, S.RUNNING), (S.STOPPED, S.RUNNING), (S.BACKOFF, S.RUNNING),
    (S.FAILED, S.BACKOFF), (S.KILLING, S.RUNNING), (S.STOPPING, S.DRAINING),
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
    assert ALLOWED[S.FAILED] == {S.STARTING}
    assert S.RUNNING not in ALLOWED[S.STOPPING] | ALLOWED[S.KILLING]


# --- backoff and crash loops ---------------------------------------------------------------
def test_backoff_doubles_from_half_a_second_and_is_capped():
    slot = make_slot(backoff_max_s=3.0, max_restarts=100, window_s=600)
    delays = [slot.record_crash(float(t)) for t in range(6)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_too_many_crashes_in_the_window_fail_the_slot():
    slot = make_slot(max_restarts=3, window_s=100)
    assert [slot.record_crash(t) is not None for t in (0, 1, 2)] == [True] * 3
    assert slot.record_crash(3) is None


def test_old_crashes_leave_the_window():
    slot = make_slot(max_restarts=2, window_s=10, backoff_max_s=300)
    assert slot.record_crash(0) is not None
    assert slot.record_crash(5) is not None
    assert slot.record_crash(20) is not None, "crashes older than the window do not count"
    assert len(slot.crash_times) == 1


def test_long_healthy_run_resets_the_backoff():
    slot = make_slot(healthy_reset_s=60, max_restarts=100, window_s=10_000)
    for t in range(4):
        slot.record_crash(t)
    assert slot.consecutive_crashes == 4
    assert slot.record_crash(130.0, ready_at=100.0) == 8.0, "30 s healthy is not enough"
    assert slot.record_crash(261.0, ready_at=200.0) == 0.5


def test_a_crash_waits_its_backoff_then_restarts_counted():
    slot = run(make_slot(), 0.0)
    assert slot.on_exit(3, UP, 1.0) == Decision()
    assert slot.state is S.BACKOFF and "restart in 0.5 s" in slot.reason
    assert slot.next_deadline() == 1.5
    assert slot.tick(UP, 1.4).do is Do.NOTHING
    decision = slot.tick(UP, 1.5)
    assert decision.do is Do.SPAWN and decision.counted and not decision.after_outage
    run(slot, 1.5)
    assert slot.on_exit(3, UP, 2.0) == Decision() and slot.deadline == 3.0, "doubled"


def test_the_healthy_run_of_the_crashed_engine_resets_the_backoff():
    """The engine's ready time is read before the exit forgets it (it was lost before)."""
    slot = make_slot(healthy_reset_s=60)
    for t in (0.0, 1.0, 2.0):
        run(slot, t)
        slot.on_exit(3, UP, t + 0.1)
    run(slot, 10.0)
    slot.on_exit(3, UP, 100.0)
    assert slot.deadline == 100.5


def test_a_crash_loop_fails_the_slot_until_an_operator_resumes_it():
    slot = make_slot(max_restarts=2, window_s=600)
    for t in (0.0, 10.0, 20.0):
        run(slot, t)
        slot.on_exit(3, UP, t + 1)
    assert slot.state is S.FAILED and slot.failure is Failure.CRASHES
    assert "3 crashes within 600 s (last: exit 3); run `bcorch resume --gpu 1`" in slot.reason
    assert slot.tick(UP, 10_000.0).do is Do.NOTHING and slot.next_deadline() is None
    decision = slot.operator_resume(30.0)
    assert decision.do is Do.SPAWN and not decision.counted
    assert not slot.crash_times and slot.failure is None


def test_exit_78_fails_at_once_and_exit_0_stops():
    slot = run(make_slot(), 0.0)
    slot.on_exit(78, UP, 1.0)
    assert slot.state is S.FAILED and slot.failure is Failure.CONFIG and slot.restarts == 0
    other = run(make_slot(), 0.0)
    other.on_exit(0, UP, 1.0)
    assert other.state is S.STOPPED and other.reason == "engine finished: nothing left (exit 0)"


# --- hangs -------------------------------------------------------------------------------
def test_a_silent_engine_is_killed_then_restarted_as_a_crash():
    slot = run(make_slot(hang_timeout_s=60, kill_grace_s=1.0), 0.0)
    slot.on_message(30.0)
    assert slot.next_deadline() == 90.0
    assert slot.tick(UP, 90.0).do is Do.NOTHING
    decision = slot.tick(UP, 90.5)
    assert decision.do is Do.TERM_TREE and "no message for 60.5 s" in decision.reason
    assert slot.state is S.KILLING and slot.next_deadline() == 91.5
    assert slot.tick(UP, 91.5).do is Do.KILL_TREE
    assert slot.on_exit(-signal.SIGKILL, UP, 92.0) == Decision()
    assert slot.state is S.BACKOFF and "hung (no heartbeat for hang_timeout_s), signal SIGKILL" \
        in slot.reason


def test_a_hang_during_a_drain_by_an_operator_keeps_the_slot_parked():
    slot = run(make_slot(hang_timeout_s=5), 0.0)
    assert slot.operator_drain(1.0).do is Do.SEND_DRAIN
    assert slot.tick(UP, 7.0).do is Do.TERM_TREE
    slot.on_exit(-signal.SIGTERM, UP, 7.5)
    assert slot.state is S.STOPPED and slot.parked


# --- drains ------------------------------------------------------------------------------
def test_a_drain_past_its_timeout_becomes_a_stop_then_a_kill():
    slot = run(make_slot(drain_timeout_s=300, stop_grace_s=10, hang_timeout_s=1e9), 0.0)
    assert slot.host_drains("bcorch drains: SIGTERM received", 1.0).do is Do.SEND_DRAIN
    assert slot.state is S.DRAINING and slot.next_deadline() == 301.0
    decision = slot.tick(UP, 301.0)
    assert decision.do is Do.SEND_STOP and slot.state is S.STOPPING
    assert "drain_timeout_s (300) passed; stopping the batch" in slot.reason
    assert slot.tick(UP, 311.0).do is Do.TERM_TREE and slot.state is S.KILLING
    slot.on_exit(0, World(host_state="DRAINING"), 311.2)
    assert slot.state is S.STOPPED and slot.reason == "engine exit 0; bcorch draining"


def test_resume_cancels_a_drain_but_not_a_stop():
    slot = run(make_slot(), 0.0)
    slot.operator_drain(1.0)
    assert slot.operator_resume(2.0).do is Do.SEND_RESUME
    assert slot.state is S.RUNNING and not slot.parked and slot.deadline is None
    slot.stop("bcorch stops", 3.0)
    assert slot.operator_resume(4.0).do is Do.NOTHING and slot.after is AfterExit.RESTART


def test_an_operator_restart_is_not_counted_as_a_crash_restart():
    slot = run(make_slot(), 0.0)
    assert slot.operator_restart(1.0).do is Do.SEND_DRAIN
    decision = slot.on_exit(0, UP, 2.0)
    assert decision.do is Do.SPAWN and not decision.counted
    slot.started(EngineProcess(pid=101, started_at=2.0), decision.reason, decision.counted, 2.0)
    assert slot.restarts == 0 and slot.state is S.STARTING


# --- the manager -------------------------------------------------------------------------
def test_exit_75_waits_for_the_manager_and_restarts_when_it_answers():
    slot = run(make_slot(), 0.0)
    decision = slot.on_exit(75, UP, 1.0)
    assert decision.do is Do.SUSPECT_MANAGER
    assert slot.state is S.BACKOFF and slot.waiting_for_manager
    for now in (1.5, 10.0, 500.0):
        assert slot.tick(DOWN, now).do is Do.NOTHING
    decision = slot.tick(UP, 501.0)
    assert decision == Decision(Do.SPAWN, "the manager answers again", after_outage=True,
                                counted=True)


def test_a_crash_while_the_manager_is_down_waits_for_it():
    slot = run(make_slot(), 0.0)
    slot.on_exit(3, DOWN, 1.0)
    assert slot.waiting_for_manager and "waiting for the manager" in slot.reason
    assert slot.tick(DOWN, 100.0).do is Do.NOTHING
    assert slot.tick(UP, 101.0).do is Do.SPAWN


# --- GPU health --------------------------------------------------------------------------
def test_gpu_health_rules():
    watch = HealthWatch()
    assert watch.update(GpuHealth(ecc_uncorrected=1, xid_events=2, last_xid=79)) == ""
    assert watch.update(GpuHealth(ecc_uncorrected=1, xid_events=3, last_xid=13)) == "", \
        "an application XID is shown, not acted on"
    assert watch.update(GpuHealth(ecc_uncorrected=1, xid_events=4, last_xid=79)) == \
        "critical XID 79 (the GPU needs a reset)"
    assert "rose from 1 to 2" in watch.update(GpuHealth(ecc_uncorrected=2, xid_events=4))
    assert watch.update(GpuHealth(lost=True)) == "NVML reports the GPU lost"


def test_an_unhealthy_gpu_is_drained_then_failed_and_resume_takes_a_new_baseline():
    slot = run(make_slot(), 0.0)
    slot.watch.update(GpuHealth(ecc_uncorrected=0, xid_events=0))
    problem = slot.watch.update(GpuHealth(ecc_uncorrected=0, xid_events=1, last_xid=48))
    assert slot.gpu_unhealthy(problem, 1.0).do is Do.SEND_DRAIN
    slot.on_exit(0, UP, 2.0)
    assert slot.state is S.FAILED and slot.failure is Failure.GPU
    assert slot.reason == "GPU unhealthy: critical XID 48 (the GPU needs a reset)"
    assert slot.operator_resume(3.0).do is Do.SPAWN
    assert slot.gpu_failure == "" and slot.watch.xid_baseline == 1


def test_snapshot_carries_the_heartbeat():
    slot = run(make_slot(), 90.0)
    slot.on_heartbeat({"type": "heartbeat", "engine_id": "host-gpu1", "state": "WORKING",
                       "job_id": "j7", "batch_size": 10, "batch_elapsed_s": 12.5,
                       "basecaller_pid": None, "batches_done": 3, "files_done": 40,
                       "files_failed": 0, "last_error": ""})
    slot.on_message(99.0)
    snap = slot.snapshot(100.0)
    assert (snap["job_id"], snap["batch_size"], snap["files_done"], snap["heartbeat_age_s"]) == (
        "j7", 10, 40, 1.0)
    assert snap["uuid"] == "virtual-1" and snap["state"] == "RUNNING" and snap["pid"] == 100


def facility_beat(run_id: str | None, model: str | None,
                  job_id: str | None = "j000007-aa11bb22cc33dd44ee55") -> dict:
    beat = {"type": "heartbeat", "engine_id": "host-gpu1", "state": "WORKING", "job_id": job_id,
            "batch_size": 10, "batch_elapsed_s": 12.5, "basecaller_pid": None,
            "batches_done": 3, "files_done": 40, "files_failed": 0, "last_error": ""}
    return {**beat, "run_id": run_id, "model": model}


def test_snapshot_names_the_run_and_model_of_the_batch_and_none_for_an_older_engine():
    slot = run(make_slot(), 90.0)
    slot.on_engine_message(facility_beat("PAW12345", "sup,5mCG_5hmCG"), UP, 99.0)
    snap = slot.snapshot(100.0)
    assert (snap["run_id"], snap["model"]) == ("PAW12345", "sup,5mCG_5hmCG")
    old = {k: v for k, v in facility_beat(None, None).items() if k not in ("run_id", "model")}
    assert slot.on_engine_message(old, UP, 101.0) == Decision()
    snap = slot.snapshot(102.0)
    assert (snap["run_id"], snap["model"], snap["job_id"]) == (
        None, None, "j000007-aa11bb22cc33dd44ee55"), "an older engine's heartbeat is kept"


def _status(*slots: dict) -> dict:
    return {"host": "gpuhost1", "pid": 1, "state": "RUNNING", "uptime_s": 3.0,
            "manager": {"url": "http://m:8000", "reachable": True}, "slots": list(slots)}


def _slot_snapshot(gpu: int, beat: dict | None) -> dict:
    slot = run(Slot(virtual_gpus(gpu + 1)[gpu], f"host-gpu{gpu}", RestartPolicy()), 0.0)
    if beat is not None:
        slot.on_engine_message(beat, UP, 1.0)
    return slot.snapshot(2.0)


def test_status_table_shows_each_gpus_run_and_model_within_100_columns():
    from bcorch.orchestrator.status_view import render_status
    long_run = "20261101_1200_1A_PAW12345_abcdef12"
    long_model = "dna_r10.4.1_e8.2_400bps_sup@v5.0.0,5mCG_5hmCG@v2"
    text = render_status(_status(_slot_snapshot(0, facility_beat(long_run, long_model)),
                                 _slot_snapshot(1, facility_beat("PAX99999", "hac")),
                                 _slot_snapshot(2, None)))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100, text
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["GPU", "RUN", "MODEL"])
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 1:header + 4]}
    assert rows["0"] == [long_run, "..." + long_model[-37:]], "long names keep their tail"
    assert rows["1"] == ["PAX99999", "hac"] and rows["2"] == ["-", "-"], text
    assert "j000007-aa11" in text and "aa11bb22cc33dd44ee55" not in text, \
        "the table shows the short job id (short_job_id); --json keeps all of it"


def test_status_table_has_no_run_column_without_runs():
    from bcorch.orchestrator.status_view import render_status
    text = render_status(_status(_slot_snapshot(0, facility_beat(None, "hac")),
                                 _slot_snapshot(1, None)))
    assert not any(line.split()[:2] == ["GPU", "RUN"] for line in text.splitlines()), text
    assert "MODEL" not in text and "hac" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 100, text


# --- a whole supervisor on a plain clock -------------------------------------------------
@pytest.fixture
def supervisor(monkeypatch):
    """A Supervisor whose spawns make no process: each engine is a record the test drives."""
    def make(**orchestrator) -> tuple[Supervisor, FakeClock]:
        clock = FakeClock(0.0)
        sup = Supervisor(from_mapping({"orchestrator": {"first_contact_timeout_s": 0,
                                                        "hang_timeout_s": 1e6,
                                                        **orchestrator}}),
                         virtual_gpus(2), hostname="h", clock=clock)
        monkeypatch.setattr(sup, "_spawn", lambda slot, reason, counted, after_outage:
                            slot.started(EngineProcess(pid=None, started_at=clock.now), reason,
                                         counted, clock.now))
        monkeypatch.setattr("bcorch.orchestrator.supervisor.probe_async", lambda url, done: None)
        monkeypatch.setattr("bcorch.orchestrator.supervisor.fetch_status_async",
                            lambda url, token, done: None)
        for slot in sup.slots:
            sup._spawn(slot, "first start", False, False)
            slot.on_ready(0.0)
        return sup, clock
    return make


def test_supervisor_manager_outage_with_the_drain_policy_exits_75(supervisor):
    sup, clock = supervisor(on_manager_failure="drain")
    sup.slots[0].on_exit(75, sup.world(), 1.0)
    sup._carry_out(sup.slots[0], Decision(Do.SUSPECT_MANAGER, "refused"), 1.0)
    sup.step(1.0)
    sup.handle(("probe", False, "connection refused"), 1.2)
    sup.step(1.2)
    assert sup.host_state.value == "DRAINING" and sup.exit_code == 75
    assert sup.slots[1].state is S.DRAINING
    sup.slots[1].on_exit(0, sup.world(), 2.0)
    assert sup._finished() == 75


def test_supervisor_waits_for_the_manager_for_manager_down_timeout_s(supervisor):
    sup, clock = supervisor(manager_down_timeout_s=600)
    sup._carry_out(sup.slots[0], sup.slots[0].on_exit(75, sup.world(), 1.0), 1.0)
    sup.handle(("probe", False, "refused"), 1.5)
    for now in (2.0, 100.0, 600.0):
        sup.step(now)
        assert sup.host_state.value == "RUNNING" and sup.slots[0].state is S.BACKOFF
    sup.step(601.5)
    assert sup.host_state.value == "DRAINING" and sup.exit_code == 75


def test_supervisor_exits_0_when_the_run_is_complete_unless_told_to_keep_serving(supervisor):
    sup, clock = supervisor()
    sup.handle(("run", True, False, "ok"), 1.0)
    sup.step(1.0)
    assert sup.host_state.value == "RUNNING"
    sup.handle(("run", True, True, "ok"), 6.0)
    sup.step(6.0)
    assert sup.host_state.value == "DRAINING" and sup.exit_code == 0
    assert "the manager reports the run complete" in sup.host_reason
    keep, _ = supervisor(exit_when_done=False)
    keep.handle(("run", True, True, "ok"), 1.0)
    keep.step(1.0)
    assert keep.host_state.value == "RUNNING" and keep.snapshot(1.0)["manager"]["run_complete"]


def test_supervisor_exits_75_when_the_manager_was_never_reached(supervisor):
    sup, clock = supervisor(first_contact_timeout_s=120)
    sup.handle(("run", False, False, "/status: connection refused"), 0.1)
    sup.step(119.0)
    assert sup.host_state.value == "RUNNING"
    sup.step(120.0)
    assert sup.host_state.value == "STOPPING" and sup.exit_code == 75
    assert all(s.state is S.STOPPING for s in sup.slots)


def test_supervisor_once_reached_keeps_todays_wait_policy(supervisor):
    sup, clock = supervisor(first_contact_timeout_s=120)
    sup.handle(("run", True, False, "ok"), 1.0)
    sup.handle(("run", False, False, "/status: refused"), 6.0)
    sup.step(500.0)
    assert sup.host_state.value == "RUNNING"


def test_supervisor_control_commands_come_from_one_table(supervisor):
    from bcorch.orchestrator.commands import COMMANDS
    from bcorch.orchestrator.control import parse_request
    sup, clock = supervisor()
    assert set(sup._control_handlers) == set(COMMANDS)
    with pytest.raises(ValueError, match="restart needs a gpu"):
        parse_request(b'{"cmd": "restart"}')
    with pytest.raises(ValueError, match="unknown command"):
        parse_request(b'{"cmd": ["status"]}')
    reply = sup._on_control({"cmd": "drain", "gpu": 1}, 1.0)
    assert reply["slots"] == [{"gpu": 1, "state": "DRAINING",
                               "reason": "drain requested by an operator"}]


@pytest.mark.parametrize("status, complete", [
    ({"input_closed": True, "files": {"PENDING": 0, "ASSIGNED": 0, "DONE": 5, "QUARANTINED": 1,
                                      "DUPLICATE": 2}}, True),
    ({"input_closed": True, "files": {"PENDING": 0, "ASSIGNED": 1, "DONE": 5}}, False),
    ({"input_closed": False, "files": {"PENDING": 0, "ASSIGNED": 0, "DONE": 5}}, False),
    ({"input_closed": True, "files": {"PENDING": 2, "DONE": 5}}, False),
    ({"input_closed": True}, False),
    ({"input_closed": True, "files": {"PENDING": 0, "ASSIGNED": 0}, "files_waiting": 1}, False),
    ({"complete": True, "input_closed": False}, True),
])
def test_run_complete_follows_the_managers_nothing_left_rule(status, complete):
    from bcorch.orchestrator.manager_watch import run_complete
    assert run_complete(status) is complete


def test_a_stopped_slot_says_how_to_bring_it_back():
    from bcorch.orchestrator.status_view import render_status
    slot = run(make_slot(), 0.0)
    slot.operator_drain(1.0)
    slot.on_exit(0, UP, 2.0)
    status = {"host": "h", "pid": 1, "state": "RUNNING", "uptime_s": 3.0,
              "manager": {"url": "http://m", "reachable": True}, "slots": [slot.snapshot(3.0)]}
    assert ("gpu1 STOPPED: drained by an operator (exit 0); `bcorch resume --gpu 1` brings it "
            "back") in render_status(status)


def test_engine_messages_become_decisions():
    slot = run(make_slot(), 0.0, ready=False)
    assert slot.on_engine_message({"type": "ready"}, UP, 1.0) == Decision()
    assert slot.state is S.RUNNING
    beat = {"type": "heartbeat", "engine_id": "host-gpu1", "state": "WORKING", "job_id": "j1",
            "batch_size": 2, "batch_elapsed_s": 0.1, "basecaller_pid": 555, "batches_done": 0,
            "files_done": 0, "files_failed": 0, "last_error": ""}
    assert slot.on_engine_message(beat, UP, 2.0).do is Do.REMEMBER_TREE
    assert slot.on_engine_message(beat, UP, 3.0).do is Do.NOTHING, "same basecaller"
    assert slot.holds_batch and slot.engine.last_message_at == 3.0
    problem = {"type": "manager_problem", "reason": "refused"}
    assert slot.on_engine_message(problem, UP, 4.0) == Decision(Do.SUSPECT_MANAGER, "refused")
    assert slot.on_engine_message(problem, DOWN, 5.0).do is Do.NOTHING, "already known down"
    assert slot.on_engine_message({"type": "heartbeat", "job_id": "x"}, UP, 6.0).do is Do.NOTHING
    slot.on_engine_message({"type": "exiting", "code": 3, "reason": "boom"}, UP, 7.0)
    slot.on_exit(3, UP, 8.0)
    assert "crashed (exit 3: boom)" in slot.reason


def test_status_header_says_whether_the_manager_was_ever_reached():
    from bcorch.orchestrator.status_view import render_status
    status = {"host": "h", "pid": 1, "state": "RUNNING", "uptime_s": 3.0, "slots": [],
              "manager": {"url": "http://m", "reachable": True, "reached": False}}
    assert "manager http://m: not reached yet" in render_status(status)
    status["manager"].update(reached=True, run_complete=True)
    assert "manager http://m: reachable, run complete" in render_status(status)


def test_status_on_the_control_pipe_names_each_gpus_run_and_model(supervisor):
    """A heartbeat read from the engine's real pipe reaches `bcorch status --json` (the control
    reply, as JSON) and the table rendered from it."""
    import json
    import multiprocessing
    from bcorch.orchestrator.status_view import render_status
    sup, clock = supervisor()
    ours, engines = multiprocessing.Pipe()
    try:
        sup.slots[0].engine.conn = ours
        engines.send(facility_beat("PAW12345", "sup,5mCG_5hmCG"))
        assert ours.poll(10), "the heartbeat did not come through the pipe"
        sup._read_pipe(sup.slots[0])
        replies: list[dict] = []
        sup.handle(("control", {"cmd": "status"}, replies.append), 1.0)
        reply = json.loads(json.dumps(replies[0]))
    finally:
        ours.close()
        engines.close()
    assert [(s["run_id"], s["model"]) for s in reply["slots"]] == [
        ("PAW12345", "sup,5mCG_5hmCG"), (None, None)]
    rows = render_status(reply).split("GPU  RUN")[1].splitlines()[1:]
    assert [row.split() for row in rows] == [["0", "PAW12345", "sup,5mCG_5hmCG"], ["1", "-", "-"]]
