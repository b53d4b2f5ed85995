"""One GPU slot: its state machine, and what each event means for it.

The slot decides; the supervisor loop carries out (in the spirit of gunicorn's arbiter).
Every event is a method that changes the slot's state through `transition()` and returns
a `Decision`: start an engine, send it a command, stop its process tree, or suspect the
manager. The slot never touches a process or a pipe, so its policies (backoff, crash
loop, hang, drain, manager outage) are tested with a plain clock and no processes.

    STARTING -> RUNNING -> DRAINING -> (exit)        finish the batch, then exit
                        -> STOPPING -> (exit)        stop the batch now (told "stop")
    any live state -> KILLING -> (exit)               TERM to the tree, KILL after a grace
    (exit) -> STARTING | BACKOFF | FAILED | STOPPED   judged by `on_exit`
"""
from __future__ import annotations

import collections
import enum
import logging
import signal
from dataclasses import dataclass, field
from typing import Any

from bcorch.protocol import EXIT_CONFIG, EXIT_OK, EXIT_PROTOCOL
from bcorch.workers.channel import Heartbeat, Msg, as_heartbeat

from .gpus import Gpu
from .gpu_policy import HealthWatch
from .proctree import KILL_GRACE_S

log = logging.getLogger("orchestrator.slot")

FIRST_RESTART_DELAY_S = 0.5
STOP_GRACE_S = 10.0       # told "stop" -> the tree is killed if the engine is still there


class SlotState(str, enum.Enum):
    STARTING = "STARTING"   # engine spawned, READY not seen yet
    RUNNING = "RUNNING"     # READY seen, heartbeats arriving
    DRAINING = "DRAINING"   # told to finish its batch and exit
    STOPPING = "STOPPING"   # told to stop its batch now (reported STOPPED) and exit
    KILLING = "KILLING"     # its process tree got TERM; KILL follows after a grace
    BACKOFF = "BACKOFF"     # no engine; waiting for the restart time or for the manager
    FAILED = "FAILED"       # no engine; waits for an operator's resume
    STOPPED = "STOPPED"     # no engine; done (drained, finished, or parked by an operator)

    @property
    def has_process(self) -> bool:
        return self in LIVE


S = SlotState
LIVE = frozenset({S.STARTING, S.RUNNING, S.DRAINING, S.STOPPING, S.KILLING})
_AFTER_EXIT = frozenset({S.STARTING, S.BACKOFF, S.FAILED, S.STOPPED})
ALLOWED: dict[SlotState, frozenset[SlotState]] = {
    S.STARTING: frozenset({S.RUNNING, S.DRAINING, S.STOPPING, S.KILLING}) | _AFTER_EXIT - {S.STARTING},
    S.RUNNING: frozenset({S.DRAINING, S.STOPPING, S.KILLING}) | _AFTER_EXIT,
    S.DRAINING: frozenset({S.RUNNING, S.STARTING, S.STOPPING, S.KILLING}) | _AFTER_EXIT,
    S.STOPPING: frozenset({S.KILLING}) | _AFTER_EXIT,
    S.KILLING: _AFTER_EXIT,
    S.BACKOFF: frozenset({S.STARTING, S.FAILED, S.STOPPED}),
    S.FAILED: frozenset({S.STARTING}),
    S.STOPPED: frozenset({S.STARTING, S.FAILED}),
}


class AfterExit(str, enum.Enum):
    """What the engine's exit will mean, decided when it was told to go."""

    DECIDE = "decide"     # judge by exit code (crash, 75, 78, 0)
    STOP = "stop"         # bcorch drains or stops: STOPPED
    PARK = "park"         # an operator drained it: STOPPED until resumed, bcorch stays up
    RESTART = "restart"   # graceful restart: STARTING at once
    FAIL = "fail"         # the GPU is unhealthy: FAILED
    HUNG = "hung"         # silent past hang_timeout_s: counted as a crash


