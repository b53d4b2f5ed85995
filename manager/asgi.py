"""The manager's WSGI application served from an asyncio event loop (ASGI).

`WSGIBridge` is the ASGI application that uvicorn runs. For each request it
- answers 413 (and closes) when Content-Length announces more than `max_body`, before
  reading a byte of the body; a chunked body is read as it comes and refused the same
  way once it passes `max_body`;
- reads the body in the event loop (a slow or silent sender costs no thread; the
  deadlines that close such connections live in manager.http_server);
- runs the unchanged synchronous WSGI app in a small thread pool;
- holds a long poll (`/assignwork?wait_s=...`) in the event loop: when the app marks
  its empty answer as holdable (environ[HOLD_KEY], see manager.app.Held), the bridge
  waits for `WorkSignal` (or the deadline, or the client going away) and asks the app
  again. A held request holds no thread.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable
from urllib.parse import unquote_to_bytes

from .app import HOLD_KEY

log = logging.getLogger("bcmanager.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
WSGIResult = tuple[int, list[tuple[bytes, bytes]], bytes]


class WorkSignal:
    """'Work may be ready', raised from any thread, awaited in the event loop.

    Each notify() wakes every coroutine that took `current()` before it; notifies that
    arrive while one is already scheduled are coalesced into it (the waiters ask again
    anyway, so one wake-up covers them all).
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._scheduled = False
        self.stopping = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        assert self._event is not None, "WorkSignal used before bind()"
        return self._event

    def notify(self) -> None:
        loop = self._loop
        if loop is None or self._scheduled:
            return
        self._scheduled = True
        try:
            loop.call_soon_threadsafe(self._fire)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            self._scheduled = False

    def stop(self) -> None:
        """Answer every held request now (shutdown)."""
        self.stopping = True
        self.notify()

    def _fire(self) -> None:
        self._scheduled = False
        fired, self._event = self._event, asyncio.Event()
        if fired is not None:
            fired.set()


class WSGIBridge:
    """ASGI application running a WSGI app in a thread pool (see the module docstring)."""

    def __init__(self, wsgi_app: Callable, *, threads: int, max_body: int,
                 signal: WorkSignal | None = None, server_name: str = "bcmanager"):
        self.wsgi_app = wsgi_app
        self.max_body = max_body
        self.signal = signal or WorkSignal()
        self.server_name = server_name
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="http")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        declared = _content_length(scope["headers"])
        if declared is not None and declared > self.max_body:
            await _send_error(send, 413, f"request body over {self.max_body} bytes", close=True)
            return
        body = await self._read_body(receive, send)
        if body is None:
            return
        await self._answer(scope, body, receive, send)

    async def _read_body(self, receive: Receive, send: Send) -> bytes | None:
        """The whole body (Content-Length or chunked); None if the client left or it is too big."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _send_error(send, 413, f"request body over {self.max_body} bytes", close=True)
                return None
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _answer(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        gone: asyncio.Task | None = None
        try:
            while True:
                woken = self.signal.current()  # taken before asking: no wake-up is missed
                environ = self._environ(scope, body)
                status, headers, payload = await loop.run_in_executor(
                    self.pool, _run_wsgi, self.wsgi_app, environ)
                hold_s = environ.get(HOLD_KEY)
                if not hold_s or self.signal.stopping:
                    break
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + float(hold_s)
                if now >= deadline:
                    break
                gone = gone or asyncio.ensure_future(receive())
                wake = asyncio.ensure_future(woken.wait())
                try:
                    await asyncio.wait({wake, gone}, timeout=deadline - now,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wake.cancel()
                if gone.done():
                    return  # the client went away: nothing to answer, nothing assigned
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
        finally:
            if gone is not None and not gone.done():
                gone.cancel()

    def _environ(self, scope: Scope, body: bytes) -> dict[str, Any]:
        server = scope.get("server") or ("", 0)
        client = scope.get("client") or ("", 0)
        environ: dict[str, Any] = {
            "REQUEST_METHOD": scope["method"],
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(scope.get("raw_path") or b"/").decode("latin-1"),
            "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
            "CONTENT_LENGTH": str(len(body)),
            "SERVER_NAME": str(server[0]),
            "SERVER_PORT": str(server[1]),
            "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
            "SERVER_SOFTWARE": self.server_name,
            "REMOTE_ADDR": str(client[0]),
            "REMOTE_PORT": str(client[1]),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": scope.get("scheme", "http"),
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for raw_name, raw_value in scope["headers"]:
            name = raw_name.decode("latin-1").upper().replace("-", "_")
            value = raw_value.decode("latin-1")
            if name == "CONTENT_TYPE":
                environ["CONTENT_TYPE"] = value
            elif name in ("CONTENT_LENGTH", "TRANSFER_ENCODING"):
                continue  # the body is already whole: CONTENT_LENGTH is its real size
            else:
                key = "HTTP_" + name
                environ[key] = f"{environ[key]},{value}" if key in environ else value
        return environ


def _run_wsgi(app: Callable, environ: dict[str, Any]) -> WSGIResult:
    """Call the WSGI app in a pool thread; a bug becomes a logged 500, never a dropped request."""
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None):
        started[:] = [(status, headers)]
        return _no_write

    try:
        iterable = app(environ, start_response)
        try:
            payload = b"".join(iterable)
        finally:
            close = getattr(iterable, "close", None)
            if close is not None:
                close()
        status, headers = started[0]
        return (int(status[:3]),
                [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
                payload)
    except Exception:
        log.exception("%s %s: internal error in the WSGI app", environ.get("REQUEST_METHOD"),
                      str(environ.get("PATH_INFO"))[:200])
        return _json_error(500, "internal error (see the manager's log)")


def _no_write(data: bytes) -> None:
    raise RuntimeError("the manager's app returns its body; write() is not supported")


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the parser refuses it before we are called
    return None


def _json_error(status: int, message: str, close: bool = False) -> WSGIResult:
    payload = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    return status, headers, payload


async def _send_error(send: Send, status: int, message: str, close: bool) -> None:
    log.info("-> %d %s", status, message)
    code, headers, payload = _json_error(status, message, close)
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return

