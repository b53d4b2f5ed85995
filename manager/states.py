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


class FileEvent(str, enum.Enum):
    ASSIGN = "ASSIGN"        # handed out in a batch
    SUCCEED = "SUCCEED"      # its batch is DONE and it was not named as failed
    FAIL = "FAIL"            # its batch FAILED, or it was named in failed_files
    RETURN = "RETURN"        # batch STOPPED or its lease expired: not the file's fault


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

    A failure counts an attempt; past max_attempts the file is QUARANTINED. A file
    that will be tried again goes out in a smaller batch (half its failed batch),
    and alone when one try is left, so a single bad file cannot use up the
    attempts of its neighbours.
    """
    if event is FileEvent.ASSIGN and state is FileState.PENDING:
        return FileOutcome(FileState.ASSIGNED, attempts, None)
    if state is not FileState.ASSIGNED:
        raise TransitionError(f"file in state {state.value} cannot take event {event.value}")
    if event is FileEvent.SUCCEED:
        return FileOutcome(FileState.DONE, attempts, None)
    if event is FileEvent.RETURN:
        return FileOutcome(FileState.PENDING, attempts, None)
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
