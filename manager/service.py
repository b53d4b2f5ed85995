"""The manager's operations: store + filesystem layout + leases, under one lock.

Each operation (assign, keep-alive, completion, expiry) holds the lock from its
database transaction to the end of its filesystem moves, so the two never disagree
between operations, and a crash in between is repaired by recover() on restart.
The HTTP layer (manager.app) only parses, validates and calls these methods.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from bcorch.protocol import (CONFIG_REFUSED, MAX_BATCH_SIZE, Batch, JobState as WireState,
                             short_job_id)

from .batching import PaceBook, Sizing, size_batch

from .identity import Kind, examine
from .journal import Journal, JournalledFile, identity_of
from .layout import Layout
from .leases import Leases
from .read_counts import ReadCount
from .states import FileState, JobState
from . import store as store_module
from .store import Completion, Found, Job, Placed, Store

log = logging.getLogger("bcmanager")

THROUGHPUT_WINDOW_S = 300.0
DUPLICATES_SHOWN = 20

_FINAL = {WireState.DONE: JobState.DONE, WireState.FAILED: JobState.FAILED,
          WireState.STOPPED: JobState.STOPPED}

SIMULATION_REFUSED = ("manager.allow_simulated is false: this manager refuses simulated basecalls "
                      "(the engine's runner.kind is \"simulate\"; set it to dorado, or allow "
                      "simulation for a demo or a test)")


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]


def refuse_simulated(engine_id: str) -> Answer:
    """The answer to an assignwork from a simulated runner when manager.allow_simulated is
    false (a configuration error on the engine's side: it stops, never retries)."""
    log.error("engine %s: refused, its runner is simulated and manager.allow_simulated "
              "is false", engine_id)
    return Answer(CONFIG_REFUSED, {"error": SIMULATION_REFUSED})


@dataclass(frozen=True)
class InFlight:
    """A live job as the batch sizing sees it: whose, since when (clock), how much work."""

    engine_id: str
    since: float
    work: int


class Manager:
    def __init__(self, store: Store, layout: Layout, *, batch_size: int,
                 report_back_interval: float, input_closed: bool = False,
                 allow_simulated: bool = False, startup_share: float = 0.02,
                 clock: Callable[[], float] = time.monotonic, journal: Journal | None = None,
                 incomplete_grace_s: float = 600.0):
        self.store = store
        self.journal = journal
        self.incomplete_grace_s = incomplete_grace_s
        self.waiting_files: Callable[[], int] = lambda: 0   # the scanner's not-yet-ready files
        self._journalled: set[str] = set()   # DONE jobs journalled, moves not yet acknowledged
        self.allow_simulated = allow_simulated
        self.layout = layout
        self.batch_size = batch_size
        self.startup_share = startup_share
        self.paces = PaceBook()
        self._in_flight: dict[str, InFlight] = {}
        self.interval = report_back_interval
        self.leases = Leases(report_back_interval, clock)
        self._clock = clock
        self._lock = threading.RLock()
        self._started = clock()
        self._done_log: collections.deque[tuple[float, int, int]] = collections.deque()
        self._engines_seen: dict[str, float] = {}
        self._moved: list[str] = []   # settled jobs not yet acknowledged in the store
        self._work_listeners: list[Callable[[], None]] = []
        self._retries_checked_at = store_module.retry_clock()
        self._close_requested = input_closed
        self._input_closed = store.input_closed()
        self._input_scanned = False   # "nothing left" needs one whole scan since the start
        self._restored: list[str] = []   # live at recovery; their lease restarts when serving

    # -- lifecycle ---------------------------------------------------------------------

    def recover(self) -> None:
        """After a start: finish recorded moves, re-create live jobs' dirs, fresh leases
        (started again by leases_start_now() once the HTTP server answers)."""
        with self._lock:
            self.layout.create_roots()
            self._rebuild_from_journal()
            self._input_closed = self.store.input_closed()
            if self._close_requested:
                self.close_input("--input-closed")
            self._finish_moves()
            live = self.store.live_jobs()
            for job in live:
                self.layout.prepare(job)
                self.leases.grant(job.job_id, job.engine_id)
                self._restored.append(job.job_id)
                self._in_flight[job.job_id] = InFlight(job.engine_id, self._clock(),
                                                       sum(f.size for f in job.files))
            self._engines_seen.update(self.store.recent_engines())
            if live:
                log.info("restart: %d live jobs get a fresh lease of %.0f s: %s", len(live),
                         self.interval,
                         ", ".join(f"{short_job_id(j.job_id)}@{j.engine_id}" for j in live[:20]))

    def leases_start_now(self) -> None:
        """The restored jobs' leases run from now, when the server starts answering: the
        engines could not keep them alive before, and a slow start (a big journal, many
        runs of a facility to recover) must not eat the lease and have their batches
        redone. A keep-alive already taken only gets its deadline moved later."""
        with self._lock:
            restored, self._restored = self._restored, []
            for job_id in restored:
                self.leases.refresh(job_id)
        if restored:
            log.info("serving: the %d restored jobs' leases of %.0f s start now",
                     len(restored), self.interval)

    def _rebuild_from_journal(self) -> None:
        """A new (or lost) database learns from the journal what is already DONE."""
        if self.journal is None or not self.store.is_new() or not self.journal.has_records():
            return
        replay = self.journal.replay()
        done = self.store.rebuild(replay.jobs, replay.input_closed, replay.reads)
        self._journalled.update(replay.jobs)
        log.warning("new database: rebuilt from the journal %s: %d files DONE in %d jobs%s; "
                    "nothing finished is done again", self.journal.path, done, len(replay.jobs),
                    ", input closed" if replay.input_closed else "")
        self._finish_moves()  # the journalled jobs' merges first: they are known now
        orphans = self.layout.set_aside_unknown(lambda job_id: self.store.job(job_id) is not None)
        if orphans:
            log.warning("new database: %d jobs that were live when the database was lost are "
                        "unknown to it: their output is set aside (LATEOUTPUT_), their files "
                        "are basecalled again: %s", len(orphans),
                        ", ".join(short_job_id(j) for j in orphans[:20]))

    def flush_moved(self) -> None:
        """Acknowledge finished moves in one transaction (the reaper does it every tick).

        Until then a restart would redo them, which is harmless: settle() is idempotent.
        """
        with self._lock:
            moved, self._moved = self._moved, []
            self.store.mark_moved(*moved)
            self._journalled.difference_update(moved)

    def close(self) -> None:
        """Acknowledge finished moves, then close the store and the journal under the lock:
        an operation in another thread finishes first or finds them closed, never cut off
        between its transaction and its moves."""
        with self._lock:
            try:
                self.flush_moved()
            finally:
                self.store.close()
                if self.journal is not None:
                    self.journal.close()

    def _finish_moves(self) -> None:
        self.flush_moved()
        for job in self.store.unfinished_moves():
            self._settle_quietly(job)
        self.flush_moved()

    # -- protocol ----------------------------------------------------------------------

    @property
    def input_closed(self) -> bool:
        return self._input_closed

    def on_work_may_be_ready(self, listener: Callable[[], None]) -> None:
        """Call `listener` (in the changing thread) whenever an empty /assignwork might now
        get work or learn that nothing is left: files added or back to PENDING, a job
        finished, the input closed. Held long polls wait on it (manager.asgi)."""
        self._work_listeners.append(listener)

    def work_may_be_ready(self) -> None:
        """Tell the listeners; whoever adds files (the scan) calls it too."""
        for listener in self._work_listeners:
            listener()

    def close_input(self, why: str = "") -> Answer:
        with self._lock:
            if not self._input_closed:
                self.store.close_input()
                self._input_closed = True
                log.info("input closed%s: no more files will be added", f" ({why})" if why else "")
                if self.journal is not None:
                    try:
                        self.journal.record_closed()
                    except OSError as exc:
                        log.error("cannot record the closed input in the journal %s: %s",
                                  self.journal.path, exc)
        self.work_may_be_ready()
        return Answer(200, {"ok": True, "input_closed": True})

    def add_found(self, found: list[Found]) -> Placed:
        """Store files the scanner found ready, recognising moved files and copies."""
        root = self.layout.input_dir
        with self._lock:
            placed = self.store.add_found(found, lambda rel: os.path.lexists(root / rel))
        for old, new in placed.moved:
            log.info("file %s moved to %s (same POD5 file identifier): its state follows it",
                     old, new)
        for copy, original in placed.duplicates:
            log.warning("file %s is a copy of %s (same POD5 file identifier): DUPLICATE, "
                        "not basecalled again", copy, original)
        return placed

    def excuse(self, path: str, size: int, mtime: float | None) -> str | None:
        """Why a failure of this file should not count an attempt, or None.

        While the input is open, a file that changed since it was found, or that cannot
        be shown complete (no valid POD5 footer) and changed within incomplete_grace_s,
        is still being written: its failure says nothing about it. Nor does the failure
        of a file that is not there (a flapping mount): counted, it would be QUARANTINED
        and, back unchanged, never looked at again.
        """
        if self._input_closed:
            return None
        full = self.layout.input_dir / path
        try:
            st = os.stat(full)
        except OSError as exc:
            return (f"it cannot be reached ({exc.strerror or type(exc).__name__}): missing "
                    f"or unmounted")
        if st.st_size != size or (mtime is not None and st.st_mtime != mtime):
            return "it changed since it was found (still being written)"
        if examine(full).kind is Kind.COMPLETE:
            return None
        age = time.time() - st.st_mtime
        if age < self.incomplete_grace_s:
            return (f"it cannot be shown complete and changed {age:.0f} s ago "
                    f"(under manager.incomplete_grace_s {self.incomplete_grace_s:.0f} s)")
        return None

    def assign(self, engine_id: str, wanted: int, simulated: bool = False) -> Answer:
        if simulated and not self.allow_simulated:
            return refuse_simulated(engine_id)
        with self._lock:
            self._engines_seen[engine_id] = time.time()
            sizing = self._sizing(engine_id, wanted)
            job = self.store.assign(engine_id, sizing.files, sizing.work, sizing.nearest)
            if job is None:
                return Answer(200, Batch.empty_answer(engine_id, self.interval,
                                                      self.run_complete()).to_dict())
            try:
                self.layout.prepare(job)
            except OSError as exc:
                log.error("job %s engine %s: cannot create its directories, batch withdrawn: %s",
                          short_job_id(job.job_id), engine_id, exc)
                self.store.finish(job.job_id, JobState.STOPPED)
                self._settle_quietly(self.store.job(job.job_id))
                return Answer(503, {"error": f"cannot create the job's directories: {exc}"[:300]})
            self.leases.grant(job.job_id, engine_id)
            work = sum(f.size for f in job.files)
            self._in_flight[job.job_id] = InFlight(engine_id, self._clock(), work)
        log.info("job %s engine %s: assigned %d files, %d bytes (%s)", short_job_id(job.job_id),
                 engine_id, len(job.files), work, sizing.why)
        return Answer(200, Batch(
            jobid=job.job_id,
            job_input_dir=self.layout.assigned_dir(job).name,
            job_output_dir=self.layout.tmp_output_dir(job).name,
            bc_engine_id=engine_id,
            batch=tuple(f.link for f in job.files),
            report_back_interval=self.interval,
            input_closed=self._input_closed,
            input_root=os.path.abspath(self.layout.input_dir),
            output_root=os.path.abspath(self.layout.output_dir),
        ).to_dict())

    def _sizing(self, engine_id: str, wanted: int) -> Sizing:
        """How much this engine's next batch holds (manager.batching).

        An engine that asks for a file count and has never reported its pace (the
        original engine) gets that count, as before. One that leaves the size to the
        manager gets manager.batch_size files until its own or the fleet's pace is known.
        """
        pace = self.paces.own(engine_id)
        if pace is None and wanted:
            return Sizing(wanted)
        if pace is None:
            pace = self.paces.fleet()
        if pace is None:
            return Sizing(wanted or self.batch_size)
        closed = self._input_closed and self.waiting_files() == 0
        now = self._clock()
        pending = self.store.snapshot().bytes[FileState.PENDING.value] if closed else 0
        return size_batch(pace=pace, files_cap=wanted or MAX_BATCH_SIZE,
                          share=self.startup_share, closed=closed, now=now,
                          pending_work=pending, others_free_at=self._others_free_at(engine_id))

    def _others_free_at(self, engine_id: str) -> list[float]:
        """When each other active engine is expected to be free (the manager's clock)."""
        now, wall = self._clock(), time.time()
        busy: dict[str, float] = {}
        for job in self._in_flight.values():
            if job.engine_id == engine_id:
                continue
            pace = self.paces.of(job.engine_id)
            end = now if pace is None else job.since + pace.startup_s + pace.seconds(job.work)
            busy[job.engine_id] = max(busy.get(job.engine_id, now), end)
        idle = [now for e, seen in self._engines_seen.items()
                if e != engine_id and e not in busy and wall - seen < self.interval]
        return list(busy.values()) + idle

    def learn_pace(self, engine_id: str, rate: float | None, startup_s: float | None) -> None:
        """An engine's report of its rate (bytes/s of basecalling) and start-up per batch."""
        if rate is None or startup_s is None or rate <= 0:
            return
        with self._lock:
            pace = self.paces.record(engine_id, rate, startup_s)
        log.debug("engine %s: rate %.0f bytes/s, start-up %.2f s", engine_id, pace.rate,
                  pace.startup_s)

    def keepalive(self, job_id: str, state: WireState, engine_id: str | None = None) -> Answer:
        with self._lock:
            engine = self.leases.engine_of(job_id)
            if engine_id is not None and engine is not None and engine_id != engine:
                log.warning("job %s: keep-alive from engine %s, but engine %s holds it: "
                            "answered late", short_job_id(job_id), engine_id, engine)
                return Answer(200, {"late": True})
            alive = self.leases.refresh(job_id)
            if engine:
                self._engines_seen[engine] = time.time()
        if not alive:
            log.info("job %s: keep-alive (%s) for a lease that is not live: late",
                     short_job_id(job_id), state.value)
        return Answer(200, {"late": not alive})

    def _holder(self, job_id: str) -> str | None:
        engine = self.leases.engine_of(job_id)
        if engine is None:
            job = self.store.job(job_id)
            engine = job.engine_id if job is not None else None
        return engine

    def complete(self, job_id: str, state: WireState, failed: dict[str, str],
                 reason: str, engine_id: str | None = None, simulated: bool = False,
                 rate: float | None = None, startup_s: float | None = None,
                 reads: ReadCount | None = None) -> Answer:
        """A final report (rate and startup_s: the engine's pace, optional; reads: what a
        DONE batch wrote, optional, kept with the job). A request naming another engine than the holder is answered as
        for an unknown job (late), so it learns nothing; a simulated DONE or FAILED on a
        manager not started for simulation is refused and the batch is returned unharmed."""
        target = _FINAL[state]
        with self._lock:
            if engine_id is not None:
                holder = self._holder(job_id)
                if holder is not None and holder != engine_id:
                    log.warning("job %s: %s from engine %s, but engine %s holds it: answered "
                                "late", short_job_id(job_id), state.value, engine_id, holder)
                    return Answer(200, {"ok": False, "late": True})
            if simulated and not self.allow_simulated and target is not JobState.STOPPED:
                log.error("job %s: simulated %s refused (manager.allow_simulated is false): "
                          "the batch is returned as STOPPED", short_job_id(job_id), state.value)
                self._finish(job_id, WireState.STOPPED, {}, "simulated result refused")
                return Answer(CONFIG_REFUSED, {"error": SIMULATION_REFUSED})
            answer = self._finish(job_id, state, failed, reason, reads)
            if state is WireState.DONE and answer.body.get("ok"):
                self.learn_pace(self._holder(job_id) or engine_id or "", rate, startup_s)
            return answer

    def _finish(self, job_id: str, state: WireState, failed: dict[str, str],
                reason: str, reads: ReadCount | None = None) -> Answer:
        target = _FINAL[state]
        with self._lock:
            result: Completion = self.store.finish(job_id, target, failed, reason, self.excuse,
                                                   reads)
            job = result.job
            if job is None:
                log.info("job %s: %s for an unknown job: late", short_job_id(job_id), state.value)
                return Answer(200, {"ok": False, "late": True})
            self._engines_seen[job.engine_id] = time.time()
            if not result.changed:
                return self._repeat_answer(job, target)
            self.leases.drop(job_id)
            self._in_flight.pop(job_id, None)
            if result.files_done:
                self._done_log.append((self._clock(), result.files_done, result.bytes_done))
                while self._done_log[0][0] < self._clock() - THROUGHPUT_WINDOW_S:
                    self._done_log.popleft()
            if not self._journal_done(job):
                return self._unjournalled_answer(job)
            self._settle_quietly(job)
        log.info("job %s engine %s: %s (%d files done%s%s)", short_job_id(job_id),
                 job.engine_id, state.value,
                 result.files_done, f", {len(failed)} named failed" if failed else "",
                 f", {reads.passed} pass + {reads.failed} fail reads"
                 if reads is not None and target is JobState.DONE else "")
        self.work_may_be_ready()
        return Answer(200, {"ok": True})

    def _repeat_answer(self, job: Job, target: JobState) -> Answer:
        if job.state is JobState.EXPIRED:
            log.info("job %s engine %s: %s after its lease expired: late, output discarded",
                     short_job_id(job.job_id), job.engine_id, target.value)
            self._discard_late(job)
            return Answer(200, {"ok": False, "late": True})
        if job.state is target:
            if not self._journal_done(job):
                return self._unjournalled_answer(job)
            return Answer(200, {"ok": True})
        return Answer(409, {"error": f"job {short_job_id(job.job_id)} was already reported {job.state.value}, "
                                     f"not {target.value}"})

    def _journal_done(self, job: Job) -> bool:
        """Record a DONE job's files in the journal before anything else happens to it.

        False when the journal cannot be written: the completion is not acknowledged
        and the outputs are not merged (the reaper and the engine's retry try again).
        """
        if self.journal is None or job.state is not JobState.DONE or job.job_id in self._journalled:
            return True
        if not self.store.unfinished(job.job_id):
            return True   # journalled and merged long ago
        files = [JournalledFile(identity_of(fid, path), path, size)
                 for fid, path, size in self.store.done_files(job.job_id)]
        try:
            self.journal.record_done(job.job_id, job.engine_id, files,
                                     self.store.job_reads(job.job_id))
        except OSError as exc:
            log.error("job %s engine %s: cannot write the journal %s (%s): completion not "
                      "acknowledged, outputs not merged yet", short_job_id(job.job_id),
                      job.engine_id, self.journal.path, exc)
            return False
        self._journalled.add(job.job_id)
        return True

    @staticmethod
    def _unjournalled_answer(job: Job) -> Answer:
        return Answer(503, {"error": f"job {short_job_id(job.job_id)}: cannot record the "
                                     f"completion in the journal on the shared filesystem; retry"})

    def _discard_late(self, job: Job) -> None:
        try:
            self.layout.discard_output(job)
        except OSError as exc:
            log.error("job %s engine %s: cannot put aside late output: %s",
                      short_job_id(job.job_id), job.engine_id, exc)

    def _settle_quietly(self, job: Job | None) -> None:
        if job is None:
            return
        if not self._journal_done(job):
            return
        try:
            self.layout.settle(job)
        except OSError as exc:
            log.error("job %s engine %s: moving its %s outputs failed (retried by the reaper): %s",
                      short_job_id(job.job_id), job.engine_id, job.state.value, exc)
            return
        self._moved.append(job.job_id)

    def reap(self) -> int:
        """Expire leases past their deadline; retry failed moves. Returns jobs expired."""
        with self._lock:
            expired = self.leases.expired()
            for job_id in expired:
                engine = self.leases.engine_of(job_id)
                self.leases.drop(job_id)
                self._in_flight.pop(job_id, None)
                result = self.store.finish(job_id, JobState.EXPIRED)
                log.warning("job %s engine %s: no keep-alive for %.0f s: lease EXPIRED, "
                            "files back to PENDING", short_job_id(job_id), engine, self.interval)
                self._settle_quietly(result.job)
            self._finish_moves()
        if expired or self._retries_came_due():
            self.work_may_be_ready()
        return len(expired)

    def _retries_came_due(self) -> bool:
        """A failed file whose back-off ended since the last tick is work for held long polls
        (nothing else wakes them then)."""
        now = store_module.retry_clock()
        since, self._retries_checked_at = self._retries_checked_at, now
        return self.store.retries_due(since, now)

    # -- reading -----------------------------------------------------------------------

    def input_scanned(self) -> None:
        """The scanner finished a whole pass over INPUT_DIR since this manager started."""
        with self._lock:
            first, self._input_scanned = not self._input_scanned, True
        if first:
            self.work_may_be_ready()

    def run_complete(self) -> bool:
        """Nothing left, ever: the input is closed, a whole scan has seen every file (a
        restarted manager with a lost database learns of unfinished files only by scanning),
        and every file is DONE, QUARANTINED or a DUPLICATE."""
        counts = self.store.snapshot().files
        return (self._input_closed and self._input_scanned
                and counts[FileState.PENDING.value] == 0 and counts[FileState.ASSIGNED.value] == 0
                and self.waiting_files() == 0)

    def files_in_state(self, state: FileState, limit: int, run_id: object = None) -> list[dict]:
        """The first `limit` files in `state`. One run, unnamed: `run_id` (which names a run
        of a Facility) is not looked at."""
        return self.store.files_in_state(state, limit)

    def status(self, every_run: bool = False) -> dict[str, Any]:
        """every_run: as Facility.status takes it; one run is always shown whole."""
        counters = self.store.snapshot()
        now = self._clock()
        with self._lock:
            while self._done_log and self._done_log[0][0] < now - THROUGHPUT_WINDOW_S:
                self._done_log.popleft()
            window = min(THROUGHPUT_WINDOW_S, max(now - self._started, 1e-3))
            files_done = sum(f for _, f, _ in self._done_log)
            bytes_done = sum(b for _, _, b in self._done_log)
            in_flight = {e: sorted(short_job_id(j) for j in jobs)
                         for e, jobs in self.leases.by_engine().items()}
            seen = dict(self._engines_seen)
        files_per_s = files_done / window
        left = counters.files["PENDING"] + counters.files["ASSIGNED"]
        copies = FileState.DUPLICATE.value   # not work: shown, never counted as progress
        total_files = sum(n for state, n in counters.files.items() if state != copies)
        total_bytes = sum(n for state, n in counters.bytes.items() if state != copies)
        duplicates = (self.store.files_in_state(FileState.DUPLICATE, DUPLICATES_SHOWN)
                      if counters.files[copies] else [])
        return {
            "files": counters.files,
            "bytes": counters.bytes,
            "progress": {
                "files_done": counters.files["DONE"], "files_total": total_files,
                "bytes_done": counters.bytes["DONE"], "bytes_total": total_bytes,
            },
            "reads": self.store.read_totals().to_dict(),
            "jobs_in_flight": {e: len(j) for e, j in in_flight.items()},
            "jobs": in_flight,
            "engines": {e: {"last_seen": t, "jobs_in_flight": len(in_flight.get(e, ()))}
                        for e, t in sorted(seen.items())},
            "throughput": {"window_s": round(window, 1), "files_per_s": files_per_s,
                           "bytes_per_s": bytes_done / window},
            "eta_s": (left / files_per_s) if files_per_s > 0 else None,
            "input_closed": self._input_closed,
            "complete": self.run_complete(),
            "report_back_interval": self.interval,
            "duplicates": [{"path": d["path"], "reason": d["reason"]} for d in duplicates],
            "files_waiting": self.waiting_files(),
            "paces": self.paces.as_dict(),
        }
