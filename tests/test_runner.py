"""Runners: real child processes on real POD5 files; process groups; stop = TERM then KILL."""
from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import psutil
import pytest

from support import wait_until
from bcorch.workers.read_ids import read_ids_in, read_ids_under, settings_under
from bcorch.orchestrator.pod5_dataset import write_corrupt, write_dataset
from bcorch.protocol import JobState
from bcorch.config import ConfigError, from_mapping
from bcorch.workers.runners import make_runner
from bcorch.workers.runners.base import LOG_NAME
from bcorch.workers.runners.script import ScriptRunner
from bcorch.workers.runners.simulate import SimulateRunner
from bcorch.workers.runners.simulate_main import is_fail


def _batch_dir(tmp_path: Path, n_files: int = 3, reads: int = 10, **kw) -> tuple[Path, dict]:
    """A job input dir of flat symlinks to real POD5 files, as the manager makes it."""
    data = tmp_path / "data"
    written = write_dataset(data, n_files, reads_per_file=reads, **kw)
    job_in = tmp_path / "ASSIGNED_j1_e"
    job_in.mkdir()
    for rel in written:
        (job_in / Path(rel).name).symlink_to(data / rel)
    return job_in, written


def _finish(handle, timeout: float = 30.0):
    return wait_until(handle.poll, timeout, what="basecaller exit")


def _script(tmp_path: Path, body: str, name: str = "bc.sh") -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.parametrize("emit", ["fastq", "bam"])
def test_simulate_records_the_batchs_model_and_kit_in_every_read(tmp_path, emit):
    job_in, written = _batch_dir(tmp_path, n_files=2, reads=8)
    out = tmp_path / "TMPOUTPUT_j1_e"
    runner = SimulateRunner(samples_per_s=5e6, fail_fraction=0.3)
    result = _finish(runner.start(job_in, out, "sup,5mCG_5hmCG", sorted(os.listdir(job_in)),
                                  kit="SQK-NBD114-24", emit=emit))
    assert result.state is JobState.DONE, (out / LOG_NAME).read_text()
    expected = sorted(rid for ids in written.values() for rid in ids)
    assert sorted(read_ids_under([out])) == expected
    assert {p.suffix for p in out.rglob("*") if p.is_file() and p.parent.name in ("pass", "fail")} \
        == {f".{emit}"}
    calls = settings_under([out])
    assert sorted(calls) == expected
    assert all(c == {"model": "sup,5mCG_5hmCG", "kit": "SQK-NBD114-24"} for c in calls.values())
    plain = tmp_path / "plain"
    _finish(runner.start(job_in, plain, "hac", sorted(os.listdir(job_in))))
    assert set(map(str, settings_under([plain]).values())) == {"{'model': 'hac'}"}


def test_simulate_pays_startup_again_after_a_model_switch(tmp_path):
    """startup_per = "engine" acts out a loaded model: a batch of another model loads its own
    (a model switch, counted), and the same model again pays nothing."""
    job_in, _ = _batch_dir(tmp_path, n_files=1, reads=2)
    runner = SimulateRunner(samples_per_s=1e7, startup_s=0.2, startup_once=True, fail_fraction=0)
    paid = []
    for n, model in enumerate(["hac", "hac", "sup", "sup", "hac"]):
        handle = runner.start(job_in, tmp_path / f"out{n}", model, os.listdir(job_in))
        paid.append(handle.startup_s)
        assert _finish(handle).state is JobState.DONE
    assert paid == [0.2, 0.0, 0.2, 0.0, 0.2] and runner.model_switches == 2


def test_simulate_writes_every_read_id_once(tmp_path):
    job_in, written = _batch_dir(tmp_path, n_files=3, reads=20)
    out = tmp_path / "TMPOUTPUT_j1_e"
    runner = SimulateRunner(samples_per_s=5e6, fail_fraction=0.3)
    handle = runner.start(job_in, out, "hac", sorted(os.listdir(job_in)))
    result = _finish(handle)
    assert result.state is JobState.DONE and result.failed_files == {}
    expected = [rid for ids in written.values() for rid in ids]
    counts = read_ids_under([out / "pass", out / "fail"])
    assert sorted(counts) == sorted(expected) and set(counts.values()) == {1}
    failed_ids = set(read_ids_under([out / "fail"]))
    assert failed_ids == {r for r in expected if is_fail(r, 0.3)} and failed_ids
    log = (out / LOG_NAME).read_text()
    assert log.splitlines()[0].startswith("SIMULATION:")


