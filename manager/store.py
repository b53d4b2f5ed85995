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
from typing import Callable, Iterable, Iterator

from bcorch.protocol import new_job_id

from .read_counts import ReadCount, ReadTotals
from .states import (RETRY_BACKOFF_MAX_S, FileEvent, FileState, JobState, file_transition,
                     job_transition, retry_delay)

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
    updated   REAL,                      -- wall clock, for operators
    fid       TEXT,                      -- POD5 file identifier; NULL: known by path and size
    mtime     REAL,                      -- st_mtime when found (a change re-examines the file)
    failures  INTEGER NOT NULL DEFAULT 0,  -- failures counted or not: the retry back-off
    retry_at  REAL,                      -- wall clock before which it does not go out again
    dup_of    INTEGER                    -- DUPLICATE: the id of the copy that is basecalled
);
-- Picking the next N pending files walks these partial indexes: O(N) at any table size.
CREATE INDEX IF NOT EXISTS files_pending ON files(id) WHERE state = 'PENDING';
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
    reason     TEXT,
    reads_pass INTEGER,                             -- reads a DONE job wrote; NULL: not reported
    reads_fail INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_live ON jobs(seq) WHERE state = 'LIVE';
CREATE INDEX IF NOT EXISTS jobs_fs_pending ON jobs(seq) WHERE fs_pending = 1;
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# Columns added since the first schema: a database made by an older manager gets them on open.
_ADDED_COLUMNS = {"fid": "TEXT", "mtime": "REAL", "failures": "INTEGER NOT NULL DEFAULT 0",
                  "retry_at": "REAL", "dup_of": "INTEGER"}
_ADDED_JOB_COLUMNS = {"reads_pass": "INTEGER", "reads_fail": "INTEGER"}
_INDEXES_OF_ADDED = """
CREATE INDEX IF NOT EXISTS files_fid ON files(fid) WHERE fid IS NOT NULL;
CREATE INDEX IF NOT EXISTS files_quarantined ON files(id) WHERE state = 'QUARANTINED';
DROP INDEX IF EXISTS files_retry;
CREATE INDEX IF NOT EXISTS files_retried ON files(id) WHERE state = 'PENDING' AND failures > 0;
"""
retry_clock = time.time  # the wall clock of retry_at (tests move it forward)
# A file that failed waits out its back-off; a retry_at further ahead than the longest
# back-off means the wall clock was set back: the file is ready.
_READY_AGAIN = "(retry_at IS NULL OR retry_at <= ? OR retry_at > ?)"

MAX_LINK_NAME = 200  # bytes; file systems allow 255


class DatabaseUnusable(Exception):
    """The database file cannot be opened or read; str() is one line for the operator."""

    def __init__(self, path: str, why: object):
        super().__init__(
            f"cannot use the database {path}: {why}. If it is damaged or from elsewhere, move it "
            f"aside (with its -wal and -shm files) and start again: the finished-files journal "
            f"beside the outputs rebuilds what is DONE (or give another file with --db / "
            f"manager.db)")
        self.path = path


@dataclass(frozen=True)
class Found:
    """A file the scanner found ready: where it is, and who it is."""

    path: str                   # relative to INPUT_DIR
    size: int
    mtime: float
    fid: str | None             # POD5 file identifier, None when it cannot be read
    state: "FileState | None" = None   # None: PENDING; QUARANTINED for a file never completed
    reason: str | None = None


@dataclass
class Placed:
    """What add_found() did with the files it was given."""

    added: int = 0
    moved: list[tuple[str, str]] = field(default_factory=list)       # (old path, new path)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (copy, the one basecalled)
    reexamined: list[str] = field(default_factory=list)


Excuse = Callable[[str, int, "float | None"], "str | None"]


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


def _up_to_work(rows: Iterable[tuple], max_work: float | None,
                nearest: bool = False) -> list[tuple]:
    """Rows (id, path, size, ...) in order until their sizes reach max_work (None: all).

    nearest: the file that would cross max_work is left out when that lands closer to it.
    """
    if max_work is None:
        return list(rows)
    picked: list[tuple] = []
    work = 0
    for row in rows:
        if nearest and picked and work + row[2] - max_work > max_work - work:
            break
        picked.append(row)
        work += row[2]
        if work >= max_work:
            break
    return picked


