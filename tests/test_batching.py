"""Batches sized by work (manager.batching): the pure policy, the store and the service
with a fake clock, and one real manager that learns an engine's pace from /completed."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from bcorch.manager.batching import (MIN_STEADY_S, Pace, PaceBook, finish_together, size_batch,
                                     steady_work)
from bcorch.manager.layout import Layout
from bcorch.manager.service import Manager
from bcorch.manager.store import Store
from bcorch.protocol import JobState as WireState

from manager_helpers import assign, complete, start_manager, write_files
from support import FakeClock

KB = 1000


# -- the pure policy -------------------------------------------------------------------

def test_steady_batch_keeps_startup_at_its_share():
    pace = Pace(rate=100.0, startup_s=10.0)
    work = steady_work(pace, 0.02)
    assert work == pytest.approx(100.0 * 490)
    assert pace.startup_s / (pace.startup_s + pace.seconds(work)) == pytest.approx(0.02)


def test_batch_grows_with_a_long_startup_and_shrinks_with_a_short_one():
    long = size_batch(pace=Pace(100.0, 10.0), files_cap=50, share=0.02, closed=False)
    short = size_batch(pace=Pace(100.0, 0.3), files_cap=50, share=0.02, closed=False)
    assert long.work == pytest.approx(49_000)
    assert short.work == pytest.approx(1_470)


@pytest.mark.parametrize("startup_s", [0.0, 0.025, 0.1])
def test_steady_batch_is_never_shorter_than_its_floor(startup_s):
    """A runner that starts in no time still costs the engine tens of ms per batch: the
    share alone would size 0-5-s batches (issue 14 §3: 2 % of the GPU lost to them)."""
    pace = Pace(rate=100.0, startup_s=startup_s)
    assert steady_work(pace, 0.02) == pytest.approx(100.0 * MIN_STEADY_S)
    assert size_batch(pace=pace, files_cap=50, share=0.02, closed=False).work \
        == pytest.approx(100.0 * MIN_STEADY_S)


def test_unknown_pace_counts_files():
    assert size_batch(pace=None, files_cap=7, share=0.02, closed=True).work is None


def test_end_of_run_splits_evenly_without_startup():
    mine = finish_together(0.0, Pace(1.0, 0.0), 100.0, [0.0, 0.0, 0.0])
    assert mine == pytest.approx(25.0)


def test_end_of_run_does_not_split_when_startup_costs_more_than_it_saves():
    # 8 s left, 4 idle engines, 10 s start-up: another piece saves < 10 s each time.
    assert finish_together(0.0, Pace(1.0, 10.0), 8.0, [0.0, 0.0, 0.0]) == pytest.approx(8.0)


def test_end_of_run_fills_up_to_busy_engines():
    # The others are busy until t=50: this engine should take what fills it to their end.
    mine = finish_together(0.0, Pace(1.0, 0.0), 100.0, [50.0, 50.0, 50.0])
    assert mine == pytest.approx(62.5)
    # with a big start-up, a piece for the busy ones no longer pays: all for this one
    assert finish_together(0.0, Pace(1.0, 60.0), 100.0, [50.0, 50.0, 50.0]) == 100.0


def test_end_of_run_share_used_only_when_smaller_than_two_steady_batches():
    pace = Pace(1.0, 1.0)   # steady batch 49 s
    plenty = size_batch(pace=pace, files_cap=100, share=0.02, closed=True,
                        pending_work=10_000.0, others_free_at=[0.0])
    assert plenty.why == "steady" and plenty.work == pytest.approx(49.0)
    tail = size_batch(pace=pace, files_cap=100, share=0.02, closed=True,
                      pending_work=60.0, others_free_at=[0.0])
    assert tail.why == "end of run" and tail.work == pytest.approx(30.0)


def test_pace_book_smooths_and_falls_back_to_the_fleet():
    book = PaceBook()
    book.record("a", 100.0, 10.0)
    book.record("a", 200.0, 20.0)
    book.record("b", 300.0, 0.0)
    assert book.own("a") == Pace(150.0, 15.0)
    assert book.of("new") == Pace(225.0, 7.5)


# -- store and service (fake clock) --------------------------------------------------

@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "db.sqlite"), max_attempts=3)
    yield s
    s.close()


def _manager(tmp_path: Path, store: Store, sizes: list[int], *, closed: bool,
             clock: FakeClock) -> Manager:
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    names = [f"r{i:03d}.pod5" for i in range(len(sizes))]
    for name, size in zip(names, sizes):
        (inp / name).write_bytes(b"x" * size)
    store.add_files(zip(names, sizes))
    manager = Manager(store, Layout(inp, out), batch_size=3, report_back_interval=60,
                      input_closed=closed, startup_share=0.02, clock=clock)
    manager.recover()
    return manager


def test_store_takes_files_until_their_work_reaches_the_budget(store):
    store.add_files((f"f{i}", s) for i, s in enumerate([10, 20, 30, 40, 50]))
    job = store.assign("e1", 10, max_work=45)
    assert [f.size for f in job.files] == [10, 20, 30]
    job = store.assign("e1", 1, max_work=1000)          # the file count still caps
    assert [f.size for f in job.files] == [40]
    assert [f.size for f in store.assign("e1", 10, max_work=1).files] == [50]   # at least one


def test_store_nearest_stops_short_when_that_is_closer(store):
    store.add_files((f"f{i}", s) for i, s in enumerate([10, 10, 150, 10]))
    assert [f.size for f in store.assign("e1", 10, max_work=40, nearest=True).files] == [10, 10]
    assert [f.size for f in store.assign("e1", 10, max_work=40, nearest=True).files] == [150]


def test_service_counts_files_until_the_pace_is_known(tmp_path, store):
    manager = _manager(tmp_path, store, [KB] * 40, closed=False, clock=FakeClock())
    assert manager.assign("e1", 0).body["batch_size"] == 3        # manager.batch_size


@pytest.mark.parametrize("startup_s, files", [(10.0, 25), (0.2, 1)])
def test_service_sizes_by_the_reported_startup(tmp_path, store, startup_s, files):
    """1000 bytes/s: start-up 10 s -> 490 s of work (capped by 25 files of 1 kB here:
    the input); 0.2 s -> 9.8 s of work, under one 1 kB file's... one file."""
    manager = _manager(tmp_path, store, [10 * KB] * 25, closed=False, clock=FakeClock())
    manager.learn_pace("e1", rate=1000.0, startup_s=startup_s)
    assert manager.assign("e1", 0).body["batch_size"] == files


