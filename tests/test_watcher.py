"""inotify wakes the input scanner at once; the periodic scan stays the safety net."""
from __future__ import annotations

import errno
import logging
import os
import random
import threading
import time
from pathlib import Path

import pytest

from bcorch.manager import watcher as watcher_mod
from bcorch.manager.watcher import InputWatcher, filesystem_type
from bcorch.orchestrator.pod5_dataset import write_pod5
from manager_helpers import start_manager
from support import wait_until

LONG = 30.0   # a wait that must be cut short by an event long before this
WOKE = 20.0   # woken by the event, not by the timeout (generous: 2 busy cores under xdist)


@pytest.fixture
def make_watcher(tmp_path):
    made: list[InputWatcher] = []

    def make(root: Path | None = None, **kw) -> InputWatcher:
        w = InputWatcher(root or tmp_path, stop=kw.pop("stop", threading.Event()), **kw)
        made.append(w)
        return w
    yield make
    for w in made:
        w.close()


def timed_wait(w: InputWatcher, timeout: float = LONG) -> float:
    t0 = time.monotonic()
    w.wait(timeout)
    return time.monotonic() - t0


def test_a_new_pod5_wakes_the_scanner_at_once(make_watcher, tmp_path):
    w = make_watcher()
    assert w.start()
    (tmp_path / "a.pod5").write_bytes(b"x")
    assert timed_wait(w) < WOKE
    assert w.wakeups == 1


def test_a_wait_in_progress_returns_when_a_file_is_renamed_into_place(make_watcher, tmp_path):
    w = make_watcher()
    assert w.start()
    took: list[float] = []
    waiter = threading.Thread(target=lambda: took.append(timed_wait(w)))
    waiter.start()
    (tmp_path / "a.pod5.tmp").write_bytes(b"x")
    os.rename(tmp_path / "a.pod5.tmp", tmp_path / "a.pod5")
    waiter.join(LONG + 5)
    assert took and took[0] < WOKE


def test_new_subdirectories_are_watched_too(make_watcher, tmp_path):
    w = make_watcher()
    assert w.start()
    (tmp_path / "run1" / "pod5_pass").mkdir(parents=True)
    assert timed_wait(w) < WOKE
    (tmp_path / "run1" / "pod5_pass" / "b.pod5").write_bytes(b"x")
    assert timed_wait(w) < WOKE
    assert w.wakeups == 2


def test_final_summary_wakes_the_scanner(make_watcher, tmp_path):
    w = make_watcher()
    assert w.start()
    (tmp_path / "final_summary_PAW00000_abc.txt").write_text("ended\n")
    assert timed_wait(w) < WOKE


def test_other_files_and_the_managers_own_dirs_do_not_wake_it(make_watcher, tmp_path):
    w = make_watcher()
    assert w.start()
    (tmp_path / "sequencing_summary.txt").write_text("x")
    (tmp_path / "ASSIGNED_job1_gpu0").mkdir()
    os.symlink("../a.pod5", tmp_path / "ASSIGNED_job1_gpu0" / "a.pod5")
    assert timed_wait(w, 0.5) >= 0.5
    assert w.wakeups == 0


def test_the_stop_event_ends_a_wait_promptly(make_watcher):
    stop = threading.Event()
    w = make_watcher(stop=stop)
    assert w.start()
    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    assert w.wait(LONG) is True
    assert time.monotonic() - t0 < WOKE


def test_a_queue_overflow_wakes_it_and_rewatches_the_tree(make_watcher, tmp_path, caplog):
    w = make_watcher()
    assert w.start()
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 100_000:
        pytest.skip(f"max_queued_events is {limit}: too many files to overflow it here")
    flood = tmp_path / "flood"
    flood.mkdir()
    assert timed_wait(w) < WOKE
    for i in range(limit // 2 + 100):   # IN_CREATE + IN_CLOSE_WRITE per file
        (flood / f"{i}.pod5").write_bytes(b"")
    (tmp_path / "late").mkdir()          # its IN_CREATE is lost in the overflow
    with caplog.at_level(logging.WARNING, logger="bcmanager.watcher"):
        assert timed_wait(w) < WOKE
    assert "overflowed" in caplog.text
    (tmp_path / "late" / "c.pod5").write_bytes(b"x")
    assert timed_wait(w) < WOKE, "the directory created during the overflow is not watched"


def test_without_inotify_it_falls_back_to_the_timer_and_says_so_once(make_watcher, monkeypatch,
                                                                     caplog):
    def no_inotify():
        raise OSError(errno.ENOSYS, "inotify_init1: Function not implemented")
    monkeypatch.setattr(watcher_mod, "_Inotify", no_inotify)
    w = make_watcher()
    with caplog.at_level(logging.INFO, logger="bcmanager.watcher"):
        assert w.start() is False
        assert w.start() is False
        assert timed_wait(w, 0.3) >= 0.3
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "scan_interval_s" in warnings[0].getMessage()


def test_a_missing_root_falls_back_to_the_timer(make_watcher, tmp_path, caplog):
    w = make_watcher(tmp_path / "not-yet")
    with caplog.at_level(logging.WARNING, logger="bcmanager.watcher"):
        assert w.start() is False
    assert "not-yet" in caplog.text
    assert not w.active


def test_a_removed_root_falls_back_to_the_timer(make_watcher, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    w = make_watcher(root)
    assert w.start()
    root.rmdir()
    w.wait(0.5)
    assert not w.active


def test_wakeups_are_rate_limited_by_the_time_a_scan_takes(make_watcher, tmp_path):
    w = make_watcher(min_gap_s=0.0)
    assert w.start()
    w.wait(0)                 # the "scan" below starts now
    busy = 0.4
    time.sleep(busy)          # stands for a scan that takes 0.4 s
    (tmp_path / "a.pod5").write_bytes(b"x")
    took = timed_wait(w)
    assert busy * 0.9 <= took < WOKE


def test_filesystem_type_names_the_innermost_mount(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\n"
                      "server:/export /data nfs4 rw 0 0\n"
                      "lustre@tcp:/fs /data/lustre lustre rw 0 0\n")
    assert filesystem_type("/data/run1/pod5", str(mounts)) == "nfs4"
    assert filesystem_type("/data/lustre/x", str(mounts)) == "lustre"
    assert filesystem_type("/home/x", str(mounts)) == "ext4"
    assert filesystem_type("/x", str(tmp_path / "absent")) == ""


def test_the_manager_sees_a_new_file_long_before_its_next_scan(procs, tmp_path):
    """scan_interval_s is an hour: only inotify can make the manager see the file."""
    m = start_manager(procs, tmp_path, scan_interval_s=3600)
    wait_until(lambda: "inotify watches" in m.log(), 30, what="the watcher to start")
    write_pod5(tmp_path / "in" / "run1" / "a.pod5", 3, 400, random.Random(1))
    wait_until(lambda: m.status()["files"]["PENDING"] == 1, 30,
               what=f"the new file to be PENDING\n{m.log()}")


def test_an_output_dir_inside_the_input_is_not_watched(make_watcher, tmp_path):
    out = tmp_path / "basecalls"
    out.mkdir()
    w = make_watcher(skip=(str(out),))
    assert w.start()
    (out / "TMPOUTPUT_j1_gpu0").mkdir()
    (out / "TMPOUTPUT_j1_gpu0" / "reads.pod5").write_bytes(b"x")
    assert timed_wait(w, 0.5) >= 0.5
    assert w.wakeups == 0
    (tmp_path / "a.pod5").write_bytes(b"x")
    assert timed_wait(w) < WOKE
