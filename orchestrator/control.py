"""The control pipe (DESIGN.md §7): a UNIX socket speaking newline-delimited JSON.

The server runs in one small thread with a selector and non-blocking sockets. It
only frames and parses lines; each request goes to the supervisor loop through
`on_request(request, reply)`, and `reply(dict)` (callable from any thread) queues
the answer for the server thread to write. A client gets one answer per line, in
order. Garbage gets an error reply; an oversized line gets an error reply and the
connection closed; a client that sends nothing (or reads nothing) is dropped after
`idle_timeout_s`, and when MAX_CLIENTS are connected a new client pushes out the one
idle longest. Nothing a client does can block the loop, or keep out an operator.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import queue
import selectors
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bcorch.config import ConfigError

from .commands import COMMANDS, GpuArg

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
MAX_CLIENTS = 256  # past this, the client idle longest makes room for the new one
IDLE_TIMEOUT_S = 10.0


class ControlError(Exception):
    """A client-side failure; str() is one line for the operator."""


def _socket_dirs() -> list[Path]:
    """Where bcorch may put its socket: $XDG_RUNTIME_DIR/bcorch, else /tmp/bcorch-<uid>."""
    dirs = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        dirs.append(Path(runtime) / "bcorch")
    dirs.append(Path(f"/tmp/bcorch-{os.getuid()}"))
    return dirs


def _socket_names() -> list[str]:
    """control-<job>.sock inside a Slurm job (every step of the job sees SLURM_JOB_ID, so
    `srun --jobid=<id> --overlap bcorch status` finds it; two jobs on one node do not collide)."""
    job = os.environ.get("SLURM_JOB_ID", "")
    return ([f"control-{job}.sock"] if job.isdigit() else []) + ["control.sock"]


def default_socket_path() -> Path:
    return _socket_dirs()[0] / _socket_names()[0]


def socket_path(configured: str) -> Path:
    """The socket bcorch listens on."""
    return Path(configured).expanduser() if configured else default_socket_path()


def find_socket(configured: str = "") -> Path:
    """The socket a control command talks to: the configured one, else the first socket
    found where bcorch may have put it (a job step's XDG_RUNTIME_DIR can differ from the
    one bcorch started with), else the default."""
    if configured:
        return Path(configured).expanduser()
    for directory in _socket_dirs():
        for name in _socket_names():
            candidate = directory / name
            try:
                if stat.S_ISSOCK(candidate.lstat().st_mode):
                    return candidate
            except OSError:
                continue
    return default_socket_path()


MAX_SOCKET_PATH = 107  # bytes in sockaddr_un.sun_path, less its terminating NUL (Linux)


def prepare_directory(path: Path) -> None:
    """Create the socket's directory 0700, or refuse one we do not own alone."""
    directory = path.parent
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.lstat()
    except OSError as exc:
        raise ConfigError(f"orchestrator.control_socket: cannot create {str(directory)!r} "
                          f"({exc.strerror})") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"orchestrator.control_socket: {str(directory)!r} is not a directory")
    if info.st_uid != os.getuid():
        raise ConfigError(f"orchestrator.control_socket: directory {str(directory)!r} is owned "
                          f"by uid {info.st_uid}, not by you (uid {os.getuid()}); refusing to use it")
    if info.st_mode & 0o077:
        raise ConfigError(f"orchestrator.control_socket: directory {str(directory)!r} has mode "
                          f"{stat.S_IMODE(info.st_mode):04o}; it must not be accessible by group "
                          f"or others (chmod 700)")


def parse_request(line: bytes) -> dict[str, Any]:
    """A validated request, or raise ValueError with a one-line reason."""
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("request is not valid JSON") from None
    except RecursionError:  # would end the control thread: the pipe would stop serving
        raise ValueError("request is not valid JSON (nested too deeply)") from None
    if not isinstance(request, dict):
        raise ValueError("request must be a JSON object")
    cmd = request.get("cmd")
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        raise ValueError(f"unknown command {str(cmd)[:40]!r} (expected one of {', '.join(COMMANDS)})")
    gpu = request.get("gpu")
    if gpu is not None and (not isinstance(gpu, int) or isinstance(gpu, bool) or gpu < 0):
        raise ValueError(f"gpu must be a non-negative integer, got {str(gpu)[:40]!r}")
    if gpu is None and COMMANDS[cmd].gpu is GpuArg.REQUIRED:
        raise ValueError(f"{cmd} needs a gpu")
    return request


