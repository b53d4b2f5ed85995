"""Engines forked from a preloaded zygote: engine start-up off the critical path (issue 14).

Spawning an engine costs a fresh interpreter and ~0.2 s of CPU importing the engine; on a
host with fewer cores than GPUs the last engines became READY seconds after the first.
The zygote is one process, started once by bcorch with the spawn start method (a fresh
interpreter: no inherited locks, threads or CUDA state), that imports the engine's modules
and then forks one engine per request. Forking a single-threaded process that has touched
neither CUDA nor NVML is safe, and each engine sets CUDA_VISIBLE_DEVICES before the target
runs, so it is pinned to its GPU exactly as a spawned engine is.

Each engine stays bcorch's own child, as a spawned one is: bcorch is made a child
subreaper, and the zygote forks through a short-lived middle process that exits at once,
so the engine is re-parented to bcorch. bcorch then sees a pid, an exit code (waitpid),
a sentinel (a pidfd), its pipe and its heartbeats; the engine sees bcorch as its parent
(its "parent gone" check) and does not care whether the zygote lives. A dead zygote only
means the next engine is started by a new zygote, or by spawn (`Launcher`).

Wire between bcorch and the zygote: a SOCK_SEQPACKET socket pair, one pickled message per
datagram. Request: (seq, SpawnSpec, name) with the engine's end of its pipe attached as
SCM_RIGHTS; the zygote closes its copy after the fork, so bcorch's end is the only peer
and the engine sees EOF when bcorch dies. Reply: (seq, pid, error).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing.connection
import os
import pickle
import select
import socket
import sys
import time
import traceback
import weakref
from typing import Any, Callable

from bcorch.workers import channel

from . import engine_process

log = logging.getLogger(__name__)

PRELOAD = ("bcorch.workers.engine", "bcorch.workers.runners.simulate",
           "bcorch.workers.runners.script", "bcorch.workers.runners.dorado",
           "bcorch.workers.runners.dorado_server", "bcorch.workers.output_check", "psutil",
           "requests")
MAX_MESSAGE = 1 << 16
FIRST_REPLY_TIMEOUT_S = 60.0    # the zygote is still importing (a loaded host can be slow)
REPLY_TIMEOUT_S = 10.0
REPARENT_TIMEOUT_S = 5.0
MAX_ZYGOTE_FAILURES = 3         # then every engine is spawned

_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


class ZygoteError(Exception):
    """The zygote could not start an engine (dead, silent, or its fork failed)."""


# --- bcorch as a child subreaper ------------------------------------------------------
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


def is_subreaper() -> bool:
    prctl = _prctl()
    if prctl is None:
        return False
    value = ctypes.c_int(0)
    return prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0) == 0 and value.value != 0


def set_subreaper(on: bool) -> bool:
    """Orphaned descendants are re-parented to this process instead of init; True if set."""
    prctl = _prctl()
    return prctl is not None and prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


# --- an engine as bcorch sees it ------------------------------------------------------
class ForkedProcess:
    """A forked engine with the part of multiprocessing.Process the supervisor uses:
    pid, sentinel, exitcode, join(), is_alive(). It is bcorch's child (see the module's
    docstring), so waitpid gives its exit code; the sentinel is a pidfd."""

    def __init__(self, pid: int, name: str = ""):
        self.pid = pid
        self.name = name
        self.sentinel = os.pidfd_open(pid)
        self._exitcode: int | None = None
        weakref.finalize(self, _close_fd, self.sentinel)

    @property
    def exitcode(self) -> int | None:
        if self._exitcode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                # Reaped elsewhere (not ours to wait for): gone, with no code to read.
                if _readable(self.sentinel, 0):
                    log.warning("engine pid %d ended but its exit code is lost", self.pid)
                    self._exitcode = 255
                return self._exitcode
            if pid == self.pid:
                self._exitcode = os.waitstatus_to_exitcode(status)
        return self._exitcode

    def is_alive(self) -> bool:
        return self.exitcode is None

    def join(self, timeout: float | None = None) -> None:
        if self.exitcode is None:
            _readable(self.sentinel, timeout)

    def __repr__(self) -> str:
        return f"<ForkedProcess {self.name} pid={self.pid} exitcode={self._exitcode}>"


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _readable(fd: int, timeout: float | None) -> bool:
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    except (OSError, ValueError):
        return True


# --- bcorch's handle on the zygote ------------------------------------------------------
class Zygote:
    def __init__(self, ctx: Any, target: engine_process.Target):
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = ctx.Process(target=zygote_main, args=(target, theirs),
                                   name="bcorch-zygote", daemon=True)
        try:
            self.process.start()
        except OSError:
            self._sock.close()
            raise
        finally:
            theirs.close()
        self._seq = 0
        self._answered = False

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def alive(self) -> bool:
        return self._sock is not None and self.process.exitcode is None

    def fork_engine(self, spec: channel.SpawnSpec, name: str) -> tuple[ForkedProcess, Any]:
        """(process, bcorch's end of its pipe); ZygoteError if the zygote did not deliver."""
        if not self.alive():
            raise ZygoteError("the zygote is not running")
        ours, theirs = multiprocessing.Pipe(duplex=True)
        self._seq += 1
        try:
            try:
                socket.send_fds(self._sock, [pickle.dumps((self._seq, spec, name))],
                                [theirs.fileno()])
            except OSError as exc:
                raise ZygoteError(f"cannot reach the zygote: {exc}") from None
            timeout = REPLY_TIMEOUT_S if self._answered else FIRST_REPLY_TIMEOUT_S
            pid = self._reply(self._seq, time.monotonic() + timeout)
            self._answered = True
            try:
                return ForkedProcess(pid, name), ours
            except OSError as exc:
                raise ZygoteError(f"engine pid {pid}: {exc}") from None
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()

    def _reply(self, seq: int, deadline: float) -> int:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ZygoteError("the zygote did not answer in time")
            ready = multiprocessing.connection.wait([self._sock, self.process.sentinel], left)
            if self._sock in ready:
                try:
                    data = self._sock.recv(MAX_MESSAGE)
                except OSError as exc:
                    raise ZygoteError(f"the zygote's socket failed: {exc}") from None
                if not data:
                    raise ZygoteError("the zygote closed its socket")
                got, pid, error = pickle.loads(data)
                if got != seq:
                    continue        # the late answer to a request that timed out
                if error:
                    raise ZygoteError(error)
                return pid
            if self.process.sentinel in ready:
                raise ZygoteError(f"the zygote exited ({self.process.exitcode})")

    def close(self) -> None:
        """Ends the zygote (its engines live on: they are bcorch's children)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.process.exitcode is None:
            self.process.join(timeout=1.0)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join(timeout=5.0)


class Launcher:
    """Starts engines: through a zygote where it can, by spawn otherwise.

    A zygote found dead is replaced at the next start; after MAX_ZYGOTE_FAILURES
    failures every later engine is spawned."""

    def __init__(self, ctx: Any, target: engine_process.Target, use_zygote: bool = True):
        self.ctx = ctx
        self.target = target
        self.zygote: Zygote | None = None
        self.failures = 0
        self._was_subreaper = is_subreaper()
        self.use_zygote = use_zygote and hasattr(os, "pidfd_open") and (
            self._was_subreaper or set_subreaper(True))
        if use_zygote and not self.use_zygote:
            log.warning("engines are spawned one by one: no pidfd or child subreaper here")

    def start(self, spec: channel.SpawnSpec, name: str) -> tuple[Any, Any]:
        """(process, bcorch's end of the pipe); OSError when no engine could be started."""
        self.check()
        zygote = self._zygote()
        if zygote is not None:
            try:
                return zygote.fork_engine(spec, name)
            except ZygoteError as exc:
                self.failures += 1
                log.warning("[gpu%s] zygote failed (%s); spawning this engine%s", spec.gpu_index,
                            exc, "" if self.failures < MAX_ZYGOTE_FAILURES
                            else ", and every later one")
                zygote.close()
                self.zygote = None
        return engine_process.start(self.ctx, self.target, spec, name)

    def check(self) -> None:
        """Called each loop pass: a zygote that died is waited for and replaced at once, so
        the next restart does not pay for a new one."""
        if self.zygote is not None and not self.zygote.alive():
            self.failures += 1
            log.warning("the zygote (pid %s) exited with %s; %s", self.zygote.pid,
                        self.zygote.process.exitcode,
                        "starting a new one" if self.failures < MAX_ZYGOTE_FAILURES
                        else "engines are spawned from now on")
            self.zygote.close()
            self.zygote = None
            self._zygote()

    def _zygote(self) -> Zygote | None:
        if not self.use_zygote or self.failures >= MAX_ZYGOTE_FAILURES:
            return None
        if self.zygote is None:
            try:
                self.zygote = Zygote(self.ctx, self.target)
            except OSError as exc:
                self.failures += 1
                log.warning("cannot start the zygote (%s); spawning engines", exc)
                return None
        return self.zygote

    @staticmethod
    def reap(pids: set[int]) -> set[int]:
        """Waits for those of `pids` (orphans of dead engines, adopted by bcorch as their
        subreaper) that have ended; returns the pids still to watch."""
        left = set()
        for pid in pids:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue            # not ours (never adopted, or already waited for)
            if done == 0:
                left.add(pid)
        return left

    def close(self) -> None:
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None
        if self.use_zygote and not self._was_subreaper:
            set_subreaper(False)


# --- inside the zygote ------------------------------------------------------------------
def zygote_main(target: engine_process.Target, sock: socket.socket) -> None:
    """The zygote's loop: one forked engine per request, until bcorch closes the socket."""
    try:
        os.setpgrp()            # a terminal's ^C reaches bcorch only
    except OSError:
        pass
    preload()
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 1)
        except InterruptedError:
            continue
        except OSError:
            break
        if not data:
            break
        seq, spec, name = pickle.loads(data)
        try:
            if not fds:
                _answer(sock, seq, None, "no pipe came with the request")
            else:
                _fork(sock, target, seq, spec, name, fds[0])
        finally:
            for fd in fds:
                os.close(fd)
    os._exit(0)


def preload() -> None:
    import importlib
    for module in PRELOAD:
        try:
            importlib.import_module(module)
        except Exception:   # a missing optional module is only not preloaded
            pass


def _answer(sock: socket.socket, seq: int, pid: int | None, error: str | None) -> None:
    try:
        sock.send(pickle.dumps((seq, pid, error)))
    except OSError:
        pass


def _fork(sock: socket.socket, target: engine_process.Target, seq: int,
          spec: channel.SpawnSpec, name: str, fd: int) -> None:
    """Fork a middle process that forks the engine and exits; answer with the engine's pid
    once the middle one is reaped (by then the engine is re-parented to bcorch)."""
    r, w = os.pipe()
    try:
        middle = os.fork()
    except OSError as exc:
        os.close(r)
        os.close(w)
        _answer(sock, seq, None, f"fork failed: {exc}")
        return
    if middle == 0:
        os.close(r)
        _middle(sock, target, spec, name, fd, w)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        raw = pipe.read()
    os.waitpid(middle, 0)
    if raw.startswith(b"pid "):
        _answer(sock, seq, int(raw[4:]), None)
    else:
        _answer(sock, seq, None, raw.decode(errors="replace") or "the middle process died")


def _middle(sock: socket.socket, target: engine_process.Target, spec: channel.SpawnSpec,
            name: str, fd: int, report: int) -> None:
    me = os.getpid()
    try:
        pid = os.fork()
    except OSError as exc:
        os.write(report, f"fork failed: {exc}".encode())
        os._exit(1)
    if pid == 0:
        os.close(report)
        _engine(sock, target, spec, name, fd, me)
    os.write(report, f"pid {pid}".encode())
    os._exit(0)


def _engine(sock: socket.socket, target: engine_process.Target, spec: channel.SpawnSpec,
            name: str, fd: int, middle: int) -> None:
    """The engine's first steps after the fork; never returns."""
    code = 1
    try:
        sock.close()
        os.environ.update(spec.env)     # CUDA_VISIBLE_DEVICES before anything can read it
        multiprocessing.current_process().name = name
        deadline = time.monotonic() + REPARENT_TIMEOUT_S
        while os.getppid() == middle and time.monotonic() < deadline:
            time.sleep(0.001)
        conn = multiprocessing.connection.Connection(fd)
        try:
            engine_process.child_main(target, conn, spec)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
