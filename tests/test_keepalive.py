"""BCKeepAlive against a scripted loopback HTTP server (the client itself: test_client.py)."""
from __future__ import annotations

import threading
import time

import pytest

from support import wait_until
from test_engine_stubs import ScriptedServer
from bcorch.workers.client import ManagerClient
from bcorch.workers.keepalive import BCKeepAlive, LeaseLost, ReportOutcome
from bcorch.protocol import JobState
from bcorch.config import from_mapping

BATCH = {"jobid": "j1", "job_input_dir": "ASSIGNED_j1_e", "job_output_dir": "TMPOUTPUT_j1_e",
         "bc_engine_id": "e", "batch_size": 1, "batch": ["a.pod5"], "report_back_interval": 1.0,
         "input_closed": False}


class Manager:
    """Answers keep-alives and completions; a test flips `down`, `late`, `late_completion`."""

    def __init__(self):
        self.down = False
        self.late = False
        self.late_completion = False

    def __call__(self, route, fields):
        if self.down:
            return 503, {"error": "down for maintenance"}
        if route == "/keepalive":
            return 200, {"late": self.late}
        if route == "/completed":
            return 200, ({"ok": False, "late": True} if self.late_completion else {"ok": True})
        return 404, {"error": f"no route {route}"}


def client(url, **kw) -> ManagerClient:
    kw.setdefault("connect_timeout", 1.0)
    kw.setdefault("read_timeout", 2.0)
    kw.setdefault("backoff_base_s", 0.01)
    return ManagerClient(url, **kw)


# -- keep-alive -----------------------------------------------------------------------------

def start_keepalive(url, interval=1.0, on_lost=None) -> BCKeepAlive:
    conf = from_mapping({"manager": {"url": url}})
    return BCKeepAlive.started_instance({**BATCH, "report_back_interval": interval},
                                        JobState.PROCESSING, conf, client=client(url),
                                        on_lease_lost=on_lost)


def test_keepalives_go_out_at_half_the_interval():
    """A loaded machine only makes gaps longer: on average they are never shorter than half
    the interval, and at least one is clearly shorter than the whole interval."""
    mgr = Manager()
    with ScriptedServer(mgr) as srv:
        ka = start_keepalive(srv.url, interval=0.6)
        wait_until(lambda: len(srv.routes("/keepalive")) >= 6, 30, what="6 keep-alives")
        outcome = ka.terminate_keepalive(JobState.DONE, {"a.pod5": "unreadable"})
    times = [t for t, route, _, _ in srv.requests if route == "/keepalive"]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[-1] - times[0] >= 0.25 * len(gaps) and min(gaps) < 0.5, gaps
    assert srv.routes("/keepalive")[0] == {"job_id": "j1", "job_state": "PROCESSING"}
    assert outcome is ReportOutcome.OK and not ka.BCManager_PB
    assert srv.routes("/completed") == [{"job_id": "j1", "job_state": "DONE",
                                          "failed_files": {"a.pod5": "unreadable"}}]


def test_terminate_wakes_the_thread_at_once():
    """The next keep-alive is 30 s away: terminating does not wait for it."""
    mgr = Manager()
    with ScriptedServer(mgr) as srv:
        ka = start_keepalive(srv.url, interval=60.0)
        started = time.monotonic()
        assert ka.terminate_keepalive(JobState.DONE) is ReportOutcome.OK
        assert time.monotonic() - started < 15.0
    assert srv.routes("/keepalive") == [] and len(srv.routes("/completed")) == 1


def test_late_answer_loses_the_lease_and_calls_back():
    mgr = Manager()
    mgr.late = True
    lost = threading.Event()
    with ScriptedServer(mgr) as srv:
        ka = start_keepalive(srv.url, interval=0.4, on_lost=lambda reason: lost.set())
        assert lost.wait(5)
        ka.join(5)
        assert ka.BCManager_PB and "late" in ka.lost_reason
        with pytest.raises(LeaseLost):
            ka.shutdown_if_broken_keepalive()
        assert ka.terminate_keepalive(JobState.DONE) is ReportOutcome.SKIPPED
    assert srv.routes("/completed") == []


def test_short_outage_is_ridden_out():
    """Interval 5 s: the outage's two failed keep-alives come 2.5 s after the last success,
    which leaves a loaded machine 2 s to see them and end the outage before the lease does."""
    mgr = Manager()
    with ScriptedServer(mgr) as srv:
        ka = start_keepalive(srv.url, interval=5.0)
        wait_until(lambda: srv.routes("/keepalive"), 15, what="first keep-alive")
        mgr.down = True
        n = len(srv.requests)
        wait_until(lambda: len(srv.requests) >= n + 2, 15, what="two failed keep-alives")
        mgr.down = False
        outcome = ka.terminate_keepalive(JobState.DONE)
    assert outcome is ReportOutcome.OK and not ka.BCManager_PB


def test_no_successful_keepalive_for_an_interval_loses_the_lease():
    mgr = Manager()
    lost = threading.Event()
    with ScriptedServer(mgr) as srv:
        mgr.down = True
        started = time.monotonic()
        ka = start_keepalive(srv.url, interval=1.0, on_lost=lambda r: lost.set())
        assert lost.wait(15)
        elapsed = time.monotonic() - started
        ka.join(5)
    assert 0.9 <= elapsed < 6.0   # lost at the 1 s lease; the upper bound is a backstop
    assert ka.BCManager_PB and "no keep-alive succeeded" in ka.lost_reason
    assert len(srv.routes("/keepalive")) >= 2  # it retried while the lease could be alive


def test_late_completion_is_not_success():
    mgr = Manager()
    mgr.late_completion = True
    with ScriptedServer(mgr) as srv:
        ka = start_keepalive(srv.url, interval=10.0)
        assert ka.terminate_keepalive(JobState.DONE) is ReportOutcome.LATE
    assert ka.BCManager_PB and "given to someone else" in ka.lost_reason


def test_final_report_is_retried_while_the_lease_can_live():
    mgr = Manager()
    with ScriptedServer(mgr) as srv:
        ka = start_keepalive(srv.url, interval=3.0)
        mgr.down = True
        ka.finish(JobState.FAILED, reason="bc_script exited with 1")
        wait_until(lambda: len(srv.routes("/completed")) >= 2, 5, what="a retried report")
        mgr.down = False
        ka.join(5)
    assert ka.outcome is ReportOutcome.OK
    assert srv.routes("/completed")[-1]["job_state"] == "FAILED"


def test_unreachable_final_report_gives_up_when_the_lease_is_over():
    with ScriptedServer(lambda r, f: (503, {"error": "down"})) as srv:
        ka = start_keepalive(srv.url, interval=1.0)
        started = time.monotonic()
        assert ka.terminate_keepalive(JobState.DONE) is ReportOutcome.UNREACHABLE
        assert time.monotonic() - started < 6.0   # gives up at the 1 s lease; a backstop
    assert ka.BCManager_PB
