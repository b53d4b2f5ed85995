"""The start-up an engine reports with each DONE batch (issue 14): the whole per-batch cost
it pays between two basecalls, and none of the time it spent waiting for work.

A real manager on loopback, reached through a proxy (a real HTTP server) that can slow the
requests down; the engine runs in this process with the simulate runner on real POD5 files.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from support import ManagerProcess, wait_until
from test_engine import Site, restore_signals  # noqa: F401 (a fixture)
from test_engine_stubs import ScriptedServer, forwarder

from bcorch.config import from_mapping
from bcorch.orchestrator.pod5_dataset import write_dataset
from bcorch.workers.engine import BCEngine

REQUEST_DELAY_S = 0.3


def _engine(url: str, input_dir: Path, output_dir: Path, **engine) -> BCEngine:
    conf = from_mapping({
        "manager": {"url": url},
        "engine": {"input_dir": str(input_dir), "output_dir": str(output_dir),
                   "engine_id": "pace", "polling_interval": 0.005, "busy_pause_s": 0.0,
                   "optimal_request_size": 1, "request_retries": 1, "read_timeout_s": 10.0,
                   **engine},
        "runner": {"kind": "simulate", "samples_per_s": 5e6, "fail_fraction": 0.0}})
    return BCEngine(None, 0, conf=conf)


def _reported_startups(proxy: ScriptedServer) -> list[float]:
    return [float(f["startup_s"]) for f in proxy.routes("/completed")
            if f.get("job_state") == "DONE" and "startup_s" in f]


def test_the_request_round_trip_counts_as_start_up(tmp_path, procs, restore_signals):
    """A manager that takes 0.3 s to answer /assignwork (closed input: nothing is held)
    costs every batch those 0.3 s of GPU time; the engine must report them."""
    site = Site(tmp_path, procs, n_files=3, reads=5, batch_size=1, input_closed=True)
    upstream = forwarder(site.manager.url)

    def slow_assign(route, fields):
        if route == "/assignwork":
            time.sleep(REQUEST_DELAY_S)
        return upstream(route, fields)

    with ScriptedServer(slow_assign) as proxy:
        engine = _engine(proxy.url, site.input_dir, site.output_dir, work_until_none_left=True)
        assert engine.begin_working() == 0
    startups = _reported_startups(proxy)
    assert len(startups) == 3, proxy.routes("/completed")
    assert all(s >= REQUEST_DELAY_S for s in startups), startups
    assert all(s < REQUEST_DELAY_S + 1.0 for s in startups), startups


def test_waiting_for_files_that_do_not_exist_yet_is_not_start_up(tmp_path, procs,
                                                                 restore_signals):
    """Open input, files arriving one by one: the engine waits in held long polls (some
    answered empty, one answered with the new file). None of that waiting is start-up.
    The file comes about 2 s into a held poll (2.5 s after the empty answer), so counting
    any of the wait would pass the 1 s bound, which leaves a loaded machine 1 s for the real
    cost (report, request, runner start: a few ms on an idle one)."""
    input_dir, output_dir, staging = tmp_path / "input", tmp_path / "output", tmp_path / "staging"
    input_dir.mkdir(), output_dir.mkdir()
    write_dataset(staging, 2, reads_per_file=5, samples_per_read=4000)
    manager = ManagerProcess(tmp_path, input_dir, output_dir, batch_size=1)
    procs.append(manager)
    manager.start()
    upstream = forwarder(manager.url)

    def short_polls(route, fields):
        if route == "/assignwork" and "wait_s" in fields:
            fields = {**fields, "wait_s": 3}    # an empty answer after 3 s instead of 5
        return upstream(route, fields)

    with ScriptedServer(short_polls) as proxy:
        engine = _engine(proxy.url, input_dir, output_dir, work_until_none_left=True)

        def arrive() -> None:
            """Each file 5.5 s after the engine is ready for it (an empty answer, then a
            held request answered with the file)."""
            for n, name in enumerate(sorted(os.listdir(staging))):
                wait_until(lambda: len(proxy.routes("/completed")) >= n, 60,
                           what=f"batch {n} reported")
                time.sleep(5.5)
                os.rename(staging / name, input_dir / name)
            wait_until(lambda: len(proxy.routes("/completed")) >= 2, 60, what="both reported")
            assert manager.post("/close-input", {})[0] == 200   # the engine then exits 0

        feeder = threading.Thread(target=arrive, daemon=True)
        feeder.start()
        assert engine.begin_working() == 0
        feeder.join(timeout=60)
    startups = _reported_startups(proxy)
    assert len(startups) == 2, proxy.routes("/completed")
    assert all(s < 1.0 for s in startups), startups
    assert len(proxy.routes("/assignwork")) >= 4, "the engine waited through empty answers"
