"""The control pipe: framing, errors, slow clients and permissions, on a real UNIX socket."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from bcorch.orchestrator import control
from bcorch.orchestrator.control import ControlError, ControlServer, request
from bcorch.orchestrator.local_cluster import LocalCluster
from support import wait_until
from bcorch.config import ConfigError


class Loop:
    """Stands in for the supervisor loop: answers requests from its own thread."""

    def __init__(self):
        self.seen: list[dict] = []
        self.pending: list = []
        self.lock = threading.Lock()
        self.hold = threading.Event()   # set: keep requests unanswered

    def on_request(self, req, reply):
        with self.lock:
            self.seen.append(req)
            if self.hold.is_set():
                self.pending.append((req, reply))
                return
        threading.Thread(target=reply, args=({"ok": True, "echo": req},)).start()

    def release(self):
        with self.lock:
            for req, reply in self.pending:
                reply({"ok": True, "echo": req})
            self.pending.clear()


@pytest.fixture
def server(tmp_path):
    loop = Loop()
    srv = ControlServer(tmp_path / "ctl" / "s.sock", loop.on_request, idle_timeout_s=1.0)
    srv.start()
    yield srv, loop
    srv.close()


def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def read_lines(sock, n):
    data = b""
    while data.count(b"\n") < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_request_reply_and_permissions(server):
    srv, loop = server
    assert request(srv.path, {"cmd": "status"}) == {"ok": True, "echo": {"cmd": "status"}}
    assert stat.S_IMODE(srv.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(srv.path.parent.stat().st_mode) == 0o700


def test_garbage_and_unknown_commands_get_errors_and_the_connection_goes_on(server):
    srv, loop = server
    s = connect(srv.path)
    s.sendall(b"this is not json\n[1,2]\n{\"cmd\": \"explode\"}\n{\"cmd\": \"drain\", \"gpu\": \"x\"}\n"
              b"{\"cmd\": \"restart\"}\n\n{\"cmd\": \"drain\", \"gpu\": 1}\n")
    replies = read_lines(s, 6)
    s.close()
    assert [r["ok"] for r in replies] == [False, False, False, False, False, True]
    assert replies[0]["error"] == "request is not valid JSON"
    assert replies[1]["error"] == "request must be a JSON object"
    assert replies[2]["error"].startswith("unknown command 'explode'")
    assert replies[3]["error"].startswith("gpu must be a non-negative integer")
    assert replies[4]["error"] == "restart needs a gpu"
    assert replies[5]["echo"] == {"cmd": "drain", "gpu": 1}
    assert loop.seen == [{"cmd": "drain", "gpu": 1}], "only valid requests reach the loop"


def test_pipelined_requests_are_answered_in_order(server):
    srv, loop = server
    loop.hold.set()
    s = connect(srv.path)
    s.sendall(b'{"cmd": "drain", "gpu": 0}\n{"cmd": "resume", "gpu": 0}\n')
    wait_until(lambda: loop.pending, 30, what="first request at the loop")
    assert len(loop.seen) == 1, "the second request waits until the first is answered"
    loop.hold.clear()
    loop.release()
    replies = read_lines(s, 2)
    s.close()
    assert [r["echo"]["cmd"] for r in replies] == ["drain", "resume"]


def test_oversized_line_gets_an_error_and_is_dropped(server):
    srv, loop = server
    s = connect(srv.path)
    try:
        s.sendall(b"x" * (control.MAX_LINE + 10))
    except OSError:
        pass
    replies = read_lines(s, 1)
    assert replies and "longer than" in replies[0]["error"]
    assert s.recv(10) == b"", "the server closed the connection"
    s.close()
    assert request(srv.path, {"cmd": "status"})["ok"], "the server still serves others"


def test_a_silent_client_neither_blocks_others_nor_stays_forever(server):
    srv, loop = server
    silent = connect(srv.path)
    half = connect(srv.path)
    half.sendall(b'{"cmd": "sta')           # half a line, then nothing
    for _ in range(3):
        assert request(srv.path, {"cmd": "status"}, timeout=5)["ok"]
    silent.settimeout(10)
    t0 = time.monotonic()
    assert silent.recv(10) == b"", "an idle client is dropped"
    assert half.recv(10) == b""
    assert time.monotonic() - t0 < 8
    silent.close()
    half.close()


def test_idle_clients_up_to_the_limit_never_lock_out_a_new_one(server):
    """Regression (issue 11, hole 7): MAX_CLIENTS idle clients made `bcorch status` fail with
    ConnectionResetError. The client idle longest makes room; the newest idle ones stay."""
    srv, loop = server
    srv.idle_timeout_s = 60.0
    idle = []
    try:
        for _ in range(control.MAX_CLIENTS):
            idle.append(connect(srv.path))
        wait_until(lambda: len(srv._clients) == control.MAX_CLIENTS, 30, what="every client in")
        for _ in range(3):
            assert request(srv.path, {"cmd": "status"}, timeout=5)["ok"]
        idle[0].settimeout(10)
        assert idle[0].recv(10) == b"", "the oldest idle client was dropped"
        idle[-1].sendall(b'{"cmd": "status"}\n')
        assert read_lines(idle[-1], 1)[0]["ok"], "a recent client still works"
    finally:
        for s in idle:
            s.close()


def test_last_line_without_newline_before_eof_is_answered(server):
    srv, loop = server
    s = connect(srv.path)
    s.sendall(b'{"cmd": "status"}')
    s.shutdown(socket.SHUT_WR)
    assert read_lines(s, 1) == [{"ok": True, "echo": {"cmd": "status"}}]
    s.close()


def test_a_second_server_on_the_same_socket_is_refused(server):
    srv, _ = server
    other = ControlServer(srv.path, lambda r, reply: reply({"ok": True}))
    with pytest.raises(ConfigError, match="another bcorch is serving"):
        other.start()


def test_two_servers_starting_at_once_never_both_serve(server, monkeypatch):
    """Both checked the path before either renamed its socket into place (the check is
    skipped here for the second): the second must still be refused, not take the path
    over and leave the first serving an unreachable socket."""
    srv, _ = server
    other = ControlServer(srv.path, lambda r, reply: reply({"ok": True, "other": True}))
    monkeypatch.setattr(other, "_refuse_if_in_use", lambda: None)
    try:
        with pytest.raises(ConfigError, match="another bcorch is serving"):
            other.start()
    finally:
        other.close()
    assert request(srv.path, {"cmd": "status"}) == {"ok": True, "echo": {"cmd": "status"}}
    assert sorted(p.name for p in srv.path.parent.iterdir()) == [srv.path.name]


def test_a_stale_socket_is_replaced(tmp_path):
    path = tmp_path / "ctl" / "s.sock"
    path.parent.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()                              # the file stays, nobody listens
    srv = ControlServer(path, lambda r, reply: reply({"ok": True, "fresh": True}))
    srv.start()
    try:
        assert request(path, {"cmd": "status"})["fresh"]
    finally:
        srv.close()
    assert not path.exists(), "close() removes the socket"


def test_the_socket_path_appears_only_once_it_listens(tmp_path, monkeypatch):
    """A client that waits for the path (as ops scripts and tests do) must never be refused.

    CI once caught the window: the path existed after bind() and before listen(), and
    the first `status` read 'stale control socket'.
    """
    name = "s.sock"
    path = tmp_path / "ctl" / name
    before_listen: list[bool] = []

    class Watched(socket.socket):
        def listen(self, *args):
            before_listen.append(path.exists())
            return super().listen(*args)

    monkeypatch.setattr(control.socket, "socket", Watched)
    srv = ControlServer(path, lambda r, reply: reply({"ok": True}))
    srv.start()
    try:
        assert before_listen == [False]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert request(path, {"cmd": "status"})["ok"]
        assert sorted(p.name for p in path.parent.iterdir()) == [name], "no temporary name left"
    finally:
        srv.close()


def test_a_regular_file_in_the_way_is_not_replaced(tmp_path):
    path = tmp_path / "ctl" / "s.sock"
    path.parent.mkdir(mode=0o700)
    path.write_text("precious")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        ControlServer(path, lambda r, reply: None).start()
    assert path.read_text() == "precious"


@pytest.mark.parametrize("mode", [0o750, 0o705, 0o777])
def test_directory_open_to_group_or_others_is_refused(tmp_path, mode):
    d = tmp_path / "ctl"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(ConfigError) as err:
        ControlServer(d / "s.sock", lambda r, reply: None).start()
    assert "must not be accessible by group or others" in str(err.value)
    assert str(err.value).startswith("orchestrator.control_socket:")
    assert not (d / "s.sock").exists()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a directory to another user")
def test_directory_owned_by_someone_else_is_refused(tmp_path):
    d = tmp_path / "ctl"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(ConfigError, match=r"is owned by uid 65534, not by you"):
        ControlServer(d / "s.sock", lambda r, reply: None).start()


def test_directory_is_created_private(tmp_path):
    d = tmp_path / "a" / "b"
    control.prepare_directory(d / "s.sock")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_default_path_prefers_xdg_runtime_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert control.default_socket_path() == tmp_path / "bcorch" / "control.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert str(control.default_socket_path()) == f"/tmp/bcorch-{os.getuid()}/control.sock"


def test_client_errors_are_one_line(tmp_path):
    with pytest.raises(ControlError, match="bcorch is not running here"):
        request(tmp_path / "none.sock", {"cmd": "status"})
    result = subprocess.run([sys.executable, "-m", "bcorch.orchestrator", "status", "--socket",
                             str(tmp_path / "none.sock")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "not running" in result.stderr


def test_client_times_out_on_a_server_that_never_answers(server):
    srv, loop = server
    loop.hold.set()
    t0 = time.monotonic()
    with pytest.raises(ControlError, match="no answer from bcorch within 0.5 s"):
        request(srv.path, {"cmd": "status"}, timeout=0.5)
    assert time.monotonic() - t0 < 10   # a backstop: the held loop would never answer
    loop.release()


@pytest.mark.parametrize("argv, message", [
    (["restart"], "the following arguments are required: --gpu"),
    (["drain", "--gpu", "x"], "argument --gpu: invalid int value"),
    (["resume", "--gpu", "-1"], "--gpu must be a GPU index"),
    (["status", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_control_flags_exit_78_with_one_line(argv, message, capsys):
    from bcorch.orchestrator import cli
    assert cli.main(argv) == 78
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_socket_path_too_long_for_unix_is_a_one_line_config_error(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "control.sock"
    result = subprocess.run([sys.executable, "-m", "bcorch.orchestrator", "--gpus", "virtual:1",
                             "--socket", str(deep)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 78, result.stderr
    assert result.stderr.count("\n") == 1 and "orchestrator.control_socket" in result.stderr
    assert "bytes, over the 107" in result.stderr


def test_a_local_cluster_in_a_deep_directory_gets_a_short_socket(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    cluster = LocalCluster(deep, gpus=1)
    try:
        assert len(str(cluster.socket)) <= 107 and cluster.socket.parent.is_dir()
    finally:
        cluster.close()
    assert not cluster.socket.parent.exists()
