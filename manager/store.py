"""The manager's durable state: one SQLite file (WAL), no HTTP and no filesystem moves.

Every assignment and every completion is one transaction begun IMMEDIATE and made
durable with synchronous=FULL before the caller answers. A completion records its
outcome together with ``fs_pending = 1``; the filesystem moves are done afterwards
by the caller and acknowledged with mark_moved(), so a restart finds every move
that was recorded but maybe not finished (unfinished_moves()).

Lease deadlines are not stored: they live on the manager's monotonic clock
(manager.leases), and a restart grants every LIVE job a fresh interval.

All methods are serialised by one lock (SQLite has one writer anyway), and the
counters behind /status are kept in memory, updated only after a commit.
"""
from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from .states import (FileEvent, FileState, JobState, file_transition, job_transition)

log = logging.getLogger("bcmanager.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS files(
    id        INTEGER PRIMARY KEY,
    path      TEXT NOT NULL UNIQUE,      -- relative to INPUT_DIR
    size      INTEGER NOT NULL,
    state     TEXT NOT NULL DEFAULT 'PENDING',
    attempts  INTEGER NOT NULL DEFAULT 0,
    retry_cap INTEGER,                   -- largest batch for the next try (after a failure)
    job_id    TEXT,                      -- the job that holds it (ASSIGNED) or last held it
    link      TEXT,                      -- its symlink name inside that job's ASSIGNED_ dir
    reason    TEXT,                      -- last failure reason
    updated   REAL                       -- wall clock, for operators
);
-- Picking the next N pending files walks these partial indexes: O(N) at any table size.
CREATE INDEX IF NOT EXISTS files_pending ON files(id) WHERE state = 'PENDING';
CREATE INDEX IF NOT EXISTS files_retry ON files(id) WHERE state = 'PENDING' AND attempts > 0;
CREATE INDEX IF NOT EXISTS files_job ON files(job_id);
CREATE TABLE IF NOT EXISTS jobs(
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused, so job ids never are
    job_id     TEXT NOT NULL UNIQUE,
    engine_id  TEXT NOT NULL,
    state      TEXT NOT NULL,
    fs_pending INTEGER NOT NULL DEFAULT 0,          -- 1: filesystem moves of the outcome not yet done
    n_files    INTEGER NOT NULL,
    created    REAL NOT NULL,
    finished   REAL,
    reason     TEXT
);
CREATE INDEX IF NOT EXISTS jobs_live ON jobs(seq) WHERE state = 'LIVE';
CREATE INDEX IF NOT EXISTS jobs_fs_pending ON jobs(seq) WHERE fs_pending = 1;
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

MAX_LINK_NAME = 200  # bytes; file systems allow 255


class UnknownFailedFile(ValueError):
    """failed_files names a file that is not in the job's batch."""


@dataclass(frozen=True)
class JobFile:
    link: str
    path: str
    size: int


@dataclass(frozen=True)
class Job:
    job_id: str
    engine_id: str
    state: JobState
    files: tuple[JobFile, ...] = ()


@dataclass(frozen=True)
class Completion:
    """What a completion did: the job after it, and whether this call changed anything."""

    job: Job | None
    changed: bool
    files_done: int = 0
    bytes_done: int = 0


@dataclass
class Counters:
    files: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in FileState})
    bytes: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in FileState})

    def move(self, old: str, new: str, size: int) -> None:
        self.files[old] -= 1
        self.bytes[old] -= size
        self.files[new] += 1
        self.bytes[new] += size


def link_name(index: int, path: str) -> str:
    """A flat, unique-within-the-job name for the symlink of path.

    The counter makes names unique even for equal names in different sub-folders;
    the sub-folders are kept (as '__') so an operator can still read where it came from.
    '..' never appears, so engines accept the name.
    """
    flat = path.replace("/", "__").replace("\\", "_").replace("..", "._")
    name = f"{index:04d}_{flat}"
    if len(name.encode()) <= MAX_LINK_NAME:
        return name
    tail = ""  # keep the end (the file name and its .pod5 suffix), measured in bytes
    for ch in reversed(flat):
        if len((ch + tail).encode()) > MAX_LINK_NAME - 10:
            break
        tail = ch + tail
    return f"{index:04d}_~{tail}"


