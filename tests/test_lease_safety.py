"""An engine that lost its lease never gets its output into pass/ or fail/.

The engine and its basecaller are frozen (SIGSTOP) past the lease interval, the
manager expires the job and hands its files to someone else, then both are let go
(SIGCONT): the basecaller runs to its end first, then the engine reports what it got.
Whatever the engine does next (notices the lost lease, or reports and is told `late`),
its output stays out of the merged outputs (the manager moved its output dir aside to
LATEOUTPUT_ when the lease expired, so even its late writes cannot land in TMPOUTPUT_), and every read still ends up
there exactly once, from the job that held the lease.
"""
from __future__ import annotations

import signal
import sys

import psutil

from bcorch.config_writer import write_config
from support import ManagedProcess, ManagerProcess, http_json, wait_until
from bcorch.workers.read_ids import read_ids_under
from bcorch.orchestrator.pod5_dataset import write_dataset

SIMULATE = "bcorch.workers.runners.simulate_main"
INTERVAL_S = 2.0


def _engine(tmp, procs, manager, name: str, samples_per_s: float) -> ManagedProcess:
    config = tmp / f"{name}.toml"
    sections = {
        "manager": {"url": manager.url},
        "engine": {"input_dir": str(tmp / "in"), "output_dir": str(tmp / "out"),
                   "engine_id": name, "polling_interval": 0.005, "request_retries": 1,
                   "connect_timeout_s": 1.0, "read_timeout_s": 5.0,
                   "work_until_none_left": True},
        "runner": {"kind": "simulate", "samples_per_s": samples_per_s, "stop_grace_s": 2.0},
    }
    write_config(config, **sections)
    p = ManagedProcess([sys.executable, "-m", "bcorch.workers.engine_cli", "--gpu", "0",
                        "--config", str(config)], tmp / f"{name}.log")
    procs.append(p)
    return p.start()


def _basecaller(pid: int) -> psutil.Process | None:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            if SIMULATE in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def test_engine_that_lost_its_lease_never_merges_its_output(tmp_path, procs):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    written = write_dataset(tmp_path / "in", 2, reads_per_file=4, samples_per_read=4000)
    manager = ManagerProcess(tmp_path, tmp_path / "in", tmp_path / "out",
                             report_back_interval=INTERVAL_S, batch_size=2, input_closed=True)
    procs.append(manager)
    manager.start()
    wait_until(lambda: manager.status()["files"]["PENDING"] == 2, 30, what="files found")

    # 2 files x 4 reads x 4000 samples at 8000 samples/s: a 4 s batch
    slow = _engine(tmp_path, procs, manager, "frozen", samples_per_s=8000)
    caller = wait_until(lambda: _basecaller(slow.pid), 30, what="the basecaller")
    shown = wait_until(lambda: manager.status()["jobs"].get("frozen-gpu0"), 30, what="the job")[0]
    tmp_out = tmp_path / "out"
    job_dir = next(tmp_out.glob(f"TMPOUTPUT_{shown}*_frozen-gpu0"))  # status shows a prefix
    job = job_dir.name[len("TMPOUTPUT_"):-len("_frozen-gpu0")]
    caller_log = job_dir / "basecaller.log"
    wait_until(lambda: "reads," in caller_log.read_text(), 30, what="the first file basecalled")
    engine = psutil.Process(slow.pid)
    for p in (engine, caller):
        p.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: manager.status()["files"]["PENDING"] == 2, 30, interval=0.2,
                   what="the manager to expire the frozen engine's lease")
        # the basecaller ends its batch while the engine still sleeps: output is written
        caller.send_signal(signal.SIGCONT)
        wait_until(lambda: caller.status() == psutil.STATUS_ZOMBIE, 30,
                   what="the late basecaller to finish")
    finally:
        for p in (caller, engine):
            p.send_signal(signal.SIGCONT)
    code = slow.wait(60)
    # what the late basecaller wrote is set aside (LATEOUTPUT_), never merged
    assert list(tmp_out.glob(f"LATEOUTPUT_{job}_*/basecaller.log")), \
        sorted(p.name for p in tmp_out.iterdir())
    assert code == 75, slow.log()[-2000:]
    assert "lease" in slow.log() and "late" in slow.log() + manager.log()
    assert list((tmp_out / "pass").iterdir()) == [] and list((tmp_out / "fail").iterdir()) == []

    # however late, a DONE report of that job is refused and merges nothing
    code, body = http_json(f"{manager.url}/completed?job_id={job}&job_state=DONE")
    assert (code, body) == (200, {"ok": False, "late": True})
    assert list((tmp_out / "pass").iterdir()) == []
    assert not list(tmp_out.glob(f"TMPOUTPUT_{job}_*"))

    # a healthy engine then does the batch; each read lands once, none from the late job
    fresh = _engine(tmp_path, procs, manager, "fresh", samples_per_s=5e6)
    assert fresh.wait(60) == 0, fresh.log()[-2000:]
    counts = read_ids_under([tmp_out / "pass", tmp_out / "fail"])
    assert sorted(counts) == sorted(r for ids in written.values() for r in ids)
    assert set(counts.values()) == {1}
    merged = [p.name for sub in ("pass", "fail") for p in (tmp_out / sub).iterdir()]
    assert merged and not any(name.startswith(job) for name in merged), merged
    assert manager.status()["files"]["DONE"] == 2
