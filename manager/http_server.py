"""The manager's HTTP server: uvicorn (httptools parser) on one event loop, with deadlines.

Why an event loop: a thread-per-connection server (cheroot, before) gives each
connection a worker while it sends its request, so 16 connections that send nothing
stopped the manager (issue 11 hole 5). Here a connection costs a file descriptor and a
few kilobytes until its request is complete; only the WSGI app runs in threads
(manager.asgi). docs/benchmarks.md compares cheroot, waitress and this server.

uvicorn bounds nothing before a request's headers are complete, so `DeadlineProtocol`
adds the bounds, one timer per connection, from a monotonic clock:
- a new connection must complete its request headers within request_timeout_s, and a
  request begun on a kept-alive connection likewise from its first byte (a keep-alive
  connection may idle IDLE_CONNECTION_S between requests: engines keep theirs open
  between keep-alives);
- a body must arrive within request_timeout_s of its headers (a Content-Length larger
  than what is sent, a trickled body);
- request headers over MAX_HEADER_BYTES get 431.
A request that overruns gets 408 and the connection is closed; a connection that never
sent a byte is closed silently.
"""
from __future__ import annotations

import asyncio
import collections
import enum
import json
import logging
import resource
import socket
import time
from typing import Callable

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .asgi import WorkSignal, WSGIBridge

log = logging.getLogger("bcmanager")

REQUEST_TIMEOUT_S = 10.0    # manager.request_timeout_s: open -> headers, then headers -> body
IDLE_CONNECTION_S = 120.0   # a kept-alive connection may idle this long between requests
MAX_HEADER_BYTES = 64 * 1024
GRACEFUL_SHUTDOWN_S = 10.0
BACKLOG = 2048


class Phase(enum.Enum):
    """Where a connection is in its current request, as the deadlines see it."""

    HEADERS = "headers"     # waiting for (the rest of) a request's headers
    BODY = "body"           # headers complete, body still coming
    ANSWERING = "answering"  # request complete: the app (or a held long poll) has it
    IDLE = "idle"           # answered, kept alive: uvicorn's keep-alive timer runs


_TRANSITIONS = {
    "connected": {None: Phase.HEADERS},
    "message_begin": {Phase.IDLE: Phase.HEADERS, Phase.HEADERS: Phase.HEADERS,
                      Phase.ANSWERING: Phase.HEADERS},  # ANSWERING: a pipelined request
    "headers_complete": {Phase.HEADERS: Phase.BODY},
    "message_complete": {Phase.BODY: Phase.ANSWERING},
    "response_complete": {Phase.ANSWERING: Phase.IDLE, Phase.HEADERS: Phase.HEADERS,
                          Phase.BODY: Phase.BODY, Phase.IDLE: Phase.IDLE},
}
_TIMED_PHASES = (Phase.HEADERS, Phase.BODY)
CUT_LOG_EVERY_S = 60.0


