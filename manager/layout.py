"""The jobs' directories on the shared filesystem (DESIGN.md §4), and their moves.

    INPUT_DIR/ASSIGNED_<job>_<engine>/       symlinks to the batch's files (relative, so
                                             they resolve on every host's mount point)
    OUTPUT_DIR/TMPOUTPUT_<job>_<engine>/     pass/ and fail/ written by the basecaller
    DONE     -> OUTPUT_DIR/{pass,fail}/<job>_<name>, the rest -> LOGOUTPUT_<job>_<engine>/
    FAILED   -> INPUT_DIR/FAILED_<job>_<engine>/, OUTPUT_DIR/FAILEDOUTPUT_<job>_<engine>/
    STOPPED  -> STOPPEDOUTPUT_<job>_<engine>/ (never merged), ASSIGNED_ removed
    EXPIRED  -> LATEOUTPUT_<job>_<engine>/ (never merged), ASSIGNED_ removed

Every step is a rename on one filesystem (atomic), and every step checks what is
already at its destination, so settle() can be run again after a crash half-way
through and finishes the job without moving anything twice. Only symlinks are ever
deleted from INPUT_DIR, never real input files.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from .states import JobState
from .store import Job

log = logging.getLogger("bcmanager.layout")

ASSIGNED = "ASSIGNED_"
FAILED = "FAILED_"
TMPOUTPUT = "TMPOUTPUT_"
OWN_INPUT_PREFIXES = (ASSIGNED, FAILED)
_DISCARD_PREFIX = {JobState.STOPPED: "STOPPEDOUTPUT_", JobState.EXPIRED: "LATEOUTPUT_"}


class Layout:
    def __init__(self, input_dir: str | Path, output_dir: str | Path):
        self.input_dir = Path(input_dir)
        self.output_dir = Path(output_dir)

    def create_roots(self) -> None:
        for sub in ("pass", "fail"):
            (self.output_dir / sub).mkdir(parents=True, exist_ok=True)

    @staticmethod
    def suffix(job_id: str, engine_id: str) -> str:
        return f"{job_id}_{engine_id}"

    def assigned_dir(self, job: Job) -> Path:
        return self.input_dir / (ASSIGNED + self.suffix(job.job_id, job.engine_id))

    def tmp_output_dir(self, job: Job) -> Path:
        return self.output_dir / (TMPOUTPUT + self.suffix(job.job_id, job.engine_id))

    def prepare(self, job: Job) -> None:
        """Create the job's input dir of symlinks and its output dirs (idempotent)."""
        assigned = str(self.assigned_dir(job))
        _mkdir(assigned)
        for f in job.files:
            try:
                os.symlink(os.path.join("..", f.path), os.path.join(assigned, f.link))
            except FileExistsError:
                pass  # made before a crash; the store fixes name -> path, so it is this one
        tmp = str(self.tmp_output_dir(job))
        for path in (tmp, os.path.join(tmp, "pass"), os.path.join(tmp, "fail")):
            _mkdir(path)

    def settle(self, job: Job) -> None:
        """Carry out the filesystem side of a finished job (idempotent)."""
        tag = f"job {job.job_id} engine {job.engine_id}"
        suffix = self.suffix(job.job_id, job.engine_id)
        if job.state is JobState.DONE:
            self._merge_outputs(job, tag)
            _rename_once(self.tmp_output_dir(job), self.output_dir / f"LOGOUTPUT_{suffix}", tag)
            _remove_links(self.assigned_dir(job), tag)
        elif job.state is JobState.FAILED:
            _rename_once(self.assigned_dir(job), self.input_dir / f"{FAILED}{suffix}", tag)
            _rename_once(self.tmp_output_dir(job), self.output_dir / f"FAILEDOUTPUT_{suffix}", tag)
        elif job.state in _DISCARD_PREFIX:
            _remove_links(self.assigned_dir(job), tag)
            self.discard_output(job)
        else:
            raise ValueError(f"{tag}: cannot settle a job in state {job.state.value}")

    def discard_output(self, job: Job) -> None:
        """Put aside what a stopped or late engine wrote; it is never merged."""
        prefix = _DISCARD_PREFIX.get(job.state, "LATEOUTPUT_")
        _rename_once(self.tmp_output_dir(job),
                     self.output_dir / f"{prefix}{self.suffix(job.job_id, job.engine_id)}",
                     f"job {job.job_id} engine {job.engine_id}")

    def set_aside_unknown(self, known: "Callable[[str], bool]") -> list[str]:
        """Put aside the dirs of jobs the store does not know (after a lost database).

        Such a job was live when the database was lost: its engine is told `late`, so its
        output must never be merged: TMPOUTPUT_ becomes LATEOUTPUT_, and its ASSIGNED_ dir
        of symlinks goes. Returns the job ids set aside.
        """
        found: list[str] = []
        for root, prefix in ((self.output_dir, TMPOUTPUT), (self.input_dir, ASSIGNED)):
            try:
                names = [e.name for e in os.scandir(root) if e.name.startswith(prefix)]
            except OSError:
                continue
            for name in names:
                suffix = name[len(prefix):]
                job_id = suffix.partition("_")[0]
                if known(job_id):
                    continue
                tag = f"job {job_id} (unknown to this database)"
                if prefix == TMPOUTPUT:
                    _rename_once(root / name, self.output_dir / f"LATEOUTPUT_{suffix}", tag)
                else:
                    _remove_links(root / name, tag)
                found.append(job_id)
        return sorted(set(found))

    def _merge_outputs(self, job: Job, tag: str) -> None:
        tmp = self.tmp_output_dir(job)
        for sub in ("pass", "fail"):
            source = tmp / sub
            if not source.is_dir():
                continue
            target = self.output_dir / sub
            if not target.is_dir():  # made at start; an operator may have removed it since
                target.mkdir(parents=True, exist_ok=True)
            with os.scandir(source) as entries:
                names = [e.name for e in entries]
            for name in names:
                dest = target / f"{job.job_id}_{name}"
                if os.path.lexists(dest):
                    log.warning("%s: %s already exists; %s stays in the job's log dir",
                                tag, dest, name)
                    continue
                os.rename(source / name, dest)


def _mkdir(path: str) -> None:
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


def _rename_once(source: Path, dest: Path, tag: str) -> None:
    """Rename source to dest; if dest is taken (a late engine wrote again), use dest.N."""
    if not os.path.lexists(source):
        return
    candidate, n = dest, 0
    while os.path.lexists(candidate):
        n += 1
        candidate = dest.with_name(f"{dest.name}.{n}")
    os.rename(source, candidate)
    log.info("%s: %s -> %s", tag, source.name, candidate.name)


def _remove_links(directory: Path, tag: str) -> None:
    """Remove a job's dir of symlinks; anything that is not a symlink is left alone."""
    if not directory.is_dir() or directory.is_symlink():
        return
    kept = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_symlink():
                os.unlink(entry.path)
            else:
                kept.append(entry.name)
    if kept:
        log.warning("%s: %s holds %d entries that are not symlinks; left in place",
                    tag, directory, len(kept))
        return
    directory.rmdir()
