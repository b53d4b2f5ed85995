"""The control pipe of a real bcorch process under abuse: garbage bytes, a 10 MB line,
half a line then silence, 100 clients at once. Each gets an error reply or a dropped
connection; the supervisor loop keeps answering `status` within a second throughout.
(The framing rules themselves are unit-tested in test_control.py.)"""
from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from bcorch.config_writer import write_config
from bcorch.orchestrator.commands import COMMANDS
from bcorch.orchestrator.control import IDLE_TIMEOUT_S, ControlServer, parse_request, request
from support import ManagedProcess, wait_until


@pytest.fixture
def bcorch(tmp_path, procs):
    for d in ("in", "out"):
        (tmp_path / d).mkdir()
    config = write_config(tmp_path / "bcorch.toml", manager={"url": "http://127.0.0.1:9"},
                          engine={"input_dir": str(tmp_path / "in"),
                                  "output_dir": str(tmp_path / "out"), "polling_interval": 0.01},
                          # no manager listens: bcorch must not give up on it mid-test
                          orchestrator={"first_contact_timeout_s": 0})
    sock = tmp_path / "ctl" / "c.sock"
    b = ManagedProcess([sys.executable, "-m", "bcorch.orchestrator", "--config", str(config),
                        "--gpus", "virtual:2", "--socket", str(sock)], tmp_path / "bcorch.log")
    procs.append(b)
    b.start()
    wait_until(lambda: sock.exists() or b.proc.poll() is not None, 30, what="control socket")
    assert b.proc.poll() is None, b.log()
    yield b, sock
    b.signal(15)
    assert b.wait(60) == 0, b.log()[-2000:]


def _connect(sock) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(str(sock))
    return s


def _status_fast(sock) -> float:
    """A loop held by an abusive client would answer only when that client is dropped
    (IDLE_TIMEOUT_S): anything clearly below it is the loop serving others meanwhile. Not a
    speed bound: a loaded 2-core CI machine took 2 s."""
    t0 = time.monotonic()
    reply = request(sock, {"cmd": "status"}, timeout=IDLE_TIMEOUT_S)
    took = time.monotonic() - t0
    assert reply["ok"] and len(reply["slots"]) == 2, reply
    assert took < IDLE_TIMEOUT_S * 0.7, f"status took {took:.2f}s"
    return took


def _abuse(sock, payload: bytes, results: list, index: int) -> None:
    """Send payload; record the first reply line, or '' when the server dropped us."""
    try:
        s = _connect(sock)
    except OSError as exc:
        results[index] = f"connect: {exc}"
        return
    try:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        data = b""
        while b"\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        results[index] = data.split(b"\n")[0].decode(errors="replace")
    except OSError as exc:
        results[index] = f"dropped: {exc}"
    finally:
        s.close()


def test_abuse_never_stops_status(bcorch):
    b, sock = bcorch
    payloads = ([b'{"cmd": "status"}\n'] * 60 + [os.urandom(512) + b"\n"] * 20
                + [b"\xff\xfe\x00garbage\n"] * 10 + [b'{"cmd": ' + b"[" * 10_000 + b"\n"] * 5
                + [b"x" * (10 << 20) + b"\n"] * 2 + [b'{"cmd": "drain", "gpu": 99}\n'] * 3)
    results: list = [None] * len(payloads)
    half = [_connect(sock) for _ in range(5)]
    for h in half:
        h.sendall(b'{"cmd": "sta')  # half a line, then silence
    threads = [threading.Thread(target=_abuse, args=(sock, p, results, i))
               for i, p in enumerate(payloads)]
    for t in threads:
        t.start()
    worst = 0.0
    while any(t.is_alive() for t in threads):
        worst = max(worst, _status_fast(sock))
    for t in threads:
        t.join(30)
    for h in half:
        h.close()
    assert all(r is not None for r in results)
    for payload, reply in zip(payloads, results):
        if payload == b'{"cmd": "status"}\n':
            assert reply.startswith("{") and json.loads(reply)["ok"] is True, reply
        elif reply and reply.startswith("{"):
            body = json.loads(reply)
            assert body["ok"] is False and body["error"], reply
    assert sum(1 for r in results if r and '"ok": false' in r) >= 30, results[60:]
    _status_fast(sock)
    assert b.proc.poll() is None


