"""Run directories that change place under the watch root: moved, copied, or reached
under a second name (a symlink). The Facility asks this before it takes a directory as a
new run (docs/facility.md, "When the run directories misbehave").

- alias: a known run's real path reached through a symlink is not a second run;
- move: a MinKNOW run name (unique) of a known run whose directory is gone is that run,
  moved: it keeps its id, store, journal and output;
- copy: a second live directory with a known run's MinKNOW name is QUARANTINED naming it;
  once the original's directory goes (`mv` between filesystems), the copy is the move.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING

from .facility_run import COPY_OF, Run
from .facility_states import RunState
from .run_discovery import RunDir
from .run_part import RunPart

if TYPE_CHECKING:
    from .facility import Facility

log = logging.getLogger("bcmanager.facility")


class RunRelocation:
    def __init__(self, fac: "Facility"):
        self.fac = fac

    def is_alias(self, where: RunDir) -> bool:
        """A known run reached through a symlink (the run, its sample or its group linked
        under another name) is not a second run: its reads would be basecalled twice."""
        fac = self.fac
        same = fac._by_real.get(os.path.realpath(where.path))
        if same is None or same not in fac._runs:
            return False
        fac._aliases.add(where.rel)
        log.warning("%s is run %s (%s) under another name (a symlink): not a run of its own; "
                    "its reads are basecalled once, as run %s", where.rel, same,
                    fac._runs[same].row.rel, same)
        return True

    def moved_from(self, where: RunDir) -> Run | None:
        """The known run that `where` is, moved within the root: a MinKNOW run directory's
        name (start, device, flow cell, run id) is unique, so a known run of the same name
        whose own directory is gone has been moved (its sample or group renamed, say).
        Other names (`run1`) may well be used twice: such a directory is a new run."""
        if not where.start:
            return None
        for run in self.fac._runs.values():
            if run.where.name == where.name and run.row.rel != where.rel \
                    and not os.path.lexists(run.where.path):
                return run
        return None

    def copy_problem(self, where: RunDir) -> str:
        """Why a new directory is not served: a second live directory with a known run's
        MinKNOW name (unique) is a copy of it, whose reads would be basecalled twice."""
        if not where.start:
            return ""
        for run in self.fac._runs.values():
            if run.where.name == where.name and run.row.rel != where.rel \
                    and os.path.lexists(run.where.path):
                return (f"{COPY_OF}{run.row.run_id} ({run.row.rel}): the same MinKNOW "
                        f"run name; not basecalled again (`run resume` serves only files of its "
                        f"own)")
        return ""

    @staticmethod
    def is_copy(run: Run) -> bool:
        return run.state is RunState.QUARANTINED and run.row.reason.startswith(COPY_OF)

    def adopt_copies(self) -> None:
        """A run quarantined as a copy whose original's directory is now gone was the first
        half of a move (`mv` between filesystems copies, then deletes): the original moves
        to it, and the copy's own row goes."""
        fac = self.fac
        for copy in [r for r in fac._runs.values() if self.is_copy(r)]:
            original = next((r for r in fac._runs.values() if r is not copy
                             and r.where.name == copy.where.name and not self.is_copy(r)),
                            None)
            if original is None or os.path.lexists(original.where.path) \
                    or not os.path.isdir(copy.where.path):
                continue
            fac.db.delete(copy.row.run_id)
            fac.identities.forget_run(copy.row.run_id)
            del fac._runs[copy.row.run_id]
            del fac._by_rel[copy.row.rel]
            fac._by_real = {real: rid for real, rid in fac._by_real.items()
                            if rid != copy.row.run_id}
            self.move(original, copy.where)

    def move(self, run: Run, where: RunDir) -> None:
        """The run follows its directory: same id, store, journal and output (beside the
        pod5 folder, the output moved with it; its database file is renamed to match)."""
        fac = self.fac
        old_rel, old_db = run.row.rel, fac.db_of(run)
        part, run.part = run.part, None
        if part is not None:
            try:
                run.moved_under |= {job.job_id for job in part.store.live_jobs()}
            finally:
                _close_for_move(run, part)
        fac._by_real = {real: rid for real, rid in fac._by_real.items()
                        if rid != run.row.run_id}
        run.where = dataclasses.replace(where, run_id=run.row.run_id)
        fac._by_real[os.path.realpath(where.path)] = run.row.run_id
        run.row.rel = where.rel
        if fac.fcfg.output == "beside":
            run.row.output_dir = fac._output_dir(where.rel)
        rename_db(old_db, fac.db_of(run))
        fac.db.save(run.row)
        del fac._by_rel[old_rel]
        fac._by_rel[where.rel] = run.row.run_id
        run.unavailable = ""
        log.warning("run %s: its directory moved from %s to %s; it is the same run (nothing "
                    "done is done again)", run.row.run_id, old_rel, where.rel)
        if fac.settlement.settled(run):
            fac.settlement.watch_late(run)
        elif part is not None:
            fac._open_part(run)
        fac.work_may_be_ready()


def _close_for_move(run: Run, part: RunPart) -> None:
    try:
        part.close()
    except Exception:  # noqa: BLE001 - reopened from what was recorded
        log.exception("run %s: closing its database before the move failed", run.row.run_id)


def real_paths_first(found: list[RunDir]) -> list[RunDir]:
    """Runs found at their real path before those reached through a symlink, so that a run
    and a link to it, found together, are recorded under the real one."""
    return sorted(found, key=lambda w: (os.path.realpath(w.path) != os.path.abspath(w.path),
                                        w.rel))


def rename_db(old: str, new: str) -> None:
    """Move a closed SQLite store (and any -wal/-shm beside it) to its new name."""
    if old == new or not os.path.exists(old):
        return
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(old + suffix):
            os.replace(old + suffix, new + suffix)
