"""scripts/bench.py facility with tiny inputs: sensible numbers, or a one-line error naming
the flag (it divided by zero when a run ran out of work before any batch finished)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support import REPO


def bench(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/bench.py", "facility", "--runs", "2",
                           "--files", "1", "--json", str(tmp_path / "out.json"),
                           "--tmp", str(tmp_path), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_one_file_per_run_simulates_and_reports(tmp_path):
    done = bench(tmp_path, "--skip-http")
    assert done.returncode == 0, done.stderr
    assert "switches/h, slack 600s" in done.stdout
    results = json.loads((tmp_path / "out.json").read_text())
    assert [f["files_done"] for f in results["fair_share"]] == [2, 2, 2, 2]
    for sim in results["fair_share"]:
        shares = sim["shares"]
        assert shares == [] or abs(sum(s["share"] for s in shares) - 1.0) < 1e-9


@pytest.mark.parametrize("args,names", [
    ((), "--files"),                       # the HTTP measurements need more files than 2
    (("--skip-http", "--priorities", "0"), "--priorities"),
    (("--skip-http", "--sim-engines", "0"), "--sim-engines"),
])
def test_inputs_it_cannot_use_are_a_one_line_error(tmp_path, args, names):
    done = bench(tmp_path, *args)
    assert done.returncode == 78, done.stdout + done.stderr   # scripts/bench_args.py
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert names in last and "Traceback" not in done.stderr, done.stderr
