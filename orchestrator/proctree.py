"""Stopping an engine's process tree, and the orphans a dead engine leaves behind.

An engine leads its own process group, and a basecaller leads another, so signalling
one group is not enough: the tree is walked with psutil, and the children seen while the
engine lived are remembered (a basecaller re-parented to init is no longer a child).
"""
from __future__ import annotations

import signal
from dataclasses import dataclass, field

import psutil

KILL_GRACE_S = 1.0        # TERM -> KILL for a tree bcorch stops itself


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


@dataclass
class ProcessTree:
    """An engine process and every descendant seen so far."""

    pid: int
    known: list[psutil.Process] = field(default_factory=list)

    def remember_children(self) -> None:
        """Called when the engine names a new basecaller: note its tree while it is a child."""
        self.known = _children(self.pid)

    def members(self) -> list[psutil.Process]:
        procs: list[psutil.Process] = []
        try:
            procs.append(psutil.Process(self.pid))
        except psutil.Error:
            pass
        procs.extend(_children(self.pid))
        procs.extend(p for p in self.known if p not in procs)
        self.known = [p for p in procs if p.pid != self.pid]
        return procs

    def terminate(self) -> None:
        """TERM (and CONT, for a stopped process) to the whole tree."""
        for proc in self.members():
            _signal(proc, signal.SIGTERM)
            _signal(proc, signal.SIGCONT)

    def kill(self) -> None:
        for proc in self.members():
            _signal(proc, signal.SIGKILL)

    def leftovers(self) -> list[psutil.Process]:
        """Descendants still alive (after the engine itself exited)."""
        return [p for p in {p.pid: p for p in self.known}.values() if _running(p)]


@dataclass
class Reaper:
    """Orphans being stopped: TERM now, KILL after KILL_GRACE_S, until they are gone."""

    batches: list[tuple[list[psutil.Process], float]] = field(default_factory=list)

    def add(self, procs: list[psutil.Process], now: float) -> None:
        for proc in procs:
            _signal(proc, signal.SIGTERM)
            _signal(proc, signal.SIGCONT)
        self.batches.append((procs, now + KILL_GRACE_S))

    def reap(self, now: float) -> None:
        remaining = []
        for procs, kill_at in self.batches:
            alive = [p for p in procs if _running(p)]
            if not alive:
                continue
            if now >= kill_at:
                for proc in alive:
                    _signal(proc, signal.SIGKILL)
                kill_at = now + KILL_GRACE_S
            remaining.append((alive, kill_at))
        self.batches = remaining

    def kill_all(self) -> None:
        for procs, _ in self.batches:
            for proc in procs:
                _signal(proc, signal.SIGKILL)
        self.batches = []

    def next_deadline(self) -> float | None:
        return min((kill_at for _, kill_at in self.batches), default=None)

    def __bool__(self) -> bool:
        return bool(self.batches)