@dataclass
class _Client:
    sock: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    waiting: bool = False       # a request is with the loop; later lines wait their turn
    eof: bool = False           # the peer sent everything it will send
    closing: bool = False       # close once outbuf is written
    last_activity: float = field(default_factory=time.monotonic)


class ControlServer:
    def __init__(self, path: Path, on_request: Callable[[dict, Callable[[dict], None]], None],
                 idle_timeout_s: float = IDLE_TIMEOUT_S):
        self.path = path
        self.on_request = on_request
        self.idle_timeout_s = idle_timeout_s
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._clients: dict[int, _Client] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self._selector = selectors.DefaultSelector()

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        length = len(os.fsencode(str(self.path)))
        if length > MAX_SOCKET_PATH:
            raise ConfigError(f"orchestrator.control_socket: {str(self.path)!r} is {length} bytes, "
                              f"over the {MAX_SOCKET_PATH} a UNIX socket path may have; "
                              "choose a shorter one (or --socket)")
        prepare_directory(self.path)
        self._refuse_if_in_use()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        staging = self._staging_path()
        try:
            staging.unlink(missing_ok=True)
            listener.bind(str(staging))
            os.chmod(staging, 0o600)
            listener.listen(socket.SOMAXCONN)
            if staging != self.path:
                self._link_into_place(staging)
        except FileExistsError:
            listener.close()
            staging.unlink(missing_ok=True)
            raise ConfigError(f"orchestrator.control_socket: another bcorch is serving "
                              f"{str(self.path)!r}") from None
        except OSError as exc:
            listener.close()
            if staging != self.path:
                staging.unlink(missing_ok=True)
            raise ConfigError(f"orchestrator.control_socket: cannot listen on "
                              f"{str(self.path)!r} ({exc.strerror})") from None
        listener.setblocking(False)
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._serve, name="bcorch-control", daemon=True)
        self._thread.start()
        log.info("control pipe listening on %s", self.path)

    def _staging_path(self) -> Path:
        """Where the socket is bound and made private before it is linked into place.

        A client that sees the real path can connect at once: between bind() and listen()
        it would be refused and read the socket as stale. Only a path already at the
        UNIX length limit is bound in place.
        """
        staging = self.path.with_name(f".{os.getpid()}.binding")
        if len(os.fsencode(str(staging))) > MAX_SOCKET_PATH:
            return self.path
        return staging

    def _link_into_place(self, staging: Path) -> None:
        """A hard link, not a rename: it fails when the path exists, so of two bcorch
        starting at once (both past _refuse_if_in_use) the second is refused instead of
        replacing the first one's socket (FileExistsError). A filesystem without hard
        links gets the rename."""
        try:
            os.link(staging, self.path)
        except FileExistsError:
            raise
        except OSError:
            os.replace(staging, self.path)
        finally:
            staging.unlink(missing_ok=True)

    def _refuse_if_in_use(self) -> None:
        if not self.path.exists() and not self.path.is_symlink():
            return
        if not stat.S_ISSOCK(self.path.lstat().st_mode):
            raise ConfigError(f"orchestrator.control_socket: {str(self.path)!r} exists and is "
                              f"not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink()          # stale socket of a bcorch that died
            return
        finally:
            probe.close()
        raise ConfigError(f"orchestrator.control_socket: another bcorch is serving "
                          f"{str(self.path)!r}")

    def close(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for client in list(self._clients.values()):
            self._drop(client)
        if self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    # --- the server thread ---------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, mask in self._selector.select(timeout=1.0):
                if key.data == "listen":
                    self._accept()
                elif key.data == "wake":
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                else:
                    client = self._clients.get(key.data)
                    if client is None:
                        continue
                    if mask & selectors.EVENT_READ:
                        self._read(client)
                    if mask & selectors.EVENT_WRITE and client.sock.fileno() != -1:
                        self._write(client)
            self._deliver_replies()
            self._drop_idle()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        if len(self._clients) >= MAX_CLIENTS:
            self._drop_oldest()
        sock.setblocking(False)
        client = _Client(sock)
        self._clients[sock.fileno()] = client
        self._selector.register(sock, selectors.EVENT_READ, sock.fileno())

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            client.eof = True
            self._next_request(client)
            self._write(client)
            return
        client.last_activity = time.monotonic()
        client.inbuf += data
        self._next_request(client)

    def _next_request(self, client: _Client) -> None:
        """Hand the next complete line to the loop, unless one is already there."""
        while not client.waiting and not client.closing:
            newline = client.inbuf.find(b"\n")
            if newline < 0 and client.eof:
                if not client.inbuf.strip():
                    client.closing = True
                    return
                newline = len(client.inbuf)    # a last line without its newline
                client.inbuf += b"\n"
            if newline < 0:
                if len(client.inbuf) > MAX_LINE:
                    self._queue_out(client, {"ok": False, "error":
                                             f"request line longer than {MAX_LINE} bytes"})
                    client.inbuf.clear()
                    client.closing = True
                return
            line = bytes(client.inbuf[:newline])
            del client.inbuf[:newline + 1]
            if len(line) > MAX_LINE:
                self._queue_out(client, {"ok": False, "error":
                                         f"request line longer than {MAX_LINE} bytes"})
                client.closing = True
                return
            if not line.strip():
                continue
            try:
                request = parse_request(line)
            except ValueError as exc:
                self._queue_out(client, {"ok": False, "error": str(exc)})
                continue
            client.waiting = True
            key = client.sock.fileno()
            self.on_request(request, lambda reply, key=key, c=client: self._post_reply(key, c, reply))

    def _post_reply(self, key: int, client: _Client, reply: dict) -> None:
        self._replies.put((key, client, reply))
        self._wake()

    def _deliver_replies(self) -> None:
        while True:
            try:
                key, client, reply = self._replies.get_nowait()
            except queue.Empty:
                return
            if self._clients.get(key) is not client:
                continue    # that client went away meanwhile
            client.waiting = False
            self._queue_out(client, reply)
            self._next_request(client)

    def _queue_out(self, client: _Client, reply: dict) -> None:
        client.outbuf += json.dumps(reply, default=str).encode() + b"\n"
        self._write(client)

    def _write(self, client: _Client) -> None:
        if client.outbuf:
            try:
                sent = client.sock.send(client.outbuf)
                del client.outbuf[:sent]
                client.last_activity = time.monotonic()
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._drop(client)
                return
        if client.closing and not client.outbuf and not client.waiting:
            self._drop(client)
            return
        self._watch(client)

    def _watch(self, client: _Client) -> None:
        """Select for reading until EOF, for writing while output is pending."""
        events = ((0 if client.eof else selectors.EVENT_READ)
                  | (selectors.EVENT_WRITE if client.outbuf else 0))
        key = client.sock.fileno()
        try:
            if events:
                try:
                    self._selector.modify(client.sock, events, key)
                except KeyError:
                    self._selector.register(client.sock, events, key)
            else:
                self._selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass

    def _drop_idle(self) -> None:
        now = time.monotonic()
        for client in list(self._clients.values()):
            if not client.waiting and now - client.last_activity > self.idle_timeout_s:
                log.info("control pipe: dropping a client idle for %.0f s", self.idle_timeout_s)
                self._drop(client)

    def _drop_oldest(self) -> None:
        """Make room for a new client: the one idle longest goes (one with a request at the
        loop only when every client has one), so an operator's status always gets in."""
        oldest = min(self._clients.values(), key=lambda c: (c.waiting, c.last_activity))
        log.warning("control pipe: %d clients; dropping the one idle for %.0f s", len(self._clients),
                    time.monotonic() - oldest.last_activity)
        self._drop(oldest)

    def _drop(self, client: _Client) -> None:
        fileno = client.sock.fileno()
        if fileno != -1:
            self._clients.pop(fileno, None)
            try:
                self._selector.unregister(client.sock)
            except (KeyError, ValueError):
                pass
        client.sock.close()


def request(path: Path, message: dict, timeout: float = 10.0) -> dict:
    """Send one request and return the reply; ControlError (one line) on any failure."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"bcorch is not running here (no control socket at {path}); "
                               f"use --socket PATH if it listens elsewhere") from None
        except ConnectionRefusedError:
            raise ControlError(f"bcorch is not running (stale control socket at {path})") from None
        except PermissionError:
            raise ControlError(f"permission denied on control socket {path}") from None
        except OSError as exc:
            raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = bytearray()
        while not data.endswith(b"\n"):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                raise ControlError(f"no answer from bcorch within {timeout:g} s") from None
            except OSError as exc:
                if exc.errno == errno.ECONNRESET:
                    raise ControlError("bcorch closed the connection") from None
                raise ControlError(f"control socket error: {exc}") from None
            if not chunk:
                raise ControlError("bcorch closed the connection without answering")
            data += chunk
        try:
            reply = json.loads(data)
        except ValueError:
            raise ControlError("bcorch sent an answer that is not JSON") from None
        if not isinstance(reply, dict):
            raise ControlError("bcorch sent an answer that is not a JSON object")
        return reply
    finally:
        sock.close()
