"""Incremental recursive scan of INPUT_DIR for *.pod5 files, and when each is ready.

Known paths are kept in memory, so a rescan costs one os.scandir walk and a set
lookup per file; only new files are stat()ed and examined. The manager's own
ASSIGNED_*/FAILED_* dirs (symlinks to inputs) are never entered, nor are symlinked
directories (no loops, no counting a file twice).

Readiness comes from the file itself (manager.identity): a POD5 with a valid footer
is complete and taken at once, with its file identifier. A POD5 without one is still
being written: it waits, re-examined only when its size or mtime changes, and is
QUARANTINED only once it has stayed unchanged for incomplete_grace_s (MinKNOW pauses
writing for minutes during mux scans) or when the input is closed. A file that cannot
be checked (not POD5-framed) falls back to the settle timer: ready once unmodified
for settle_s. QUARANTINED files are watched: one that changes is examined again.
A `final_summary_*.txt` anywhere in the tree (MinKNOW writes it when sequencing ends)
is reported to on_final_summary.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .identity import Examined, Kind, examine
from .layout import OWN_INPUT_PREFIXES
from .states import FileState
from .store import Found

log = logging.getLogger("bcmanager.scanner")

SUFFIX = ".pod5"
FINAL_SUMMARY = ("final_summary_", ".txt")


def walk_candidates(root: str | Path, known: set[str], watched: dict[str, Any],
                    skip: tuple[str, ...] = (),
                    summaries: list[str] | None = None) -> Iterator[tuple[str, int, float]]:
    """Yield (path relative to root, size, mtime) of every *.pod5 not in known, or in watched.

    summaries, when given, collects the paths of final_summary_*.txt files seen.
    """
    skip_set = {os.path.abspath(s) for s in skip}
    stack: list[tuple[str, str]] = [(os.path.abspath(root), "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            entries = os.scandir(directory)
        except OSError as exc:
            log.warning("scan: cannot read %s: %s", directory, exc)
            continue
        with entries:
            for entry in entries:
                name = entry.name
                if name.endswith(SUFFIX):
                    rel = prefix + name
                    if rel in known and rel not in watched:
                        continue
                    try:
                        st = entry.stat() if entry.is_file() else None
                    except OSError:
                        continue  # vanished between listing and stat
                    if st is not None:
                        yield rel, st.st_size, st.st_mtime
                        continue
                elif summaries is not None and name.startswith(FINAL_SUMMARY[0]) \
                        and name.endswith(FINAL_SUMMARY[1]):
                    summaries.append(prefix + name)
                    continue
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if not is_dir:
                    continue
                if not prefix and name.startswith(OWN_INPUT_PREFIXES):
                    continue
                if skip_set and entry.path in skip_set:
                    continue
                stack.append((entry.path, prefix + name + "/"))


@dataclass
class _Waiting:
    size: int
    mtime: float
    since: float          # monotonic time it was last seen to change
    examined: Examined


class Scanner:
    """Finds files that are ready and hands them to place(), in large chunks.

    place(list[Found]) stores them and returns either a count or a store.Placed (which
    also tells of moved files, so the known paths follow them).
    """

    def __init__(self, root: str | Path, settle_s: float, place: Callable[[list[Found]], Any],
                 known: set[str], skip: tuple[str, ...] = (), chunk: int = 50_000, *,
                 grace_s: float = 600.0, quarantined: Callable[[], dict] = dict,
                 input_closed: Callable[[], bool] = lambda: False,
                 on_final_summary: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.root = Path(root)
        self.settle_s = settle_s
        self.grace_s = grace_s
        self._place = place
        self.known = known
        self.skip = skip
        self.chunk = chunk
        self._quarantined = quarantined
        self._input_closed = input_closed
        self._on_final_summary = on_final_summary
        self._clock = clock
        self.waiting: dict[str, _Waiting] = {}

    def scan_once(self, stop: Callable[[], bool] = lambda: False) -> int:
        """One pass; returns the number of files added. stop() is polled between chunks."""
        added = 0
        batch: list[Found] = []
        watched = self._quarantined()
        closed = self._input_closed()
        summaries: list[str] | None = [] if self._on_final_summary and not closed else None
        now, wall = self._clock(), time.time()
        seen_waiting: set[str] = set()
        for rel, size, mtime in walk_candidates(self.root, self.known, watched, self.skip,
                                                summaries):
            before = watched.get(rel)
            if before is not None and _unchanged(before, size, mtime):
                continue
            found = self._verdict(rel, size, mtime, now, wall, closed)
            if found is None:
                seen_waiting.add(rel)
                continue
            batch.append(found)
            if len(batch) >= self.chunk:
                added += self._flush(batch)
                batch = []
                if stop():
                    return added
        added += self._flush(batch)
        for gone in set(self.waiting) - seen_waiting:
            del self.waiting[gone]
        if added:
            log.info("scan: %d new files in %s (%d known)", added, self.root, len(self.known))
        if summaries:
            self._on_final_summary(summaries[0])
        return added

    def _verdict(self, rel: str, size: int, mtime: float, now: float, wall: float,
                 closed: bool) -> Found | None:
        """Found when the file is ready (or is to be QUARANTINED), None while it waits."""
        waiting = self.waiting.get(rel)
        if waiting is None or (waiting.size, waiting.mtime) != (size, mtime):
            waiting = _Waiting(size, mtime, now, examine(self.root / rel))
            self.waiting[rel] = waiting
        verdict = waiting.examined
        if verdict.kind is Kind.COMPLETE:
            del self.waiting[rel]
            return Found(rel, size, mtime, verdict.identifier)
        if verdict.kind is Kind.UNKNOWN:
            if mtime > wall - self.settle_s:
                return None
            del self.waiting[rel]
            return Found(rel, size, mtime, None)
        unchanged_for = now - waiting.since
        if not closed and unchanged_for < self.grace_s:
            return None
        del self.waiting[rel]
        when = "the input was closed" if closed else \
            f"it stayed unchanged for {unchanged_for:.0f} s (manager.incomplete_grace_s)"
        log.warning("scan: %s is an incomplete POD5 (%s) and %s: QUARANTINED until it changes",
                    rel, verdict.why, when)
        return Found(rel, size, mtime, None, FileState.QUARANTINED,
                     f"incomplete POD5 ({verdict.why}) when {when}")

    def _flush(self, batch: list[Found]) -> int:
        if not batch:
            return 0
        result = self._place(batch)
        if isinstance(result, int):
            self.known.update(f.path for f in batch)
            return result
        for old, _new in result.moved:
            self.known.discard(old)
        self.known.update(f.path for f in batch)
        return result.added + len(result.reexamined)


def _unchanged(before: tuple[int, float | None], size: int, mtime: float) -> bool:
    known_size, known_mtime = before
    return size == known_size and (known_mtime is None or known_mtime == mtime)