def test_simulate_takes_time_in_proportion_to_samples(tmp_path):
    job_in, _ = _batch_dir(tmp_path, n_files=2, reads=10, samples_per_read=4000)
    runner = SimulateRunner(samples_per_s=80_000)  # 80 000 samples -> at least 1 s
    started = time.monotonic()
    result = _finish(runner.start(job_in, tmp_path / "out", "hac", os.listdir(job_in)))
    assert result.state is JobState.DONE
    assert time.monotonic() - started >= 1.0


def test_simulate_reports_unreadable_file_and_does_the_rest(tmp_path):
    job_in, written = _batch_dir(tmp_path, n_files=2, reads=5)
    write_corrupt(tmp_path / "bad.pod5")
    (job_in / "bad.pod5").symlink_to(tmp_path / "bad.pod5")
    out = tmp_path / "out"
    result = _finish(SimulateRunner(5e6).start(job_in, out, "hac", os.listdir(job_in)))
    assert result.state is JobState.DONE
    assert list(result.failed_files) == ["bad.pod5"] and result.failed_files["bad.pod5"]
    assert "\n" not in result.failed_files["bad.pod5"]
    assert sorted(read_ids_under([out])) == sorted(r for ids in written.values() for r in ids)
    assert json.loads((out / "failed_files.json").read_text()) == result.failed_files


def test_simulate_batch_of_only_bad_files_fails(tmp_path):
    job_in = tmp_path / "in"
    write_corrupt(job_in / "a.pod5")
    result = _finish(SimulateRunner(5e6).start(job_in, tmp_path / "out", "hac", ["a.pod5"]))
    assert result.state is JobState.FAILED and "a.pod5" in result.failed_files


def test_script_runner_passes_the_seed_arguments_and_logs(tmp_path):
    script = _script(tmp_path, 'echo "args:$1|$2|$3|$4"; echo oops >&2; ps -o pgid= $$ > "$2/pgid"\n')
    out = tmp_path / "out"
    handle = ScriptRunner(str(script), port=5601).start(tmp_path, out, "sup", ["x.pod5"])
    result = _finish(handle)
    assert result.state is JobState.DONE and result.returncode == 0
    log = (out / LOG_NAME).read_text()
    assert f"args:{tmp_path}|{out}|sup|5601" in log and "oops" in log
    assert int((out / "pgid").read_text()) == handle.pid != os.getpgid(0)


def test_script_runner_gets_a_batchs_kit_and_emit_in_its_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BCORCH_KIT", "inherited")
    script = _script(tmp_path, 'echo "kit:${BCORCH_KIT-unset}|emit:${BCORCH_EMIT-unset}|$3"\n')
    runner = ScriptRunner(str(script), port=1)
    _finish(runner.start(tmp_path, tmp_path / "o1", "sup", [], kit="SQK-NBD114-24", emit="bam"))
    assert "kit:SQK-NBD114-24|emit:bam|sup" in (tmp_path / "o1" / LOG_NAME).read_text()
    monkeypatch.delenv("BCORCH_KIT")
    _finish(runner.start(tmp_path, tmp_path / "o2", "hac", []))
    assert "kit:unset|emit:unset|hac" in (tmp_path / "o2" / LOG_NAME).read_text()


def test_script_runner_nonzero_exit_is_failed(tmp_path):
    script = _script(tmp_path, "exit 3\n")
    result = _finish(ScriptRunner(str(script), port=1).start(tmp_path, tmp_path / "o", "m", []))
    assert result.state is JobState.FAILED and "exited with 3" in result.reason


