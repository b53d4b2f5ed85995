"""bcorch_summary.json: what a finished run's basecalling came to, written once it settles.

Written whole or not at all (a temporary file in the same folder, fsync'd, renamed over the
old one, then the folder fsync'd), so a reader (a LIMS, a pipeline waiting for the file)
never sees half of it, even across a crash.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

SUMMARY_NAME = "bcorch_summary.json"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_summary(output_dir: Path, summary: Mapping[str, Any]) -> Path:
    """Write summary as output_dir/bcorch_summary.json atomically; return its path.

    Raises ValueError for a summary JSON cannot hold (NaN, infinity, other objects) before
    anything is written, and OSError when the folder cannot be written.
    """
    directory = Path(output_dir)
    text = json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / SUMMARY_NAME
    fd, tmp = tempfile.mkstemp(prefix=f".{SUMMARY_NAME}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)
    return target
