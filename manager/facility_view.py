"""The read side of facility mode: what /runs, /status, /files and the metrics show.

A FacilityView reads a Facility (manager.facility) and changes nothing: each run's view
(its state, settings, counts and progress, from its part while it serves and from its
summary once final), the facility-wide status summed over runs, files in a state, and the
per-run figures the metrics collect. The runs' own status is read outside the facility
lock; only the list of runs and the facility's own fields are read under it.

A settled run has no part (the facility closed it): its figures come from its summary,
and its files in a state from its store, opened for that one query. A part read outside
the lock may be closed under the reader (the run settled meanwhile); the reader then
takes the summary, as it would a moment later.

/status and the per-run metric series leave out runs settled longer than
facility.shown_settled_s ago (their summary's written_at, wall clock), so what a facility
that runs for months answers grows with its recent runs, not with every run it has found;
/runs, /files and /status?runs=all still list them, and the facility-wide totals count them.
"""
from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from .facility_states import RunState
from .read_counts import ReadTotals
from .service import DUPLICATES_SHOWN
from .states import FileState
from .store import Counters, Store

if TYPE_CHECKING:
    from .facility import Facility, Run
    from .run_part import RunPart

NO_PROGRESS = {"files_done": 0, "files_total": 0, "bytes_done": 0, "bytes_total": 0}

T = TypeVar("T")


@dataclass
class RunCounts:
    """What the metrics show of one run: from its part while open, else its summary."""

    run_id: str
    files: dict[str, int]
    bytes: dict[str, int]
    jobs: dict[str, int]
    leases: dict[str, int] = field(default_factory=dict)   # engine -> live jobs
    reads: ReadTotals = field(default_factory=ReadTotals)


def _from_part(part: RunPart | None, read: Callable[[RunPart], T]) -> T | None:
    """read(part), or None when there is no part or it was closed meanwhile."""
    if part is None:
        return None
    try:
        return read(part)
    except sqlite3.ProgrammingError:
        if part.closed:
            return None
        raise


def _reads_of(counts: dict[str, Any]) -> ReadTotals:
    """A run's read totals from its status or summary; a summary written before reads were
    counted has none: its DONE batches count as unknown."""
    totals = ReadTotals.from_dict(counts.get("reads"))
    if totals is None:
        jobs = counts.get("jobs") or {}
        done = jobs.get("DONE", 0) if isinstance(jobs.get("DONE", 0), int) else 0
        totals = ReadTotals(jobs_done=done)
    return totals


def _summary_counters(summary: dict[str, Any]) -> Counters:
    counters = Counters()
    for state, n in (summary.get("files") or {}).items():
        counters.files[state] = n
    for state, n in (summary.get("bytes") or {}).items():
        counters.bytes[state] = n
    return counters


