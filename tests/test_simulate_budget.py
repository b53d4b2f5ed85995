"""The simulate runner keeps a deadline from its spawn (what the fleet benchmark relies on)."""
from __future__ import annotations

import subprocess
import sys
import time

from bcorch.workers.read_ids import read_ids_under
from bcorch.orchestrator.pod5_dataset import write_dataset

SAMPLES = 4 * 5000          # one file: 4 reads x 5000 samples
RATE = SAMPLES / 2.0        # = 2 s of simulated basecalling


def _simulate(tmp_path, out: str, *extra: str, timeout: float = 120) -> float:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bcorch.workers.runners.simulate_main",
                           "--input-dir", str(tmp_path / "in"), "--output-dir", str(tmp_path / out),
                           "--samples-per-s", repr(RATE), *extra],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return time.monotonic() - t0


def test_budget_counts_from_started_at(tmp_path):
    written = write_dataset(tmp_path / "in", 1, reads_per_file=4, samples_per_read=5000)
    expected = {rid for ids in written.values() for rid in ids}

    fresh = _simulate(tmp_path, "fresh", "--startup-s", "0.5", "--started-at", repr(time.monotonic()))
    assert fresh >= 2.5  # startup_s + samples / rate, from the spawn
    assert set(read_ids_under([tmp_path / "fresh"])) == expected

    # A spawn whose budget has already passed (start-up took longer than the work) does not
    # sleep the whole budget again on top: it only does its reading and writing. The budget
    # here is 10 minutes, spent an hour ago: a runner that slept it again would overrun the
    # 5-minute timeout, whatever this machine's speed.
    late = _simulate(tmp_path, "late", "--startup-s", "600", "--started-at",
                     repr(time.monotonic() - 3600), timeout=300)
    assert late < 600
    assert set(read_ids_under([tmp_path / "late"])) == expected
