"""What an engine means to do next, and why: keep working, drain, or stop.

One value held by the engine and changed only through `Intent.change()`, which
says which requests count: a stop is final, and asking again for the goal there
already is keeps the first reason.
"""
from __future__ import annotations

import dataclasses
import enum


class Goal(enum.Enum):
    WORK = "work"     # ask for batches and basecall them
    DRAIN = "drain"   # finish (and report) the current batch, then exit 0
    STOP = "stop"     # stop the basecaller now, report STOPPED, exit 0


class Cause(enum.Enum):
    """Who asked for the goal."""

    START = "started"
    DRAIN_COMMAND = "drain requested by the parent"
    RESUME_COMMAND = "resume requested by the parent"
    STOP_COMMAND = "stop requested by the parent"
    SIGNAL = "signal"                 # the first SIGTERM/SIGINT: drain
    SIGNAL_AGAIN = "signal again"     # the second one: stop now
    PARENT_GONE = "parent gone"       # the orchestrator died: stop, quickly
    NOTHING_LEFT = "nothing left to basecall"


@dataclasses.dataclass(frozen=True)
class Intent:
    goal: Goal = Goal.WORK
    cause: Cause = Cause.START
    reason: str = "working"           # for logs, the exit reason and a STOPPED report

    def change(self, goal: Goal, cause: Cause, reason: str = "") -> Intent | None:
        """The intent after a request, or None when the request changes nothing."""
        if self.goal is Goal.STOP or goal is self.goal:
            return None
        return Intent(goal, cause, reason or cause.value)

    @property
    def working(self) -> bool:
        return self.goal is Goal.WORK

    @property
    def stopping(self) -> bool:
        return self.goal is Goal.STOP

    @property
    def exit_reason(self) -> str:
        if self.goal is Goal.DRAIN and self.cause is not Cause.NOTHING_LEFT:
            return "drained"
        return self.reason
