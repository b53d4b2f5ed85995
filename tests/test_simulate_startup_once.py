"""The simulate runner's start-up per batch or once per engine (issue 14 §4: a
dorado-server keeps its model loaded, so only its first batch pays for loading it)."""
from __future__ import annotations

import os

from test_runner import _batch_dir, _finish

from bcorch.config import from_mapping
from bcorch.protocol import JobState
from bcorch.workers.runners import make_runner


def _startups(tmp_path, startup_per: str, batches: int = 3) -> list[float]:
    conf = from_mapping({"runner": {"kind": "simulate", "samples_per_s": 1e7, "startup_s": 0.2,
                                    "startup_per": startup_per, "fail_fraction": 0}})
    runner = make_runner(conf, None)
    job_in, _ = _batch_dir(tmp_path, n_files=1, reads=2)
    paid = []
    for n in range(batches):
        handle = runner.start(job_in, tmp_path / f"out{n}", "m", os.listdir(job_in))
        argv = handle.argv
        paid.append(float(argv[argv.index("--startup-s") + 1]))
        assert handle.startup_s == paid[-1], "what the engine reports is what the batch paid"
        assert _finish(handle).state is JobState.DONE
    return paid


def test_startup_per_engine_is_paid_by_the_first_batch_only(tmp_path):
    assert _startups(tmp_path, "engine") == [0.2, 0.0, 0.0]


def test_startup_per_batch_is_paid_by_every_batch(tmp_path):
    assert _startups(tmp_path, "batch") == [0.2, 0.2, 0.2]
