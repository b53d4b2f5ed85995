"""One GPU slot: its explicit state machine, restart accounting and backoff.

Every state change goes through `transition()`, which checks that the change is
allowed and logs it with the GPU and engine id. Only the supervisor loop calls it.
"""
from __future__ import annotations

import collections
import enum
import logging
from dataclasses import dataclass, field
from typing import Any

from bcorch.workers.channel import Heartbeat

from .gpus import Gpu, GpuHealth

log = logging.getLogger("orchestrator.slot")

FIRST_RESTART_DELAY_S = 0.5


class SlotState(str, enum.Enum):
    STARTING = "STARTING"   # engine spawned, READY not seen yet
    RUNNING = "RUNNING"     # READY seen, heartbeats arriving
    DRAINING = "DRAINING"   # told to finish its batch and exit
    BACKOFF = "BACKOFF"     # no engine; waiting for restart_at or for the manager
    FAILED = "FAILED"       # no engine; waits for an operator's resume
    STOPPED = "STOPPED"     # no engine; done (drained, finished, or parked by an operator)

    @property
    def has_process(self) -> bool:
        return self in (SlotState.STARTING, SlotState.RUNNING, SlotState.DRAINING)


S = SlotState
ALLOWED: dict[SlotState, frozenset[SlotState]] = {
    S.STARTING: frozenset({S.RUNNING, S.DRAINING, S.BACKOFF, S.FAILED, S.STOPPED}),
    S.RUNNING: frozenset({S.DRAINING, S.BACKOFF, S.FAILED, S.STOPPED}),
    S.DRAINING: frozenset({S.RUNNING, S.STARTING, S.BACKOFF, S.FAILED, S.STOPPED}),
    S.BACKOFF: frozenset({S.STARTING, S.FAILED, S.STOPPED}),
    S.FAILED: frozenset({S.STARTING}),
    S.STOPPED: frozenset({S.STARTING, S.FAILED}),
}


class AfterExit(str, enum.Enum):
    """What the loop does when a slot's engine exits (set when it is told to drain)."""

    DECIDE = "decide"     # judge by exit code (crash, 75, 78, 0)
    STOP = "stop"         # drained on purpose: STOPPED
    RESTART = "restart"   # graceful restart: STARTING at once
    FAIL = "fail"         # the GPU is unhealthy: FAILED


class IllegalTransition(RuntimeError):
    pass


class SlotLog(logging.LoggerAdapter):
    """Prefixes every line with the GPU and the engine id."""

    def process(self, msg, kwargs):
        return f"[gpu{self.extra['gpu']} {self.extra['engine_id']}] {msg}", kwargs


@dataclass
class RestartPolicy:
    backoff_max_s: float = 300.0
    healthy_reset_s: float = 600.0
    max_restarts: int = 5
    window_s: float = 600.0
    first_delay_s: float = FIRST_RESTART_DELAY_S

    @classmethod
    def from_config(cls, orch: Any) -> "RestartPolicy":
        return cls(backoff_max_s=orch.restart_backoff_max_s, healthy_reset_s=orch.healthy_reset_s,
                   max_restarts=orch.max_restarts, window_s=orch.restart_window_s)


