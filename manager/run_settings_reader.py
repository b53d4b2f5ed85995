"""Reading a run's settings, and reading them again: at discovery (from bcorch_run.json
when recorded, else the rules and its bcorch.toml), on `run resume` of a QUARANTINED run,
and when its bcorch.toml changes (stat'ed each scan tick).

Before the run's first batch a changed bcorch.toml is read again (a bad value quarantines
the run, as at discovery). After it only the priority is taken: the model, kit and format
stay, so a run is never a mix, and a warning says so."""
from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from bcorch.protocol import ProtocolError, validate_rel_path

from .facility_record import RECORD_NAME
from .facility_run import Run
from .facility_states import RunState
from .run_discovery import linked_pod5_problem
from .run_settings import RUN_FILE, RunSettings, RunSettingsError, run_file_stamp, settings_for
from .states import FileState

if TYPE_CHECKING:
    from .facility import Facility

log = logging.getLogger("bcmanager.facility")


class RunSettingsReader:
    def __init__(self, fac: "Facility"):
        self.fac = fac

    def read(self, run: Run, recorded: Any = None) -> str:
        """Check the run's path and read its settings into it (those recorded beside its
        output, when given and valid); the reason it cannot serve, else ""."""
        try:
            validate_rel_path(run.where.rel, "the run's path under the watch root")
            linked = linked_pod5_problem(run.where.path)
            if linked:
                return linked
            run.run_file = run_file_stamp(run.where.path)
            run.settings = _recorded_settings(run, recorded) or \
                settings_for(run.where, self.fac.fcfg)
        except (RunSettingsError, ProtocolError) as exc:
            return str(exc)
        run.row.settings = run.settings.to_dict()
        return ""

    def requalify(self, run: Run) -> None:
        """A QUARANTINED run asked to resume: read its settings again, open its part."""
        problem = self.read(run)
        if problem:
            run.row.reason = problem
            return
        run.row.state, run.row.reason = RunState.ACTIVE, ""
        if run.part is None:
            self.fac._open_part(run)

    def check_file(self, run: Run) -> None:
        """The run's bcorch.toml written after its settings were read (dropped in after
        MinKNOW made the directory, or edited): read again before the run's first batch,
        only its priority taken after."""
        fac = self.fac
        stamp = run_file_stamp(run.where.path)
        if stamp == run.run_file or run.state is RunState.QUARANTINED or run.settings is None:
            return
        before = run.settings
        where = f"{run.where.path / RUN_FILE}"
        if not _started(run):
            problem = self.read(run)
            if problem:
                fac._quarantine(run, problem)
            elif run.settings != before:
                fac.db.save(run.row)
                fac._write_record(run)
                log.info("run %s: %s changed before its first batch; now model %s, kit %s, "
                         "emit %s, priority %g", run.row.run_id, where, run.settings.model,
                         run.settings.kit or "none", run.settings.emit, run.settings.priority)
            return
        run.run_file = stamp
        try:
            wanted = settings_for(run.where, fac.fcfg)
        except RunSettingsError as exc:
            log.warning("run %s: %s changed after its first batch and cannot be used (%s); "
                        "the run keeps its settings", run.row.run_id, where, exc)
            return
        if wanted.priority != before.priority:
            run.settings = dataclasses.replace(before, priority=wanted.priority)
            run.row.settings = run.settings.to_dict()
            fac.db.save(run.row)
            fac._write_record(run)
            log.info("run %s: priority %g (from %s)", run.row.run_id, wanted.priority, where)
        if (wanted.model, wanted.kit, wanted.emit) != (before.model, before.kit, before.emit):
            log.warning("run %s: %s changed after its first batch: NOT applied, the run keeps "
                        "model %s, kit %s, emit %s (a run is basecalled with one model; for "
                        "other settings, cancel it and copy its POD5 files to a new run "
                        "directory)", run.row.run_id, where, before.model, before.kit or "none",
                        before.emit)


def _recorded_settings(run: Run, recorded: Any) -> RunSettings | None:
    if not isinstance(recorded, dict):
        return None
    try:
        settings = RunSettings.from_dict(recorded, f"{run.row.output_dir}/{RECORD_NAME}")
    except RunSettingsError as exc:
        log.warning("run %s: %s; its settings are read afresh", run.row.run_id, exc)
        return None
    log.info("run %s: settings recorded beside its output (%s) are kept",
             run.row.run_id, RECORD_NAME)
    return settings


def _started(run: Run) -> bool:
    """A batch of it was handed out (also before a new state directory: its store, rebuilt
    from its journal, has files settled)."""
    if run.row.first_batch_at is not None or run.part is None:
        return True
    files = run.part.store.snapshot().files
    return any(files[s.value] for s in (FileState.ASSIGNED, FileState.DONE,
                                        FileState.QUARANTINED))
