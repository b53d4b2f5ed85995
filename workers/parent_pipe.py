"""The engine's end of the pipe to its parent, the orchestrator (workers/channel.py).

Out: READY, a heartbeat each second, job events, EXITING. In: drain / resume / stop
commands. It also notices that the parent is gone: the pipe closed, a send that
fails, or the engine re-parented (the orchestrator was killed with -9). From then
on it is silent and `gone` says why; the engine decides what that means.

An engine started alone (`bcorch engine`) has no parent pipe: `ParentPipe(None)`
sends nothing, receives nothing and is never gone.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from . import channel
from .channel import Cmd, Heartbeat, Msg


class ParentPipe:
    def __init__(self, conn: Any, log: logging.Logger | logging.LoggerAdapter) -> None:
        self.conn = conn
        self.log = log
        self.gone = ""        # why the parent is gone; "" while it is there (or there is none)
        self._parent_pid = os.getppid()

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.gone

    def fileno(self) -> int | None:
        """The descriptor to wait on for commands; None when there is nothing to wait for."""
        if not self.connected:
            return None
        try:
            return self.conn.fileno()
        except (OSError, ValueError):
            self._lost("the pipe to the parent is closed")
            return None

    def receive(self) -> list[Cmd]:
        """The commands waiting in the pipe (unknown messages are logged and dropped)."""
        commands: list[Cmd] = []
        if not self.connected:
            return commands
        try:
            while self.conn.poll(0):
                msg = self.conn.recv()
                cmd = _command_of(msg)
                if cmd is None:
                    self.log.warning("ignoring unknown message from the parent: %r", msg)
                else:
                    commands.append(cmd)
        except (EOFError, OSError, ValueError):
            self._lost("the pipe to the parent is closed")
        if self.connected and os.getppid() != self._parent_pid:
            self._lost("the parent process is gone")
        return commands

    def send(self, kind: Msg, **fields: Any) -> None:
        if self.connected:
            channel.send(self.conn, channel.message(kind, **fields))

    def send_heartbeat(self, beat: Heartbeat) -> None:
        if self.connected and not channel.send(self.conn, beat):
            self._lost("the pipe to the parent is closed")

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except (OSError, AttributeError):
                pass

    def _lost(self, reason: str) -> None:
        if not self.gone:
            self.gone = reason


def _command_of(msg: Any) -> Cmd | None:
    try:
        return Cmd(msg.get("cmd")) if isinstance(msg, dict) else None
    except ValueError:
        return None