LINES = st.one_of(st.binary(max_size=200),
                  st.dictionaries(st.sampled_from(["cmd", "gpu", "x"]),
                                  st.one_of(st.sampled_from(list(COMMANDS)), st.text(max_size=10),
                                            st.integers(-10, 10 ** 20), st.none(), st.booleans(),
                                            st.floats()),
                                  max_size=3).map(lambda d: json.dumps(d).encode()))


def _one_exchange(sock_path, line: bytes) -> list[bytes]:
    """Send one line, close our side, read until the server closes: every reply line."""
    s = _connect(sock_path)
    try:
        s.sendall(line)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    finally:
        s.close()
    return data.splitlines()


@settings(max_examples=150, deadline=None)
@given(line=LINES)
def test_any_line_gets_exactly_one_reply(line):
    """Each example gets its own control server (a real UNIX socket, the real framing and
    validation) whose handler records what reaches the supervisor loop, so examples are
    independent and a failure shrinks to one line. A line is either refused with a one-line
    error that never reaches the loop, or handed to the loop once as a valid request."""
    line = line.replace(b"\n", b" ") + b"\n"
    handed: list[dict] = []

    def on_request(request: dict, reply) -> None:
        handed.append(request)
        reply({"ok": True, "cmd": request["cmd"]})

    with tempfile.TemporaryDirectory(prefix="bcfz-") as tmp:
        server = ControlServer(Path(tmp) / "ctl" / "c.sock", on_request)
        server.start()
        try:
            replies = _one_exchange(server.path, line)
        finally:
            server.close()
    if not line.strip():
        assert replies == [] and handed == []
        return
    assert len(replies) == 1, replies
    reply = json.loads(replies[0])
    try:
        expected = parse_request(line.strip())
    except ValueError as exc:
        assert reply == {"ok": False, "error": str(exc)} and handed == []
        assert reply["error"] and "\n" not in reply["error"]
    else:
        assert handed == [expected] and expected["cmd"] in COMMANDS
        assert reply == {"ok": True, "cmd": expected["cmd"]}


BAD_LINES = [
    b"\x00\xff\xfe garbage",
    b"{}",
    b"[1, 2, 3]",
    b'{"cmd": null}',
    b'{"cmd": "status", "gpu": true}',
    b'{"cmd": "status", "gpu": 1e309}',
    b'{"cmd": "drain", "gpu": -1}',
    b'{"cmd": "drain", "gpu": 100000000000000000000}',
    b'{"cmd": "restart"}',
    b'{"cmd": "resume", "gpu": 99}',
    b'{"cmd": "STATUS"}',
    b'{"cmd": "status", "x": {"y": [1, {"z": NaN}]}}',
]


def test_the_real_pipe_answers_each_bad_line_once_and_keeps_serving(bcorch):
    """The same lines, in a fixed order, against one real bcorch: one reply each (nothing
    after it on the connection), and `status` still answers after every one."""
    b, sock = bcorch
    for line in BAD_LINES:
        s = _connect(sock)
        try:
            s.sendall(line + b"\n")
            data = b""
            while b"\n" not in data and (chunk := s.recv(65536)):
                data += chunk
        finally:
            s.close()
        first, _, rest = data.partition(b"\n")
        assert rest == b"", (line, data)
        reply = json.loads(first)
        assert isinstance(reply.get("ok"), bool) and (reply["ok"] or reply["error"]), (line, reply)
        _status_fast(sock)
    assert b.proc.poll() is None
