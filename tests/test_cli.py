"""Both command lines as people and scripts use them: --version, --help, --watch, pipes."""
from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from manager_helpers import start_manager
from support import ManagedProcess, wait_until
from test_orch_fakes import FakeBcorch

BIN = Path(sys.executable).parent
BCORCH, BCMANAGER = str(BIN / "bcorch"), str(BIN / "bcmanager")


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def test_version_of_both_commands_is_the_package_version():
    for exe, name in ((BCORCH, "bcorch"), (BCMANAGER, "bcmanager")):
        result = run(exe, "--version")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"{name} {version('bcorch')}"


@pytest.mark.parametrize("argv", [
    [BCORCH], [BCORCH, "status"], [BCORCH, "drain"], [BCORCH, "resume"], [BCORCH, "restart"],
    [BCORCH, "stop"], [BCORCH, "gpus"], [BCORCH, "demo"], [BCORCH, "engine"],
    [BCMANAGER], [BCMANAGER, "status"], [BCMANAGER, "close-input"],
])
def test_every_help_page_has_usage_and_a_description(argv):
    result = run(*argv, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")
    paragraphs = result.stdout.split("\n\n")
    assert len(paragraphs) >= 3, "usage, a description, the options"
    assert result.stderr == ""


def test_main_help_lists_every_bcorch_command():
    text = run(BCORCH, "--help").stdout
    for command in ("engine", "status", "drain", "resume", "restart", "stop", "gpus", "demo"):
        assert f"bcorch {command}" in text or f"|{command}" in text, command
    assert "78 configuration error" in text


@pytest.fixture
def fake_bcorch(tmp_path, procs):
    b = FakeBcorch(tmp_path, gpus=2)
    procs.append(b)
    b.start()
    b.wait_state(1, "RUNNING")
    return b


def test_bcorch_status_into_a_closed_pipe_is_quiet(fake_bcorch):
    proc = subprocess.Popen([BCORCH, "status", "--json", "--socket", str(fake_bcorch.socket)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader (`head`) is gone before bcorch writes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_bcmanager_status_into_a_closed_pipe_is_quiet(procs, tmp_path):
    manager = start_manager(procs, tmp_path)
    proc = subprocess.Popen([BCMANAGER, "status", "--json", "--url", manager.url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def watch_into_file(argv: list[str], log: Path, marker: str, procs) -> str:
    """Run a --watch command with its output in a file until it printed `marker` twice;
    Ctrl-C ends it with 0."""
    proc = ManagedProcess(argv, log)
    procs.append(proc)
    proc.start()
    wait_until(lambda: proc.log().count(marker) >= 2, 30, what=f"two blocks in {log}")
    proc.signal(signal.SIGINT)
    assert proc.wait(30) == 0, proc.log()
    return proc.log()


def test_bcmanager_watch_without_a_terminal_appends_plain_blocks(procs, tmp_path):
    manager = start_manager(procs, tmp_path)
    text = watch_into_file([BCMANAGER, "status", "--url", manager.url, "--watch", "0.2"],
                           tmp_path / "watch.log", "progress    ", procs)
    assert "\x1b[" not in text
    assert text.count("--- ") >= 2 and "Traceback" not in text


def test_watch_stops_on_ctrl_c_even_when_started_with_sigint_ignored(procs, tmp_path):
    """A shell starts background jobs (`&`, nohup, some CI runners) with SIGINT ignored."""
    manager = start_manager(procs, tmp_path)
    text = watch_into_file(["bash", "-c", f"trap '' INT; exec {BCMANAGER} status --url "
                                          f"{manager.url} --watch 0.2"],
                           tmp_path / "watch.log", "progress    ", procs)
    assert "Traceback" not in text


def test_bcorch_watch_without_a_terminal_appends_plain_tables(fake_bcorch, procs, tmp_path):
    text = watch_into_file([BCORCH, "status", "--socket", str(fake_bcorch.socket), "--watch",
                            "0.2"], tmp_path / "watch.log", "GPU  STATE", procs)
    assert "\x1b[" not in text and "Traceback" not in text


def read_pty(fd: int, until: str, count: int, timeout: float = 30) -> str:
    out = b""
    deadline = time.monotonic() + timeout
    while out.decode(errors="replace").count(until) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting for {count}x {until!r} in {out[-2000:]!r}"
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            out += os.read(fd, 65536)
    return out.decode(errors="replace")


@pytest.mark.parametrize("which", ["bcmanager", "bcorch"])
def test_watch_on_a_terminal_redraws_in_place(which, procs, tmp_path):
    if which == "bcmanager":
        target = start_manager(procs, tmp_path)
        argv, marker = [BCMANAGER, "status", "--url", target.url, "--watch", "0.2"], "progress"
    else:
        target = FakeBcorch(tmp_path, gpus=2)
        procs.append(target)
        target.start()
        argv, marker = [BCORCH, "status", "--socket", str(target.socket), "--watch", "0.2"], "STATE"
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    try:
        text = read_pty(master, marker, 3)
        assert "\x1b[J" in text, "the block is cleared and drawn again"
        lines_per_block = text.split("\x1b[")[0].count("\n")
        assert f"\x1b[{lines_per_block}F" in text, "the cursor goes back to the block's top"
        assert "--- " not in text
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        os.close(master)
    assert code == 0


def test_watch_interval_below_a_tenth_of_a_second_is_refused(tmp_path):
    result = run(BCMANAGER, "status", "--url", "http://127.0.0.1:9", "--watch", "0")
    assert result.returncode == 78 and "--watch" in result.stderr
    result = run(BCORCH, "status", "--socket", str(tmp_path / "s"), "--watch", "0.01")
    assert result.returncode == 78 and "--watch" in result.stderr
