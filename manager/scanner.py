"""Incremental recursive scan of INPUT_DIR for *.pod5 files.

Known paths are kept in memory, so a rescan costs one os.scandir walk and a set
lookup per file; only new files are stat()ed. A file modified in the last settle_s
seconds is still being written: it is skipped now and seen again next scan. The
manager's own ASSIGNED_*/FAILED_* dirs (symlinks to inputs) are never entered, nor
are symlinked directories (no loops, no counting a file twice).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from .layout import OWN_INPUT_PREFIXES

log = logging.getLogger("bcmanager.scanner")

SUFFIX = ".pod5"


def walk_new(root: str | Path, known: set[str], settle_s: float,
             now: float | None = None, skip: tuple[str, ...] = ()) -> Iterator[tuple[str, int]]:
    """Yield (path relative to root, size) of every settled *.pod5 file not in known.

    skip: absolute directories not to enter (e.g. OUTPUT_DIR when it lies inside root).
    """
    now = time.time() if now is None else now
    newest = now - settle_s
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
                    if rel in known:
                        continue
                    try:
                        st = entry.stat() if entry.is_file() else None
                    except OSError:
                        continue  # vanished between listing and stat
                    if st is not None:
                        if st.st_mtime <= newest:
                            yield rel, st.st_size
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


class Scanner:
    """Adds new settled files to the store, in large transactions."""

    def __init__(self, root: str | Path, settle_s: float, add: Callable[[list[tuple[str, int]]], int],
                 known: set[str], skip: tuple[str, ...] = (), chunk: int = 50_000):
        self.root = root
        self.settle_s = settle_s
        self._add = add
        self.known = known
        self.skip = skip
        self.chunk = chunk

    def scan_once(self, stop: Callable[[], bool] = lambda: False) -> int:
        """One pass; returns the number of files added. stop() is polled between chunks."""
        added = 0
        batch: list[tuple[str, int]] = []
        for item in walk_new(self.root, self.known, self.settle_s, skip=self.skip):
            batch.append(item)
            if len(batch) >= self.chunk:
                added += self._flush(batch)
                batch = []
                if stop():
                    return added
        added += self._flush(batch)
        if added:
            log.info("scan: %d new files in %s (%d known)", added, self.root, len(self.known))
        return added

    def _flush(self, batch: list[tuple[str, int]]) -> int:
        if not batch:
            return 0
        added = self._add(batch)
        self.known.update(p for p, _ in batch)
        return added
