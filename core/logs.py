"""Logging set-up shared by the three processes: one format, one line per record, and no
whole job id in any line.

A job id is the lease's capability (bcorch.protocol.new_job_id), and job ids also reach log
lines inside directory names (TMPOUTPUT_<job>_<engine>). Rather than trusting every call site,
the handler's filter cuts each whole job id in a formatted line down to its shown prefix.
Names of runs and files are the user's, and may hold a line break or a terminal escape:
the same filter writes control characters as escapes, so a name cannot forge a log line
(a traceback, formatted by the handler after the filter, keeps its lines).
"""
from __future__ import annotations

import logging
import re
import sys

from .protocol import JOB_ID_RANDOM_BITS, short_job_id

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
WHOLE_JOB_ID = re.compile(r"(?<![0-9A-Za-z])j\d{6,}-[0-9a-f]{%d}(?![0-9a-f])"
                          % (JOB_ID_RANDOM_BITS // 4))


def redact_job_ids(text: str) -> str:
    return WHOLE_JOB_ID.sub(lambda m: short_job_id(m.group(0)), text)


def escape_controls(text: str) -> str:
    """Control characters (tab aside) as Python escapes: \\n, \\r, \\x1b."""
    return CONTROL.sub(lambda m: repr(m.group(0))[1:-1], text)


class SafeLineFilter(logging.Filter):
    """Each record's message on one line, with every whole job id cut to its prefix."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = escape_controls(redact_job_ids(message))
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def configure(level: str | int, fmt: str = FORMAT) -> None:
    """basicConfig on stderr (replacing earlier handlers), every handler filtering job ids."""
    if isinstance(level, str):
        level = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr, format=fmt, force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(SafeLineFilter())
