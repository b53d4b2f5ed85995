"""POD5 files that appear in a COMPLETE run's input after its summary was written.

A COMPLETE run of a facility is closed (manager.facility): its part, scanner included, is
gone, and nothing new in its directory is basecalled. MinKNOW never writes there once it
has written its final summary, so a new file means someone copied it in by hand; it is
not taken silently, nor dropped silently: it is logged once per run, naming the file.

Cheap enough for hundreds of settled runs: each check stats the run's directories (not
its files) and lists only a directory whose mtime changed; a file counts as late when
its ctime (which a rename into place also sets) is after the summary was written.

A run is watched only for facility.late_watch_s after it settled (7 days by default), so a
tick looks at the runs settled that recently, not at every run the facility has ever
seen. Its age is on the wall clock, as the summary's mtime is: it holds across restarts.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .layout import OWN_INPUT_PREFIXES

log = logging.getLogger("bcmanager.facility")


@dataclass
class _Watched:
    input_dir: str
    skip: str                  # the run's output directory, when it is inside its input
    settled_at: float          # wall time the summary was written
    dirs: dict[str, int] = field(default_factory=dict)   # directory -> st_mtime_ns seen
    walked: bool = False


class LateFiles:
    """check() once per scan tick; a run is dropped once it has been reported, or once
    watch_s have passed since it settled."""

    def __init__(self, watch_s: float, clock: Callable[[], float] = time.time) -> None:
        self.watch_s = watch_s
        self._clock = clock
        self._runs: dict[str, _Watched] = {}
        self._lock = threading.Lock()   # watch() comes from a request's thread

    def _expired(self, settled_at: float) -> bool:
        return self.watch_s <= 0 or self._clock() - settled_at >= self.watch_s

    def watch(self, run_id: str, input_dir: str, output_dir: str, settled_at: float) -> None:
        """Watch the run's input (again, from scratch, when it was moved), unless it
        settled longer than watch_s ago."""
        input_dir, output_dir = os.path.abspath(input_dir), os.path.abspath(output_dir)
        with self._lock:
            if self._expired(settled_at):
                self._runs.pop(run_id, None)
                return
            known = self._runs.get(run_id)
            if known is None or known.input_dir != input_dir:
                self._runs[run_id] = _Watched(input_dir, output_dir, settled_at)

    def check(self, stop: Callable[[], bool] = lambda: False) -> dict[str, str]:
        """Run id -> the first late file found (input-relative), each logged once."""
        found: dict[str, str] = {}
        with self._lock:
            for run_id in [r for r, w in self._runs.items() if self._expired(w.settled_at)]:
                del self._runs[run_id]
            runs = list(self._runs.items())
        for run_id, watched in runs:
            if stop():
                break
            late = _first_late(watched)
            if late is None:
                continue
            found[run_id] = late
            with self._lock:
                self._runs.pop(run_id, None)
            log.warning("run %s is COMPLETE and its summary written: %s appeared in its input "
                        "afterwards and will NOT be basecalled (put it in a new run directory); "
                        "said once", run_id, late)
        return found


def _first_late(w: _Watched) -> str | None:
    if not w.walked:
        w.walked = True
        return _walk(w, w.input_dir)
    for directory, seen in list(w.dirs.items()):
        try:
            now = os.stat(directory).st_mtime_ns
        except OSError:
            w.dirs.pop(directory, None)
            continue
        if now != seen:
            w.dirs[directory] = now
            late = _walk(w, directory)
            if late is not None:
                return late
    return None


def _walk(w: _Watched, top: str) -> str | None:
    """Record the mtime of top and the directories below it; the first late *.pod5 in a
    directory changed since the run settled."""
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            st = os.stat(directory)
            with os.scandir(directory) as entries:
                listed = list(entries)
        except OSError:
            continue
        w.dirs[directory] = st.st_mtime_ns
        changed = st.st_mtime_ns / 1e9 >= w.settled_at
        for entry in listed:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.path != w.skip and not (directory == w.input_dir and
                                                     entry.name.startswith(OWN_INPUT_PREFIXES)):
                        if entry.path not in w.dirs:
                            stack.append(entry.path)
                    continue
                if changed and entry.name.endswith(".pod5") and \
                        entry.stat(follow_symlinks=False).st_ctime >= w.settled_at:
                    return os.path.relpath(entry.path, w.input_dir)
            except OSError:
                continue
    return None
