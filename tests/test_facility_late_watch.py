"""The late-file watch of settled runs is bounded (soak finding): a facility manager that
runs for months looks, on each scan tick, at the runs settled within facility.late_watch_s,
not at every COMPLETE run it has ever found.

A real Facility in process over real run directories and summaries; the folders the watch
looks at (stat or list) are counted through the module's `os`, not timed.
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from bcorch.config import ConfigError, FacilityConfig, ManagerConfig, from_mapping
from bcorch.manager import late_files
from bcorch.manager.facility import Facility
from bcorch.manager.facility_states import RunState
from bcorch.manager.late_files import LateFiles
from bcorch.manager.run_summary import SUMMARY_NAME
from bcorch.orchestrator.pod5_dataset import write_pod5
from test_facility import GROUP, SAMPLE, run_name

DAY = 24 * 3600.0
OLD_RUNS = 40
RECENT_RUNS = 2


class CountingOs:
    """The os module, recording the folders late_files stats or lists."""

    def __init__(self) -> None:
        self.looked_at: list[str] = []

    def stat(self, path, *args, **kwargs):
        self.looked_at.append(os.fspath(path))
        return os.stat(path, *args, **kwargs)

    def scandir(self, path):
        self.looked_at.append(os.fspath(path))
        return os.scandir(path)

    def __getattr__(self, name):
        return getattr(os, name)


def settled_run(root: Path, n: int, age_s: float) -> Path:
    """A run directory whose summary says COMPLETE, written age_s ago."""
    run = root / GROUP / SAMPLE / run_name(n)
    (run / "pod5").mkdir(parents=True)
    (run / "pod5" / "sub").mkdir()
    out = run / "basecalls"
    out.mkdir()
    written = time.time() - age_s
    summary = out / SUMMARY_NAME
    summary.write_text(json.dumps({"run_id": run_name(n), "state": "COMPLETE",
                                   "written_at": written, "settings": {}}))
    os.utime(summary, (written, written))
    return run


def looked_at_per_tick(fac: Facility, monkeypatch) -> list[str]:
    counting = CountingOs()
    monkeypatch.setattr(late_files, "os", counting)
    fac.scan_tick()
    monkeypatch.setattr(late_files, "os", os)
    return counting.looked_at


def facility(tmp_path: Path, root: Path) -> Facility:
    cfg = ManagerConfig(watch_root=str(root), settle_s=0.0, report_back_interval=3600.0,
                        db=str(tmp_path / "state" / "facility.sqlite"))
    return Facility(cfg, FacilityConfig())


def under(paths: list[str], runs: list[Path]) -> list[str]:
    prefixes = tuple(str(r) + os.sep for r in runs) + tuple(str(r) for r in runs)
    return [p for p in paths if p.startswith(prefixes)]


def test_a_tick_looks_only_at_runs_settled_within_the_watch(tmp_path, monkeypatch):
    """40 runs settled 30 days ago and 2 an hour ago: a tick (and a tick after a restart)
    looks at the folders of the 2 only, with the default late_watch_s of 7 days."""
    root = tmp_path / "root"
    old = [settled_run(root, n, 30 * DAY) for n in range(1, OLD_RUNS + 1)]
    recent = [settled_run(root, n, 3600.0)
              for n in range(OLD_RUNS + 1, OLD_RUNS + RECENT_RUNS + 1)]
    for _ in range(2):   # the first facility finds them, the second loads them (a restart)
        fac = facility(tmp_path, root)
        try:
            fac.scan_tick()
            assert len(fac._runs) == OLD_RUNS + RECENT_RUNS
            assert {r.state for r in fac._runs.values()} == {RunState.COMPLETE}
            fac.scan_tick()
            looked_at = looked_at_per_tick(fac, monkeypatch)
            assert under(looked_at, old) == [], \
                f"{len(under(looked_at, old))} folders of runs settled 30 days ago looked at"
            for run in recent:
                assert str(run / "pod5") in looked_at, (run, looked_at)
        finally:
            fac.close()


def test_a_run_is_watched_until_late_watch_s_after_it_settled(tmp_path):
    """Watched while younger than watch_s (a late file is found); once older it is
    dropped: nothing of it is looked at, and a file copied in then is not reported."""
    run = tmp_path / "run"
    (run / "pod5").mkdir(parents=True)
    settled_at = time.time() - 10.0
    now = [settled_at + 50.0]
    late = LateFiles(100.0, clock=lambda: now[0])
    late.watch("r1", str(run), str(run / "basecalls"), settled_at)
    late.watch("r2", str(run), str(run / "basecalls"), settled_at - 100.0)   # already past
    counting = CountingOs()
    late_files.os, saved = counting, os   # type: ignore[assignment]
    try:
        assert late.check() == {}
        assert str(run / "pod5") in counting.looked_at
        assert set(late._runs) == {"r1"}
        now[0] = settled_at + 100.0
        counting.looked_at.clear()
        write_pod5(run / "pod5" / "copied.pod5", 1, 200, random.Random(1))
        assert late.check() == {}
        assert counting.looked_at == [] and late._runs == {}
    finally:
        late_files.os = saved   # type: ignore[assignment]


def test_the_same_file_is_reported_within_the_watch(tmp_path):
    run = tmp_path / "run"
    (run / "pod5").mkdir(parents=True)
    late = LateFiles(100.0)
    late.watch("r1", str(run), str(run / "basecalls"), time.time() - 10.0)
    assert late.check() == {}
    write_pod5(run / "pod5" / "copied.pod5", 1, 200, random.Random(1))
    assert late.check() == {"r1": os.path.join("pod5", "copied.pod5")}


@pytest.mark.parametrize("value", [-1.0, float("nan"), 400 * DAY, "7d"])
def test_late_watch_s_is_validated(value):
    with pytest.raises(ConfigError, match=r"^facility\.late_watch_s: "):
        from_mapping({"facility": {"late_watch_s": value}})


def test_late_watch_s_defaults_to_seven_days_and_zero_turns_it_off(tmp_path):
    assert from_mapping({}).facility.late_watch_s == 7 * DAY
    assert from_mapping({"facility": {"late_watch_s": 0}}).facility.late_watch_s == 0
    run = tmp_path / "run"
    (run / "pod5").mkdir(parents=True)
    late = LateFiles(0.0)
    late.watch("r1", str(run), str(run / "basecalls"), time.time() + 5.0)
    assert late._runs == {}
