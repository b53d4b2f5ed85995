"""runner.min_read_fraction defaults to 1.0 (issue 11, hole 7): with the default configuration a
file with one read missing from the output is not DONE. A lower value is for a dorado told to
filter reads (docs/basecallers.md)."""
from __future__ import annotations

from pathlib import Path

import pytest

from bcorch import config
from bcorch.orchestrator.pod5_dataset import write_dataset
from bcorch.protocol import JobState
from bcorch.workers.output_check import OutputChecker
from bcorch.workers.runners.base import RunResult


def _batch_with_one_read_missing(tmp: Path) -> tuple[Path, Path, list[str]]:
    written = write_dataset(tmp / "data", 2, reads_per_file=10, samples_per_read=1000)
    job_in, out = tmp / "ASSIGNED_j1_e", tmp / "TMPOUTPUT_j1_e"
    job_in.mkdir()
    (out / "pass").mkdir(parents=True)
    names = [Path(rel).name for rel in written]
    for name in names:
        (job_in / name).symlink_to(tmp / "data" / name)
    reads = [r for ids in written.values() for r in ids][1:]  # 19 of 20: one read lost
    (out / "pass" / "calls.fastq").write_text("".join(f"@{r}\nA\n+\n!\n" for r in reads))
    return job_in, out, names


@pytest.mark.parametrize("checker", [
    lambda: OutputChecker(config.load(None).runner.min_read_fraction),  # what an engine uses
    lambda: OutputChecker(),
], ids=["config default", "checker default"])
def test_a_file_missing_one_read_is_not_done_by_default(tmp_path, checker):
    job_in, out, names = _batch_with_one_read_missing(tmp_path)
    checked = checker().apply(RunResult(JobState.DONE, 0), job_in, out, names)
    assert checked.state is JobState.FAILED, checked
    assert "9 of 10 reads" in checked.reason, checked.reason


def test_a_lower_fraction_accepts_what_a_filtering_dorado_dropped(tmp_path):
    job_in, out, names = _batch_with_one_read_missing(tmp_path)
    cfg = config.from_mapping({"runner": {"min_read_fraction": 0.9}})
    checked = OutputChecker(cfg.runner.min_read_fraction).apply(
        RunResult(JobState.DONE, 0), job_in, out, names)
    assert checked.state is JobState.DONE and checked.failed_files == {}
