"""Facility mode's small parts: the run state machine, the batch's run fields, the watcher
of a facility root, the facility database."""
from __future__ import annotations

import threading

import pytest

from bcorch.manager.facility_db import FacilityDB, RunRow
from bcorch.manager.facility_states import RunEvent, RunState, TransitionRefused, transition
from bcorch.manager.watcher import InputWatcher
from bcorch.protocol import Batch, ProtocolError
from support import wait_until

S, E = RunState, RunEvent


@pytest.mark.parametrize("state,event,closed,after", [
    (S.ACTIVE, E.PAUSE, False, S.PAUSED),
    (S.PAUSED, E.PAUSE, False, S.PAUSED),
    (S.PAUSED, E.RESUME, False, S.ACTIVE),
    (S.PAUSED, E.RESUME, True, S.CLOSED),      # closed while paused: resumes closed
    (S.ACTIVE, E.CLOSE, False, S.CLOSED),
    (S.PAUSED, E.CLOSE, False, S.PAUSED),
    (S.CLOSED, E.PAUSE, True, S.PAUSED),
    (S.CLOSED, E.SETTLED, True, S.COMPLETE),
    (S.ACTIVE, E.SETTLED, False, S.ACTIVE),    # only a closed run completes
    (S.PAUSED, E.SETTLED, True, S.PAUSED),
    (S.ACTIVE, E.CANCEL, False, S.CANCELLED),
    (S.CLOSED, E.CANCEL, True, S.CANCELLED),
    (S.QUARANTINED, E.CANCEL, False, S.CANCELLED),
    (S.QUARANTINED, E.RESUME, False, S.ACTIVE),
    (S.ACTIVE, E.QUARANTINE, False, S.QUARANTINED),
    (S.COMPLETE, E.CLOSE, True, S.COMPLETE),
    (S.CANCELLED, E.CANCEL, False, S.CANCELLED),
])
def test_allowed_transitions(state, event, closed, after):
    assert transition(state, event, closed) is after


@pytest.mark.parametrize("state,event,says", [
    (S.COMPLETE, E.PAUSE, "COMPLETE"),
    (S.COMPLETE, E.CANCEL, "COMPLETE"),
    (S.CANCELLED, E.RESUME, "CANCELLED"),
    (S.CANCELLED, E.PAUSE, "CANCELLED"),
    (S.QUARANTINED, E.PAUSE, "QUARANTINED"),
    (S.COMPLETE, E.QUARANTINE, "COMPLETE"),
])
def test_refused_transitions_say_why_in_one_line(state, event, says):
    with pytest.raises(TransitionRefused) as info:
        transition(state, event, False)
    assert says in str(info.value) and "\n" not in str(info.value)


def _answer(**run_fields) -> dict:
    return {"jobid": "j1", "job_input_dir": "ASSIGNED_j1_e", "job_output_dir": "TMPOUTPUT_j1_e",
            "bc_engine_id": "e", "batch_size": 1, "batch": ["a.pod5"],
            "report_back_interval": 90, **run_fields}


def test_batch_run_fields_round_trip_and_are_absent_in_single_run_answers():
    fields = {"run_id": "r1", "run_input_dir": "g/s/r1", "run_output_dir": "g/s/r1/basecalls",
              "model": "sup,5mCG_5hmCG", "kit": "SQK-NBD114-24", "emit": "bam"}
    batch = Batch.from_answer(_answer(**fields))
    assert {k: getattr(batch, k) for k in fields} == fields
    assert Batch.from_answer(batch.to_dict()) == batch
    plain = Batch.from_answer(_answer())
    assert not set(fields) & set(plain.to_dict())


@pytest.mark.parametrize("field,value", [
    ("run_input_dir", "../etc"), ("run_input_dir", "/abs"), ("run_output_dir", "a//b"),
    ("run_output_dir", "a/../b"), ("run_input_dir", "a/."), ("run_id", "a/b"),
    ("model", "sup; rm -rf /"), ("model", "../hac"), ("model", "--help"), ("kit", "a kit"),
    ("kit", "-x"), ("emit", "sam"),
    ("run_input_dir", 3),
])
def test_batch_run_fields_are_validated(field, value):
    with pytest.raises(ProtocolError) as info:
        Batch.from_answer(_answer(**{field: value}))
    assert field in str(info.value)


def test_a_facility_watcher_ignores_batch_dirs_in_run_dirs(tmp_path):
    run = tmp_path / "g" / "s" / "run1"
    (run / "pod5").mkdir(parents=True)
    stop = threading.Event()
    watcher = InputWatcher(tmp_path, stop=stop, min_gap_s=0.0)
    watcher.input_roots = watcher.input_roots | {str(run)}
    try:
        assert watcher.start()
        (run / "ASSIGNED_j1_gpu0").mkdir()
        (run / "FAILED_j1_gpu0").mkdir()
        watcher.wait(0.5)
        assert watcher.wakeups == 0
        (run / "pod5" / "x.pod5").write_bytes(b"x")
        wait_until(lambda: (watcher.wait(0.2), watcher.wakeups)[1] == 1, 10, what="a wake-up")
    finally:
        watcher.close()


def test_facility_db_keeps_rows_across_opening(tmp_path):
    db = FacilityDB(tmp_path / "f.sqlite")
    db.add(RunRow("r1", "g/s/r1", S.ACTIVE, settings={"model": "hac"}, output_dir="/o",
                  found_at=1.0))
    row = db.runs()[0]
    row.state, row.reason, row.served_s, row.summary = S.CANCELLED, "by command", 2.5, {"x": 1}
    db.save(row)
    db.set_flag("closed", "1")
    db.close()
    again = FacilityDB(tmp_path / "f.sqlite")
    (back,) = again.runs()
    assert (back.state, back.reason, back.served_s, back.summary, back.settings) == \
        (S.CANCELLED, "by command", 2.5, {"x": 1}, {"model": "hac"})
    assert again.get_flag("closed") == "1"
    with pytest.raises(Exception):
        again.add(RunRow("r2", "g/s/r1", S.ACTIVE, found_at=2.0))   # one row per rel
    again.close()