class FacilityView:
    def __init__(self, facility: Facility):
        self.facility = facility

    def served_s(self, run: Run) -> float:
        """GPU seconds: finished batches (recorded) plus those running now."""
        fac = self.facility
        running = sum(max(0.0, fac._clock() - i.started) for i in fac._jobs.values()
                      if i.run_id == run.row.run_id)
        return run.row.served_s + running

    def run_view(self, run: Run) -> dict[str, Any]:
        """The RUN object of /runs and /status; "_counts" and "_status" are for status()."""
        summary = run.row.summary if run.state.final else {}
        st = _from_part(run.part, lambda p: p.manager.status()) if not summary else None
        if st is None and not summary and run.state.final:
            summary = run.row.summary   # it settled while being read
        settings = run.row.settings or {}
        counts = st or summary or {}
        files = counts.get("files", {})
        return {
            "run_id": run.row.run_id, "rel": run.row.rel, "state": run.state.value,
            "reason": run.row.reason or run.unavailable, "priority": settings.get("priority"),
            "model": settings.get("model"), "kit": settings.get("kit"),
            "emit": settings.get("emit"), "files": files,
            "progress": counts.get("progress", dict(NO_PROGRESS)),
            "reads": _reads_of(counts).to_dict(),
            "eta_s": st["eta_s"] if st and run.state.serving else None,
            "input_closed": run.row.input_closed, "output_dir": run.row.output_dir,
            "served_s": round(self.served_s(run), 3),
            "files_not_basecalled": (files.get("PENDING", 0) + files.get("ASSIGNED", 0)
                                     if run.state is RunState.CANCELLED else 0),
            "_status": st,
            "_counts": counts,
        }

    def shown(self, run: Run) -> bool:
        """Listed in /status and the per-run metrics: not settled, or settled recently."""
        summary = run.row.summary
        if not (run.state.final and summary):
            return True
        settled_at = summary.get("written_at")
        if not isinstance(settled_at, (int, float)):
            return True
        return time.time() - settled_at < self.facility.fcfg.shown_settled_s

    def shown_ids(self) -> set[str]:
        return {r.row.run_id for r in self._all_runs() if self.shown(r)}

    def _all_runs(self) -> list[Run]:
        with self.facility._lock:
            return list(self.facility._runs.values())

    def runs(self) -> list[dict[str, Any]]:
        views = [self.run_view(r) for r in self._all_runs()]   # not under the facility lock
        for v in views:
            v.pop("_status")
            v.pop("_counts")
        return views

    def status(self, every_run: bool = False) -> dict[str, Any]:
        """The facility's status; its "runs" leave out those settled longer than
        facility.shown_settled_s ago unless every_run (the totals count them all)."""
        fac = self.facility
        runs = self._all_runs()
        views = [self.run_view(r) for r in runs]
        with fac._lock:
            seen = dict(fac._engines_seen)
            nothing_left = fac.nothing_left()
        parts = [v.pop("_status") for v in views]
        parts = [p for p in parts if p is not None]
        counts = [v.pop("_counts") for v in views]
        states = [s.value for s in FileState]
        files = {s: sum(c.get("files", {}).get(s, 0) for c in counts) for s in states}
        size = {s: sum(c.get("bytes", {}).get(s, 0) for c in counts) for s in states}
        progress = {k: sum(c.get("progress", NO_PROGRESS)[k] for c in counts)
                    for k in NO_PROGRESS}
        jobs: dict[str, list[str]] = {}
        for p in parts:
            for engine, ids in p["jobs"].items():
                jobs.setdefault(engine, []).extend(ids)
        for p in parts:
            for engine, info in p["engines"].items():
                seen[engine] = max(seen.get(engine, 0.0), info["last_seen"])
        files_per_s = sum(p["throughput"]["files_per_s"] for p in parts)
        bytes_per_s = sum(p["throughput"]["bytes_per_s"] for p in parts)
        window = max((p["throughput"]["window_s"] for p in parts), default=0.0)
        left = files["PENDING"] + files["ASSIGNED"]
        switches = fac.fair.switches()
        return {
            "files": files, "bytes": size, "progress": progress,
            "reads": ReadTotals.summed(ReadTotals.from_dict(v["reads"]) or ReadTotals()
                                       for v in views).to_dict(),
            "jobs_in_flight": {e: len(ids) for e, ids in jobs.items()},
            "jobs": {e: sorted(ids) for e, ids in jobs.items()},
            "engines": {e: {"last_seen": t, "jobs_in_flight": len(jobs.get(e, ()))}
                        for e, t in sorted(seen.items())},
            "throughput": {"window_s": window, "files_per_s": files_per_s,
                           "bytes_per_s": bytes_per_s},
            "eta_s": (left / files_per_s) if files_per_s > 0 else None,
            "input_closed": fac._closed,
            "complete": nothing_left,
            "report_back_interval": fac.interval,
            "duplicates": [d for p in parts for d in p["duplicates"]][:DUPLICATES_SHOWN],
            "files_waiting": sum(p["files_waiting"] for p in parts),
            "paces": {},
            "runs": [v for r, v in zip(runs, views) if every_run or self.shown(r)],
            "runs_not_shown": 0 if every_run else sum(not self.shown(r) for r in runs),
            "facility": {"root": fac.root, "output_root": fac.output_root,
                         "output": fac.fcfg.output, "closed": fac._closed,
                         "model_switches": switches,
                         "model_switches_total": sum(switches.values()),
                         "model_switches_per_hour": round(fac.fair.switches_per_hour(), 3)},
        }

    def files_in_state(self, state: FileState, limit: int, run_id: object = None) -> list[dict]:
        fac = self.facility
        with fac._lock:
            runs = [fac._run(run_id)] if run_id is not None else list(fac._runs.values())
        out: list[dict] = []
        for run in runs:
            if len(out) >= limit:
                break
            wanted = limit - len(out)
            found = _from_part(run.part, lambda p: p.store.files_in_state(state, wanted))
            if found is None and fac._settled(run):
                found = self._settled_files(run, state, wanted)
            out.extend({**f, "run": run.row.run_id} for f in found or ())
        return out

    def _settled_files(self, run: Run, state: FileState, limit: int) -> list[dict]:
        """A settled run's files in a state: its store opened for this query alone (not at
        all when its summary counts none, or its database is gone)."""
        if not (run.row.summary.get("files") or {}).get(state.value):
            return []
        path = self.facility.db_of(run)
        if not os.path.exists(path):
            return []
        store = Store(path, self.facility.cfg.max_attempts)
        try:
            return store.files_in_state(state, limit)
        finally:
            store.close()

    def counters(self) -> list[tuple[str, Counters]]:
        """(run_id, the run's file counters): its store's, or its summary's once settled."""
        with self.facility._lock:
            runs = list(self.facility._runs.values())
        out = []
        for run in runs:
            counters = _from_part(run.part, lambda p: p.store.snapshot())
            if counters is None and run.row.summary:
                counters = _summary_counters(run.row.summary)
            if counters is not None:
                out.append((run.row.run_id, counters))
        return out

    def run_counts(self) -> list[RunCounts]:
        """Each run's files, bytes, jobs and live leases for the metrics; a run neither open
        nor summarised (QUARANTINED before it took files) has none."""
        with self.facility._lock:
            runs = list(self.facility._runs.values())
        out = []
        for run in runs:
            counts = _from_part(run.part, _part_counts)
            if counts is None and run.row.summary:
                counters = _summary_counters(run.row.summary)
                counts = RunCounts("", counters.files, counters.bytes,
                                   dict(run.row.summary.get("jobs") or {}),
                                   reads=_reads_of(run.row.summary))
            if counts is not None:
                counts.run_id = run.row.run_id
                out.append(counts)
        return out

    def parts(self) -> list[tuple[str, RunPart]]:
        with self.facility._lock:
            return [(r.row.run_id, r.part) for r in self.facility._runs.values()
                    if r.part is not None]

    def served(self) -> dict[str, float]:
        """GPU seconds served to each run (finished batches and those running now)."""
        with self.facility._lock:
            return {r.row.run_id: self.served_s(r) for r in self.facility._runs.values()}

    def states(self) -> dict[str, str]:
        with self.facility._lock:
            return {r.row.run_id: r.state.value for r in self.facility._runs.values()}


def _part_counts(part: RunPart) -> RunCounts:
    counters = part.store.snapshot()
    leases = {engine: len(ids) for engine, ids in part.manager.leases.by_engine().items()}
    return RunCounts("", counters.files, counters.bytes, part.store.job_counts(), leases,
                     part.store.read_totals())
