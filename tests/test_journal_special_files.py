"""Something other than a regular file where the manager keeps its files on the shared
filesystem (the journal, the instance lock, a run's bcorch_run.json): refused at once with
one line naming the path and what it is, exit 78, never a block or a traceback."""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Callable

import pytest
from support import ManagedProcess, ManagerProcess

from bcorch.manager.facility_record import read_json
from bcorch.manager.instance_lock import LOCK_NAME
from bcorch.manager.journal import FILE_NAME as JOURNAL_NAME, Journal, JournalUnusable
from bcorch.manager.state_file import NotRegularFile, open_regular

EXIT_CONFIG = 78
KINDS = {"fifo": "FIFO", "directory": "directory", "socket": "socket"}


def put_special(path: Path, kind: str) -> socket.socket | None:
    """Make path a FIFO, a directory or a listening UNIX socket (returned: keep it open)."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.listen()
        return sock
    return None


def run_manager_to_exit(procs, tmp_path: Path, *extra: str) -> tuple[int, str]:
    """Start a manager on tmp_path/in and /out; its exit code and output (30 s at most)."""
    manager = ManagerProcess(tmp_path, tmp_path / "in", tmp_path / "out", extra=extra)
    procs.append(manager)
    ManagedProcess.start(manager)  # not ServingProcess.start: it must not serve
    try:
        code = manager.wait(30)
    except Exception:  # noqa: BLE001 - still running: the bug; the procs fixture kills it
        pytest.fail(f"the manager did not exit within 30 s:\n{manager.log()}")
    return code, manager.log()


def assert_one_line_refusal(code: int, log: str, path: Path, kind: str) -> None:
    assert code == EXIT_CONFIG, log
    assert "Traceback" not in log, log
    lines = [line for line in log.splitlines() if line.startswith("bcmanager:")]
    assert len(lines) == 1, log
    assert str(path) in lines[0] and KINDS[kind] in lines[0], lines[0]


def raised_without_blocking(action: Callable[[], object], timeout: float,
                            blocked: str) -> list[BaseException]:
    """Run action in a daemon thread (one blocked on a FIFO could never be joined): what it
    raised. Fails with the message `blocked` if it has not returned within timeout s."""
    done = threading.Event()
    errors: list[BaseException] = []

    def run():
        try:
            action()
        except BaseException as exc:  # noqa: BLE001 - the caller examines it
            errors.append(exc)
        done.set()
    threading.Thread(target=run, daemon=True).start()
    assert done.wait(timeout), blocked
    return errors


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("closed", [False, True], ids=["open", "input-closed"])
def test_a_special_journal_is_refused_at_start(procs, tmp_path, kind, closed):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    journal = tmp_path / "out" / JOURNAL_NAME
    keep = put_special(journal, kind)
    try:
        code, log = run_manager_to_exit(procs, tmp_path, *(["--input-closed"] if closed else []))
    finally:
        if keep is not None:
            keep.close()
    assert_one_line_refusal(code, log, journal, kind)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_special_instance_lock_is_refused_at_start(procs, tmp_path, kind):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    lock = tmp_path / "out" / LOCK_NAME
    keep = put_special(lock, kind)
    try:
        code, log = run_manager_to_exit(procs, tmp_path)
    finally:
        if keep is not None:
            keep.close()
    assert_one_line_refusal(code, log, lock, kind)


def test_a_fifo_swapped_in_after_the_check_does_not_block_an_append(tmp_path):
    """The race: the journal passed the start-up check, then a FIFO (with a reader, so a
    plain open would succeed) replaces it: the append is refused, it does not block."""
    journal = Journal(tmp_path)
    fifo = tmp_path / JOURNAL_NAME
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        errors = raised_without_blocking(journal.record_closed, 10, "the append blocked on a FIFO")
        assert errors and isinstance(errors[0], NotRegularFile), errors
        assert "FIFO" in str(errors[0])
        with pytest.raises(JournalUnusable, match="FIFO"):
            journal.replay()
    finally:
        os.close(reader)
        journal.close()


def test_open_regular_refuses_without_blocking(tmp_path):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_APPEND):
        with pytest.raises(NotRegularFile, match="FIFO"):
            os.close(open_regular(fifo, flags))
    with pytest.raises(NotRegularFile, match="directory"):
        open_regular(tmp_path, os.O_RDONLY)
    plain = tmp_path / "plain"
    plain.write_text("x")
    fd = open_regular(plain, os.O_RDONLY)
    try:
        assert os.read(fd, 10) == b"x"
    finally:
        os.close(fd)


def test_a_fifo_for_a_run_record_is_not_used_and_does_not_block(tmp_path):
    """bcorch_run.json / bcorch_summary.json are read when a facility finds a run again."""
    os.mkfifo(tmp_path / "bcorch_run.json")
    done = threading.Event()
    result: list[object] = []
    threading.Thread(target=lambda: (result.append(read_json(tmp_path / "bcorch_run.json")),
                                     done.set()), daemon=True).start()
    assert done.wait(10), "reading bcorch_run.json blocked on a FIFO"
    assert result == [None]



def test_a_run_part_with_a_fifo_journal_is_refused_not_blocked(tmp_path):
    """What a facility opens per run (manager.run_part.RunPart): refused at once (the
    facility sets that run aside), never blocked."""
    from bcorch.config import Config
    from bcorch.manager.run_part import RunPart, RunPlace

    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    os.mkfifo(tmp_path / "out" / JOURNAL_NAME)
    place = RunPlace(str(tmp_path / "in"), str(tmp_path / "out"), str(tmp_path / "db.sqlite"),
                     db_chosen=True)
    errors = raised_without_blocking(
        lambda: RunPart(Config().manager, place, input_closed=True).close(), 20,
        "opening the run blocked on a FIFO journal")
    assert errors and isinstance(errors[0], JournalUnusable), errors
    assert str(tmp_path / "out" / JOURNAL_NAME) in str(errors[0]) and "FIFO" in str(errors[0])