class Store:
    def __init__(self, path: str, max_attempts: int):
        self.path = path
        self.max_attempts = max_attempts
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                       timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
            self._add_columns()
            self.counters = self._recount()
            self.reads = self._recount_reads()
        except sqlite3.Error as exc:
            raise DatabaseUnusable(path, exc) from None

    def _add_columns(self) -> None:
        have = {row[1] for row in self._db.execute("PRAGMA table_info(files)")}
        for name, decl in _ADDED_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE files ADD COLUMN {name} {decl}")
        if "failures" not in have:
            self._db.execute("UPDATE files SET failures = attempts WHERE attempts > 0")
        self._db.executescript(_INDEXES_OF_ADDED)
        have_in_jobs = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, decl in _ADDED_JOB_COLUMNS.items():
            if name not in have_in_jobs:   # older jobs' reads stay NULL: unknown
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")

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

    def add_files(self, rows: Iterable["tuple[str, int] | Found"]) -> int:
        """Insert new PENDING files (path relative to INPUT_DIR, size); return how many.

        Found items are taken by path alone (identity and moves are add_found()'s job).
        """
        rows = [(r.path, r.size) if isinstance(r, Found) else tuple(r) for r in rows]
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

    def read_totals(self) -> ReadTotals:
        """Reads of the DONE jobs, and how many of them reported theirs."""
        with self._lock:
            r = self.reads
            return ReadTotals(r.passed, r.failed, r.jobs_counted, r.jobs_done)

    def _recount_reads(self) -> ReadTotals:
        done, counted, passed, failed = self._db.execute(
            "SELECT COUNT(*), COUNT(reads_pass), COALESCE(SUM(reads_pass), 0), "
            "COALESCE(SUM(reads_fail), 0) FROM jobs WHERE state = 'DONE'").fetchone()
        return ReadTotals(passed, failed, counted, done)

    def _recount(self) -> Counters:
        counters = Counters()
        for state, n, size in self._db.execute(
                "SELECT state, COUNT(*), COALESCE(SUM(size), 0) FROM files GROUP BY state"):
            counters.files[state] = n
            counters.bytes[state] = size
        return counters

    def add_found(self, found: Iterable[Found], exists: Callable[[str], bool]) -> Placed:
        """Place files found ready, by identity: new, moved, a duplicate, or changed.

        A file whose POD5 identifier is already known under a path that no longer exists
        has moved: the row follows it and keeps its state (a DONE file is not redone).
        If the known path still exists, the new one is a second copy: DUPLICATE, never
        basecalled. A path already known as QUARANTINED (it changed on disk) is examined
        again and goes back to PENDING with no attempts counted.
        exists(path relative to INPUT_DIR) tells whether a known path is still there.
        """
        found = list(found)
        placed = Placed()
        if not found:
            return placed
        now = time.time()
        plain_bytes = 0
        with self._tx() as db:
            for f in found:
                row = db.execute("SELECT id, state FROM files WHERE path = ?",
                                 (f.path,)).fetchone()
                if row is not None:
                    if row[1] == FileState.QUARANTINED.value and self._reexamine(db, row[0], f, now):
                        placed.reexamined.append(f.path)
                    continue
                known = self._by_identity(db, f.fid) if f.fid else None
                if known is not None:
                    known_id, known_path = known
                    if not exists(known_path):
                        db.execute("UPDATE files SET path = ?, mtime = ?, updated = ? WHERE id = ?",
                                   (f.path, f.mtime, now, known_id))
                        placed.moved.append((known_path, f.path))
                        continue
                    db.execute("INSERT INTO files(path, size, state, fid, mtime, dup_of, reason, "
                               "updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (f.path, f.size, FileState.DUPLICATE.value, f.fid, f.mtime, known_id,
                                f"duplicate of {known_path} (same POD5 file identifier)", now))
                    placed.duplicates.append((f.path, known_path))
                    continue
                state = f.state or FileState.PENDING
                db.execute("INSERT INTO files(path, size, state, fid, mtime, reason, updated) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (f.path, f.size, state.value, f.fid, f.mtime, f.reason, now))
                placed.added += 1
                if state is FileState.PENDING:
                    plain_bytes += f.size
        with self._lock:
            if placed.moved or placed.duplicates or placed.reexamined or \
                    any(f.state not in (None, FileState.PENDING) for f in found):
                self.counters = self._recount()
            else:
                self.counters.files[FileState.PENDING.value] += placed.added
                self.counters.bytes[FileState.PENDING.value] += plain_bytes
        return placed

    @staticmethod
    def _by_identity(db: sqlite3.Connection, fid: str) -> tuple[int, str] | None:
        row = db.execute("SELECT id, path FROM files WHERE fid = ? AND state != 'DUPLICATE' "
                         "ORDER BY id LIMIT 1", (fid,)).fetchone()
        return (row[0], row[1]) if row else None

    def _reexamine(self, db: sqlite3.Connection, file_id: int, f: Found, now: float) -> bool:
        known = self._by_identity(db, f.fid) if f.fid else None
        if known is not None and known[0] != file_id:
            db.execute("UPDATE files SET state = ?, fid = ?, size = ?, mtime = ?, dup_of = ?, "
                       "reason = ?, updated = ? WHERE id = ?",
                       (FileState.DUPLICATE.value, f.fid, f.size, f.mtime, known[0],
                        f"duplicate of {known[1]} (same POD5 file identifier)", now, file_id))
            return True
        if f.state is FileState.QUARANTINED:  # changed, but still not complete
            db.execute("UPDATE files SET size = ?, mtime = ?, reason = ?, updated = ? WHERE id = ?",
                       (f.size, f.mtime, f.reason, now, file_id))
            return False
        outcome = file_transition(FileState.QUARANTINED, FileEvent.REEXAMINE, 0,
                                  max_attempts=self.max_attempts)
        db.execute("UPDATE files SET state = ?, attempts = ?, failures = 0, retry_at = NULL, "
                   "retry_cap = NULL, fid = ?, size = ?, mtime = ?, updated = ? WHERE id = ?",
                   (outcome.state.value, outcome.attempts, f.fid, f.size, f.mtime, now, file_id))
        log.info("file %s changed on disk since it was QUARANTINED: examined again, PENDING",
                 f.path)
        return True

    def quarantined(self) -> dict[str, tuple[int, float | None]]:
        """Path -> (size, mtime) of every QUARANTINED file: the scanner watches them change."""
        with self._lock:
            rows = self._db.execute(
                "SELECT path, size, mtime FROM files WHERE state = 'QUARANTINED'").fetchall()
        return {p: (s, m) for p, s, m in rows}

    def cross_run_duplicates(self) -> list[tuple[str, str]]:
        """(fid, path) of the files placed DUPLICATE of another run's file (a facility's
        identity index; a copy within this store has dup_of set instead)."""
        with self._lock:
            return self._db.execute(
                "SELECT fid, path FROM files WHERE state = 'DUPLICATE' AND dup_of IS NULL "
                "AND fid IS NOT NULL ORDER BY id").fetchall()

    def release_duplicates(self, paths: list[str]) -> int:
        """These cross-run DUPLICATE files are this run's to basecall after all (the run
        that held them was cancelled before basecalling them): PENDING. Returns how many."""
        if not paths:
            return 0
        with self._tx() as db:
            before = db.total_changes
            db.executemany("UPDATE files SET state = 'PENDING', reason = NULL, attempts = 0, "
                           "updated = ? WHERE path = ? AND state = 'DUPLICATE' "
                           "AND dup_of IS NULL", [(time.time(), p) for p in paths])
            released = db.total_changes - before
        with self._lock:
            self.counters = self._recount()
        return released

    # -- the journal -------------------------------------------------------------------

    def is_new(self) -> bool:
        """No file and no job recorded: a new database, or one that was lost."""
        with self._lock:
            return (self._db.execute("SELECT 1 FROM files LIMIT 1").fetchone() is None
                    and self._db.execute("SELECT 1 FROM jobs LIMIT 1").fetchone() is None)

    def rebuild(self, jobs: dict[str, tuple[str, list]], input_closed: bool,
                reads: dict[str, ReadCount] | None = None) -> int:
        """Fill a new database from the journal: its jobs DONE (moves to redo), files DONE.

        jobs: job id -> (engine id, [JournalledFile]); reads: job id -> the reads it wrote,
        where the journal has them (else unknown). Returns the number of files DONE.
        The jobs come back with fs_pending = 1, so recovery finishes (idempotently) any
        merge of their outputs that the lost database had not seen through.
        """
        now = time.time()
        done = 0
        with self._tx() as db:
            for job_id, (engine_id, files) in jobs.items():
                count = (reads or {}).get(job_id)
                db.execute("INSERT OR IGNORE INTO jobs(job_id, engine_id, state, fs_pending, "
                           "n_files, created, finished, reason, reads_pass, reads_fail) "
                           "VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?, ?)",
                           (job_id, engine_id, JobState.DONE.value, len(files), now, now,
                            "rebuilt from the journal", count.passed if count else None,
                            count.failed if count else None))
                for f in files:
                    fid = None if f.identity.startswith("path:") else f.identity
                    if fid is not None and self._by_identity(db, fid) is not None:
                        continue
                    cur = db.execute("INSERT OR IGNORE INTO files(path, size, state, job_id, fid, "
                                     "updated) VALUES (?, ?, ?, ?, ?, ?)",
                                     (f.path, f.size, FileState.DONE.value, job_id, fid, now))
                    done += cur.rowcount
            if input_closed:
                db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('input_closed', '1')")
        with self._lock:
            self.counters = self._recount()
            self.reads = self._recount_reads()
        return done

    def job_reads(self, job_id: str) -> ReadCount | None:
        """The reads a DONE job wrote, as its engine reported them (None: not reported)."""
        with self._lock:
            row = self._db.execute("SELECT reads_pass, reads_fail FROM jobs WHERE job_id = ?",
                                   (job_id,)).fetchone()
        return ReadCount(row[0], row[1]) if row and row[0] is not None else None

    def done_files(self, job_id: str) -> list[tuple[str | None, str, int]]:
        """(fid, path, size) of the files a job finished: what the journal records for it."""
        with self._lock:
            return self._db.execute(
                "SELECT fid, path, size FROM files WHERE job_id = ? AND state = 'DONE' "
                "ORDER BY id", (job_id,)).fetchall()

    def retries_due(self, since: float, until: float) -> bool:
        """Whether a PENDING file's retry back-off ended in (since, until] (retry_at's clock)."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM files WHERE state = 'PENDING' AND failures > 0 "
                "AND retry_at > ? AND retry_at <= ? LIMIT 1", (since, until)).fetchone()
        return row is not None

    # -- flags -------------------------------------------------------------------------

    def input_closed(self) -> bool:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'input_closed'").fetchone()
        return row is not None and row[0] == "1"

    def close_input(self) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('input_closed', '1')")

    # -- jobs --------------------------------------------------------------------------

    def assign(self, engine_id: str, wanted: int, max_work: float | None = None,
               nearest: bool = False) -> Job | None:
        """Hand up to `wanted` PENDING files to a new LIVE job; None when nothing is pending.

        max_work: files are taken until their sizes (the work measure, manager.batching)
        reach it (nearest: or stop short of it, whichever is closer); at least one file.
        Files that failed before go first, in batches no larger than their retry cap.
        """
        with self._tx() as db:
            now = retry_clock()
            picked = self._pick_retried(db, wanted, now)
            if not picked:
                rows = db.execute(
                    "SELECT id, path, size, attempts FROM files WHERE state = 'PENDING' "
                    f"AND {_READY_AGAIN} ORDER BY id LIMIT ?",
                    (now, now + RETRY_BACKOFF_MAX_S, wanted))
                picked = _up_to_work(rows, max_work, nearest)
            if not picked:
                return None
            now = time.time()
            cur = db.execute(
                "INSERT INTO jobs(job_id, engine_id, state, n_files, created) VALUES (?, ?, ?, ?, ?)",
                ("tmp-" + secrets.token_hex(8), engine_id, JobState.LIVE.value, len(picked), now))
            seq = cur.lastrowid
            job_id = new_job_id(seq)
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

    def _pick_retried(self, db: sqlite3.Connection, wanted: int, now: float) -> list[tuple]:
        rows = db.execute(
            "SELECT id, path, size, attempts, retry_cap FROM files "
            f"WHERE state = 'PENDING' AND failures > 0 AND {_READY_AGAIN} ORDER BY id LIMIT ?",
            (now, now + RETRY_BACKOFF_MAX_S, wanted)).fetchall()
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
               reason: str = "", excuse: Excuse | None = None,
               reads: ReadCount | None = None) -> Completion:
        """Record the end of a job and move its files; idempotent for a repeated same outcome.

        reads: what a DONE job wrote, as its engine reported it (kept with the job; None:
        unknown). Ignored for any other outcome: nothing of that job's output is merged.

        failed maps link names of a DONE batch to a reason: those files count an attempt,
        unless excuse(path, size, mtime) gives a reason not to (the file is still being
        written). Every failure, counted or not, puts the file on a growing back-off.
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
                "SELECT id, link, size, attempts, path, mtime, failures FROM files "
                "WHERE job_id = ? AND state = 'ASSIGNED'", (job_id,)).fetchall()
            links = {row[1] for row in rows}
            unknown = sorted(set(failed) - links)
            if unknown:
                raise UnknownFailedFile(f"failed_files: {unknown[0][:80]!r} is not in job {job_id}")
            now = time.time()
            moves: list[tuple[str, str, int]] = []
            updates = []
            done_files = done_bytes = 0
            # Files named in a DONE batch are known bad one by one: they retry alone.
            retry_from = 1 if target is JobState.DONE else len(rows)
            for file_id, link, size, attempts, path, mtime, failures in rows:
                event, why = self._event_for(target, link, failed, reason, job_id)
                if event is FileEvent.FAIL and excuse is not None:
                    excused = excuse(path, size, mtime)
                    if excused:
                        event, why = FileEvent.DEFER, f"job {job_id}: {why}; not counted: {excused}"
                        log.info("job %s engine %s: file %s failed but %s: no attempt counted",
                                 job_id, engine_id, link, excused)
                outcome = file_transition(FileState.ASSIGNED, event, attempts,
                                          max_attempts=self.max_attempts, batch_files=retry_from)
                retry_at = None
                if event in (FileEvent.FAIL, FileEvent.DEFER):
                    failures += 1
                    retry_at = retry_clock() + retry_delay(failures)
                updates.append((outcome.state.value, outcome.attempts, outcome.retry_cap,
                                why, now, failures, retry_at, file_id))
                moves.append((FileState.ASSIGNED.value, outcome.state.value, size))
                if outcome.state is FileState.DONE:
                    done_files += 1
                    done_bytes += size
                elif outcome.state is FileState.QUARANTINED:
                    log.warning("job %s engine %s: file %s QUARANTINED after %d attempts: %s",
                                job_id, engine_id, link, outcome.attempts, why)
            db.executemany("UPDATE files SET state = ?, attempts = ?, retry_cap = ?, "
                           "reason = COALESCE(?, reason), updated = ?, failures = ?, retry_at = ? "
                           "WHERE id = ?", updates)
            if target is not JobState.DONE:
                reads = None
            db.execute("UPDATE jobs SET state = ?, fs_pending = 1, finished = ?, reason = ?, "
                       "reads_pass = ?, reads_fail = ? WHERE job_id = ?",
                       (target.value, now, reason or None,
                        reads.passed if reads else None, reads.failed if reads else None,
                        job_id))
        with self._lock:
            for old, new, size in moves:
                self.counters.move(old, new, size)
            if target is JobState.DONE:
                self.reads.add_job(reads)
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

    def unfinished(self, job_id: str) -> bool:
        """True while the job's filesystem moves are recorded but not acknowledged."""
        with self._lock:
            row = self._db.execute("SELECT fs_pending FROM jobs WHERE job_id = ?",
                                   (job_id,)).fetchone()
        return bool(row and row[0])

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

    def state_of(self, path: str) -> FileState | None:
        """The state of the file at path (input-relative); None when it is not known."""
        with self._lock:
            row = self._db.execute("SELECT state FROM files WHERE path = ?", (path,)).fetchone()
        return FileState(row[0]) if row else None

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
