"""A run's end: settling it (bcorch_summary.json written, COMPLETE or CANCELLED) and
retiring it (its part closed, so a facility that has seen hundreds of runs holds files open
only for those it still serves). A run found again with its summary written (a new state
directory) is settled from it and never opened or summarised again (docs/facility.md)."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .facility_db import RunRow
from .facility_run import Run, number, recorded_id
from .facility_states import RunEvent, RunState, transition
from .facility_view import NO_PROGRESS
from .read_counts import ReadTotals
from .run_discovery import RunDir
from .run_settings import RunSettings, RunSettingsError
from .run_summary import SUMMARY_NAME, write_summary
from .states import FileState

if TYPE_CHECKING:
    from .facility import Facility

log = logging.getLogger("bcmanager.facility")


class RunSettlement:
    def __init__(self, fac: "Facility"):
        self.fac = fac

    @staticmethod
    def settled(run: Run) -> bool:
        """Over and summarised: nothing about it changes any more."""
        return run.state.final and bool(run.row.summary)

    def check(self, run: Run) -> None:
        """CLOSED with every file settled -> COMPLETE (summary written); a CANCELLED run
        with nothing running writes its summary too. Then the run is retired."""
        fac = self.fac
        if run.part is None or run.row.summary:
            return
        if run.state is RunState.CLOSED:
            if not run.part.manager.run_complete():
                return
        elif run.state is not RunState.CANCELLED or run.part.manager.leases.by_engine():
            return
        if not _moves_done(run):
            return
        after = transition(run.state, RunEvent.SETTLED, run.row.input_closed)
        summary = self.summary(run, after)
        try:
            write_summary(Path(run.row.output_dir), summary)
        except OSError as exc:
            log.error("run %s: cannot write bcorch_summary.json in %s (will retry): %s",
                      run.row.run_id, run.row.output_dir, exc)
            return
        run.row.summary, run.row.state = summary, after
        fac.db.save(run.row)
        fac.fair.forget_run(run.row.run_id)
        log.info("run %s: %s; bcorch_summary.json written in %s", run.row.run_id, after.value,
                 run.row.output_dir)
        self.retire(run)
        fac.work_may_be_ready()   # held long polls may learn that nothing is left

    def retire(self, run: Run) -> None:
        """A settled run's part is closed and dropped: its row and summary answer for it."""
        part, run.part = run.part, None
        if part is not None:
            try:
                part.close()
            except Exception:  # noqa: BLE001 - its summary is written; the others go on
                log.exception("run %s: closing its database failed", run.row.run_id)
        self.watch_late(run)

    def watch_late(self, run: Run) -> None:
        """Files are late when changed after the summary file was: its mtime is on the
        filesystem's clock, as theirs are (the written_at inside it when it is gone)."""
        if run.state is not RunState.COMPLETE:
            return
        try:
            settled_at = os.stat(Path(run.row.output_dir) / SUMMARY_NAME).st_mtime
        except OSError:
            settled_at = float(run.row.summary.get("written_at") or 0.0)
        self.fac.late.watch(run.row.run_id, str(run.where.path), run.row.output_dir,
                            settled_at)

    def summary(self, run: Run, state: RunState) -> dict[str, Any]:
        st = run.part.manager.status() if run.part is not None else None
        files = st["files"] if st else {}
        summary: dict[str, Any] = {
            "run_id": run.row.run_id, "rel": run.row.rel, "state": state.value,
            "settings": run.row.settings,
            "files": files, "bytes": st["bytes"] if st else {},
            "progress": st["progress"] if st else dict(NO_PROGRESS),
            "reads": st["reads"] if st else ReadTotals().to_dict(),
            "files_done": files.get(FileState.DONE.value, 0),
            "files_quarantined": files.get(FileState.QUARANTINED.value, 0),
            "files_duplicate": files.get(FileState.DUPLICATE.value, 0),
            "gpu_s": round(self.fac.view.served_s(run), 3),
            "jobs": run.part.store.job_counts() if run.part is not None else {},
            "first_batch_at": run.row.first_batch_at, "last_batch_at": run.row.last_batch_at,
            "written_at": time.time(),
        }
        if state is RunState.CANCELLED:
            summary["files_not_basecalled"] = (files.get(FileState.PENDING.value, 0)
                                               + files.get(FileState.ASSIGNED.value, 0))
        return summary

    def add_settled(self, where: RunDir, output_dir: str, summary: dict[str, Any]) -> Run:
        """Found again with its summary written: shown from it, never opened or summarised
        again (which would lose its GPU time and batch times)."""
        fac = self.fac
        run_id = fac._unique_id(recorded_id(summary) or where.run_id)
        where = dataclasses.replace(where, run_id=run_id)
        settings = summary.get("settings") if isinstance(summary.get("settings"), dict) else {}
        row = RunRow(run_id, where.rel, RunState(summary["state"]), input_closed=True,
                     settings=settings, output_dir=output_dir, found_at=time.time(),
                     first_batch_at=number(summary.get("first_batch_at")),
                     last_batch_at=number(summary.get("last_batch_at")),
                     served_s=number(summary.get("gpu_s")) or 0.0, summary=summary)
        run = Run(row, where)
        try:
            run.settings = RunSettings.from_dict(settings, SUMMARY_NAME)
        except RunSettingsError:
            run.settings = None
        fac.db.add(row)
        fac._register(run)
        log.info("run %s (%s): found %s, its %s in %s: not opened", run_id, where.rel,
                 row.state.value, SUMMARY_NAME, output_dir)
        fac.identities.adopt_journal(run_id, output_dir)
        self.watch_late(run)
        return run


def _moves_done(run: Run) -> bool:
    """Every finished batch's outputs are where they belong. A move that failed (a full
    disk, `pass` not a directory) is retried by the run's reaper, so a run is not settled,
    and its part closed, before then."""
    assert run.part is not None
    run.part.manager.flush_moved()
    return not run.part.store.unfinished_moves()
