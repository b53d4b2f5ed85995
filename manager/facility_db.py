"""The facility's own small database: one row per run, so states survive a restart.

Each run's files and jobs are in that run's Store (manager.store); this table holds only
what the facility decides about a run: its id, where it is, its state and why, its
settings (recorded when it is found, so a restart never changes a run's model half-way),
and its accounting (GPU seconds served, first and last batch times). It lives on the
manager host's local disk, keyed by the watch root (manager.statedir).
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .facility_states import RunState
from .statedir import keyed_db_path
from .store import DatabaseUnusable

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    rel TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    input_closed INTEGER NOT NULL DEFAULT 0,
    settings TEXT NOT NULL DEFAULT '{}',
    output_dir TEXT NOT NULL DEFAULT '',
    found_at REAL NOT NULL,
    first_batch_at REAL,
    last_batch_at REAL,
    served_s REAL NOT NULL DEFAULT 0,
    summary TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS identities (   -- manager.facility_identity
    fid TEXT PRIMARY KEY,                   -- POD5 file identifier
    run_id TEXT NOT NULL,                   -- the run that claimed it first
    path TEXT NOT NULL,                     -- where, relative to that run's directory
    done INTEGER NOT NULL DEFAULT 0         -- 1: basecalled there (DONE)
);
CREATE INDEX IF NOT EXISTS identities_run ON identities(run_id);
CREATE TABLE IF NOT EXISTS facility (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
SQL_VARIABLES = 500   # identities looked up per query (SQLite allows 999 variables at least)


def default_facility_db(root: str | os.PathLike[str], chosen: str = "") -> Path:
    """manager.db when given, else bcfacility-<root name>-<hash of the root>.sqlite in the
    state directory."""
    return Path(chosen) if chosen else keyed_db_path("bcfacility", root)


@dataclass
class RunRow:
    run_id: str
    rel: str
    state: RunState
    reason: str = ""
    input_closed: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    output_dir: str = ""
    found_at: float = 0.0
    first_batch_at: float | None = None
    last_batch_at: float | None = None
    served_s: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)


class FacilityDB:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = str(path)
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: safe from a killed process
            self._db.executescript(SCHEMA)
        except (sqlite3.DatabaseError, OSError) as exc:
            raise DatabaseUnusable(self.path, exc) from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self) -> "_Tx":
        return _Tx(self)

    def runs(self) -> list[RunRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT run_id, rel, state, reason, input_closed, settings, output_dir, found_at, "
                "first_batch_at, last_batch_at, served_s, summary FROM runs ORDER BY found_at, "
                "rel").fetchall()
        return [RunRow(r[0], r[1], RunState(r[2]), r[3], bool(r[4]), json.loads(r[5] or "{}"),
                       r[6], r[7], r[8], r[9], r[10], json.loads(r[11] or "{}")) for r in rows]

    def add(self, row: RunRow) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO runs (run_id, rel, state, reason, input_closed, settings, "
                       "output_dir, found_at, first_batch_at, last_batch_at, served_s, summary) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (row.run_id, row.rel, row.state.value, row.reason, int(row.input_closed),
                        json.dumps(row.settings), row.output_dir, row.found_at or time.time(),
                        row.first_batch_at, row.last_batch_at, row.served_s,
                        json.dumps(row.summary) if row.summary else ""))

    def save(self, row: RunRow) -> None:
        """Write the row's changing fields (where it is, state, reason, settings, accounting,
        summary)."""
        with self._tx() as db:
            db.execute("UPDATE runs SET rel = ?, state = ?, reason = ?, input_closed = ?, "
                       "settings = ?, output_dir = ?, first_batch_at = ?, last_batch_at = ?, "
                       "served_s = ?, summary = ? WHERE run_id = ?",
                       (row.rel, row.state.value, row.reason, int(row.input_closed),
                        json.dumps(row.settings), row.output_dir, row.first_batch_at,
                        row.last_batch_at, row.served_s,
                        json.dumps(row.summary) if row.summary else "", row.run_id))

    def delete(self, run_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))

    def claim_identities(self, run_id: str, claims: list[tuple[str, str]]
                         ) -> dict[str, tuple[str, str, bool]]:
        """Claim each (fid, path) for run_id unless another run has: those others' claims,
        fid -> (run id, path, done there)."""
        others: dict[str, tuple[str, str, bool]] = {}
        with self._tx() as db:
            db.executemany("INSERT OR IGNORE INTO identities (fid, run_id, path) "
                           "VALUES (?, ?, ?)", [(fid, run_id, path) for fid, path in claims])
            for start in range(0, len(claims), SQL_VARIABLES):
                chunk = [fid for fid, _ in claims[start:start + SQL_VARIABLES]]
                for fid, owner, where, done in db.execute(
                        f"SELECT fid, run_id, path, done FROM identities WHERE fid IN "
                        f"({','.join('?' * len(chunk))}) AND run_id != ?", (*chunk, run_id)):
                    others[fid] = (owner, where, bool(done))
        return others

    def transfer_identities(self, run_id: str, rows: list[tuple[str, str]]) -> None:
        """(fid, path) rows become run_id's, not done (their files moved into it)."""
        with self._tx() as db:
            db.executemany("UPDATE identities SET run_id = ?, path = ?, done = 0 WHERE fid = ?",
                           [(run_id, path, fid) for fid, path in rows])

    def adopt_identities(self, run_id: str, rows: list[tuple[str, str, bool]]) -> None:
        """Record (fid, path, done) rows as run_id's where no run has claimed them; a row
        already run_id's takes the done flag."""
        if not rows:
            return
        with self._tx() as db:
            db.executemany("INSERT INTO identities (fid, run_id, path, done) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT(fid) DO UPDATE SET done = MAX(done, excluded.done) "
                           "WHERE run_id = excluded.run_id",
                           [(fid, run_id, path, int(done)) for fid, path, done in rows])

    def mark_identities_done(self, run_id: str, fids: list[str]) -> None:
        if not fids:
            return
        with self._tx() as db:
            db.executemany("UPDATE identities SET done = 1 WHERE fid = ? AND run_id = ?",
                           [(fid, run_id) for fid in fids])

    def delete_identities(self, run_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM identities WHERE run_id = ?", (run_id,))

    def get_flag(self, key: str) -> str:
        with self._lock:
            found = self._db.execute("SELECT value FROM facility WHERE key = ?", (key,)).fetchone()
        return found[0] if found else ""

    def set_flag(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO facility (key, value) VALUES (?, ?)", (key, value))


class _Tx:
    def __init__(self, owner: FacilityDB):
        self.owner = owner

    def __enter__(self) -> sqlite3.Connection:
        self.owner._lock.acquire()
        self.owner._db.execute("BEGIN IMMEDIATE")
        return self.owner._db

    def __exit__(self, kind, value, tb) -> None:
        try:
            self.owner._db.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            self.owner._lock.release()

