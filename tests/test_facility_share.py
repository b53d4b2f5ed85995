"""The Facility's wiring of the fair share (in process, on a fake clock): batches are
charged their actual time, so GPU time follows priority, and model switches are counted."""
from __future__ import annotations

import collections
import os
import time
from pathlib import Path

from bcorch.config import FacilityConfig, ManagerConfig
from bcorch.manager.facility import Facility
from bcorch.protocol import JobState

from support import FakeClock


def _run(root: Path, name: str, files: int, toml: str = "") -> None:
    run = root / "g" / "s" / name
    (run / "pod5").mkdir(parents=True)
    if toml:
        (run / "bcorch.toml").write_text(toml)
    old = time.time() - 3600
    for i in range(files):
        path = run / "pod5" / f"f{i:03d}.pod5"
        path.write_bytes(b"not yet a pod5 file")   # taken by the settle timer (settle_s 0)
        os.utime(path, (old, old))


def _facility(root: Path, clock: FakeClock, slack: float = 0.0) -> Facility:
    cfg = ManagerConfig(watch_root=str(root), settle_s=0.0, report_back_interval=3600.0)
    fac = Facility(cfg, FacilityConfig(switch_slack_s=slack), clock=clock)
    fac.scan_tick()
    return fac


def _serve(fac: Facility, clock: FakeClock, engine: str, seconds: float) -> str:
    answer = fac.assign(engine, 1)
    assert answer.status == 200 and answer.body["batch_size"] == 1, answer.body
    clock.now += seconds
    done = fac.complete(answer.body["jobid"], JobState.DONE, {}, "")
    assert done.body.get("ok"), done.body
    return answer.body["run_id"]


def test_gpu_time_follows_priority(tmp_path):
    clock = FakeClock()
    _run(tmp_path, "low", 40)
    _run(tmp_path, "high", 40, toml="[run]\npriority = 3.0\n")
    fac = _facility(tmp_path, clock)
    try:
        served = collections.Counter(_serve(fac, clock, "gpu0", 10.0) for _ in range(40))
        assert served == {"high": 30, "low": 10}
        views = {v["run_id"]: v for v in fac.runs()}
        assert views["high"]["served_s"] == 300.0 and views["low"]["served_s"] == 100.0
    finally:
        fac.close()


def test_an_engine_stays_on_its_model_within_the_slack_and_switches_are_counted(tmp_path):
    clock = FakeClock()
    _run(tmp_path, "a", 30, toml='[run]\nmodel = "sup"\n')
    _run(tmp_path, "b", 30)
    fac = _facility(tmp_path, clock, slack=50.0)
    try:
        order = [_serve(fac, clock, "gpu0", 10.0) for _ in range(20)]
        runs = [order[0]]
        for run in order[1:]:
            if run != runs[-1]:
                runs.append(run)
        # the engine keeps a model for about slack / batch + 1 batches before it switches
        assert 3 <= len(runs) <= 5, order
        switches = fac.status()["facility"]["model_switches"]["gpu0"]
        assert switches == len(runs) - 1
    finally:
        fac.close()
