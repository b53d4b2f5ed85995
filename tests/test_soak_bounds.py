"""What a long run keeps in memory stays bounded: counted after many batches through the real
classes, never timed (scripts/bench_soak.py measures the rates; docs/benchmarks.md, Soak)."""
from __future__ import annotations

import pytest

from bcorch.config import from_mapping
from bcorch.manager.layout import Layout
from bcorch.manager.service import THROUGHPUT_WINDOW_S, Manager
from bcorch.manager.store import Store
from bcorch.protocol import Batch, JobState as WireState
from bcorch.workers.engine import BatchTiming, BCEngine
from bcorch.workers.runners.base import RunResult

from support import FakeClock

BATCHES = 1500


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "db.sqlite"), max_attempts=3)
    yield s
    s.close()


def test_the_throughput_window_forgets_batches_even_when_nobody_reads_status(tmp_path, store):
    """One entry per DONE batch of the last THROUGHPUT_WINDOW_S, not of the whole run: a
    manager nobody asks for /status (no live page open) must not keep every batch."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    batches = 400
    names = [f"r{i:04d}.pod5" for i in range(batches)]
    for name in names:
        (inp / name).write_bytes(b"x" * 100)
    store.add_files((name, 100) for name in names)
    clock = FakeClock()
    manager = Manager(store, Layout(inp, out), batch_size=1, report_back_interval=60,
                      input_closed=True, clock=clock)
    manager.recover()
    step_s = 10.0
    for _ in range(batches):
        job_id = manager.assign("gpu0", 1).body["jobid"]
        assert manager.complete(job_id, WireState.DONE, {}, "").body == {"ok": True}
        clock.now += step_s
    assert store.snapshot().files["DONE"] == batches
    in_window = int(THROUGHPUT_WINDOW_S / step_s) + 1
    assert len(manager._done_log) <= in_window, len(manager._done_log)
    assert len(manager._in_flight) == 0 and len(manager.leases) == 0


def test_an_engine_keeps_the_timings_of_its_recent_batches_only(tmp_path):
    """BCEngine.batch_timings holds the last BATCH_TIMINGS_KEPT batches (the busy pause and
    the benchmarks read the newest), not one entry per batch of a 72-hour run."""
    conf = from_mapping({
        "manager": {"url": "http://127.0.0.1:9"},
        "engine": {"input_dir": str(tmp_path), "output_dir": str(tmp_path),
                   "engine_id": "soak"},
        "runner": {"kind": "simulate"}})
    engine = BCEngine(None, 0, conf=conf)
    try:
        for i in range(BATCHES):
            batch = Batch(jobid=f"j{i:06d}-{i:016x}", job_input_dir="ASSIGNED_x",
                          job_output_dir="TMPOUTPUT_x", bc_engine_id="soak-gpu0",
                          batch=("a.pod5",), report_back_interval=60.0)
            t = float(i)
            engine._record(batch, RunResult(WireState.DONE, 0),
                           BatchTiming(requested=t, received=t, runner_started=t + 0.1,
                                       basecaller_ended=t + 0.5, reported=t + 0.6))
        assert engine.batches_done == BATCHES and engine.files_done == BATCHES
        assert len(engine.batch_timings) < BATCHES
        assert engine.batch_timings[-1].requested == float(BATCHES - 1)
    finally:
        engine._executor.shutdown(wait=False)
