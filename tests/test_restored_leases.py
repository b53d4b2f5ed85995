"""A restarted manager's restored jobs: their lease runs from when it serves, not from
recovery (a slow start must not expire them before an engine can send a keep-alive)."""
from __future__ import annotations

from pathlib import Path

from bcorch.manager.layout import Layout
from bcorch.manager.service import Manager
from bcorch.manager.store import Store
from bcorch.protocol import JobState as WireState

from support import FakeClock

INTERVAL = 60.0


def _manager(tmp_path: Path, clock: FakeClock) -> tuple[Store, Manager]:
    store = Store(str(tmp_path / "m.sqlite"), max_attempts=3)
    return store, Manager(store, Layout(tmp_path / "in", tmp_path / "out"), batch_size=1,
                          report_back_interval=INTERVAL, clock=clock)


def _one_job_live_at_a_restart(tmp_path: Path, clock: FakeClock) -> str:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "in" / "a.pod5").write_bytes(b"pod5?")
    store, manager = _manager(tmp_path, clock)
    try:
        manager.recover()
        store.add_files([("a.pod5", 5)])
        job_id = manager.assign("e-gpu0", 1).body["jobid"]
        assert job_id
    finally:
        store.close()
    return job_id


def test_a_slow_start_does_not_expire_the_restored_leases(tmp_path):
    clock = FakeClock()
    job_id = _one_job_live_at_a_restart(tmp_path, clock)
    store, manager = _manager(tmp_path, clock)
    try:
        manager.recover()
        clock.now += INTERVAL + 30   # the rest of the start-up: other runs, a slow disk
        manager.leases_start_now()   # the server answers from here
        clock.now += INTERVAL - 1    # the engines' first keep-alive, late in the lease
        assert manager.reap() == 0
        assert manager.keepalive(job_id, WireState.PROCESSING, "e-gpu0").body == {"late": False}
        clock.now += INTERVAL + 1    # and a lease still ends: no keep-alive, expired
        assert manager.reap() == 1
    finally:
        store.close()


def test_leases_start_once_and_a_keepalive_before_is_kept(tmp_path):
    """Serving starts once: a second call restarts nothing (a lease that ran out since
    the first stays out), and a keep-alive taken before the call is not shortened."""
    clock = FakeClock()
    job_id = _one_job_live_at_a_restart(tmp_path, clock)
    store, manager = _manager(tmp_path, clock)
    try:
        manager.recover()
        manager.leases_start_now()
        clock.now += INTERVAL / 2
        assert manager.keepalive(job_id, WireState.PROCESSING, "e-gpu0").body == {"late": False}
        clock.now += INTERVAL - 1
        manager.leases_start_now()
        assert manager.reap() == 0
        clock.now += 2
        manager.leases_start_now()
        assert manager.reap() == 1
    finally:
        store.close()