class Failure(str, enum.Enum):
    CRASHES = "crashes"   # too many crashes in the window
    CONFIG = "config"     # exit 78
    GPU = "gpu"           # NVML says the GPU is unhealthy


class Do(str, enum.Enum):
    NOTHING = "nothing"
    SPAWN = "spawn"
    SEND_DRAIN = "drain"
    SEND_RESUME = "resume"
    SEND_STOP = "stop"
    TERM_TREE = "term"
    KILL_TREE = "kill"
    SUSPECT_MANAGER = "suspect"
    REMEMBER_TREE = "remember"    # a new basecaller: note the engine's tree while it is a child


@dataclass(frozen=True)
class Decision:
    """What the loop must do for a slot; `reason` is for the log or the spawn's cause."""

    do: Do = Do.NOTHING
    reason: str = ""
    after_outage: bool = False   # SPAWN: the first request of the new engine is spread
    counted: bool = False        # SPAWN: an automatic restart (shown in RESTARTS)


NOTHING = Decision()


@dataclass(frozen=True)
class World:
    """What the slot needs to know of the rest of the host to decide."""

    host_state: str = "RUNNING"           # the supervisor's HostState value
    manager_down: bool = False            # the probe says the manager does not answer
    manager_known_up: bool = True         # not down, and no probe pending
    wait_for_manager: bool = True         # on_manager_failure = "wait"

    @property
    def host_running(self) -> bool:
        return self.host_state == "RUNNING"


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
    hang_timeout_s: float = 60.0
    drain_timeout_s: float = 300.0
    stop_grace_s: float = STOP_GRACE_S
    kill_grace_s: float = KILL_GRACE_S

    @classmethod
    def from_config(cls, orch: Any) -> "RestartPolicy":
        return cls(backoff_max_s=orch.restart_backoff_max_s, healthy_reset_s=orch.healthy_reset_s,
                   max_restarts=orch.max_restarts, window_s=orch.restart_window_s,
                   hang_timeout_s=orch.hang_timeout_s, drain_timeout_s=orch.drain_timeout_s)


@dataclass
class EngineProcess:
    """One engine process as its slot knows it; replaced at every start."""

    pid: int | None
    started_at: float
    process: Any = None                   # multiprocessing.Process (None in policy tests)
    conn: Any = None                      # the parent's end of the pipe
    tree: Any = None                      # proctree.ProcessTree
    ready_at: float | None = None
    last_message_at: float | None = None
    heartbeat: Heartbeat | None = None    # the last one since the engine started
    exiting_reason: str = ""

    def silent_since(self) -> float:
        return self.last_message_at if self.last_message_at is not None else self.started_at


def describe_exit(code: int | None) -> str:
    if code is None:
        return "?"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


