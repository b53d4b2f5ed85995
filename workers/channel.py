"""The contract between an engine process and its parent (the orchestrator).

The parent starts the engine with a `SpawnSpec` (pickled by the spawn start
method). After that the channel is one duplex ``multiprocessing`` connection.
Every message is a plain dict with a ``type`` (child -> parent) or a ``cmd``
(parent -> child), so either side can log it as it is; the heartbeat's keys are
typed by `Heartbeat`, and `heartbeat()` builds one. A heartbeat's `run_id` and
`model` came later (issue 13's facility mode): an engine of an older bcorch sends
neither, so `as_heartbeat()` accepts a heartbeat without them and fills in None.

child -> parent
    {"type": "ready", "engine_id", "gpu", "pid"}
    {"type": "heartbeat", "engine_id", "state", "job_id", "batch_size",
     "batch_elapsed_s", "basecaller_pid", "batches_done", "files_done",
     "files_failed", "last_error", "run_id", "model"}              (every second)
    {"type": "job_start", "job_id", "batch_size"}
    {"type": "job_end", "job_id", "state", "files_failed"}
    {"type": "manager_problem", "reason"}
    {"type": "exiting", "code", "reason"}                          (last message)

parent -> child
    {"cmd": "drain"}   finish the current batch, then exit 0
    {"cmd": "resume"}  cancel a drain that has not finished yet
    {"cmd": "stop"}    stop the basecaller now, report STOPPED, exit 0
"""
from __future__ import annotations

import dataclasses
import enum
import logging
from typing import Any, TypedDict

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0


class EngineState(str, enum.Enum):
    """What an engine is doing, as its heartbeat says."""

    STARTING = "STARTING"
    REQUESTING = "REQUESTING"
    WORKING = "WORKING"
    REPORTING = "REPORTING"
    WAITING = "WAITING"            # empty answer, polling_interval pause
    MANAGER_DOWN = "MANAGER_DOWN"  # retrying an unreachable manager
    DRAINING = "DRAINING"
    STOPPING = "STOPPING"


class Cmd(str, enum.Enum):
    DRAIN = "drain"
    RESUME = "resume"
    STOP = "stop"


class Msg(str, enum.Enum):
    READY = "ready"
    HEARTBEAT = "heartbeat"
    JOB_START = "job_start"
    JOB_END = "job_end"
    MANAGER_PROBLEM = "manager_problem"
    EXITING = "exiting"


@dataclasses.dataclass(frozen=True)
class SpawnSpec:
    """What the supervisor hands a new engine process (supervisor -> engine).

    Plain values only, so that the spawn start method can pickle it.
    """

    gpu_index: int                     # the GPU slot's index: logs, the default engine id
    engine_id: str | None = None       # None: engine.engine_id, else <host>-gpu<gpu_index>
    manager_url: str | None = None     # None: manager.url from the config
    config_path: str | None = None     # None: the default config search
    device_index: int | None = None    # the CUDA device inside CUDA_VISIBLE_DEVICES; None: gpu_index
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # set before anything else runs
    log_level: str = "INFO"
    after_outage: bool = False         # spread the first request (restarted after a manager outage)


class _HeartbeatKeys(TypedDict):
    """The keys every engine's heartbeat has had since the first bcorch."""

    type: str                     # Msg.HEARTBEAT
    engine_id: str
    state: str                    # an EngineState value
    job_id: str | None
    batch_size: int
    batch_elapsed_s: float
    basecaller_pid: int | None    # while a basecaller runs
    batches_done: int
    files_done: int
    files_failed: int
    last_error: str


class Heartbeat(_HeartbeatKeys, total=False):
    """The engine's heartbeat, once a second (engine -> slot).

    `run_id` and `model` say what the GPU is basecalling: both None while no batch is
    held. `run_id` is the facility run of the batch (None for a single-run manager's
    batch, which names no run); `model` is the model the basecaller runs the batch with,
    the run's model or else engine.model (None if that is empty too, e.g. the script
    runner). Optional: older engines do not send them (`as_heartbeat` fills in None).
    """

    run_id: str | None
    model: str | None


def heartbeat(*, engine_id: str, state: EngineState, job_id: str | None, batch_size: int,
              batch_elapsed_s: float, basecaller_pid: int | None, batches_done: int,
              files_done: int, files_failed: int, last_error: str, run_id: str | None = None,
              model: str | None = None) -> Heartbeat:
    return Heartbeat(type=Msg.HEARTBEAT.value, engine_id=engine_id, state=state.value,
                     job_id=job_id, batch_size=batch_size, batch_elapsed_s=batch_elapsed_s,
                     basecaller_pid=basecaller_pid, batches_done=batches_done,
                     files_done=files_done, files_failed=files_failed, last_error=last_error,
                     run_id=run_id, model=model)


HEARTBEAT_KEYS: frozenset[str] = Heartbeat.__required_keys__
HEARTBEAT_OPTIONAL_KEYS: frozenset[str] = Heartbeat.__optional_keys__


def as_heartbeat(msg: dict[str, Any]) -> Heartbeat | None:
    """The message as a Heartbeat; None when a required key is missing.

    Extra keys are kept; an optional key an older engine does not send is None.
    """
    if not HEARTBEAT_KEYS <= msg.keys():
        return None
    beat = {key: None for key in HEARTBEAT_OPTIONAL_KEYS}
    beat.update(msg)
    return beat  # type: ignore[return-value]  # every required key checked above


def message(kind: Msg, **fields: Any) -> dict[str, Any]:
    return {"type": kind.value, **fields}


def command(cmd: Cmd) -> dict[str, Any]:
    return {"cmd": cmd.value}


def send(conn: Any, msg: dict[str, Any] | Heartbeat) -> bool:
    """Send without raising: a closed pipe means the other side is gone."""
    if conn is None:
        return False
    try:
        conn.send(msg)
        return True
    except (OSError, EOFError, ValueError, BrokenPipeError):
        return False
