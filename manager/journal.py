"""The finished-files journal: what is DONE, kept beside the outputs on the shared filesystem.

The database lives on the manager host's local disk (SQLite's WAL is unsafe on NFS and
Lustre), so it can be lost with its host, or a manager can be started elsewhere with a
new --db. The journal is what lets such a manager redo nothing: one line of JSON per
finished job, appended and fsync'd before the completion is acknowledged (and before
its outputs are merged), naming every file of the job by its identity.

    {"done": JOB, "engine": ENGINE, "t": WALL, "files": [[IDENTITY, PATH, SIZE], ...],
     "reads": [PASS, FAIL]}
    {"closed": true, "t": WALL}

IDENTITY is the POD5 file identifier, or "path:" + PATH for a file that could not be
identified. The file is only ever appended to (one writer, O_APPEND), which every
shared filesystem handles; a line torn by a crash is skipped on reading, and the next
append starts on a fresh line. Repeated records are harmless: reading keeps the last.

"reads" (the reads the job wrote, as its engine reported them) is there only when known:
the original engine reports none, and journals written before reads were counted have
none. A line without it, or with a malformed one, still records its files; only the
job's reads are then unknown to a database rebuilt from it.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .durable import fsync_dir
from .read_counts import ReadCount
from .state_file import NotRegularFile, check_regular, open_regular, open_regular_for_reading
from .store import DatabaseUnusable

log = logging.getLogger("bcmanager.journal")

FILE_NAME = "bcmanager.journal"
PATH_PREFIX = "path:"


@dataclass(frozen=True)
class JournalledFile:
    identity: str
    path: str
    size: int


@dataclass
class Replay:
    """What a journal says: finished jobs with their files, and whether the input was closed."""

    jobs: dict[str, tuple[str, list[JournalledFile]]] = field(default_factory=dict)
    reads: dict[str, ReadCount] = field(default_factory=dict)   # jobs whose reads are known
    input_closed: bool = False
    skipped_lines: int = 0

    @property
    def files(self) -> int:
        return sum(len(files) for _, files in self.jobs.values())


class JournalUnusable(DatabaseUnusable):
    """The journal's path is not a regular file (a FIFO, a directory, a socket): the
    manager refuses to start (exit 78) rather than block on it or fail later."""

    def __init__(self, path: Path, why: str):
        Exception.__init__(self, f"cannot use the finished-files journal {path}: {why} (it "
                                 f"must be a regular file, or absent)")


def identity_of(fid: str | None, path: str) -> str:
    return fid or PATH_PREFIX + path


class Journal:
    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / FILE_NAME
        self._fd: int | None = None
        try:
            check_regular(self.path)
        except NotRegularFile as exc:
            raise JournalUnusable(self.path, exc.strerror) from None

    def _open(self) -> int:
        if self._fd is None:
            created = not self.path.exists()
            fd = open_regular(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    os.write(fd, b"\n")  # a torn line from a crash stays alone on its line
                if created:
                    fsync_dir(self.path.parent)
            except OSError:
                os.close(fd)
                raise
            self._fd = fd
        return self._fd

    def _append(self, record: dict) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        fd = self._open()
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to {self.path} ({written} of {len(line)} bytes)")
        os.fsync(fd)

    def record_done(self, job_id: str, engine_id: str, files: Iterable[JournalledFile],
                    reads: ReadCount | None = None) -> None:
        """Append a finished job (with its reads when known); durable when this returns
        (raises OSError otherwise)."""
        record: dict = {"done": job_id, "engine": engine_id, "t": round(time.time(), 3),
                        "files": [[f.identity, f.path, f.size] for f in files]}
        if reads is not None:
            record["reads"] = [reads.passed, reads.failed]
        self._append(record)

    def record_closed(self) -> None:
        self._append({"closed": True, "t": round(time.time(), 3)})

    def has_records(self) -> bool:
        try:
            return self.path.stat().st_size > 0
        except OSError:
            return False

    def replay(self) -> Replay:
        out = Replay()
        try:
            fh = open_regular_for_reading(self.path)
        except FileNotFoundError:
            return out
        except NotRegularFile as exc:
            raise JournalUnusable(self.path, exc.strerror) from None
        with fh:
            for raw in fh:
                try:
                    record = json.loads(raw)
                    if record.get("closed"):
                        out.input_closed = True
                        continue
                    files = [JournalledFile(str(i), str(p), int(s)) for i, p, s in record["files"]]
                    job_id = str(record["done"])
                    out.jobs[job_id] = (str(record["engine"]), files)
                    reads = _reads_of(record)
                    if reads is not None:
                        out.reads[job_id] = reads
                except (ValueError, KeyError, TypeError, AttributeError):
                    if raw.strip():
                        out.skipped_lines += 1
        if out.skipped_lines:
            log.warning("journal %s: %d unreadable lines skipped (a write torn by a crash)",
                        self.path, out.skipped_lines)
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _reads_of(record: dict) -> ReadCount | None:
    """A line's [PASS, FAIL]; None when absent or not two counts (the files still count)."""
    value = record.get("reads")
    if (isinstance(value, list) and len(value) == 2
            and all(type(n) is int and n >= 0 for n in value)):
        return ReadCount(value[0], value[1])
    return None
