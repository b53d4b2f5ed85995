"""Messages between an engine process and its parent (the orchestrator).

The channel is one duplex ``multiprocessing`` connection. Every message is a
plain dict with a ``type`` (child -> parent) or a ``cmd`` (parent -> child), so
either side can log it as it is and neither needs the other's classes.

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

import enum
import logging
from typing import Any

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


def message(kind: Msg, **fields: Any) -> dict[str, Any]:
    return {"type": kind.value, **fields}


def command(cmd: Cmd) -> dict[str, Any]:
    return {"cmd": cmd.value}


def send(conn: Any, msg: dict[str, Any]) -> bool:
    """Send without raising: a closed pipe means the other side is gone."""
    if conn is None:
        return False
    try:
        conn.send(msg)
        return True
    except (OSError, EOFError, ValueError, BrokenPipeError):
        return False
