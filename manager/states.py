"""The two state machines of the manager: one for a file, one for a job.

Each is an enum and one transition function; the store applies what these return
and nothing else moves a file or a job between states.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class FileState(str, enum.Enum):
    PENDING = "PENDING"
    ASSIGNED = "ASSIGNED"
    DONE = "DONE"
    QUARANTINED = "QUARANTINED"
    DUPLICATE = "DUPLICATE"      # another copy of a file already known (same POD5 identifier)


class FileEvent(str, enum.Enum):
    ASSIGN = "ASSIGN"        # handed out in a batch
    SUCCEED = "SUCCEED"      # its batch is DONE and it was not named as failed
    FAIL = "FAIL"            # its batch FAILED, or it was named in failed_files
    RETURN = "RETURN"        # batch STOPPED or its lease expired: not the file's fault
    DEFER = "DEFER"          # it failed while still being written (input open): no attempt
    REEXAMINE = "REEXAMINE"  # a QUARANTINED file changed on disk: it gets a fresh start


class JobState(str, enum.Enum):
    LIVE = "LIVE"
    DONE = "DONE"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    EXPIRED = "EXPIRED"

    @property
    def final(self) -> bool:
        return self is not JobState.LIVE


class TransitionError(ValueError):
    """An event that the current state does not accept (a bug in the caller)."""


@dataclass(frozen=True)
class FileOutcome:
    state: FileState
    attempts: int
    retry_cap: int | None   # largest batch this file may go out in next (None = any)


def file_transition(state: FileState, event: FileEvent, attempts: int, *,
                    max_attempts: int, batch_files: int = 1) -> FileOutcome:
    """Where a file goes on an event.

    A failure counts an attempt (unless DEFERred: the file was still being written);
    past max_attempts the file is QUARANTINED, until it changes on disk. A file
    that will be tried again goes out in a smaller batch (half its failed batch),
    and alone when one try is left, so a single bad file cannot use up the
    attempts of its neighbours.
    """
    if event is FileEvent.ASSIGN and state is FileState.PENDING:
        return FileOutcome(FileState.ASSIGNED, attempts, None)
    if event is FileEvent.REEXAMINE and state is FileState.QUARANTINED:
        return FileOutcome(FileState.PENDING, 0, None)
    if state is not FileState.ASSIGNED:
        raise TransitionError(f"file in state {state.value} cannot take event {event.value}")
    if event is FileEvent.SUCCEED:
        return FileOutcome(FileState.DONE, attempts, None)
    if event is FileEvent.RETURN:
        return FileOutcome(FileState.PENDING, attempts, None)
    if event is FileEvent.DEFER:
        return FileOutcome(FileState.PENDING, attempts, 1)
    if event is FileEvent.FAIL:
        attempts += 1
        if attempts >= max_attempts:
            return FileOutcome(FileState.QUARANTINED, attempts, None)
        tries_left = max_attempts - attempts
        cap = 1 if tries_left <= 1 else max(1, batch_files // 2)
        return FileOutcome(FileState.PENDING, attempts, cap)
    raise TransitionError(f"file in state {state.value} cannot take event {event.value}")


_JOB_EDGES = {
    JobState.LIVE: {JobState.DONE, JobState.FAILED, JobState.STOPPED, JobState.EXPIRED},
}


def job_transition(state: JobState, target: JobState) -> JobState:
    """A live job ends exactly once; a finished job never changes again."""
    if target not in _JOB_EDGES.get(state, ()):
        raise TransitionError(f"job in state {state.value} cannot become {target.value}")
    return target


RETRY_BACKOFF_BASE_S = 1.0
RETRY_BACKOFF_MAX_S = 60.0


def retry_delay(failures: int) -> float:
    """Seconds before a file that failed `failures` times may go out again: 1, 2, 4 ... 60.

    Three failures of one file therefore take at least 3 s, whatever the engines do.
    """
    if failures <= 0:
        return 0.0
    return min(RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_BASE_S * 2 ** (failures - 1))