@dataclass
class Slot:
    gpu: Gpu
    engine_id: str
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    state: SlotState = SlotState.STOPPED
    reason: str = "not started"
    since: float = 0.0
    engine: EngineProcess | None = None
    after: AfterExit = AfterExit.DECIDE
    deadline: float | None = None         # of the state: drain, stop or kill grace, restart time
    # restarts
    restarts: int = 0                     # automatic restarts (after a crash, hang or outage)
    crash_times: collections.deque = field(default_factory=collections.deque)
    consecutive_crashes: int = 0
    waiting_for_manager: bool = False     # BACKOFF until the manager answers again
    parked: bool = False                  # STOPPED by an operator: bcorch stays up for a resume
    failure: Failure | None = None
    last_exit: str = "-"
    last_exit_code: int | None = None
    # GPU health
    watch: HealthWatch = field(default_factory=HealthWatch)
    gpu_failure: str = ""

    def __post_init__(self) -> None:
        self.log = SlotLog(log, {"gpu": self.gpu.index, "engine_id": self.engine_id})

    # --- the engine starts and speaks ---------------------------------------------------
    def started(self, engine: EngineProcess, reason: str, counted: bool, now: float) -> None:
        self.engine, self.after, self.deadline = engine, AfterExit.DECIDE, None
        self.waiting_for_manager = False
        if counted:
            self.restarts += 1
        self._to(S.STARTING, f"{reason}; pid {engine.pid}", now)

    def start_failed(self, error: str, reason: str, world: World, now: float) -> Decision:
        self.engine = None
        self._to(S.STARTING, reason, now)
        self.log.error("cannot start the engine process: %s", error)
        return self._crashed(f"spawn failed: {error}", None, world, now)

    def on_engine_message(self, msg: Any, world: World, now: float) -> Decision:
        """What a message from the engine means (workers/channel.py is the contract)."""
        self.on_message(now)
        if not isinstance(msg, dict):
            self.log.warning("ignoring a message that is not a dict: %r", msg)
            return NOTHING
        kind = msg.get("type")
        if kind == Msg.READY.value:
            self.on_ready(now)
        elif kind == Msg.HEARTBEAT.value:
            beat = as_heartbeat(msg)
            if beat is None:
                self.log.warning("ignoring a heartbeat without the keys of channel.Heartbeat: %r",
                                 msg)
            elif self.on_heartbeat(beat):
                return Decision(Do.REMEMBER_TREE)
        elif kind == Msg.JOB_START.value:
            self.log.info("job %s started (%s files)", msg.get("job_id"), msg.get("batch_size"))
        elif kind == Msg.JOB_END.value:
            self.log.info("job %s ended %s (%s files failed)", msg.get("job_id"),
                          msg.get("state"), msg.get("files_failed"))
        elif kind == Msg.MANAGER_PROBLEM.value:
            reason = str(msg.get("reason", ""))[:200]
            self.log.warning("engine reports a manager problem: %s", reason)
            if not world.manager_down:
                return Decision(Do.SUSPECT_MANAGER, reason)
        elif kind == Msg.EXITING.value:
            if self.engine is not None:
                self.engine.exiting_reason = str(msg.get("reason", ""))[:300]
            self.log.info("engine exiting (code %s): %s", msg.get("code"), msg.get("reason"))
        else:
            self.log.debug("unknown message %r", msg)
        return NOTHING

    @property
    def holds_batch(self) -> bool:
        """Its engine's last heartbeat names a job (so the manager was reached)."""
        beat = self.engine.heartbeat if self.engine is not None else None
        return bool(beat and beat["job_id"])

    def on_message(self, now: float) -> None:
        if self.engine is not None:
            self.engine.last_message_at = now

    def on_ready(self, now: float) -> None:
        if self.engine is not None:
            self.engine.ready_at = now
        if self.state is S.STARTING:
            self._to(S.RUNNING, "engine ready", now)

    def on_heartbeat(self, beat: Heartbeat) -> bool:
        """Record a heartbeat; True when it names a new basecaller (remember the tree)."""
        if self.engine is None:
            return False
        old_pid = self.engine.heartbeat["basecaller_pid"] if self.engine.heartbeat else None
        self.engine.heartbeat = beat
        return bool(beat["basecaller_pid"]) and beat["basecaller_pid"] != old_pid

    # --- the engine exits -----------------------------------------------------------------
    def on_exit(self, code: int, world: World, now: float) -> Decision:
        engine = self.engine
        desc = describe_exit(code)
        reason = engine.exiting_reason if engine is not None else ""
        ready_at = engine.ready_at if engine is not None else None
        after, self.after = self.after, AfterExit.DECIDE
        self.engine, self.deadline = None, None
        self.last_exit, self.last_exit_code = desc, code
        detail = f"{desc}{': ' + reason if reason else ''}"
        if not world.host_running:
            self._to(S.STOPPED, f"engine {detail}; bcorch {world.host_state.lower()}", now)
        elif after is AfterExit.RESTART:
            return Decision(Do.SPAWN, f"graceful restart (previous engine {desc})")
        elif after is AfterExit.FAIL:
            self._fail(Failure.GPU, f"GPU unhealthy: {self.gpu_failure}", now)
        elif after in (AfterExit.PARK, AfterExit.STOP):
            self.parked = after is AfterExit.PARK
            self._to(S.STOPPED, f"drained by an operator ({desc})", now)
        elif after is AfterExit.HUNG:
            return self._crashed(f"hung (no heartbeat for hang_timeout_s), {desc}", ready_at,
                                 world, now)
        elif code == EXIT_OK:
            self._to(S.STOPPED, "engine finished: nothing left (exit 0)", now)
        elif code == EXIT_CONFIG:
            self._fail(Failure.CONFIG, f"configuration error ({detail}); fix it and run "
                                       f"`bcorch resume --gpu {self.gpu.index}`", now)
        elif code == EXIT_PROTOCOL:
            self.deadline = now + self.policy.first_delay_s
            self.waiting_for_manager = True
            self._to(S.BACKOFF, f"manager problem ({detail}); waiting for the manager", now)
            return Decision(Do.SUSPECT_MANAGER, reason or "an engine exited 75")
        else:
            return self._crashed(detail, ready_at, world, now)
        return NOTHING

    def _crashed(self, detail: str, ready_at: float | None, world: World, now: float) -> Decision:
        delay = self.record_crash(now, ready_at)
        if delay is None:
            self._fail(Failure.CRASHES, f"{len(self.crash_times)} crashes within "
                                        f"{self.policy.window_s:g} s (last: {detail}); "
                                        f"run `bcorch resume --gpu {self.gpu.index}`", now)
            return NOTHING
        self.deadline = now + delay
        if world.manager_down and world.wait_for_manager:
            self.waiting_for_manager = True
            self._to(S.BACKOFF, f"crashed ({detail}); waiting for the manager", now)
        else:
            self._to(S.BACKOFF, f"crashed ({detail}); restart in {delay:.1f} s", now)
        return NOTHING

    def record_crash(self, now: float, ready_at: float | None = None) -> float | None:
        """Count a crash; the delay before the restart, or None when the slot must fail.
        `ready_at`: when the crashed engine became ready (a long healthy run resets)."""
        policy = self.policy
        if ready_at is not None and now - ready_at >= policy.healthy_reset_s:
            self.consecutive_crashes = 0
        self.crash_times.append(now)
        while self.crash_times and now - self.crash_times[0] > policy.window_s:
            self.crash_times.popleft()
        if len(self.crash_times) > policy.max_restarts:
            return None
        self.consecutive_crashes += 1
        delay = policy.first_delay_s * 2 ** (self.consecutive_crashes - 1)
        return min(delay, policy.backoff_max_s)

    # --- time passes ----------------------------------------------------------------------
    def tick(self, world: World, now: float) -> Decision:
        """What is due now: a hang, a drain or stop that took too long, a restart."""
        engine, policy = self.engine, self.policy
        if engine is not None and self.state is not S.KILLING:
            silent = now - engine.silent_since()
            if silent > policy.hang_timeout_s:
                if self.after in (AfterExit.DECIDE, AfterExit.RESTART):
                    self.after = AfterExit.HUNG
                return self._kill(f"no message for {silent:.1f} s "
                                  f"(hang_timeout_s = {policy.hang_timeout_s:g})", now)
        if self.deadline is None or now < self.deadline:
            if self.state is S.BACKOFF and self.waiting_for_manager and self.deadline is None:
                return self._restart_when_manager_up(world, now)
            return NOTHING
        if self.state is S.DRAINING:
            return self._stop(f"drain_timeout_s ({policy.drain_timeout_s:g}) passed; "
                              f"stopping the batch (reported STOPPED)", now)
        if self.state is S.STOPPING:
            return self._kill(f"still running {policy.stop_grace_s:g} s after stop", now)
        if self.state is S.KILLING:
            self.deadline = now + policy.kill_grace_s
            return Decision(Do.KILL_TREE, "still running after TERM")
        if self.state is S.BACKOFF:
            self.deadline = None
            return self._restart_when_manager_up(world, now)
        return NOTHING

    def _restart_when_manager_up(self, world: World, now: float) -> Decision:
        if not world.host_running:
            return NOTHING
        if (self.waiting_for_manager or world.manager_down) and not world.manager_known_up:
            self.waiting_for_manager = True
            return NOTHING
        if self.waiting_for_manager:
            return Decision(Do.SPAWN, "the manager answers again", after_outage=True, counted=True)
        return Decision(Do.SPAWN, "restart after backoff", counted=True)

    def next_deadline(self) -> float | None:
        times = [self.deadline] if self.deadline is not None else []
        if self.engine is not None and self.state is not S.KILLING:
            times.append(self.engine.silent_since() + self.policy.hang_timeout_s)
        return min(times, default=None)

    # --- asked to go ----------------------------------------------------------------------
    def drain(self, after: AfterExit, reason: str, now: float) -> Decision:
        """Finish the batch, then `after`. A slot already leaving only learns what follows."""
        if self.state in (S.STARTING, S.RUNNING):
            self.after = after
            self.deadline = now + self.policy.drain_timeout_s
            self._to(S.DRAINING, reason, now)
            return Decision(Do.SEND_DRAIN)
        if self.state in (S.DRAINING, S.STOPPING, S.KILLING):
            self.after = after
            self.reason = reason
        return NOTHING

    def stop(self, reason: str, now: float) -> Decision:
        """bcorch stops now: batches are stopped (reported STOPPED); no engine restarts."""
        if self.state in (S.STARTING, S.RUNNING, S.DRAINING):
            self.after = AfterExit.STOP
            return self._stop(reason, now)
        if self.state is S.BACKOFF:
            self.deadline = None
            self._to(S.STOPPED, reason, now)
        return NOTHING

    def host_drains(self, reason: str, now: float) -> Decision:
        if self.state.has_process:
            return self.drain(AfterExit.STOP, reason, now)
        if self.state is S.BACKOFF:
            self.deadline = None
            self._to(S.STOPPED, reason, now)
        return NOTHING

    def gpu_unhealthy(self, problem: str, now: float) -> Decision:
        if self.gpu_failure:
            return NOTHING
        self.gpu_failure = problem
        self.log.error("GPU unhealthy: %s; draining it", problem)
        if self.state.has_process:
            return self.drain(AfterExit.FAIL, f"GPU unhealthy: {problem}", now)
        if self.state in (S.BACKOFF, S.STOPPED):
            self.deadline = None
            self._fail(Failure.GPU, f"GPU unhealthy: {problem}", now)
        return NOTHING

    def _stop(self, reason: str, now: float) -> Decision:
        self.deadline = now + self.policy.stop_grace_s
        self._to(S.STOPPING, reason, now)
        return Decision(Do.SEND_STOP)

    def _kill(self, reason: str, now: float) -> Decision:
        self.log.warning("stopping the engine's process tree: %s", reason)
        self.deadline = now + self.policy.kill_grace_s
        self._to(S.KILLING, reason, now)
        return Decision(Do.TERM_TREE, reason)

    # --- an operator on the control pipe --------------------------------------------------
    def operator_drain(self, now: float) -> Decision:
        if self.state in (S.STARTING, S.RUNNING):
            self.parked = True
            return self.drain(AfterExit.PARK, "drain requested by an operator", now)
        if self.state is S.BACKOFF:
            self.parked = True
            self.deadline = None
            self._to(S.STOPPED, "drained by an operator", now)
        return NOTHING

    def operator_resume(self, now: float) -> Decision:
        self.parked = False
        if self.state is S.DRAINING:
            self.gpu_failure = ""
            self.after, self.deadline = AfterExit.DECIDE, None
            ready = self.engine is not None and self.engine.ready_at is not None
            self._to(S.RUNNING if ready else S.STARTING, "resumed by an operator", now)
            return Decision(Do.SEND_RESUME)
        if self.state in (S.STOPPING, S.KILLING):
            self.gpu_failure = ""
            self.after = AfterExit.RESTART     # too late to cancel: start anew after
            return NOTHING
        if self.state in (S.FAILED, S.STOPPED, S.BACKOFF):
            self.clear_failures()
            return Decision(Do.SPAWN, "resumed by an operator")
        return NOTHING

    def operator_restart(self, now: float) -> Decision:
        self.parked = False
        if self.state in (S.STARTING, S.RUNNING, S.DRAINING, S.STOPPING, S.KILLING):
            return self.drain(AfterExit.RESTART, "restart requested by an operator", now)
        self.clear_failures()
        return Decision(Do.SPAWN, "restart requested by an operator")

    def clear_failures(self) -> None:
        """An operator's resume: forget crashes, GPU failure and backoff."""
        self.crash_times.clear()
        self.consecutive_crashes = 0
        self.failure = None
        self.gpu_failure = ""
        self.deadline = None
        self.waiting_for_manager = False
        self.watch.rebase()

    # --- state ----------------------------------------------------------------------------
    def _fail(self, failure: Failure, reason: str, now: float) -> None:
        self.failure = failure
        self._to(S.FAILED, reason, now)

    def _to(self, new: SlotState, reason: str, now: float) -> None:
        transition(self, new, reason, now)

    @property
    def pid(self) -> int | None:
        return self.engine.pid if self.engine is not None else None

    def snapshot(self, now: float) -> dict[str, Any]:
        engine = self.engine
        hb: Heartbeat | dict[str, Any] = (engine.heartbeat if engine is not None else None) or {}
        health = self.watch.health
        return {
            "gpu": self.gpu.index, "uuid": self.gpu.uuid, "name": self.gpu.name,
            "virtual": self.gpu.virtual, "engine_id": self.engine_id,
            "state": self.state.value, "reason": self.reason,
            "in_state_s": round(now - self.since, 1), "pid": self.pid,
            "engine_state": hb.get("state"), "job_id": hb.get("job_id"),
            "run_id": hb.get("run_id"), "model": hb.get("model"),
            "batch_size": hb.get("batch_size"), "batch_elapsed_s": hb.get("batch_elapsed_s"),
            "basecaller_pid": hb.get("basecaller_pid"),
            "batches_done": hb.get("batches_done"), "files_done": hb.get("files_done"),
            "files_failed": hb.get("files_failed"), "last_error": hb.get("last_error"),
            "heartbeat_age_s": (round(now - engine.last_message_at, 1)
                                if engine is not None and engine.last_message_at is not None
                                else None),
            "restarts": self.restarts, "last_exit": self.last_exit,
            "restart_in_s": (round(max(0.0, self.deadline - now), 1)
                             if self.state is S.BACKOFF and self.deadline is not None else None),
            "waiting_for_manager": self.waiting_for_manager,
            "gpu_failure": self.gpu_failure,
            "health": health.to_dict() if health is not None else None,
        }


def transition(slot: Slot, new: SlotState, reason: str, now: float) -> None:
    """The one way a slot changes state: checked against ALLOWED and logged."""
    old = slot.state
    if new is not old and new not in ALLOWED[old]:
        raise IllegalTransition(f"gpu{slot.gpu.index}: {old.value} -> {new.value} ({reason})")
    slot.state, slot.reason, slot.since = new, reason, now
    level = logging.WARNING if new in (S.FAILED, S.BACKOFF, S.KILLING) else logging.INFO
    slot.log.log(level, "%s -> %s (%s)", old.value, new.value, reason)
