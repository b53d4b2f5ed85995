"""bcorch_summary.json: what a finished run's basecalling came to, written once it settles.

Written whole or not at all (manager.durable.write_atomically), so a reader (a LIMS, a
pipeline waiting for the file) never sees half of it, even across a crash.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from .durable import write_atomically

SUMMARY_NAME = "bcorch_summary.json"


def write_summary(output_dir: Path, summary: Mapping[str, Any]) -> Path:
    """Write summary as output_dir/bcorch_summary.json atomically; return its path.

    Raises ValueError for a summary JSON cannot hold (NaN, infinity, other objects) before
    anything is written, and OSError when the folder cannot be written.
    """
    directory = Path(output_dir)
    text = json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    return write_atomically(directory / SUMMARY_NAME, text)
