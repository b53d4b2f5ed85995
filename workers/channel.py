"""The contract between an engine process and its parent (the orchestrator).

The parent starts the engine with a `SpawnSpec` (pickled by the spawn start
method). After that the channel is one duplex ``multiprocessing`` connection.
Every message is a plain dict with a ``type`` (child -> parent) or a ``cmd``
(parent -> child), so either side can log it as it is; the heartbeat's keys are
typed by `Heartbeat`, and `heartbeat()` builds one.

child -> parent
    {"type": "ready", "engine_id", "gpu", "pid"}
    {"type": "heartbeat", "engine_id", "state", "job_id", "batch_size",
     "batch_elapsed_s", "basecaller_pid", "batches_done", "files_done",
     "files_failed", "last_error"}                                 (every second)
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


class Heartbeat(TypedDict):
    """The engine's heartbeat, once a second (engine -> slot)."""

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


def heartbeat(*, engine_id: str, state: EngineState, job_id: str | None, batch_size: int,
              batch_elapsed_s: float, basecaller_pid: int | None, batches_done: int,
              files_done: int, files_failed: int, last_error: str) -> Heartbeat:
    return Heartbeat(type=Msg.HEARTBEAT.value, engine_id=engine_id, state=state.value,
                     job_id=job_id, batch_size=batch_size, batch_elapsed_s=batch_elapsed_s,
                     basecaller_pid=basecaller_pid, batches_done=batches_done,
                     files_done=files_done, files_failed=files_failed, last_error=last_error)


HEARTBEAT_KEYS: frozenset[str] = Heartbeat.__required_keys__


def as_heartbeat(msg: dict[str, Any]) -> Heartbeat | None:
    """The message as a Heartbeat; None when a key is missing (extra keys are kept)."""
    if not HEARTBEAT_KEYS <= msg.keys():
        return None
    return msg  # type: ignore[return-value]  # every key checked above


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
