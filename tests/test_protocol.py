import pytest

from bcorch.protocol import Batch, JobState, ProtocolError, is_valid_id, parse_job_state


@pytest.mark.parametrize("value, ok", [
    ("host-gpu0", True), ("a.b_c-1", True), ("x" * 64, True), ("x" * 65, False),
    ("", False), ("..", False), (".", False), ("a/b", False), ("a b", False),
    ("é", False), (7, False), (None, False),
])
def test_ids(value, ok):
    assert is_valid_id(value) is ok


def answer(**over):
    base = {"jobid": "j1", "job_input_dir": "ASSIGNED_j1_e", "job_output_dir": "TMPOUTPUT_j1_e",
            "bc_engine_id": "e", "batch_size": 2, "batch": ["a.pod5", "b.pod5"],
            "report_back_interval": 90}
    base.update(over)
    return base


def test_batch_round_trip():
    batch = Batch.from_answer(answer())
    assert batch.batch_size == 2 and not batch.empty
    assert Batch.from_answer(batch.to_dict()) == batch


def test_empty_batch_with_and_without_input_closed():
    assert Batch.from_answer({"batch_size": 0}).empty
    closed = Batch.from_answer({"batch_size": 0, "input_closed": True, "report_back_interval": 5})
    assert closed.empty and closed.input_closed is True


@pytest.mark.parametrize("bad, reason", [
    ([], "JSON object"),
    ({}, "no batch_size"),
    (answer(batch_size=-1), "non-negative"),
    (answer(job_input_dir="../etc"), "job_input_dir"),
    (answer(job_output_dir="a/b"), "job_output_dir"),
    (answer(batch=["../x.pod5", "b.pod5"]), "batch entry"),
    (answer(batch=["a.pod5"]), "list of 2"),
    (answer(jobid="a b"), "jobid"),
    (answer(report_back_interval="soon"), "report_back_interval"),
    ({k: v for k, v in answer().items() if k != "jobid"}, "no jobid"),
])
def test_malformed_answers_are_protocol_errors(bad, reason):
    with pytest.raises(ProtocolError, match=reason):
        Batch.from_answer(bad)


def test_job_states():
    assert parse_job_state("DONE") is JobState.DONE and JobState.DONE.final
    assert not JobState.PROCESSING.final
    with pytest.raises(ProtocolError, match="job_state"):
        parse_job_state("done")
    with pytest.raises(ProtocolError, match="job_state"):
        parse_job_state("STARTED", frozenset({JobState.DONE}))
