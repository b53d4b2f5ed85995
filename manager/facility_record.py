"""What the facility decided about a run, kept beside the run's output on the shared
filesystem, so that a new state directory (the manager on another host, or its local state
lost) does not change it.

- bcorch_run.json (RECORD_NAME): the run's id, its settings, whether it was cancelled or
  paused, and its accounting (GPU seconds, first and last batch times), written
  (atomically: temporary file, fsync, rename) when its part opens, when its settings or
  state change by command and when a batch of it ends. A run found again is given the
  same id and settings, so it is never basecalled with two models; a cancelled run stays
  cancelled, a paused one paused, and its GPU seconds are not lost from its summary.
- bcorch_summary.json (manager.run_summary): a run found again with its summary of a
  COMPLETE or CANCELLED state is settled: it is not opened or summarised again (a second
  summary would have lost its GPU time and batch times).

The facility database stays the authority while it exists: these files are read only for
a run that the database does not know.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .durable import write_atomically
from .run_summary import SUMMARY_NAME
from .state_file import open_regular_for_reading

log = logging.getLogger("bcmanager.facility")

RECORD_NAME = "bcorch_run.json"
MAX_BYTES = 1024 * 1024


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in path; None when there is none or it cannot be used (logged)."""
    try:
        with open_regular_for_reading(path) as fh:  # a FIFO there must not block
            raw = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read %s (%s): not used", path, exc.strerror or exc)
        return None
    try:
        value = json.loads(raw) if len(raw) <= MAX_BYTES else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        log.warning("%s is not a JSON object of at most %d bytes: not used", path, MAX_BYTES)
        return None
    return value


def read_record(output_dir: str) -> dict[str, Any] | None:
    return read_json(Path(output_dir) / RECORD_NAME)


def read_summary(output_dir: str) -> dict[str, Any] | None:
    return read_json(Path(output_dir) / SUMMARY_NAME)


@dataclass(frozen=True)
class RunRecord:
    """What bcorch_run.json holds."""

    run_id: str
    settings: dict[str, Any]
    cancelled: bool = False
    paused: bool = False
    gpu_s: float = 0.0
    first_batch_at: float | None = None
    last_batch_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_record(output_dir: str, record: RunRecord) -> None:
    """Write bcorch_run.json; a failure is logged (the facility database still holds it)."""
    text = json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n"
    try:
        write_atomically(Path(output_dir) / RECORD_NAME, text)
    except OSError as exc:
        log.error("run %s: cannot write %s in %s: %s", record.run_id, RECORD_NAME, output_dir, exc)
