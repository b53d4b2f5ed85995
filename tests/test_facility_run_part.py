"""A run part that cannot be opened gives back what it had opened (soak finding): a run set
aside because its journal cannot be used must not keep its SQLite files open for as long as
the facility manager runs.

Real SQLite files, a real FIFO where the journal should be, the process's open descriptors
read from /proc/self/fd.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from bcorch.config import FacilityConfig, ManagerConfig
from bcorch.manager.facility import Facility
from bcorch.manager.facility_states import RunState
from bcorch.manager.journal import FILE_NAME as JOURNAL_NAME
from bcorch.manager.journal import JournalUnusable
from bcorch.manager.run_part import RunPart, RunPlace
from test_facility import GROUP, SAMPLE, make_run, run_name


def open_paths() -> list[str]:
    """The files this process holds open."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue   # the descriptor listdir itself used, closed meanwhile
    return paths


def held_under(directory: Path) -> list[str]:
    prefix = str(directory.resolve()) + os.sep
    return [p for p in open_paths() if p.startswith(prefix)]


def test_a_part_whose_journal_is_unusable_closes_its_store(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    os.mkfifo(output / JOURNAL_NAME)
    (tmp_path / "in").mkdir()
    state = tmp_path / "state"
    place = RunPlace(str(tmp_path / "in"), str(output), str(state / "run.sqlite"))
    with pytest.raises(JournalUnusable):
        RunPart(ManagerConfig(), place)
    assert (state / "run.sqlite").exists()   # the store was opened before the journal
    assert held_under(state) == []


def test_a_run_set_aside_at_open_holds_no_files(tmp_path):
    """Through the facility: the run is QUARANTINED with the journal named, and none of
    its database's files stay open."""
    root = tmp_path / "root"
    run_id, _ = make_run(root, 1, 2)
    output = root / GROUP / SAMPLE / run_name(1) / "basecalls"
    output.mkdir()
    os.mkfifo(output / JOURNAL_NAME)
    state = tmp_path / "state"
    cfg = ManagerConfig(watch_root=str(root), settle_s=0.0, report_back_interval=3600.0,
                        db=str(state / "facility.sqlite"))
    fac = Facility(cfg, FacilityConfig())
    try:
        fac.scan_tick()
        run = fac._runs[run_id]
        assert run.state is RunState.QUARANTINED and JOURNAL_NAME in run.row.reason, run.row
        assert run.part is None
        held = [p for p in held_under(state) if not p.startswith(str(state / "facility.sqlite"))]
        assert held == [], held
    finally:
        fac.close()