def test_service_batch_grows_with_startup(tmp_path, store):
    manager = _manager(tmp_path, store, [KB] * 200, closed=False, clock=FakeClock())
    manager.learn_pace("short", rate=1000.0, startup_s=0.3)    # 14.7 kB -> 15 files
    manager.learn_pace("long", rate=1000.0, startup_s=1.0)     # 49 kB -> 49 files
    assert manager.assign("short", 0).body["batch_size"] == 15
    assert manager.assign("long", 0).body["batch_size"] == 49


def test_service_near_zero_startup_gets_the_floor_not_one_file(tmp_path, store):
    """The fleet benchmark's case: 1-s files, an engine that reports 20 ms per batch.
    The share alone gives 0.98 s of work (one file per batch); the floor 10 files."""
    manager = _manager(tmp_path, store, [KB] * 40, closed=False, clock=FakeClock())
    manager.learn_pace("e1", rate=1000.0, startup_s=0.02)
    assert manager.assign("e1", 0).body["batch_size"] == round(MIN_STEADY_S)


def test_engine_batchsize_caps_the_batch(tmp_path, store):
    manager = _manager(tmp_path, store, [KB] * 200, closed=False, clock=FakeClock())
    manager.learn_pace("e1", rate=1000.0, startup_s=1.0)
    assert manager.assign("e1", 8).body["batch_size"] == 8


