"""The facility's index of POD5 file identities: one file, basecalled in one run only.

Within a run, its store knows files by their POD5 file identifier (issue 11): a second copy
is DUPLICATE. Across runs nothing did: a run directory copied under another name (`cp -r
RUN RUN_copy`, or into another protocol group), or copied inside another run's directory,
was basecalled in both places. This index maps each identifier to the run (and path) that
claimed it first; a file another run claimed is placed DUPLICATE, its reason naming the run
and the file where it is basecalled, so its run shows it and its summary counts it
(`files_duplicate`).

The index lives in the facility database (manager.facility_db, table `identities`). It is
filled as runs' scanners place files (claim()), and from what is already known when a run
is opened (its store: a restart, or a store rebuilt from its journal on a new state
directory) or found settled from its summary (its journal), so a copy that appears after a
move to another host is still recognised.
"""
from __future__ import annotations

import dataclasses
import logging
import sqlite3
from pathlib import Path
from typing import Callable, Iterable

from .facility_db import FacilityDB
from .facility_states import RunState
from .journal import PATH_PREFIX, Journal, JournalUnusable
from .states import FileState
from .store import Found, Store

log = logging.getLogger("bcmanager.facility")

Owner = tuple[str, str]   # (run id, path relative to that run's directory)


class IdentityIndex:
    """will_basecall(run id, path): whether that run may still basecall its file at path
    (the run is not CANCELLED and the file is still there); state_of(run id): the run's
    state (None when unknown), for the reason a DUPLICATE gives."""

    def __init__(self, db: FacilityDB, rel_of: Callable[[str], str],
                 will_basecall: Callable[[str, str], bool],
                 state_of: Callable[[str], RunState | None] = lambda _run_id: None):
        self.db = db
        self._rel_of = rel_of
        self._will_basecall = will_basecall
        self._state_of = state_of
        self._warned: set[tuple[str, str]] = set()

    def screen(self, run_id: str, found: list[Found]) -> list[Found]:
        """The files found in run_id, those another run claimed first made DUPLICATE; the
        others are claimed for run_id.

        A file another run claimed but has not basecalled and never will (the file is no
        longer where that run found it: its run folder renamed, say; or that run was
        CANCELLED, and its files copied to a new run for other settings) is run_id's now
        and basecalled here."""
        claims = [(f.fid, f.path) for f in found if f.fid and f.state is None]
        if not claims:
            return found
        others = self.db.claim_identities(run_id, claims)
        if not others:
            return found
        moved_in = [(f.fid, f.path) for f in found if f.fid in others
                    and not others[f.fid][2] and not self._will_basecall(*others[f.fid][:2])]
        if moved_in:
            self.db.transfer_identities(run_id, moved_in)
            for fid, path in moved_in:
                owner = others.pop(fid)
                log.warning("run %s: %s is %s of run %s (%s), which has not basecalled it "
                            "and will not (moved away, or the run cancelled): basecalled in "
                            "run %s", run_id, path, owner[1], owner[0], self._rel_of(owner[0]),
                            run_id)
        screened = []
        for f in found:
            owner = others.get(f.fid) if f.fid and f.state is None else None
            if owner is None:
                screened.append(f)
                continue
            screened.append(dataclasses.replace(f, state=FileState.DUPLICATE,
                                                reason=self._reason(owner[:2])))
            self._warn_once(run_id, f.path, owner[:2])
        return screened

    def _reason(self, owner: Owner) -> str:
        run_id, path = owner
        where = (f"duplicate of {path} in run {run_id} ({self._rel_of(run_id)}): the same POD5 "
                 f"file identifier")
        if self._state_of(run_id) is RunState.QUARANTINED:
            return (f"{where}; that run is QUARANTINED, so it is basecalled nowhere yet: fix "
                    f"its bcorch.toml and `bcmanager run resume {run_id}` (basecalled there), "
                    f"or `bcmanager run cancel {run_id}` (basecalled here)")
        return f"{where}; basecalled there, not again"

    def _warn_once(self, run_id: str, path: str, owner: Owner) -> None:
        key = (run_id, owner[0])
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning("run %s: %s (and any other file of run %s's) is a copy of %s in run %s "
                    "(%s): DUPLICATE, not basecalled again", run_id, path, owner[0], owner[1],
                    owner[0], self._rel_of(owner[0]))

    def release(self, run_id: str, parts: Iterable[tuple[str, Store]]) -> int:
        """run_id was cancelled: its files that other runs hold as DUPLICATE of it, and
        that it has not basecalled and will not, become PENDING in the first of those runs
        (the copy an operator made before the cancel) and that run's claim. Returns how
        many."""
        released = 0
        for other, store in parts:
            if other == run_id:
                continue
            duplicates = store.cross_run_duplicates()
            if not duplicates:
                continue
            owners = self.db.claim_identities(other, duplicates)
            freed = [(fid, path) for fid, path in duplicates
                     if fid in owners and owners[fid][0] == run_id and not owners[fid][2]
                     and not self._will_basecall(*owners[fid][:2])]
            if not freed:
                continue
            store.release_duplicates([path for _, path in freed])
            self.db.transfer_identities(other, freed)
            released += len(freed)
            log.warning("run %s: %d files DUPLICATE of run %s, which was cancelled before "
                        "it basecalled them: PENDING, basecalled in run %s", other,
                        len(freed), run_id, other)
        return released

    def adopt_store(self, run_id: str, store_path: str) -> None:
        """The identities in a run's store (not its duplicates), where not claimed yet."""
        try:
            conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            log.warning("run %s: cannot read its file identities from %s: %s", run_id,
                        store_path, exc)
            return
        try:
            rows = [(fid, path, state == FileState.DONE.value) for fid, path, state in
                    conn.execute("SELECT fid, path, state FROM files WHERE fid IS NOT NULL "
                                 "AND state != ?", (FileState.DUPLICATE.value,))]
        except sqlite3.Error as exc:
            log.warning("run %s: cannot read its file identities from %s: %s", run_id,
                        store_path, exc)
            return
        finally:
            conn.close()
        self.db.adopt_identities(run_id, rows)

    def adopt_journal(self, run_id: str, output_dir: str) -> None:
        """The identities of the files a run's journal records finished (a settled run,
        whose store is not opened)."""
        try:
            replay = Journal(Path(output_dir)).replay()
        except (OSError, JournalUnusable) as exc:   # the run is over: it is only not indexed
            log.warning("run %s: cannot read its file identities from its journal in %s "
                        "(%s): a copy of its files in another run is not recognised", run_id,
                        output_dir, exc)
            return
        self.db.adopt_identities(run_id, _identities(replay.jobs.values()))

    def done(self, run_id: str, fids: list[str]) -> None:
        """These files of run_id were basecalled (a DONE batch)."""
        self.db.mark_identities_done(run_id, fids)

    def forget_run(self, run_id: str) -> None:
        self.db.delete_identities(run_id)


def _identities(jobs: Iterable[tuple[str, list]]) -> list[tuple[str, str, bool]]:
    return [(f.identity, f.path, True) for _, files in jobs for f in files
            if not f.identity.startswith(PATH_PREFIX)]
