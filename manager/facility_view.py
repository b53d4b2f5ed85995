"""The read side of facility mode: what /runs, /status, /files and the metrics show.

A FacilityView reads a Facility (manager.facility) and changes nothing: each run's view
(its state, settings, counts and progress, from its part while it serves and from its
summary once final), the facility-wide status summed over runs, files in a state, and the
per-run figures the metrics collect. The runs' own status is read outside the facility
lock; only the list of runs and the facility's own fields are read under it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .facility_states import RunState
from .service import DUPLICATES_SHOWN
from .states import FileState

if TYPE_CHECKING:
    from .facility import Facility, Run
    from .run_part import RunPart

NO_PROGRESS = {"files_done": 0, "files_total": 0, "bytes_done": 0, "bytes_total": 0}


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
        st = run.part.manager.status() if run.part is not None and not summary else None
        settings = run.row.settings or {}
        counts = st or summary or {}
        files = counts.get("files", {})
        return {
            "run_id": run.row.run_id, "rel": run.row.rel, "state": run.state.value,
            "reason": run.row.reason, "priority": settings.get("priority"),
            "model": settings.get("model"), "kit": settings.get("kit"),
            "emit": settings.get("emit"), "files": files,
            "progress": counts.get("progress", dict(NO_PROGRESS)),
            "eta_s": st["eta_s"] if st and run.state.serving else None,
            "input_closed": run.row.input_closed, "output_dir": run.row.output_dir,
            "served_s": round(self.served_s(run), 3),
            "files_not_basecalled": (files.get("PENDING", 0) + files.get("ASSIGNED", 0)
                                     if run.state is RunState.CANCELLED else 0),
            "_status": st,
            "_counts": counts,
        }

    def _all_runs(self) -> list[Run]:
        with self.facility._lock:
            return list(self.facility._runs.values())

    def runs(self) -> list[dict[str, Any]]:
        views = [self.run_view(r) for r in self._all_runs()]   # not under the facility lock
        for v in views:
            v.pop("_status")
            v.pop("_counts")
        return views

    def status(self) -> dict[str, Any]:
        fac = self.facility
        views = [self.run_view(r) for r in self._all_runs()]
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
            "runs": views,
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
            if run.part is None or len(out) >= limit:
                continue
            for f in run.part.store.files_in_state(state, limit - len(out)):
                out.append({**f, "run": run.row.run_id})
        return out

    def counters(self) -> list[tuple[str, Any]]:
        """(run_id, the run's store counters) for the metrics."""
        with self.facility._lock:
            return [(r.row.run_id, r.part.store.snapshot())
                    for r in self.facility._runs.values() if r.part is not None]

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
