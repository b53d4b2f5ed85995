"""Live views for people: redraw a block of lines in place on a terminal, plain blocks otherwise.

One module for `bcorch status --watch`, `bcmanager status --watch` and `bcorch demo`, so the
three behave alike: on a TTY each block replaces the previous one; into a file or a pipe the
blocks are appended (a log gets a readable history, no escape codes).
"""
from __future__ import annotations

import signal
import sys
import time
from typing import Callable, Optional, TextIO

CURSOR_UP_AND_CLEAR = "\x1b[{n}F\x1b[J"


class Redraw:
    """show(lines): on a TTY, replace the previous block; else append it, at most every
    `plain_every_s` seconds unless forced."""

    def __init__(self, stream: Optional[TextIO] = None, plain_every_s: float = 0.0):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.plain_every_s = plain_every_s
        self._drawn = 0
        self._last_plain: Optional[float] = None

    def show(self, lines: list[str], force: bool = False) -> None:
        if self.tty:
            if self._drawn:
                self.stream.write(CURSOR_UP_AND_CLEAR.format(n=self._drawn))
            self._drawn = len(lines)
        else:
            now = time.monotonic()
            if not force and self._last_plain is not None and \
                    now - self._last_plain < self.plain_every_s:
                return
            self._last_plain = now
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()


def stop_on_ctrl_c() -> None:
    """Make SIGINT raise KeyboardInterrupt even if this process started with it ignored.

    A shell starts background jobs (`cmd &`, nohup, some CI runners) with SIGINT ignored, and
    Python then leaves it ignored: `--watch` and the demo, which stop on Ctrl-C, would run on.
    Only for the main thread of an interactive command."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def watch(render: Callable[[], Optional[str]], every_s: float, stamped: bool = True,
          stream: Optional[TextIO] = None) -> int:
    """Show render()'s text every `every_s` seconds until Ctrl-C (0) or render() gives None (1).

    Off a terminal each block starts with a `--- HH:MM:SS` line when `stamped` (not for JSON,
    which scripts read one line at a time).
    """
    view = Redraw(stream)
    stop_on_ctrl_c()
    try:
        while True:
            text = render()
            if text is None:
                return 1
            lines = text.splitlines()
            if stamped and not view.tty:
                lines = [f"--- {time.strftime('%H:%M:%S')}"] + lines
            view.show(lines)
            time.sleep(every_s)
    except KeyboardInterrupt:
        return 0
