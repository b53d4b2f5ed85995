"""A run as the facility holds it (its row, directory, settings and part), and the small
values its modules share (manager.facility and the run_* modules it coordinates)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .facility_db import RunRow
from .facility_states import RunState
from .run_discovery import RunDir, propose_run_id
from .run_part import RunPart
from .run_settings import RunSettings

MISSING = "its directory is missing"
COPY_OF = "a copy of run "


class UnknownRun(LookupError):
    """str() is a one-line reason naming the run parameter."""


@dataclass
class Issued:
    run_id: str
    started: float   # facility clock


@dataclass
class Run:
    row: RunRow
    where: RunDir
    settings: RunSettings | None = None
    part: RunPart | None = None
    unavailable: str = ""   # why its batches cannot be handed out now (its directory gone)
    run_file: tuple[int, int] | None = None   # its bcorch.toml when last read (run_file_stamp)
    moved_under: set[str] = dataclasses.field(default_factory=set)   # jobs out when it moved
    out_while_missing: set[str] = dataclasses.field(default_factory=set)   # jobs out meanwhile

    @property
    def state(self) -> RunState:
        return self.row.state


def recorded_id(found: dict[str, Any]) -> str:
    """The run id recorded beside a run's output, when it is one we would give."""
    value = found.get("run_id")
    return value if isinstance(value, str) and propose_run_id(value) == value else ""


def number(value: Any) -> float | None:
    """A finite number read from a JSON file, else None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) else None