class Store:
    def __init__(self, path: str, max_attempts: int):
        self.path = path
        self.max_attempts = max_attempts
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self.counters = Counters()
        for state, n, size in self._db.execute(
                "SELECT state, COUNT(*), COALESCE(SUM(size), 0) FROM files GROUP BY state"):
            self.counters.files[state] = n
            self.counters.bytes[state] = size

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction; durable=False skips the fsync (for work a restart redoes)."""
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    # -- input -------------------------------------------------------------------------

    def known_paths(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT path FROM files")}

    def add_files(self, rows: Iterable[tuple[str, int]]) -> int:
        """Insert new PENDING files (path relative to INPUT_DIR, size); return how many."""
        rows = list(rows)
        if not rows:
            return 0
        with self._tx() as db:
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO files(path, size, updated) VALUES (?, ?, ?)",
                           [(p, s, time.time()) for p, s in rows])
            added = db.total_changes - before
            if added == len(rows):
                added_bytes = sum(s for _, s in rows)
            else:  # some were already known: count what is really there
                added_bytes = None
        with self._lock:
            if added_bytes is None:
                self.counters = self._recount()
            else:
                self.counters.files[FileState.PENDING.value] += added
                self.counters.bytes[FileState.PENDING.value] += added_bytes
        return added

    def snapshot(self) -> Counters:
        with self._lock:
            return Counters(dict(self.counters.files), dict(self.counters.bytes))

    def _recount(self) -> Counters:
        counters = Counters()
        for state, n, size in self._db.execute(
                "SELECT state, COUNT(*), COALESCE(SUM(size), 0) FROM files GROUP BY state"):
            counters.files[state] = n
            counters.bytes[state] = size
        return counters

    # -- flags -------------------------------------------------------------------------

    def input_closed(self) -> bool:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'input_closed'").fetchone()
        return row is not None and row[0] == "1"

    def close_input(self) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('input_closed', '1')")

    # -- jobs --------------------------------------------------------------------------

    def assign(self, engine_id: str, wanted: int) -> Job | None:
        """Hand up to `wanted` PENDING files to a new LIVE job; None when nothing is pending.

        Files that failed before go first, in batches no larger than their retry cap.
        """
        with self._tx() as db:
            picked = self._pick_retried(db, wanted)
            if not picked:
                picked = db.execute(
                    "SELECT id, path, size, attempts FROM files WHERE state = 'PENDING' "
                    "ORDER BY id LIMIT ?", (wanted,)).fetchall()
            if not picked:
                return None
            now = time.time()
            cur = db.execute(
                "INSERT INTO jobs(job_id, engine_id, state, n_files, created) VALUES (?, ?, ?, ?, ?)",
                ("tmp-" + secrets.token_hex(8), engine_id, JobState.LIVE.value, len(picked), now))
            seq = cur.lastrowid
            job_id = f"j{seq:06d}-{secrets.token_hex(2)}"
            db.execute("UPDATE jobs SET job_id = ? WHERE seq = ?", (job_id, seq))
            files = []
            updates = []
            for index, (file_id, path, size, attempts) in enumerate(picked):
                outcome = file_transition(FileState.PENDING, FileEvent.ASSIGN, attempts,
                                          max_attempts=self.max_attempts)
                link = link_name(index, path)
                files.append(JobFile(link, path, size))
                updates.append((outcome.state.value, job_id, link, now, file_id))
            db.executemany("UPDATE files SET state = ?, job_id = ?, link = ?, updated = ? "
                           "WHERE id = ?", updates)
        with self._lock:
            for f in files:
                self.counters.move(FileState.PENDING.value, FileState.ASSIGNED.value, f.size)
        return Job(job_id, engine_id, JobState.LIVE, tuple(files))

    def _pick_retried(self, db: sqlite3.Connection, wanted: int) -> list[tuple]:
        rows = db.execute(
            "SELECT id, path, size, attempts, retry_cap FROM files "
            "WHERE state = 'PENDING' AND attempts > 0 ORDER BY id LIMIT ?", (wanted,)).fetchall()
        picked: list[tuple] = []
        limit = wanted
        for file_id, path, size, attempts, cap in rows:
            limit = min(limit, cap or wanted)
            if len(picked) >= limit:
                break
            picked.append((file_id, path, size, attempts))
        return picked

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT job_id, engine_id, state FROM jobs WHERE job_id = ?",
                                   (job_id,)).fetchone()
            if row is None:
                return None
            files = self._db.execute(
                "SELECT link, path, size FROM files WHERE job_id = ? ORDER BY link",
                (job_id,)).fetchall()
        return Job(row[0], row[1], JobState(row[2]), tuple(JobFile(*f) for f in files))

    def live_jobs(self) -> list[Job]:
        with self._lock:
            ids = [r[0] for r in self._db.execute(
                "SELECT job_id FROM jobs WHERE state = 'LIVE' ORDER BY seq")]
        return [job for job in map(self.job, ids) if job is not None]

    def finish(self, job_id: str, target: JobState, failed: dict[str, str] | None = None,
               reason: str = "") -> Completion:
        """Record the end of a job and move its files; idempotent for a repeated same outcome.

        failed maps link names of a DONE batch to a reason: those files count an attempt.
        The caller must do the filesystem moves afterwards and then call mark_moved().
        Raises UnknownFailedFile (nothing changed) for a name that is not in the batch.
        """
        failed = failed or {}
        with self._tx() as db:
            row = db.execute("SELECT engine_id, state, n_files FROM jobs WHERE job_id = ?",
                             (job_id,)).fetchone()
            if row is None:
                return Completion(None, False)
            engine_id, state, n_files = row[0], JobState(row[1]), row[2]
            if state.final:
                return Completion(Job(job_id, engine_id, state), False)
            job_transition(state, target)
            rows = db.execute(
                "SELECT id, link, size, attempts FROM files WHERE job_id = ? AND state = 'ASSIGNED'",
                (job_id,)).fetchall()
            links = {link for _, link, _, _ in rows}
            unknown = sorted(set(failed) - links)
            if unknown:
                raise UnknownFailedFile(f"failed_files: {unknown[0][:80]!r} is not in job {job_id}")
            now = time.time()
            moves: list[tuple[str, str, int]] = []
            updates = []
            done_files = done_bytes = 0
            # Files named in a DONE batch are known bad one by one: they retry alone.
            retry_from = 1 if target is JobState.DONE else len(rows)
            for file_id, link, size, attempts in rows:
                event, why = self._event_for(target, link, failed, reason, job_id)
                outcome = file_transition(FileState.ASSIGNED, event, attempts,
                                          max_attempts=self.max_attempts, batch_files=retry_from)
                updates.append((outcome.state.value, outcome.attempts, outcome.retry_cap,
                                why, now, file_id))
                moves.append((FileState.ASSIGNED.value, outcome.state.value, size))
                if outcome.state is FileState.DONE:
                    done_files += 1
                    done_bytes += size
                elif outcome.state is FileState.QUARANTINED:
                    log.warning("job %s engine %s: file %s QUARANTINED after %d attempts: %s",
                                job_id, engine_id, link, outcome.attempts, why)
            db.executemany("UPDATE files SET state = ?, attempts = ?, retry_cap = ?, "
                           "reason = COALESCE(?, reason), updated = ? WHERE id = ?", updates)
            db.execute("UPDATE jobs SET state = ?, fs_pending = 1, finished = ?, reason = ? "
                       "WHERE job_id = ?", (target.value, now, reason or None, job_id))
        with self._lock:
            for old, new, size in moves:
                self.counters.move(old, new, size)
        return Completion(Job(job_id, engine_id, target), True, done_files, done_bytes)

    @staticmethod
    def _event_for(target: JobState, link: str, failed: dict[str, str], reason: str,
                   job_id: str) -> tuple[FileEvent, str | None]:
        if target is JobState.DONE:
            if link in failed:
                return FileEvent.FAIL, f"job {job_id}: {failed[link] or 'named in failed_files'}"
            return FileEvent.SUCCEED, None
        if target is JobState.FAILED:
            why = failed.get(link) or reason or "batch FAILED"
            return FileEvent.FAIL, f"job {job_id}: {why}"
        return FileEvent.RETURN, None

    def unfinished_moves(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, engine_id, state FROM jobs WHERE fs_pending = 1 ORDER BY seq").fetchall()
        return [Job(j, e, JobState(s)) for j, e, s in rows]

    def mark_moved(self, *job_ids: str) -> None:
        # Not fsynced: if this is lost, a restart redoes the (idempotent) moves.
        if not job_ids:
            return
        with self._tx(durable=False) as db:
            db.executemany("UPDATE jobs SET fs_pending = 0 WHERE job_id = ?",
                           [(j,) for j in job_ids])

    # -- reading -----------------------------------------------------------------------

    def files_in_state(self, state: FileState, limit: int) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT path, size, attempts, job_id, reason FROM files WHERE state = ? "
                "ORDER BY id LIMIT ?", (state.value, limit)).fetchall()
        return [{"path": p, "size": s, "attempts": a, "job_id": j, "reason": r}
                for p, s, a, j, r in rows]

    def job_counts(self) -> dict[str, int]:
        """Jobs ever created, by state (every state present, 0 when none): /metrics reads it."""
        counts = {s.value: 0 for s in JobState}
        with self._lock:
            for state, n in self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
                counts[state] = n
        return counts

    def recent_engines(self, limit: int = 1000) -> dict[str, float]:
        """Engine id -> wall time of its latest job (survives restarts)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT engine_id, MAX(created) FROM jobs GROUP BY engine_id "
                "ORDER BY 2 DESC LIMIT ?", (limit,)).fetchall()
        return {e: t for e, t in rows}
