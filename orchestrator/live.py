"""Live views for people: redraw a block of lines in place on a terminal, plain lines otherwise.

Used by `bcorch demo` and `bcorch status --watch` (bcmanager has its own copy, since the
manager does not import the orchestrator).
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

CURSOR_UP_AND_CLEAR = "\x1b[{n}F\x1b[J"


class Redraw:
    """show(lines): on a TTY, replace the previous block; else print it at most every
    `plain_every_s` seconds (so a log file gets a readable history, not escape codes)."""

    def __init__(self, stream: TextIO | None = None, plain_every_s: float = 0.0):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.plain_every_s = plain_every_s
        self._drawn = 0
        self._last_plain: float | None = None

    def show(self, lines: list[str], force: bool = False) -> None:
        if self.tty:
            if self._drawn:
                self.stream.write(CURSOR_UP_AND_CLEAR.format(n=self._drawn))
            self.stream.write("\n".join(lines) + "\n")
            self._drawn = len(lines)
        else:
            now = time.monotonic()
            if not force and self._last_plain is not None and \
                    now - self._last_plain < self.plain_every_s:
                return
            self.stream.write("\n".join(lines) + "\n")
            self._last_plain = now
        self.stream.flush()


