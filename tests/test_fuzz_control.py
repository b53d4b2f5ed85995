"""The control pipe of a real bcorch process under abuse: garbage bytes, a 10 MB line,
half a line then silence, 100 clients at once. Each gets an error reply or a dropped
connection; the supervisor loop keeps answering `status` within a second throughout.
(The framing rules themselves are unit-tested in test_control.py.)"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bcorch.orchestrator.control import request
from support import ManagedProcess, wait_until


@pytest.fixture
def bcorch(tmp_path, procs):
    config = tmp_path / "bcorch.toml"
    for d in ("in", "out"):
        (tmp_path / d).mkdir()
    config.write_text(f'[manager]\nurl = "http://127.0.0.1:9"\n[engine]\ninput_dir = "{tmp_path / "in"}"\n'
                      f'output_dir = "{tmp_path / "out"}"\npolling_interval = 0.01\n'
                      f'[runner]\nkind = "simulate"\n')
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
    t0 = time.monotonic()
    reply = request(sock, {"cmd": "status"}, timeout=5)
    took = time.monotonic() - t0
    assert reply["ok"] and len(reply["slots"]) == 2, reply
    assert took < 1.0, f"status took {took:.2f}s"
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


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=st.one_of(st.binary(max_size=200),
                      st.dictionaries(st.sampled_from(["cmd", "gpu", "x"]),
                                      st.one_of(st.text(max_size=10), st.integers(-10, 10 ** 20),
                                                st.none(), st.booleans(), st.floats()),
                                      max_size=3).map(lambda d: json.dumps(d).encode())))
def test_any_line_gets_one_reply_and_status_still_works(bcorch, line):
    b, sock = bcorch
    line = line.replace(b"\n", b" ") + b"\n"
    s = _connect(sock)
    try:
        s.sendall(line)
        data = b""
        while b"\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    if data:
        reply = json.loads(data.split(b"\n")[0])
        assert isinstance(reply.get("ok"), bool) and (reply["ok"] or reply["error"])
        if reply["ok"] and b'"stop"' in line:
            pytest.fail("the fuzzer found stop; this test would end bcorch")
    _status_fast(sock)
