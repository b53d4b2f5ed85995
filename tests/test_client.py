"""The manager client (workers/client.py) against a real HTTP server on loopback.

Retries, timeouts, the token and how answers are read; what a valid answer is
(Batch.from_answer) is tested in test_protocol.py.
"""
from __future__ import annotations

import threading
import time

import pytest

from support import free_port
from test_engine_stubs import ScriptedServer
from bcorch.workers.client import ManagerClient, ManagerRefused, ManagerUnreachable, full_jitter
from bcorch.protocol import Batch, JobState, ProtocolError

BATCH = {"jobid": "j1", "job_input_dir": "ASSIGNED_j1_e", "job_output_dir": "TMPOUTPUT_j1_e",
         "bc_engine_id": "e", "batch_size": 1, "batch": ["a.pod5"], "report_back_interval": 1.0,
         "input_closed": False}


def client(url, **kw) -> ManagerClient:
    kw.setdefault("connect_timeout", 1.0)
    kw.setdefault("read_timeout", 2.0)
    kw.setdefault("backoff_base_s", 0.01)
    return ManagerClient(url, **kw)


def test_client_sends_token_and_parses_batch():
    with ScriptedServer(lambda r, f: (200, BATCH)) as srv:
        batch = client(srv.url, token="t0k").assign_work("e", 5)
    assert batch == Batch.from_answer(BATCH)
    _, route, fields, headers = srv.requests[0]
    assert route == "/assignwork" and fields == {"engineid": "e", "batchsize": "5"}
    assert headers["Authorization"] == "Bearer t0k"


def test_4xx_is_not_retried_and_carries_the_reason():
    with ScriptedServer(lambda r, f: (400, {"error": "parameter batchsize must be an integer"})) as srv:
        with pytest.raises(ManagerRefused, match="400.*parameter batchsize must be an integer"):
            client(srv.url, retries=5).assign_work("e", 1)
    assert len(srv.requests) == 1


def test_5xx_is_retried_a_bounded_number_of_times():
    with ScriptedServer(lambda r, f: (500, b"Internal Server Error")) as srv:
        with pytest.raises(ManagerUnreachable, match="500"):
            client(srv.url, retries=3).assign_work("e", 1)
    assert len(srv.requests) == 4


def test_connection_refused_is_unreachable_after_retries():
    c = client(f"http://127.0.0.1:{free_port()}", retries=2)
    started = time.monotonic()
    with pytest.raises(ManagerUnreachable, match="cannot connect"):
        c.heartbeat(retries=2)
    assert time.monotonic() - started < 5


def test_no_answer_times_out():
    hang = threading.Event()

    def slow(route, fields):
        hang.wait(10)
        return 200, {}

    with ScriptedServer(slow) as srv:
        started = time.monotonic()
        with pytest.raises(ManagerUnreachable, match="no answer"):
            client(srv.url, read_timeout=0.3, retries=0).heartbeat()
        assert time.monotonic() - started < 8   # a backstop below the server's 10 s hang
        hang.set()


@pytest.mark.parametrize("body, message", [
    (b"<html>oops</html>", "not JSON"),
    ({"batch_size": 1}, "no report_back_interval"),
    ({**BATCH, "job_input_dir": "../etc"}, "job_input_dir must be a plain directory name"),
])
def test_malformed_answers_are_protocol_errors(body, message):
    with ScriptedServer(lambda r, f: (200, body)) as srv:
        with pytest.raises(ProtocolError, match=message):
            client(srv.url).assign_work("e", 1)


def test_completed_posts_failed_files_and_reason():
    with ScriptedServer(lambda r, f: (200, {"ok": True})) as srv:
        answer = client(srv.url).completed("j1", JobState.DONE, {"a.pod5": "bad"}, "partly")
    assert answer.ok and not answer.late
    assert srv.requests[0][2] == {"job_id": "j1", "job_state": "DONE",
                                  "failed_files": {"a.pod5": "bad"}, "reason": "partly"}


def test_full_jitter_stays_within_bounds():
    values = [full_jitter(a, 0.5, 4.0) for a in range(10) for _ in range(50)]
    assert all(0 <= v <= 4.0 for v in values)
    assert max(values) > 2.0 and min(values) < 0.5  # spread out, not in step
