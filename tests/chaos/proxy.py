"""A loopback TCP proxy between engines and the manager that can cut the line.

Modes:
    FORWARD  connections are relayed to the upstream port (a dead upstream closes them);
    REFUSE   the listening socket is closed, so connects get ECONNREFUSED;
    HANG     connections are accepted and then never read nor answered, until the mode
             changes (then they are closed).

Everything runs on threads of the test process, so no process is left behind; close()
ends them all and is safe to call twice.
"""
from __future__ import annotations

import enum
import logging
import socket
import threading

log = logging.getLogger("chaos.proxy")

_CHUNK = 65536


class Mode(enum.Enum):
    FORWARD = "forward"
    REFUSE = "refuse"
    HANG = "hang"


class Proxy:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1", port: int = 0):
        self.upstream = (host, upstream_port)
        self.host = host
        self.port = port
        self.mode = Mode.FORWARD
        self.connections = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self._open: set[socket.socket] = set()
        self._hung: list[socket.socket] = []
        self._closed = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "Proxy":
        self._listen()
        return self

    def set_mode(self, mode: Mode) -> None:
        with self._lock:
            old, self.mode = self.mode, mode
            hung, self._hung = self._hung, []
        log.info("proxy %s -> %s", old.value, mode.value)
        for s in hung:
            _close(s)
        if mode is Mode.REFUSE:
            self._stop_listening()
            self._cut_open()
        elif old is Mode.REFUSE:
            self._listen()
        if mode is Mode.HANG:
            self._cut_open()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            hung, self._hung = self._hung, []
        for s in hung:
            _close(s)
        self._stop_listening()
        self._cut_open()

    # -- internals ---------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accepter = threading.Thread(target=self._accept, args=(listener,),
                                          name="proxy-accept", daemon=True)
        self._accepter.start()

    def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass
            listener.close()
        if self._accepter is not None:
            self._accepter.join(timeout=5)
            self._accepter = None

    def _cut_open(self) -> None:
        with self._lock:
            open_now = list(self._open)
        for s in open_now:
            _close(s)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    _close(client)
                    return
                self.connections += 1
                if self.mode is Mode.HANG:
                    self._hung.append(client)
                    continue
            threading.Thread(target=self._relay, args=(client,), name="proxy-relay",
                             daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=2)
        except OSError:
            _close(client)  # the manager is down: the engine sees a closed connection
            return
        upstream.settimeout(None)
        with self._lock:
            self._open.update((client, upstream))
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join(timeout=30)
        with self._lock:
            self._open.difference_update((client, upstream))
        _close(client)
        _close(upstream)


def _pump(source: socket.socket, dest: socket.socket) -> None:
    try:
        while True:
            data = source.recv(_CHUNK)
            if not data:
                break
            dest.sendall(data)
    except OSError:
        pass
    for s in (source, dest):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