def test_stop_kills_the_whole_group_after_grace(tmp_path):
    # The leader ignores TERM and has a grandchild: both must be gone after stop().
    script = _script(tmp_path, "trap '' TERM\nsleep 300 &\necho $! > \"$2/child\"\nwait\n")
    out = tmp_path / "out"
    handle = ScriptRunner(str(script), port=1).start(tmp_path, out, "m", [])
    child = int(wait_until(lambda: (out / "child").exists() and (out / "child").read_text().strip(),
                           10, what="grandchild pid"))
    started = time.monotonic()
    result = handle.stop(grace=0.5)
    assert result.state is JobState.STOPPED
    assert 0.4 <= time.monotonic() - started < 5
    assert not psutil.pid_exists(handle.pid) or psutil.Process(handle.pid).status() == "zombie"
    wait_until(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie",
               5, what="grandchild gone")


def test_terminate_then_poll_reports_stopped(tmp_path):
    job_in, _ = _batch_dir(tmp_path, n_files=1, reads=10)
    handle = SimulateRunner(samples_per_s=1000).start(job_in, tmp_path / "o", "m", ["x"])
    handle.terminate()
    result = _finish(handle, 10)
    assert result.state is JobState.STOPPED


@pytest.mark.parametrize("runner, message", [
    ({"kind": "script"}, "runner.bc_script: required"),
    ({"kind": "script", "bc_script": "/nonexistent/bc.sh"}, "runner.bc_script: no such file"),
    ({"kind": "dorado"}, "runner.dorado_path: 'dorado' is not on PATH"),
    ({"kind": "dorado-server"}, "runner.server_path: 'dorado_basecall_server' is not on PATH"),
])
def test_runner_configuration_errors_name_the_key(runner, message):
    with pytest.raises(ConfigError) as err:
        make_runner(from_mapping({"runner": runner}))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_script_not_executable_is_a_config_error(tmp_path):
    path = tmp_path / "bc.sh"
    path.write_text("#!/bin/sh\n")
    with pytest.raises(ConfigError, match="runner.bc_script: .* is not executable"):
        make_runner(from_mapping({"runner": {"kind": "script", "bc_script": str(path)}}))


def test_output_reader_counts_duplicates(tmp_path):
    (tmp_path / "pass").mkdir()
    (tmp_path / "pass" / "a.fastq").write_text("@r1 x=1\nACGT\n+\n!!!!\n@r2\nA\n+\n!\n")
    (tmp_path / "fail").mkdir()
    (tmp_path / "fail" / "b.fastq").write_text("@r1\nA\n+\n!\n")
    assert list(read_ids_in(tmp_path / "pass" / "a.fastq")) == ["r1", "r2"]
    assert read_ids_under([tmp_path / "pass", tmp_path / "fail", tmp_path / "missing"]) == \
        {"r1": 2, "r2": 1}
    (tmp_path / "bad.fastq").write_text("r1\nA\n+\n!\n")
    with pytest.raises(ValueError, match="not a FASTQ header"):
        list(read_ids_in(tmp_path / "bad.fastq"))


class _ReadyServer:
    """A basecall server that is up: what ServerBatchHandle asks of BasecallServer."""

    pid = None
    last_exit = None

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir

    def poll(self):
        from bcorch.workers.runners.dorado_server import ServerState
        return ServerState.READY


def test_every_runner_returns_a_run_handle(tmp_path):
    """Runner.start is declared to return RunHandle: the process handle and the
    dorado-server runner's batch handle both honour the protocol, and run to a result."""
    import sys
    from bcorch.workers.runners.base import RunHandle
    from bcorch.workers.runners.dorado_server import ServerBatchHandle
    script = _script(tmp_path, "exit 0\n")
    process = ScriptRunner(str(script), "9999").start(tmp_path, tmp_path / "out1", "m", [])
    server_batch = ServerBatchHandle(_ReadyServer(tmp_path), [sys.executable, "-c", "pass"],
                                     tmp_path / "out2", stall_timeout_s=0.0)
    for handle in (process, server_batch):
        assert isinstance(handle, RunHandle), type(handle).__name__
        assert wait_until(handle.poll, 30, what="the basecaller").state is JobState.DONE
        assert handle.result is not None and handle.log_path.exists()
