"""A long-polling engine is answered when a failed file's retry back-off ends, not when its
wait_s runs out (a retried file otherwise idled up to the engine's whole long poll)."""
from __future__ import annotations

import time

from manager_helpers import assign, complete, start_manager, wait_counts
from bcorch.orchestrator.pod5_dataset import write_dataset

WAIT_S = 8  # far longer than the first back-off (1 s) plus a reaper tick (< 1 s)


def test_a_file_back_from_its_retry_back_off_answers_a_held_long_poll(procs, tmp_path):
    write_dataset(tmp_path / "in", 1, reads_per_file=2, samples_per_read=400)
    m = start_manager(procs, tmp_path, report_back_interval=5.0, max_attempts=3)
    wait_counts(m, PENDING=1)
    batch = assign(m, "gpu0", 1)
    [name] = batch["batch"]
    assert complete(m, batch["jobid"], "DONE", failed_files={name: "cannot open"})[0] == 200
    asked = time.monotonic()
    code, again = m.get("/assignwork", engineid="gpu0", batchsize=1, wait_s=WAIT_S)
    waited = time.monotonic() - asked
    assert code == 200 and again["batch"] == [name], (waited, again)
    assert waited < WAIT_S - 2, f"answered only after {waited:.1f}s, at the end of its wait_s"
