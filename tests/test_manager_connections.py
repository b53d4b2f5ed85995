"""The manager's HTTP server under idle, slow and odd connections, and long polls.

Issue 11 hole 5: connections that send nothing, trickle their headers or announce more
body than they send must neither hold a worker nor stay open without bound, so an
engine's /assignwork and /keepalive are answered and its lease lives. Hole 7: a chunked
POST body is read. Issue 12: /assignwork?wait_s= holds an empty answer until work is
ready, without holding a thread. Speed goals are in scripts/bench_connections.py; the
bounds here are generous on purpose (a loaded CI machine must pass).
"""
from __future__ import annotations

import json
import logging
import re
import resource
import socket
import threading
import time

from manager_helpers import assign, complete, keepalive, start_manager, wait_counts, write_files
from bcorch.config_writer import write_config
from support import http_json, wait_until

TOKEN = "conn-token"
DEADLINE_S = 2.0          # manager.request_timeout_s in these tests (the default is 10 s)
CLOSE_BOUND_S = 60.0      # anything unbounded fails here
ANSWER_BOUND_S = 5.0      # the benchmark's goal is 1 s (p99); this is a loaded machine's bound


def _connect(manager, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", manager.port), timeout=timeout)


def _read_until_closed(sock: socket.socket, bound: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and how long that took."""
    start = time.monotonic()
    sock.settimeout(bound)
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return data, time.monotonic() - start
        data += chunk


def _timed(call):
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


def _request(manager, raw: bytes, timeout: float = 10.0) -> tuple[int, dict]:
    with _connect(manager, timeout) as sock:
        sock.sendall(raw)
        reader = sock.makefile("rb")
        status = int(reader.readline().split()[1])
        length = 0
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, json.loads(reader.read(length) or b"{}")


class Trickler(threading.Thread):
    """Slowloris: each socket sends one more header byte a second and never ends its headers.

    A socket the server closes is opened again, so the pressure is held for the whole run.
    """

    PREFIX = b"GET /status HTTP/1.1\r\nHost: x\r\nX-Slow: "

    def __init__(self, manager, n: int):
        super().__init__(daemon=True)
        self.manager, self.n = manager, n
        self.stop = threading.Event()
        self.reopened = 0
        self.socks: list[socket.socket] = []

    def _open(self) -> socket.socket:
        sock = _connect(self.manager)
        sock.setblocking(False)
        return sock

    def run(self) -> None:
        self.socks = [self._open() for _ in range(self.n)]
        sent = 0
        while not self.stop.wait(1.0):
            byte = self.PREFIX[sent:sent + 1] or b"a"
            sent += 1
            for i, sock in enumerate(self.socks):
                try:
                    sock.send(byte)
                except (BlockingIOError, OSError):
                    sock.close()
                    self.socks[i] = self._open()
                    self.reopened += 1

    def close(self) -> None:
        self.stop.set()
        self.join(10)
        for sock in self.socks:
            sock.close()


def test_idle_and_trickling_connections_do_not_stop_engines_or_expire_leases(procs, tmp_path):
    """300 silent connections and 30 slowloris clients held open: the engine's
    /assignwork and /keepalive are still answered at once and its lease never expires."""
    m = start_manager(procs, tmp_path, token=TOKEN, report_back_interval=3, batch_size=1)
    write_files(tmp_path / "in", [f"f{i}.pod5" for i in range(4)])
    wait_counts(m, PENDING=4)
    job = assign(m, "gpu0")["jobid"]
    idle = [_connect(m) for _ in range(300)]
    trickler = Trickler(m, 30)
    trickler.start()
    try:
        wait_until(lambda: len(trickler.socks) == 30, 30, what="trickling clients connected")
        worst = 0.0
        end = time.monotonic() + 8.0   # > 2 leases of 3 s: a blocked keep-alive expires it
        while time.monotonic() < end:
            answer, took = _timed(lambda: keepalive(m, job))
            assert answer == {"late": False}, "the lease expired while connections were idle"
            worst = max(worst, took)
            (code, body), took = _timed(lambda: m.get("/assignwork", engineid="gpu1",
                                                      batchsize=1, wait_s=0))
            assert code == 200, body
            worst = max(worst, took)
            if body["batch_size"]:
                assert keepalive(m, body["jobid"]) == {"late": False}
                assert complete(m, body["jobid"], "STOPPED")[0] == 200
            time.sleep(0.5)
        assert worst < ANSWER_BOUND_S, f"an engine waited {worst:.1f} s for an answer"
        assert complete(m, job, "STOPPED") == (200, {"ok": True})
        assert "EXPIRED" not in m.log()
    finally:
        trickler.close()
        for sock in idle:
            sock.close()


def test_a_connection_that_sends_nothing_is_closed(procs, tmp_path):
    m = start_manager(procs, tmp_path, request_timeout_s=DEADLINE_S)
    with _connect(m) as sock:
        data, took = _read_until_closed(sock, CLOSE_BOUND_S)
    assert data == b"" and DEADLINE_S * 0.9 <= took < CLOSE_BOUND_S  # the configured deadline


def test_trickled_headers_are_closed_with_408(procs, tmp_path):
    m = start_manager(procs, tmp_path, request_timeout_s=DEADLINE_S)
    with _connect(m) as sock:
        sock.setblocking(False)
        start = time.monotonic()
        data = b""
        for byte in Trickler.PREFIX + b"a" * 1000:
            try:
                sock.send(bytes([byte]))
                data += sock.recv(4096)
                break
            except BlockingIOError:
                pass
            except OSError:
                break
            assert time.monotonic() - start < CLOSE_BOUND_S, "trickled headers were never cut off"
            time.sleep(0.25)
        sock.setblocking(True)
        rest, _ = _read_until_closed(sock, 10)
    assert (data + rest).startswith(b"HTTP/1.1 408"), data + rest


def test_content_length_larger_than_the_body_is_closed_with_408(procs, tmp_path):
    m = start_manager(procs, tmp_path, request_timeout_s=DEADLINE_S, token=TOKEN)
    body = b'{"engineid": "gpu0"}'
    with _connect(m) as sock:
        sock.sendall(b"POST /assignwork HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                     b"Content-Length: " + str(len(body) + 100).encode() + b"\r\n\r\n" + body)
        data, took = _read_until_closed(sock, CLOSE_BOUND_S)
    assert data.startswith(b"HTTP/1.1 408") and took < CLOSE_BOUND_S, data
    assert m.status()["files"]["ASSIGNED"] == 0


def test_oversized_headers_are_431(procs, tmp_path):
    m = start_manager(procs, tmp_path)
    with _connect(m) as sock:
        sock.sendall(b"GET /heartbeat HTTP/1.1\r\nHost: x\r\n")
        for _ in range(20):
            try:
                sock.sendall(b"X-Big: " + b"a" * 8000 + b"\r\n")
            except OSError:
                break
        data, _ = _read_until_closed(sock, CLOSE_BOUND_S)
    assert data.startswith(b"HTTP/1.1 431"), data[:200]


def _chunked(body: bytes, piece: int = 7) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + piece]), body[i:i + piece])
             for i in range(0, len(body), piece)]
    return b"".join(parts) + b"0\r\n\r\n"


def test_a_chunked_post_body_is_read(procs, tmp_path):
    m = start_manager(procs, tmp_path, token=TOKEN)
    write_files(tmp_path / "in", ["a.pod5"])
    wait_counts(m, PENDING=1)
    body = json.dumps({"engineid": "gpu0", "batchsize": 1}).encode()
    code, answer = _request(m, b"POST /assignwork HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                               b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
                            + _chunked(body))
    assert code == 200 and answer["batch_size"] == 1, answer
    assert answer["bc_engine_id"] == "gpu0"


def test_a_chunked_body_over_the_limit_is_413(procs, tmp_path):
    m = start_manager(procs, tmp_path, token=TOKEN)
    with _connect(m) as sock:
        sock.sendall(b"POST /completed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (64 * 1024, b" " * 64 * 1024)
        try:
            for _ in range(40):  # 2.5 MiB, over the 1 MiB limit
                sock.sendall(chunk)
        except OSError:
            pass  # the server answered and closed while we were still sending
        data, _ = _read_until_closed(sock, CLOSE_BOUND_S)
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert http_json(m.url + "/heartbeat")[0] == 200


# -- long poll ------------------------------------------------------------------------------

class Poll(threading.Thread):
    """One /assignwork in the background; result and elapsed time when it is answered."""

    def __init__(self, manager, engine: str, **params):
        super().__init__(daemon=True)
        self.manager, self.engine, self.params = manager, engine, params
        self.result: tuple[int, dict] | None = None
        self.took = 0.0

    def run(self) -> None:
        start = time.monotonic()
        query = "&".join(f"{k}={v}" for k, v in {"engineid": self.engine, **self.params}.items())
        self.result = http_json(f"{self.manager.url}/assignwork?{query}", self.manager.token,
                                timeout=60)
        self.took = time.monotonic() - start

    def answer(self) -> dict:
        self.join(60)
        assert self.result is not None, "no answer to the long poll"
        code, body = self.result
        assert code == 200, body
        return body


def _held(manager, count: int = 1) -> None:
    """Wait until the manager has answered (and so is holding) `count` /assignwork calls."""
    def seen():
        text = http_json(manager.url + "/metrics", manager.token)[1]
        return any(line.startswith('bcmanager_request_duration_seconds_count{code="200",'
                                   'route="/assignwork"}')
                   and float(line.split()[-1]) >= count for line in str(text).splitlines())
    wait_until(seen, 30, what=f"{count} /assignwork calls held")


def test_wait_s_is_answered_as_soon_as_a_file_arrives(procs, tmp_path):
    m = start_manager(procs, tmp_path, token=TOKEN)
    poll = Poll(m, "gpu0", wait_s=30, batchsize=1)
    poll.start()
    _held(m)
    assert poll.result is None, "an empty long poll was answered at once"
    write_files(tmp_path / "in", ["late.pod5"])
    body = poll.answer()
    assert body["batch_size"] == 1 and poll.took < 25, (body, poll.took)


def test_without_wait_s_an_empty_answer_is_immediate(procs, tmp_path):
    m = start_manager(procs, tmp_path, token=TOKEN)
    (code, body), took = _timed(lambda: m.get("/assignwork", engineid="gpu0"))
    assert code == 200 and body["batch_size"] == 0 and took < ANSWER_BOUND_S
    poll = Poll(m, "gpu0", wait_s=1)
    poll.start()
    body = poll.answer()
    assert body["batch_size"] == 0 and 0.9 <= poll.took < 1 + ANSWER_BOUND_S, poll.took


def test_wait_s_is_answered_when_an_expired_lease_returns_files(procs, tmp_path):
    m = start_manager(procs, tmp_path, token=TOKEN, report_back_interval=2)
    write_files(tmp_path / "in", ["a.pod5"])
    wait_counts(m, PENDING=1)
    lost = assign(m, "gpu0")["jobid"]
    poll = Poll(m, "gpu1", wait_s=30)
    poll.start()
    body = poll.answer()
    assert body["batch_size"] == 1 and poll.took < 25, (body, poll.took)
    assert keepalive(m, lost) == {"late": True}


def test_wait_s_says_at_once_that_nothing_is_left_when_the_input_closes(procs, tmp_path):
    m = start_manager(procs, tmp_path, token=TOKEN)
    write_files(tmp_path / "in", ["a.pod5"])
    wait_counts(m, PENDING=1)
    job = assign(m, "gpu0")["jobid"]
    poll = Poll(m, "gpu1", wait_s=30)
    poll.start()
    _held(m, 2)
    assert m.post("/close-input", {})[0] == 200
    time.sleep(0.5)
    assert poll.result is None, "answered while a file was still being basecalled"
    assert complete(m, job, "DONE")[0] == 200
    body = poll.answer()
    assert body["batch_size"] == 0 and body["input_closed"] is True and poll.took < 25


def test_held_long_polls_hold_no_worker_thread(procs, tmp_path):
    config = tmp_path / "one-thread.toml"
    write_config(config, manager={"threads": 1, "settle_s": 0, "scan_interval_s": 0.2})
    m = start_manager(procs, tmp_path, token=TOKEN, config=config)
    polls = [Poll(m, f"gpu{i}", wait_s=30, batchsize=1) for i in range(20)]
    for poll in polls:
        poll.start()
    _held(m, 20)
    (code, _), took = _timed(lambda: m.get("/status"))
    assert code == 200 and took < ANSWER_BOUND_S
    write_files(tmp_path / "in", [f"f{i}.pod5" for i in range(20)])
    bodies = [poll.answer() for poll in polls]
    assert [b["batch_size"] for b in bodies] == [1] * 20


def test_sigterm_answers_held_long_polls_and_exits(procs, tmp_path):
    m = start_manager(procs, tmp_path, token=TOKEN)
    poll = Poll(m, "gpu0", wait_s=30)
    poll.start()
    _held(m)
    start = time.monotonic()
    m.signal(15)
    assert m.wait(60) == 0
    body = poll.answer()
    assert body["batch_size"] == 0 and time.monotonic() - start < 25, "shutdown waited for wait_s"


def test_wait_s_is_validated(procs, tmp_path):
    m = start_manager(procs, tmp_path, token=TOKEN)
    for value in ["31", "-1", "abc", "2.5", "", "1e3"]:
        code, body = m.get("/assignwork", engineid="gpu0", wait_s=value)
        assert code == 400 and "wait_s" in body["error"], (value, body)
    for value in [[1], 31, -1, 2.5, True, None, "3"]:
        code, body = m.post("/assignwork", {"engineid": "gpu0", "wait_s": value})
        if value == "3" or value is None:
            assert code == 200, (value, body)  # null = not given; "3" as in a query string
        else:
            assert code == 400 and "wait_s" in body["error"], (value, body)


# -- start-up --------------------------------------------------------------------------------

def test_the_open_files_limit_is_raised_to_the_hard_limit(caplog):
    from bcorch.manager.http_server import raise_open_files_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    try:
        with caplog.at_level(logging.INFO, logger="bcmanager"):
            raise_open_files_limit()
        now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert now == hard or (hard == resource.RLIM_INFINITY and now > 256)
        assert f"open files limit: raised from {min(256, hard)} to {now}" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_manager_logs_its_open_files_limit(procs, tmp_path):
    m = start_manager(procs, tmp_path)
    assert "open files limit" in m.log()



def test_the_listening_socket_is_tcp_so_answers_are_not_delayed():
    """asyncio sets TCP_NODELAY on accepted sockets only when the listener's proto is TCP;
    without it each answer waited ~40 ms for the client's delayed ACK (25 req/s per client)."""
    from bcorch.manager.http_server import HTTPServer

    server = HTTPServer("127.0.0.1", 0, lambda environ, start_response: [], threads=1,
                        max_body=10)
    try:
        assert server.sock.proto == socket.IPPROTO_TCP
    finally:
        server.close()


def test_cut_connections_are_logged_a_few_lines_a_minute_not_one_each(caplog):
    from bcorch.manager.http_server import CUT_LOG_EVERY_S, CutConnections

    now = [0.0]
    cut = CutConnections(clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="bcmanager"):
        for i in range(1000):   # 1000 cuts over 100 s
            now[0] = i * 0.1
            cut.add("408 headers not complete in 10 s", f"10.0.0.{i % 250}:1")
    lines = [r.getMessage() for r in caplog.records]
    assert 1 < len(lines) <= 2 * (100 / CUT_LOG_EVERY_S + 1), lines
    assert any(re.search(r"connections cut in the last 60 s: [0-9]{3} 408 headers", line)
               for line in lines), lines