def test_engine_that_never_reports_gets_its_file_count(tmp_path, store):
    """The original engine: explicit batchsize, no pace fields, same answer as before,
    even when other engines have reported theirs."""
    manager = _manager(tmp_path, store, [KB] * 200, closed=True, clock=FakeClock())
    manager.learn_pace("ours", rate=1000.0, startup_s=0.1)
    assert manager.assign("original", 10).body["batch_size"] == 10
    assert manager.complete(manager.store.live_jobs()[0].job_id, WireState.DONE, {}, "").body \
        == {"ok": True}
    assert manager.paces.own("original") is None


def four_idle_engines(manager, startup_s: float) -> None:
    """Engines e1-e4 known at 100 B/s with this start-up, each seen just now (idle)."""
    for engine in ("e1", "e2", "e3", "e4"):
        manager.learn_pace(engine, rate=100.0, startup_s=startup_s)
        manager._engines_seen[engine] = time.time()


def test_zero_startup_gives_one_file_batches_at_the_end(tmp_path, store):
    clock = FakeClock()
    manager = _manager(tmp_path, store, [KB] * 40, closed=True, clock=clock)
    four_idle_engines(manager, startup_s=0.0)   # steady batch: 10 s = 1 file
    got = [manager.assign(f"e{1 + i % 4}", 0).body["batch_size"] for i in range(4)]
    assert got == [1, 1, 1, 1]


def test_closed_run_far_from_its_end_gets_steady_batches(tmp_path, store):
    """40 files of 1 kB (10 s each at 100 B/s), 4 idle engines, start-up 1 s (steady batch
    49 s = 5 files): 400 s are left, more than two steady batches each."""
    clock = FakeClock()
    manager = _manager(tmp_path, store, [KB] * 40, closed=True, clock=clock)
    four_idle_engines(manager, startup_s=1.0)
    assert manager.assign("e1", 0).body["batch_size"] == 5


def test_end_of_run_no_split_when_startup_is_large(tmp_path, store):
    """3 files left (30 s of work), 4 idle engines, start-up 60 s: one engine takes all."""
    clock = FakeClock()
    manager = _manager(tmp_path, store, [KB] * 3, closed=True, clock=clock)
    four_idle_engines(manager, startup_s=60.0)
    assert manager.assign("e1", 0).body["batch_size"] == 3


def test_end_of_run_split_when_startup_is_small(tmp_path, store):
    """12 files left (120 s), 4 idle engines, start-up 1 s: each takes about a quarter."""
    clock = FakeClock()
    manager = _manager(tmp_path, store, [KB] * 12, closed=True, clock=clock)
    four_idle_engines(manager, startup_s=1.0)
    got = [manager.assign(f"e{i}", 0).body["batch_size"] for i in (1, 2, 3, 4)]
    assert got == [3, 3, 3, 3]


def test_open_run_never_splits(tmp_path, store):
    manager = _manager(tmp_path, store, [KB] * 12, closed=False, clock=FakeClock())
    four_idle_engines(manager, startup_s=1.0)
    assert manager.assign("e1", 0).body["batch_size"] == 5


# -- a real manager ------------------------------------------------------------------

def test_real_manager_learns_the_pace_from_completed(procs, tmp_path):
    m = start_manager(procs, tmp_path, batch_size=2)
    write_files(tmp_path / "in", [f"r{i:03d}.pod5" for i in range(60)], data=b"x" * KB)
    from support import wait_until
    wait_until(lambda: m.status()["files"]["PENDING"] == 60, 30, what="60 files found")
    first = assign(m, "e1")
    assert first["batch_size"] == 2                      # pace unknown: manager.batch_size
    code, body = complete(m, first["jobid"], "DONE", rate=1000.0, startup_s=0.5)
    assert (code, body) == (200, {"ok": True})
    second = assign(m, "e1")
    assert second["batch_size"] == 25                     # 0.5 s * 49 * 1000 B/s = 24.5 kB
    assert m.status()["paces"]["e1"] == {"rate": 1000.0, "startup_s": 0.5}
    code, body = complete(m, second["jobid"], "DONE", rate="fast")
    assert code == 400 and "rate" in body["error"]
