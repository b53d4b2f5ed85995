"""Facility mode: one manager serving every sequencing run found under a watch root.

Each run directory (manager.run_discovery) becomes one RunPart (manager.run_part), the
single-run machinery unchanged: its own store, journal, layout and scanner, so nothing
about losing or repeating files is new here. The Facility adds what is between runs:

- discovery: every scan tick looks for new runs, then scans each run that still takes
  files (one pass of its scanner each, stopped between chunks when the service stops);
- each run's state (manager.facility_states) and settings, kept in a small database of
  its own (manager.facility_db), so pause, cancel and settings survive a restart;
- assignment: FairShare.pick chooses among the runs that are serving and have PENDING
  files; that run's Manager.assign sizes and hands out the batch (if it has nothing after
  all, e.g. every PENDING file is backing off, the next run is tried). The answer carries
  the run's directories (relative to the shared roots) and its model, kit and format;
- keep-alives and completions go to the run that issued the job (job id -> run);
- a closed run whose files are all settled writes bcorch_summary.json and is COMPLETE.

A settled run (COMPLETE, or CANCELLED with its summary written) is retired: its part is
closed (moves acknowledged, store and journal closed) and dropped, so a facility that has
seen hundreds of runs holds files open only for the runs still being served. What is
still asked about it comes from its row and summary in the facility database (its view,
counts, GPU time); /files for it opens its store for that one query. A restart opens no
settled run at all. A POD5 that appears in a COMPLETE run's input afterwards is not
basecalled: manager.late_files logs it once. A QUARANTINED run has no part either;
`run resume` opens it.

The Facility coordinates; each other job is a module of its own:
- manager.facility_run: a Run as held here (row, directory, settings, part);
- manager.run_relocation: run directories moved, copied or reached through a symlink;
- manager.run_settlement: settling a run (its summary), retiring it, and a run found
  settled from its summary;
- manager.run_settings_reader: a run's settings read at discovery, on resume, and again
  when its bcorch.toml changes;
- manager.facility_identity: one index of POD5 file identities for all runs, so a file
  copied into a second run is DUPLICATE there;
- manager.facility_view: what the routes and metrics read (run views, the summed status,
  files in a state); the Facility's reading methods delegate to it.

Engines are told that nothing is left only when the facility is closed (`bcmanager
close-input`: no new runs) and every run is COMPLETE, CANCELLED or QUARANTINED.

Run directories misbehave (docs/facility.md, tests/test_facility_hostile.py): one whose
directory is missing gets no batches until it is back (the others go on); one moved within
the root (its MinKNOW name unique) stays the same run; one reached through a symlink is
not a second run; a bcorch.toml is read until the run's first batch, never after (one run,
one model); bcorch_run.json and bcorch_summary.json beside a run's output carry its id,
settings, cancel and settling over to a new state directory (manager.facility_record).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from bcorch.config import FacilityConfig, ManagerConfig
from bcorch.protocol import Batch, JobState as WireState, short_job_id

from .facility_db import FacilityDB, RunRow, default_facility_db
from .facility_identity import IdentityIndex
from .facility_record import RECORD_NAME, RunRecord, read_record, read_summary, write_record
from .facility_run import MISSING, Issued, Run, UnknownRun, number, recorded_id
from .facility_states import RunEvent, RunState, TransitionRefused, transition
from .facility_view import FacilityView, RunCounts
from .fair_share import Demand, FairShare
from .late_files import LateFiles
from .read_counts import ReadCount
from .run_discovery import RunDir, discover_runs, run_dir
from .run_part import RunPart, RunPlace
from .run_relocation import RunRelocation, real_paths_first
from .run_settings import RunSettings, RunSettingsError, run_file_stamp
from .run_settings_reader import RunSettingsReader
from .run_settlement import RunSettlement
from .service import Answer, refuse_simulated
from .states import FileState
from .statedir import default_db_path

__all__ = ["Facility", "Issued", "Run", "UnknownRun"]

log = logging.getLogger("bcmanager.facility")

OUTPUT_BESIDE = "basecalls"
DEFAULT_ESTIMATE_S = 60.0   # a batch's GPU seconds before the engine's pace is known
CLOSED_FLAG = "closed"
IDENTITIES_FLAG = "identities_indexed"   # settled runs' file identities are in the index


class Facility:
    """The App's backend in facility mode: the same methods as a Manager, over many runs."""

    def __init__(self, cfg: ManagerConfig, fcfg: FacilityConfig, *,
                 stop: Callable[[], bool] = lambda: False,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg, self.fcfg = cfg, fcfg
        self.root = os.path.abspath(cfg.watch_root)
        self.output_root = (self.root if fcfg.output == "beside"
                            else os.path.abspath(fcfg.output_root))
        self.interval = cfg.report_back_interval
        self.allow_simulated = cfg.allow_simulated
        self.watcher: Any = None   # the service's InputWatcher on the root (skips outputs)
        self._stop = stop
        self._clock = clock
        self.db_path = str(default_facility_db(self.root, cfg.db))
        self.db = FacilityDB(self.db_path)
        self.fair = FairShare(fcfg.switch_slack_s, clock)
        self.view = FacilityView(self)
        self.late = LateFiles(fcfg.late_watch_s)
        self.identities = IdentityIndex(self.db, self._rel_of, self._will_basecall,
                                        self._state_of)
        self.relocation = RunRelocation(self)
        self.settlement = RunSettlement(self)
        self.settings_reader = RunSettingsReader(self)
        self._lock = threading.RLock()
        self._runs: dict[str, Run] = {}
        self._by_rel: dict[str, str] = {}
        self._by_real: dict[str, str] = {}   # a run directory's real path -> its run id
        self._aliases: set[str] = set()      # rels that are a known run through a symlink
        self._jobs: dict[str, Issued] = {}
        self._records_due: set[str] = set()   # runs whose bcorch_run.json is behind
        self._record_lock = threading.Lock()   # one bcorch_run.json written at a time
        self._listeners: list[Callable[[], None]] = []
        self._engines_seen: dict[str, float] = {}
        self._closed = self.db.get_flag(CLOSED_FLAG) == "1"
        self._discovered = False   # "nothing left" needs one discovery and scan since start
        if cfg.input_closed:
            self.close_input("--input-closed")
        for row in self.db.runs():
            self._load(row)
        self._index_settled_runs()

    def _rel_of(self, run_id: str) -> str:
        run = self._runs.get(run_id)
        return run.row.rel if run is not None else "no longer known"

    def _state_of(self, run_id: str) -> RunState | None:
        run = self._runs.get(run_id)
        return run.state if run is not None else None

    def _will_basecall(self, run_id: str, path: str) -> bool:
        """Whether run_id may still basecall its file at path: the file is still there,
        and the run is not CANCELLED (a cancelled run only finishes the batches it had
        out)."""
        run = self._runs.get(run_id)
        if run is None or not os.path.lexists(run.where.path / path):
            return False
        if run.state is not RunState.CANCELLED:
            return True
        part = run.part
        try:
            return part is not None and part.store.state_of(path) is FileState.ASSIGNED
        except sqlite3.ProgrammingError:   # settled and closed meanwhile: nothing out
            return False

    def _index_settled_runs(self) -> None:
        """Once per facility database: the file identities of settled runs found before
        the index existed (their stores are not opened), from their journals."""
        if self.db.get_flag(IDENTITIES_FLAG) == "1":
            return
        for run in self._runs.values():
            if self._settled(run):
                self.identities.adopt_journal(run.row.run_id, run.row.output_dir)
        self.db.set_flag(IDENTITIES_FLAG, "1")

    # -- runs --------------------------------------------------------------------------

    def attach_watcher(self, watcher: Any) -> None:
        """The service's watcher on the root: the runs' output dirs are not watched."""
        self.watcher = watcher
        with self._lock:
            for run in self._runs.values():
                self._watch_run(run)

    def _watch_run(self, run: Run) -> None:
        """The watcher neither enters the run's output dir nor wakes for its batch dirs
        (whether its part is open or not)."""
        if self.watcher is None:
            return
        self.watcher.input_roots = self.watcher.input_roots | {str(run.where.path)}
        output_dir = run.row.output_dir
        if output_dir and output_dir.startswith(self.root + os.sep):
            self.watcher.skip = self.watcher.skip | {output_dir}

    def run_count(self) -> int:
        return len(self._runs)

    def _output_dir(self, rel: str) -> str:
        if self.fcfg.output == "beside":
            return os.path.join(self.root, rel, OUTPUT_BESIDE)
        return os.path.join(self.output_root, rel)

    def run_output_rel(self, rel: str) -> str:
        """The run's output directory relative to the shared output root."""
        return f"{rel}/{OUTPUT_BESIDE}" if self.fcfg.output == "beside" else rel

    def db_of(self, run: Run) -> str:
        """The SQLite file of the run's store."""
        return self._db_for(run.row.output_dir)

    def _db_for(self, output_dir: str) -> str:
        own = default_db_path(output_dir)
        return str(Path(self.cfg.db).parent / own.name) if self.cfg.db else str(own)

    def _load(self, row: RunRow) -> None:
        """A run known to the database (a restart): its part is opened unless quarantined."""
        run = Run(row, run_dir(self.root, row.rel, row.run_id))
        run.run_file = run_file_stamp(run.where.path)
        if row.settings:
            try:
                run.settings = RunSettings.from_dict(row.settings, "the facility database")
            except RunSettingsError as exc:
                row.state, row.reason = RunState.QUARANTINED, str(exc)
        self._register(run)
        if self._settled(run):
            self.settlement.watch_late(run)   # over and summarised: its database is not opened
        elif row.state is not RunState.QUARANTINED:
            self._open_part(run)

    def _register(self, run: Run) -> None:
        """Known by its id, its path under the root and its real path."""
        self._runs[run.row.run_id] = run
        self._by_rel[run.row.rel] = run.row.run_id
        self._by_real.setdefault(os.path.realpath(run.where.path), run.row.run_id)

    def _unique_id(self, proposed: str) -> str:
        if proposed not in self._runs:
            return proposed
        n = 2
        while True:
            tail = f"-{n}"
            candidate = proposed[:64 - len(tail)] + tail
            if candidate not in self._runs:
                return candidate
            n += 1

    def _add(self, where: RunDir) -> Run:
        """A run the facility database does not know. Its output may tell of an earlier
        life (a new state directory, manager.facility_record): then it keeps its id and
        settings, stays cancelled, and a settled one is not opened at all."""
        output_dir = self._output_dir(where.rel)
        summary = read_summary(output_dir)
        if summary is not None and summary.get("state") in (RunState.COMPLETE.value,
                                                              RunState.CANCELLED.value):
            return self.settlement.add_settled(where, output_dir, summary)
        record = read_record(output_dir) or {}
        run_id = self._unique_id(recorded_id(record) or where.run_id)
        where = dataclasses.replace(where, run_id=run_id)
        row = RunRow(run_id, where.rel, RunState.ACTIVE, output_dir=output_dir,
                     found_at=time.time())
        run = Run(row, where)
        problem = self.relocation.copy_problem(where) or self.settings_reader.read(run, record.get("settings"))
        if problem:
            row.state, row.reason = RunState.QUARANTINED, problem
        elif record.get("cancelled") is True:
            row.state, row.reason = RunState.CANCELLED, f"cancelled by command ({RECORD_NAME})"
        elif record.get("paused") is True:
            row.state = RunState.PAUSED
        if record:
            row.served_s = max(0.0, number(record.get("gpu_s")) or 0.0)
            row.first_batch_at = number(record.get("first_batch_at"))
            row.last_batch_at = number(record.get("last_batch_at"))
        self.db.add(row)
        self._register(run)
        if row.state is RunState.QUARANTINED:
            log.error("run %s (%s): QUARANTINED: %s; the other runs go on", run_id, where.rel,
                      row.reason)
        else:
            log.info("run %s (%s): found; model %s, kit %s, emit %s, priority %g; output %s",
                     run_id, where.rel, run.settings.model, run.settings.kit or "none",
                     run.settings.emit, run.settings.priority, row.output_dir)
            self._open_part(run)
        return run

    def _write_record(self, run: Run) -> None:
        """bcorch_run.json from the run's row as it is now. Writes are one at a time and
        each takes the row when it starts, so the last file written is never older than
        the last change (a pause cannot be overwritten by an earlier batch's accounting)."""
        with self._record_lock:
            row = run.row
            if run.settings is None:
                return
            write_record(row.output_dir, RunRecord(
                row.run_id, row.settings, cancelled=row.state is RunState.CANCELLED,
                paused=row.state is RunState.PAUSED, gpu_s=round(row.served_s, 3),
                first_batch_at=row.first_batch_at, last_batch_at=row.last_batch_at))

    def _open_part(self, run: Run) -> None:
        """Open the run's part, unless its directory is missing (an unmounted root at a
        restart, say): creating its output would re-create the run's directory on the mount
        point, and its files would be handed out though they are not there. A scan tick
        opens it once the directory is back."""
        if not self._present(run):
            return
        row = run.row
        place = RunPlace(str(run.where.path), row.output_dir, self._db_for(row.output_dir))
        try:
            part = RunPart(self.cfg, place, input_closed=row.input_closed,
                           on_final_summary=lambda path, rid=row.run_id:
                           self._final_summary(rid, path),
                           screen=lambda found, rid=row.run_id:
                           self.identities.screen(rid, found))
        except Exception as exc:  # noqa: BLE001 - one run's trouble must not stop the others
            log.exception("run %s: cannot open its database or directories", row.run_id)
            self._quarantine(run, f"cannot open the run's database or directories: "
                                  f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            return
        run.part = part
        self.identities.adopt_store(row.run_id, part.store.path)
        self._watch_run(run)
        part.manager.on_work_may_be_ready(self.work_may_be_ready)
        for job in part.store.live_jobs():   # a restart: the run's live jobs are its own
            self._jobs.setdefault(job.job_id, Issued(row.run_id, self._clock()))
            self.fair.started(job.job_id, row.run_id, job.engine_id, self._model(run),
                              DEFAULT_ESTIMATE_S)
        if part.manager.input_closed and not row.input_closed:
            self._closed_by_its_journal(run)
        self._write_record(run)

    def _closed_by_its_journal(self, run: Run) -> None:
        """The run's store, rebuilt from its journal (a new state directory: another host,
        or the old one lost), says its input was closed: so is the run, else it would stay
        ACTIVE for ever and the facility never finish."""
        run.row.input_closed = True
        try:
            after = transition(run.state, RunEvent.CLOSE, True)
        except TransitionRefused:
            after = run.state
        if after is not run.state:
            log.info("run %s: %s -> %s (its journal says its input was closed)",
                     run.row.run_id, run.state.value, after.value)
        run.row.state = after
        self.db.save(run.row)

    def _quarantine(self, run: Run, reason: str) -> None:
        run.row.state = transition(run.state, RunEvent.QUARANTINE, run.row.input_closed)
        run.row.reason = reason
        self.db.save(run.row)
        log.error("run %s (%s): QUARANTINED: %s; the other runs go on", run.row.run_id,
                  run.row.rel, reason)

    @staticmethod
    def _model(run: Run) -> str:
        return run.settings.model if run.settings else ""

    def _run(self, run_id: object) -> Run:
        if not isinstance(run_id, str) or not run_id:
            raise UnknownRun("parameter run is required (a run id from GET /runs)")
        run = self._runs.get(run_id)
        if run is None:
            raise UnknownRun(f"parameter run: no run {run_id[:80]!r} (see GET /runs)")
        return run

    # -- commands ----------------------------------------------------------------------

    def command(self, run_id: object, event: RunEvent) -> dict[str, Any]:
        """pause, resume, cancel or close a run; UnknownRun or TransitionRefused."""
        with self._lock:
            run = self._run(run_id)
            before = run.state
            try:
                after = transition(before, event, run.row.input_closed)
            except TransitionRefused as exc:
                raise TransitionRefused(f"run {run.row.run_id}: {exc}") from None
            if event is RunEvent.RESUME and before is RunState.QUARANTINED:
                self.settings_reader.requalify(run)
                if run.state is RunState.QUARANTINED:
                    raise TransitionRefused(f"run {run.row.run_id}: still QUARANTINED: "
                                            f"{run.row.reason}")
                after = transition(run.state, event, run.row.input_closed)
            if event is RunEvent.CLOSE:
                self._close_run_input(run, "by command")
            run.row.state = after
            if after is not RunState.QUARANTINED:
                run.row.reason = "" if after is not RunState.CANCELLED else "cancelled by command"
            self.db.save(run.row)
            if before is not after:
                log.info("run %s: %s -> %s (%s)", run.row.run_id, before.value, after.value,
                         event.value)
            if after is RunState.CANCELLED:
                self.fair.forget_run(run.row.run_id)
                if before is not after:   # copies made before the cancel: basecalled there
                    self.identities.release(run.row.run_id, [
                        (r.row.run_id, r.part.store) for r in self._runs.values()
                        if r.part is not None and r.state is not RunState.CANCELLED])
            if before is not after:
                self._write_record(run)
            self.settlement.check(run)
            answer = self.view.run_view(run)
        self.work_may_be_ready()
        return answer

    def _close_run_input(self, run: Run, why: str) -> None:
        run.row.input_closed = True
        if run.part is not None:
            run.part.manager.close_input(f"run {run.row.run_id} closed {why}")

    def _final_summary(self, run_id: str, path: str) -> None:
        with self._lock:
            run = self._runs[run_id]
            try:
                after = transition(run.state, RunEvent.CLOSE, run.row.input_closed)
            except TransitionRefused:
                return
            self._close_run_input(run, f"by MinKNOW's {path}")
            if after is not run.state:
                log.info("run %s: %s -> %s (MinKNOW wrote %s)", run_id, run.state.value,
                         after.value, path)
            run.row.state = after
            self.db.save(run.row)

    def close_input(self, why: str = "") -> Answer:
        """Close the facility: no new runs. Each run still closes on its own."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self.db.set_flag(CLOSED_FLAG, "1")
                log.info("facility closed%s: no new runs will be taken",
                         f" ({why})" if why else "")
        self.work_may_be_ready()
        return Answer(200, {"ok": True, "input_closed": True, "facility": True})

    @property
    def input_closed(self) -> bool:
        return self._closed

    # -- scanning and reaping ------------------------------------------------------------

    def scan_tick(self) -> None:
        """Find new runs (unless closed), then one scan of each run that takes files."""
        if not self._closed:
            known = set(self._by_rel) | self._aliases
            for where in real_paths_first(discover_runs(Path(self.root), known)):
                if self._stop():
                    return
                with self._lock:
                    if where.rel in self._by_rel or self.relocation.is_alias(where):
                        continue
                    moved = self.relocation.moved_from(where)
                    if moved is not None:
                        self.relocation.move(moved, where)
                    else:
                        self._add(where)
            with self._lock:
                self.relocation.adopt_copies()
        for run in list(self._runs.values()):
            if self._stop():
                return
            if run.part is None and self._needs_part(run):
                with self._lock:
                    if run.part is None and self._needs_part(run):
                        self._open_part(run)
            part = run.part
            if part is None or run.state.final or run.state is RunState.QUARANTINED:
                continue
            if not self._present(run):
                continue
            with self._lock:
                self.settings_reader.check_file(run)
            try:
                part.scan(self._stop)
            except Exception:  # noqa: BLE001
                if not part.closed:   # else it settled meanwhile: nothing to scan
                    log.exception("run %s: scan failed (will retry)", run.row.run_id)
        for run in list(self._runs.values()):
            with self._lock:
                self.settlement.check(run)
        self.late.check(self._stop)
        if not self._discovered:
            self._discovered = True
            self.work_may_be_ready()

    def _needs_part(self, run: Run) -> bool:
        """Its part was not opened (its directory was missing) and it is still served."""
        return run.state is not RunState.QUARANTINED and not self._settled(run)

    def _present(self, run: Run) -> bool:
        """Whether the run's directory is there; a run whose directory is gone (deleted,
        moved out of the root, unmounted) is said so once, gets no batches and is not
        scanned until it is back. Its files stay as they are: nothing is lost or redone."""
        here = os.path.isdir(run.where.path)
        with self._lock:
            if here and run.unavailable:
                log.info("run %s (%s): %s; serving it again", run.row.run_id, run.row.rel,
                         "its directory is back" if run.unavailable.startswith(MISSING)
                         else "its directory is there")
                run.unavailable = ""
                self.work_may_be_ready()
            if not here or run.out_while_missing:
                self._note_jobs_out_while_missing(run, here)
            if not here and not run.unavailable.startswith(MISSING):
                self._unavailable(run, f"{MISSING} ({run.where.path}): moved, deleted or "
                                       f"unmounted; its files wait until it is back, or "
                                       f"`run cancel` it")
        return here

    @staticmethod
    def _note_jobs_out_while_missing(run: Run, here: bool) -> None:
        """Its batches out while its directory is missing: their engines may report them
        FAILED after it is back (a flapping mount), which says nothing about the files.
        Once it is back, those that ended without a completion (expired) are forgotten."""
        part = run.part
        if part is None or part.closed:
            return
        try:
            live = {job.job_id for job in part.store.live_jobs()}
            run.out_while_missing = (run.out_while_missing & live) if here \
                else run.out_while_missing | live
        except sqlite3.ProgrammingError:
            if not part.closed:
                raise

    def _unavailable(self, run: Run, why: str) -> None:
        run.unavailable = why
        log.warning("run %s (%s): %s; the other runs go on", run.row.run_id, run.row.rel, why)

    def reap(self) -> int:
        expired = 0
        for run in list(self._runs.values()):
            part = run.part
            if part is None or run.state is RunState.QUARANTINED:
                continue
            try:
                expired += part.reap()
            except sqlite3.ProgrammingError:
                if not part.closed:   # else it settled meanwhile: nothing to reap
                    raise
        self._sweep_jobs()
        return expired

    def _sweep_jobs(self) -> None:
        """Jobs whose lease ended without a completion (expired) are charged their time."""
        with self._lock:
            for job_id, issued in list(self._jobs.items()):
                run = self._runs.get(issued.run_id)
                if run is None or run.part is None or \
                        run.part.manager.leases.engine_of(job_id) is None:
                    self._finished(job_id, issued)
        self._write_records_due()

    def _finished(self, job_id: str, issued: Issued) -> None:
        if self._jobs.pop(job_id, None) is None:
            return
        served = max(0.0, self._clock() - issued.started)
        self.fair.finished(job_id, served)
        run = self._runs.get(issued.run_id)
        if run is not None:
            run.row.served_s += served
            run.row.last_batch_at = time.time()
            self.db.save(run.row)
            self._records_due.add(run.row.run_id)

    def _write_records_due(self) -> None:
        """bcorch_run.json of the runs whose accounting changed, written outside the
        facility's lock (two fsyncs on a shared filesystem must not hold up assignment)."""
        while self._records_due:
            try:
                run = self._runs.get(self._records_due.pop())
            except KeyError:
                return
            if run is not None:
                self._write_record(run)

    _settled = staticmethod(RunSettlement.settled)

    # -- protocol ----------------------------------------------------------------------

    def on_work_may_be_ready(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def work_may_be_ready(self) -> None:
        for listener in self._listeners:
            listener()

    def nothing_left(self) -> bool:
        """The facility is closed and every run is COMPLETE, CANCELLED or QUARANTINED."""
        return (self._closed and self._discovered
                and all(r.state.final or r.state is RunState.QUARANTINED
                        for r in self._runs.values()))

    def _ready(self) -> list[Demand]:
        ready = []
        for run in self._runs.values():
            if not run.state.serving or run.part is None or run.settings is None \
                    or run.unavailable:
                continue
            if run.part.store.snapshot().files[FileState.PENDING.value] <= 0:
                continue
            ready.append(Demand(run.row.run_id, run.settings.priority, run.settings.model))
        return ready

    def assign(self, engine_id: str, wanted: int, simulated: bool = False) -> Answer:
        if simulated and not self.allow_simulated:
            return refuse_simulated(engine_id)
        with self._lock:
            self._engines_seen[engine_id] = time.time()
            ready = self._ready()
            while ready:
                demand = self.fair.pick(engine_id, ready)
                if demand is None:
                    break
                run = self._runs[demand.run_id]
                assert run.part is not None and run.settings is not None
                answer = run.part.manager.assign(engine_id, wanted, simulated)
                if answer.status == 503:   # its batch could not be prepared: withdrawn
                    if self._present(run):
                        self._unavailable(run, "its batches cannot be prepared until the "
                                               f"next scan: {answer.body.get('error', '')}")
                elif answer.status != 200:
                    return answer
                elif answer.body.get("batch_size"):
                    return self._issued(run, engine_id, answer)
                ready = [d for d in ready if d.run_id != demand.run_id]
            return Answer(200, Batch.empty_answer(engine_id, self.interval,
                                                  self.nothing_left()).to_dict())

    def _issued(self, run: Run, engine_id: str, answer: Answer) -> Answer:
        assert run.part is not None and run.settings is not None
        batch = Batch.from_answer(answer.body)
        pace = run.part.manager.paces.of(engine_id)
        work = sum(f.size for f in (run.part.store.job(batch.jobid).files
                                    if pace is not None else ()))
        estimate = pace.startup_s + pace.seconds(work) if pace is not None else DEFAULT_ESTIMATE_S
        self.fair.started(batch.jobid, run.row.run_id, engine_id, run.settings.model, estimate)
        self._jobs[batch.jobid] = Issued(run.row.run_id, self._clock())
        if run.row.first_batch_at is None:
            run.row.first_batch_at = time.time()
            self.db.save(run.row)
        return Answer(200, dataclasses.replace(
            batch, input_closed=self._closed, input_root=self.root, output_root=self.output_root,
            run_id=run.row.run_id, run_input_dir=run.row.rel,
            run_output_dir=os.path.relpath(run.row.output_dir, self.output_root),
            model=run.settings.model,
            kit=run.settings.kit, emit=run.settings.emit).to_dict())

    def _owner(self, job_id: str) -> Run | None:
        issued = self._jobs.get(job_id)
        if issued is not None:
            return self._runs.get(issued.run_id)
        with self._lock:   # a job finished before a restart: ask the open runs' stores
            for run in self._runs.values():
                if run.part is not None and run.part.store.job(job_id) is not None:
                    return run
        return None

    def keepalive(self, job_id: str, state: WireState, engine_id: str | None = None) -> Answer:
        run = self._owner(job_id)
        part = run.part if run is not None else None
        late = Answer(200, {"late": True})
        if part is None:
            log.info("job %s: keep-alive (%s) for a job no run knows: late",
                     short_job_id(job_id), state.value)
            return late
        with _retired_is_late(part, job_id, late) as answer:
            answer.value = part.manager.keepalive(job_id, state, engine_id=engine_id)
        return answer.value

    def complete(self, job_id: str, state: WireState, failed: dict[str, str], reason: str,
                 engine_id: str | None = None, simulated: bool = False,
                 rate: float | None = None, startup_s: float | None = None,
                 reads: ReadCount | None = None) -> Answer:
        run = self._owner(job_id)
        part = run.part if run is not None else None
        late = Answer(200, {"ok": False, "late": True})
        if run is None or part is None:
            log.info("job %s: %s for a job no run knows: late", short_job_id(job_id),
                     state.value)
            return late
        why = ("moved under it" if job_id in run.moved_under
               else "went missing while it was out" if job_id in run.out_while_missing
               else "is missing" if not os.path.isdir(run.where.path) else "")
        if state is WireState.FAILED and why:
            log.warning("job %s of run %s: FAILED while the run's directory %s: taken as "
                        "STOPPED, no attempt counted against its files (%s)",
                        short_job_id(job_id), run.row.run_id, why, reason[:200])
            state, failed = WireState.STOPPED, {}
        if state.final:
            run.moved_under.discard(job_id)
            run.out_while_missing.discard(job_id)
        with _retired_is_late(part, job_id, late) as answer:
            answer.value = part.manager.complete(job_id, state, failed, reason,
                                                 engine_id=engine_id, simulated=simulated,
                                                 rate=rate, startup_s=startup_s, reads=reads)
        if state is WireState.DONE and answer.value.body.get("ok"):
            with _retired_is_late(part, job_id, answer.value):
                self.identities.done(run.row.run_id, [fid for fid, _, _ in
                                                      part.store.done_files(job_id) if fid])
        with self._lock:
            issued = self._jobs.get(job_id)
            if issued is not None and part.manager.leases.engine_of(job_id) is None:
                self._finished(job_id, issued)
            self.settlement.check(run)
        self._write_records_due()
        return answer.value

    # -- reading (manager.facility_view) -----------------------------------------------

    def run_view(self, run: Run) -> dict[str, Any]:
        return self.view.run_view(run)

    def runs(self) -> list[dict[str, Any]]:
        return self.view.runs()

    def status(self, every_run: bool = False) -> dict[str, Any]:
        return self.view.status(every_run)

    def shown_ids(self) -> set[str]:
        return self.view.shown_ids()

    def files_in_state(self, state: FileState, limit: int, run_id: object = None) -> list[dict]:
        return self.view.files_in_state(state, limit, run_id)

    def counters(self) -> list[tuple[str, Any]]:
        return self.view.counters()

    def parts(self) -> list[tuple[str, RunPart]]:
        return self.view.parts()

    def run_counts(self) -> list[RunCounts]:
        return self.view.run_counts()

    def served(self) -> dict[str, float]:
        return self.view.served()

    def states(self) -> dict[str, str]:
        return self.view.states()

    def close(self) -> None:
        with self._lock:
            for run in self._runs.values():
                if run.part is not None:
                    try:
                        run.part.close()
                    except Exception:  # noqa: BLE001
                        log.exception("run %s: closing its database failed", run.row.run_id)
            self.db.close()


class _Result:
    def __init__(self, value: Answer):
        self.value = value


@contextlib.contextmanager
def _retired_is_late(part: RunPart, job_id: str, late: Answer) -> Iterator[_Result]:
    """A job's run retired while its message was on the way (its store closed under it):
    the message is late, as it would be a moment later."""
    result = _Result(late)
    try:
        yield result
    except sqlite3.ProgrammingError:
        if not part.closed:
            raise
        log.info("job %s: its run settled and was closed meanwhile: late", short_job_id(job_id))
        result.value = late