@dataclass
class Slot:
    gpu: Gpu
    engine_id: str
    state: SlotState = SlotState.STOPPED
    reason: str = "not started"
    since: float = 0.0
    # the engine process
    process: Any = None
    conn: Any = None
    pid: int | None = None
    started_at: float | None = None
    ready_at: float | None = None
    last_message_at: float | None = None
    heartbeat: Heartbeat | None = None    # the last one since the engine started
    known_tree: list[Any] = field(default_factory=list)  # psutil.Process of its children
    kill_list: list[Any] = field(default_factory=list)   # the tree being stopped
    hung: bool = False
    exiting_reason: str = ""
    # drain and stop
    after_exit: AfterExit = AfterExit.DECIDE
    drain_deadline: float | None = None
    stop_sent_at: float | None = None
    kill_at: float | None = None
    parked: bool = False                  # drained by an operator: bcorch stays up
    # restarts
    restarts: int = 0
    crash_times: collections.deque = field(default_factory=collections.deque)
    consecutive_crashes: int = 0
    restart_at: float | None = None
    waiting_for_manager: bool = False
    failed_by_config: bool = False
    last_exit: str = "-"
    last_exit_code: int | None = None
    # GPU health
    health: GpuHealth | None = None
    gpu_failure: str = ""
    ecc_baseline: int | None = None
    xid_baseline: int = 0

    def __post_init__(self) -> None:
        self.log = SlotLog(log, {"gpu": self.gpu.index, "engine_id": self.engine_id})

    def record_crash(self, now: float, policy: RestartPolicy) -> float | None:
        """Count a crash; the delay before the restart, or None when the slot must fail."""
        if (self.ready_at is not None and now - self.ready_at >= policy.healthy_reset_s):
            self.consecutive_crashes = 0
        self.crash_times.append(now)
        while self.crash_times and now - self.crash_times[0] > policy.window_s:
            self.crash_times.popleft()
        if len(self.crash_times) > policy.max_restarts:
            return None
        self.consecutive_crashes += 1
        delay = policy.first_delay_s * 2 ** (self.consecutive_crashes - 1)
        return min(delay, policy.backoff_max_s)

    def clear_failures(self) -> None:
        """An operator's resume: forget crashes, GPU failure and backoff."""
        self.crash_times.clear()
        self.consecutive_crashes = 0
        self.failed_by_config = False
        self.gpu_failure = ""
        self.restart_at = None
        self.waiting_for_manager = False
        if self.health is not None:
            self.ecc_baseline = self.health.ecc_uncorrected
            self.xid_baseline = self.health.xid_events

    def clear_process(self) -> None:
        self.process = self.conn = self.pid = None
        self.started_at = self.ready_at = self.last_message_at = None
        self.heartbeat = None
        self.known_tree = []
        self.kill_list = []
        self.hung = False
        self.exiting_reason = ""
        self.after_exit = AfterExit.DECIDE
        self.drain_deadline = self.stop_sent_at = self.kill_at = None

    def snapshot(self, now: float) -> dict[str, Any]:
        hb: Heartbeat | dict[str, Any] = self.heartbeat or {}
        return {
            "gpu": self.gpu.index, "uuid": self.gpu.uuid, "name": self.gpu.name,
            "virtual": self.gpu.virtual, "engine_id": self.engine_id,
            "state": self.state.value, "reason": self.reason,
            "in_state_s": round(now - self.since, 1), "pid": self.pid,
            "engine_state": hb.get("state"), "job_id": hb.get("job_id"),
            "batch_size": hb.get("batch_size"), "batch_elapsed_s": hb.get("batch_elapsed_s"),
            "basecaller_pid": hb.get("basecaller_pid"),
            "batches_done": hb.get("batches_done"), "files_done": hb.get("files_done"),
            "files_failed": hb.get("files_failed"), "last_error": hb.get("last_error"),
            "heartbeat_age_s": (round(now - self.last_message_at, 1)
                                if self.last_message_at is not None else None),
            "restarts": self.restarts, "last_exit": self.last_exit,
            "restart_in_s": (round(max(0.0, self.restart_at - now), 1)
                             if self.restart_at is not None else None),
            "waiting_for_manager": self.waiting_for_manager,
            "gpu_failure": self.gpu_failure,
            "health": self.health.to_dict() if self.health is not None else None,
        }


def transition(slot: Slot, new: SlotState, reason: str, now: float) -> None:
    """The one way a slot changes state: checked against ALLOWED and logged."""
    old = slot.state
    if new is not old and new not in ALLOWED[old]:
        raise IllegalTransition(f"gpu{slot.gpu.index}: {old.value} -> {new.value} ({reason})")
    slot.state, slot.reason, slot.since = new, reason, now
    level = logging.WARNING if new in (SlotState.FAILED, SlotState.BACKOFF) else logging.INFO
    slot.log.log(level, "%s -> %s (%s)", old.value, new.value, reason)
