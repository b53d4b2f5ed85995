"""One run's machinery: Store + Layout + Manager + Scanner + Journal, recovered on start.

Single-run mode serves one RunPart (manager.server); facility mode (manager.facility)
makes one per run directory. Everything that keeps a run's files from being lost or
done twice (the store, the journal beside the outputs, recovery, the layout's moves)
lives here and is the same in both modes.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from bcorch.config import ManagerConfig

from .journal import Journal
from .layout import Layout
from .scanner import Scanner
from .service import Manager
from .states import FileState
from .store import DatabaseUnusable, Found, Placed, Store

log = logging.getLogger("bcmanager")


@dataclass(frozen=True)
class RunPlace:
    """Where a run part reads, writes and keeps its database."""

    input_dir: str
    output_dir: str
    db: str                    # SQLite file on this host's local disk
    db_chosen: bool = False    # named by the operator (manager.db): its directory must exist


def open_store(place: RunPlace, max_attempts: int) -> Store:
    if not place.db_chosen:
        try:
            Path(place.db).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            why = f"cannot create its directory ({exc.strerror or exc}); set manager.db or --db"
            raise DatabaseUnusable(place.db, why) from None
    return Store(place.db, max_attempts)


class RunPart:
    """A run's store, layout, manager and scanner, built and recovered together.

    on_final_summary, when given, is called with the path of MinKNOW's
    final_summary_*.txt the first time a scan sees it (manager.close_on_final_summary).
    """

    def __init__(self, cfg: ManagerConfig, place: RunPlace, *,
                 on_final_summary: Callable[[str], None] | None = None,
                 input_closed: bool = False,
                 screen: Callable[[list[Found]], list[Found]] | None = None):
        self.place = place
        self._screen = screen
        Path(place.output_dir).mkdir(parents=True, exist_ok=True)
        self.store = open_store(place, cfg.max_attempts)
        self.skip = (place.output_dir,) if inside(place.output_dir, place.input_dir) else ()
        self.journal: Journal | None = None
        try:
            self.layout = Layout(place.input_dir, place.output_dir)
            self.journal = Journal(place.output_dir)
            self.manager = Manager(self.store, self.layout, batch_size=cfg.batch_size,
                                   report_back_interval=cfg.report_back_interval,
                                   input_closed=input_closed,
                                   allow_simulated=cfg.allow_simulated,
                                   startup_share=cfg.startup_share,
                                   journal=self.journal,
                                   incomplete_grace_s=cfg.incomplete_grace_s)
            self.manager.recover()
            self.scanner = Scanner(
                place.input_dir, cfg.settle_s, self._add_found, self.store.known_paths(),
                skip=self.skip, grace_s=cfg.incomplete_grace_s, quarantined=self.store.quarantined,
                input_closed=lambda: self.manager.input_closed,
                on_final_summary=on_final_summary if cfg.close_on_final_summary else None)
            self.manager.waiting_files = lambda: len(self.scanner.waiting)
        except BaseException as exc:
            self._give_back()
            if isinstance(exc, sqlite3.DatabaseError):   # damage found past the first page
                raise DatabaseUnusable(self.store.path, exc) from None
            raise
        self._closed = False
        self._close_lock = threading.Lock()

    def _give_back(self) -> None:
        """A part that failed to open closes what it had opened: a facility sets the run
        aside and goes on for months, and must not hold its database or journal open."""
        try:
            self.store.close()
        finally:
            if self.journal is not None:
                self.journal.close()

    def _add_found(self, found: list[Found]) -> Placed:
        """Files the scanner found, screened first when a screen was given (the facility
        makes DUPLICATE those another run has: manager.facility_identity).

        A screened file the store knows as QUARANTINED (it changed, so it is examined
        again) stays QUARANTINED, the reason naming the other run's file: the store would
        otherwise make it PENDING, and it would be basecalled a second time."""
        if self._screen is None:
            return self.manager.add_found(found)
        screened = self._screen(found)
        if any(f.state is FileState.DUPLICATE for f in screened):
            quarantined = self.store.quarantined()
            screened = [replace(f, state=FileState.QUARANTINED)
                        if f.state is FileState.DUPLICATE and f.path in quarantined else f
                        for f in screened]
        return self.manager.add_found(screened)

    def scan(self, stop: Callable[[], bool]) -> int:
        """One scan of the run's input; wakes long polls when files were added."""
        added = self.scanner.scan_once(stop)
        if added:
            self.manager.work_may_be_ready()
        if not stop():
            self.manager.input_scanned()
        return added

    def reap(self) -> int:
        return self.manager.reap()

    @property
    def closed(self) -> bool:
        """close() was called: its store and journal must not be used any more."""
        return self._closed

    def close(self) -> None:
        """Acknowledge finished moves and close the database and journal (once)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.manager.close()


def inside(child: str, parent: str) -> bool:
    child_abs, parent_abs = os.path.abspath(child), os.path.abspath(parent)
    return child_abs != parent_abs and child_abs.startswith(parent_abs.rstrip(os.sep) + os.sep)
