"""A run's state in a facility, and the one function that changes it.

    ACTIVE       files are found and handed out
    PAUSED       no new batches; running batches finish; files are still found
    CLOSED       no new files (final summary or `run close`); the rest is handed out
    COMPLETE     closed and every file settled: bcorch_summary.json written
    CANCELLED    no new batches ever; unfinished files are left as they are
    QUARANTINED  its settings are bad (the reason says which); `run resume` re-reads them

Whether a paused run's input is closed is kept beside the state (the facility's
`input_closed`), so a paused run that is closed resumes to CLOSED.
"""
from __future__ import annotations

import enum


class RunState(str, enum.Enum):
    ACTIVE = "ACTIVE"
    PAUSED = "PAUSED"
    CLOSED = "CLOSED"
    COMPLETE = "COMPLETE"
    CANCELLED = "CANCELLED"
    QUARANTINED = "QUARANTINED"

    @property
    def final(self) -> bool:
        return self in (RunState.COMPLETE, RunState.CANCELLED)

    @property
    def serving(self) -> bool:
        """Its files may be handed out."""
        return self in (RunState.ACTIVE, RunState.CLOSED)


class RunEvent(str, enum.Enum):
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    CLOSE = "close"          # by command or MinKNOW's final summary
    SETTLED = "settled"      # closed and every file DONE/QUARANTINED/DUPLICATE
    QUARANTINE = "quarantine"


COMMANDS = (RunEvent.PAUSE, RunEvent.RESUME, RunEvent.CANCEL, RunEvent.CLOSE)


class TransitionRefused(ValueError):
    """A change that the run's state does not allow; str() is a one-line reason."""


def transition(state: RunState, event: RunEvent, input_closed: bool) -> RunState:
    """The state after `event`, or TransitionRefused. Repeating a command is allowed and
    changes nothing (pause a PAUSED run, close a CLOSED one)."""
    S, E = RunState, RunEvent
    if event is E.QUARANTINE:
        if state.final:
            raise TransitionRefused(f"the run is {state.value}")
        return S.QUARANTINED
    if state is S.COMPLETE:
        if event in (E.CLOSE, E.SETTLED):
            return state
        raise TransitionRefused(f"the run is COMPLETE: every file is settled and its "
                                f"summary written; nothing to {event.value}")
    if state is S.CANCELLED:
        if event in (E.CANCEL, E.SETTLED):
            return state
        raise TransitionRefused(f"the run was CANCELLED: it cannot be {_past(event)}")
    if event is E.CANCEL:
        return S.CANCELLED
    if state is S.QUARANTINED:
        if event is E.RESUME:
            return S.CLOSED if input_closed else S.ACTIVE
        if event is E.CLOSE:
            return state
        raise TransitionRefused(f"the run is QUARANTINED: fix its settings and resume it, "
                                f"or cancel it (not {event.value})")
    if event is E.PAUSE:
        return S.PAUSED
    if event is E.RESUME:
        return S.CLOSED if (input_closed or state is S.CLOSED) else S.ACTIVE
    if event is E.CLOSE:
        return S.PAUSED if state is S.PAUSED else S.CLOSED
    if event is E.SETTLED:
        return S.COMPLETE if state is S.CLOSED else state
    raise TransitionRefused(f"unknown event {event!r}")  # pragma: no cover


def _past(event: RunEvent) -> str:
    return {"pause": "paused", "resume": "resumed", "close": "closed"}.get(event.value,
                                                                           event.value)