class CutConnections:
    """Counts connections cut by a deadline or limit; one log line a minute at most, so a
    slowloris flood cannot flood the log too."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._counts: collections.Counter[str] = collections.Counter()
        self._since = clock()

    def add(self, why: str, peer: str) -> None:
        if not self._counts:
            log.info("http: %s: connection cut (%s); more are counted, logged once a minute",
                     peer, why)
        self._counts[why] += 1
        now = self._clock()
        if now - self._since >= CUT_LOG_EVERY_S:
            log.info("http: connections cut in the last %.0f s: %s", now - self._since,
                     ", ".join(f"{n} {why}" for why, n in sorted(self._counts.items())))
            self._counts.clear()
            self._since = now


CUT = CutConnections()


class DeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header/body deadlines and a header size limit.

    request_timeout_s bounds the headers (from the connection or the request's first byte)
    and then the body; HTTPServer sets it from manager.request_timeout_s."""

    request_timeout_s = REQUEST_TIMEOUT_S

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.phase: Phase | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._request_bytes_seen = False

    def _move(self, event: str) -> None:
        """The one transition function: new phase, and the timer that goes with it."""
        new = _TRANSITIONS[event].get(self.phase)
        if new is None:
            return  # an event that does not move this phase (e.g. a parser quirk): keep it
        entering = new is not self.phase
        self.phase = new
        if event == "message_begin":
            self._header_bytes = 0
            self._request_bytes_seen = True
        if entering or event == "connected":
            self._arm(self.request_timeout_s if new in _TIMED_PHASES else None)

    def _arm(self, seconds: float | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if seconds is not None:
            self._deadline = self.loop.call_later(seconds, self._overran)

    def _overran(self) -> None:
        self._deadline = None
        if self.transport is None or self.transport.is_closing():
            return
        phase = self.phase
        if not self._request_bytes_seen:
            CUT.add(f"silent for {self.request_timeout_s:g} s", self._peer())
            self.transport.close()
            return
        seconds = self.request_timeout_s
        what = "headers" if phase is Phase.HEADERS else "body"
        CUT.add(f"408 {what} not complete in {seconds:g} s", self._peer())
        self._refuse(408, f"request {what} not complete within {seconds:g} s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer straight on the transport (no app involved) and close."""
        payload = json.dumps({"error": message}).encode()
        reason = {408: "Request Timeout", 431: "Request Header Fields Too Large"}[status]
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n".encode() + payload)
        self.transport.close()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app must not answer on a closed connection
            self.cycle.message_event.set()

    def _peer(self) -> str:
        return "%s:%s" % self.client if self.client else "?"

    # -- asyncio / httptools callbacks ----------------------------------------------------

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._request_bytes_seen = False
        self._move("connected")

    def connection_lost(self, exc) -> None:
        self._arm(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.HEADERS and self._request_bytes_seen:
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                CUT.add(f"431 headers over {MAX_HEADER_BYTES} bytes", self._peer())
                self._arm(None)
                self._refuse(431, f"request headers over {MAX_HEADER_BYTES} bytes")
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._move("message_begin")

    def on_headers_complete(self) -> None:
        self._move("headers_complete")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._move("message_complete")
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._move("response_complete")
        super().on_response_complete()


def raise_open_files_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (each connection is a descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = _nr_open()
    if target != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft >= target:
        log.info("open files limit: %d (already the hard limit)", soft)
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("open files limit: could not raise %d to %s: %s (about %d connections "
                    "at most)", soft, target, exc, soft)
        return soft, hard
    log.info("open files limit: raised from %d to %d (the hard limit)", soft, target)
    return target, hard


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 1 << 20


class HTTPServer:
    """Binds at construction (a busy port is an error there); serves in its own thread."""

    def __init__(self, host: str, port: int, wsgi_app: Callable, *, threads: int,
                 max_body: int, request_timeout_s: float = REQUEST_TIMEOUT_S):
        self.signal = WorkSignal()
        self.bridge = WSGIBridge(wsgi_app, threads=threads, max_body=max_body,
                                 signal=self.signal)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only then,
        # and without it every answer (headers, then body) waits ~40 ms for a delayed ACK.
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.sock.listen(BACKLOG)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])
        config = uvicorn.Config(
            self.bridge, interface="asgi3", lifespan="off",
            http=type("Protocol", (DeadlineProtocol,), {"request_timeout_s": request_timeout_s}),
            log_config=None, access_log=False, server_header=False, proxy_headers=False,
            backlog=BACKLOG,
            timeout_keep_alive=int(IDLE_CONNECTION_S),
            timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN_S))
        self.server = uvicorn.Server(config)
        # Its start/stop chatter and a line per malformed request (a flood, under attack);
        # what we refuse ourselves is logged by DeadlineProtocol and the app.
        logging.getLogger("uvicorn.error").setLevel(logging.ERROR)

    def notify_work(self) -> None:
        """Wake held long polls: work may be ready (any thread)."""
        self.signal.notify()

    def serve(self) -> None:
        """Runs the event loop until stop(); blocks (call it in a thread)."""
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self.signal.bind(asyncio.get_running_loop())
        await self.server.serve(sockets=[self.sock])

    def stop(self) -> None:
        self.signal.stop()
        self.server.should_exit = True

    def close(self) -> None:
        self.bridge.close()
        self.sock.close()
