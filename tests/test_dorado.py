"""The dorado runner and the output check: a fake `dorado` executable (tests/fakes) that
checks its arguments and acts out dorado's documented behaviours, real POD5 files, the
real manager, real engine processes, and real bcorch for the exit-78 case."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dorado_helpers import (FAKES, HAC, DoradoSite, argv_records, fake_env, models_dir,
                            write_toml)
from support import ManagedProcess, wait_until
from bcorch.workers.output_check import OutputChecker, skipped_in_log
from bcorch.workers.read_ids import read_ids_under, settings_under
from bcorch.orchestrator.pod5_dataset import write_corrupt, write_dataset
from bcorch.protocol import JobState
from bcorch.config import ConfigError, from_mapping
from bcorch.workers.runners import Placement, make_runner
from bcorch.workers.runners.base import LOG_NAME, BatchSettingsError, RunResult
from bcorch.workers.runners.dorado import DoradoRunner, check_model

DORADO = str(FAKES / "dorado")


def _job(tmp: Path, n_files: int = 2, reads: int = 5, corrupt: int = 0) -> tuple[Path, dict, list]:
    """A job input dir of symlinks to real POD5 files, as the manager makes it."""
    data = tmp / "data"
    written = write_dataset(data, n_files, reads_per_file=reads, samples_per_read=2000)
    for i in range(corrupt):
        write_corrupt(data / f"corrupt_{i}.pod5", seed=i)
    job_in = tmp / "ASSIGNED_j1_e"
    job_in.mkdir()
    names = [Path(rel).name for rel in written] + [f"corrupt_{i}.pod5" for i in range(corrupt)]
    for name in names:
        (job_in / name).symlink_to(data / name)
    return job_in, written, names


def _run(tmp: Path, monkeypatch, runner: DoradoRunner, job_in: Path, names: list,
         model: str = "hac", **env: str):
    for key, value in fake_env(tmp, **env).items():
        monkeypatch.setenv(key, value)
    out = tmp / "TMPOUTPUT_j1_e"
    handle = runner.start(job_in, out, model, names)
    return wait_until(handle.poll, 60, what="fake dorado to exit"), out


# -- models: no downloads in a cluster ------------------------------------------------------

@pytest.mark.parametrize("model, present, ok", [
    ("hac", [HAC], True),
    ("hac@v5.2.0", [HAC], True),
    ("hac@v4.3.0", [HAC], False),
    ("sup", [HAC], False),
    ("hac,5mCG_5hmCG", [HAC], False),
    ("hac,5mCG_5hmCG", [HAC, HAC + "_5mCG_5hmCG@v2"], True),
    ("sup", [HAC + "_5mCG_5hmCG@v2".replace("hac", "sup")], False),  # a mods model is not simplex
    (HAC, [HAC], True),
    ("dna_r9.4.1_e8_hac@v3.3", [HAC], False),
])
def test_model_must_already_be_in_the_models_directory(tmp_path, model, present, ok):
    root = models_dir(tmp_path, *present)
    if ok:
        check_model(model, str(root))
        return
    with pytest.raises(ConfigError) as err:
        check_model(model, str(root))
    text = str(err.value)
    assert text.startswith("engine.model:") and repr(model) in text and str(root) in text
    assert "\n" not in text


def test_model_path_and_missing_models_directory_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"engine.model: model directory .*nowhere.* does not"):
        check_model(str(tmp_path / "nowhere"), "")
    with pytest.raises(ConfigError, match=r"runner.models_directory: required for model 'hac'"):
        check_model("hac", "")
    with pytest.raises(ConfigError, match=r"runner.models_directory: no such directory"):
        check_model("hac", str(tmp_path / "missing"))


@pytest.mark.parametrize("runner, message", [
    ({"kind": "dorado", "dorado_path": "/nonexistent/dorado"}, "runner.dorado_path: no such file"),
    ({"kind": "dorado", "dorado_path": "no-such-dorado-on-path"},
     "runner.dorado_path: 'no-such-dorado-on-path' is not on PATH"),
    ({"kind": "dorado", "dorado_path": DORADO}, "runner.models_directory: required for model 'hac'"),
])
def test_dorado_runner_configuration_errors_name_the_key(runner, message):
    with pytest.raises(ConfigError) as err:
        make_runner(from_mapping({"runner": runner}))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


# -- the command line ---------------------------------------------------------------------

def test_command_line_output_dir_device_and_extra_args(tmp_path, monkeypatch):
    root = models_dir(tmp_path)
    job_in, written, names = _job(tmp_path)
    conf = from_mapping({"engine": {"model": "hac"}, "runner": {
        "kind": "dorado", "dorado_path": DORADO, "models_directory": str(root),
        "extra_args": ["--no-trim", "--min-qscore", "7"]}})
    runner = make_runner(conf, placement=Placement("e", gpu_index=3, device_index=0))
    result, out = _run(tmp_path, monkeypatch, runner, job_in, names, CUDA_VISIBLE_DEVICES="GPU-x")
    assert result.state is JobState.DONE, (out / LOG_NAME).read_text()
    [record] = argv_records(tmp_path, "dorado")
    assert record["argv"] == ["basecaller", "hac", str(job_in), "--device", "cuda:0",
                              "--output-dir", str(out / "pass"), "--emit-fastq",
                              "--models-directory", str(root), "--no-trim", "--min-qscore", "7"]
    assert record["cuda_visible_devices"] == "GPU-x"
    expected = sorted(r for ids in written.values() for r in ids)
    assert sorted(read_ids_under([out / "pass"])) == expected
    assert "Simplex reads basecalled: 10" in (out / LOG_NAME).read_text()


@pytest.mark.parametrize("emit", ["fastq", "bam"])
def test_a_batchs_model_kit_and_emit_replace_the_engines(tmp_path, monkeypatch, emit):
    """Facility mode: the run's model complex and kit reach dorado's command line (a kit in
    extra_args gives way to the batch's), its format replaces runner.emit, and every read
    records what basecalled it (the fake's DS tag)."""
    mods = HAC + "_5mCG_5hmCG@v2"
    root = models_dir(tmp_path, HAC, mods)
    job_in, written, names = _job(tmp_path)
    runner = DoradoRunner(DORADO, "hac", str(root), emit="bam" if emit == "fastq" else "fastq",
                          extra_args=["--kit-name", "OLD-KIT", "--no-trim"])
    for key, value in fake_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "TMPOUTPUT_j1_e"
    handle = runner.start(job_in, out, "hac,5mCG_5hmCG", names, kit="SQK-NBD114-24", emit=emit)
    result = wait_until(handle.poll, 60, what="fake dorado to exit")
    assert result.state is JobState.DONE, (out / LOG_NAME).read_text()
    [record] = argv_records(tmp_path, "dorado")
    assert record["argv"] == ["basecaller", "hac,5mCG_5hmCG", str(job_in), "--device", "cuda:0",
                              "--output-dir", str(out / "pass"),
                              *(["--emit-fastq"] if emit == "fastq" else []),
                              "--models-directory", str(root), "--kit-name", "SQK-NBD114-24",
                              "--no-trim"]
    assert list((out / "pass").rglob(f"*.{emit}"))
    expected = sorted(r for ids in written.values() for r in ids)
    calls = settings_under([out / "pass"])
    assert sorted(calls) == expected
    assert all(c == {"model": "hac,5mCG_5hmCG", "kit": "SQK-NBD114-24"} for c in calls.values())


def test_without_batch_settings_the_command_line_is_unchanged(tmp_path):
    root = models_dir(tmp_path)
    runner = DoradoRunner(DORADO, "hac", str(root), extra_args=["--kit-name", "K1"])
    argv = runner.argv(tmp_path / "in", tmp_path / "out", "hac")
    assert argv[1:] == ["basecaller", "hac", str(tmp_path / "in"), "--device", "cuda:0",
                        "--output-dir", str(tmp_path / "out" / "pass"), "--emit-fastq",
                        "--models-directory", str(root), "--kit-name", "K1"]


def test_a_batchs_model_not_installed_is_a_batch_settings_error(tmp_path):
    """The batch's own model missing here fails that batch (the engine goes on); the engine's
    own model missing is still a configuration error (exit 78)."""
    root = models_dir(tmp_path)
    runner = DoradoRunner(DORADO, "hac", str(root))
    job_in, _, names = _job(tmp_path, n_files=1)
    with pytest.raises(BatchSettingsError, match=r"engine.model: no 'sup' model"):
        runner.start(job_in, tmp_path / "o1", "sup", names)
    with pytest.raises(BatchSettingsError, match=r"emit must be one of fastq, bam"):
        runner.start(job_in, tmp_path / "o2", "hac", names, emit="sam")
    for child in root.iterdir():
        child.rmdir()
    with pytest.raises(ConfigError) as err:
        runner.start(job_in, tmp_path / "o3", "hac", names)
    assert not isinstance(err.value, BatchSettingsError)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


@pytest.mark.parametrize("weird", ["m; rm -rf x", "two words", "$(touch pwned)", "`id` && |<>"])
def test_model_string_reaches_dorado_as_one_literal_argument(tmp_path, monkeypatch, weird):
    model_dir = tmp_path / "models" / weird
    model_dir.mkdir(parents=True)
    job_in, _, names = _job(tmp_path, n_files=1)
    runner = DoradoRunner(DORADO, str(model_dir))
    monkeypatch.chdir(tmp_path)
    result, out = _run(tmp_path, monkeypatch, runner, job_in, names, model=str(model_dir))
    assert result.state is JobState.DONE, (out / LOG_NAME).read_text()
    [record] = argv_records(tmp_path, "dorado")
    assert record["argv"][1] == str(model_dir) and record["argv"][2] == str(job_in)
    assert not (tmp_path / "pwned").exists() and not list(tmp_path.glob("x"))


def test_bam_output_is_checked_by_read_ids(tmp_path, monkeypatch):
    """dorado's default output, written as real BAM (pysam) by the fake: a skipped file is one
    failed file, and a file with half its reads missing (no log line says so) fails the batch."""
    root = models_dir(tmp_path)
    job_in, _, names = _job(tmp_path, n_files=2, corrupt=1)
    runner = DoradoRunner(DORADO, "hac", str(root), emit="bam")
    result, out = _run(tmp_path, monkeypatch, runner, job_in, names)
    bams = list((out / "pass").rglob("*.bam"))
    assert len(bams) == 1 and "--emit-fastq" not in argv_records(tmp_path)[0]["argv"]
    checked = OutputChecker().apply(result, job_in, out, names)
    assert checked.state is JobState.DONE and list(checked.failed_files) == ["corrupt_0.pod5"]
    assert "Failed to open file" in checked.failed_files["corrupt_0.pod5"]

    partial_tmp = tmp_path / "partial"
    partial_tmp.mkdir()
    job_in, _, names = _job(partial_tmp, n_files=2, reads=8)
    result, out = _run(partial_tmp, monkeypatch, runner, job_in, names, FAKE_DORADO_MODE="partial")
    checked = OutputChecker().apply(result, job_in, out, names)
    assert checked.state is JobState.FAILED
    assert "output check (read ids)" in checked.reason and "only 4 of 8 reads" in checked.reason


@pytest.mark.parametrize("emit", ["bam", "fastq"])
def test_split_reads_count_for_their_parent_once(tmp_path, monkeypatch, emit):
    """dorado splits chimeric reads into children with new ids and `pi:Z:<parent>`: the output
    check and the verification reader both count the parent as written, and exactly once."""
    root = models_dir(tmp_path)
    job_in, written, names = _job(tmp_path, n_files=2, reads=4)
    runner = DoradoRunner(DORADO, "hac", str(root), emit=emit)
    result, out = _run(tmp_path, monkeypatch, runner, job_in, names, FAKE_DORADO_MODE="split")
    checked = OutputChecker().apply(result, job_in, out, names)
    assert checked.state is JobState.DONE and checked.failed_files == {}
    found = read_ids_under([out / "pass"])
    parents = [r for ids in written.values() for r in ids]
    assert not set(parents) & set(found), "the children carry new ids"
    assert all(r in found for r in parents) and found.doubled() == []
    assert sorted(found.parents) == sorted(parents) and set(found.parents.values()) == {2}
    assert {found.origin(child) for child in found} == set(parents)


def test_bam_output_without_pysam_is_a_configuration_error(tmp_path, monkeypatch):
    """Without pysam BAM could not be checked: refuse to start (exit 78), never run unchecked."""
    root = models_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "pysam", None)
    with pytest.raises(ConfigError, match=r"runner.emit: BAM output needs pysam .* "
                                          r"runner.emit = \"fastq\""):
        DoradoRunner(DORADO, "hac", str(root), emit="bam")
    assert DoradoRunner(DORADO, "hac", str(root), emit="fastq").emit == "fastq"


def test_an_unreadable_bam_leaves_it_to_the_log(tmp_path, caplog):
    job_in, written, names = _job(tmp_path, n_files=2, reads=3)
    out = tmp_path / "out"
    (out / "pass").mkdir(parents=True)
    (out / "pass" / "calls.bam").write_bytes(b"not a bam at all")
    (out / LOG_NAME).write_text(
        f"[2026-01-01 10:00:00.000] [error] Failed to open file {job_in / names[1]}: bad\n")
    checked = OutputChecker().apply(RunResult(JobState.DONE, 0), job_in, out, names)
    assert checked.state is JobState.DONE and list(checked.failed_files) == [names[1]]
    assert "calls.bam: not a readable BAM" in caplog.text


# -- the output check ---------------------------------------------------------------------

def test_corrupt_file_skipped_with_exit_0_is_one_failed_file(tmp_path, monkeypatch):
    root = models_dir(tmp_path)
    job_in, _, names = _job(tmp_path, n_files=2, corrupt=1)
    result, out = _run(tmp_path, monkeypatch, DoradoRunner(DORADO, "hac", str(root)), job_in, names)
    assert result.state is JobState.DONE and result.returncode == 0
    checked = OutputChecker().apply(result, job_in, out, names)
    assert checked.state is JobState.DONE
    assert set(checked.failed_files) == {"corrupt_0.pod5"}
    assert "Failed to open file" in checked.failed_files["corrupt_0.pod5"]


def test_partial_output_fails_the_whole_batch(tmp_path, monkeypatch):
    root = models_dir(tmp_path)
    job_in, _, names = _job(tmp_path, n_files=2, reads=8)
    result, out = _run(tmp_path, monkeypatch, DoradoRunner(DORADO, "hac", str(root)), job_in,
                       names, FAKE_DORADO_MODE="partial")
    assert result.state is JobState.DONE
    checked = OutputChecker(min_read_fraction=0.9).apply(result, job_in, out, names)
    assert checked.state is JobState.FAILED
    assert f"{names[0]}: only 4 of 8 reads in the output" in checked.reason
    tolerant = OutputChecker(min_read_fraction=0.5).apply(result, job_in, out, names)
    assert tolerant.state is JobState.DONE and tolerant.failed_files == {}


def test_missing_file_without_a_log_line_is_still_caught_by_read_ids(tmp_path):
    job_in, written, names = _job(tmp_path, n_files=3, reads=4)
    out = tmp_path / "out"
    (out / "pass").mkdir(parents=True)
    first, second = (written[n] for n in names[:2])
    (out / "pass" / "calls.fastq").write_text("".join(
        f"@{r}\tpi:Z:ignored\nA\n+\n!\n" for r in first)
        + "".join(f"@child-{i}\tpi:Z:{r}\nA\n+\n!\n" for i, r in enumerate(second)))
    checked = OutputChecker().apply(RunResult(JobState.DONE, 0), job_in, out, names)
    assert checked.state is JobState.DONE
    assert list(checked.failed_files) == [names[2]]
    assert "none of its reads is in the output (0 of 4 reads written)" in \
        checked.failed_files[names[2]]


def test_without_pod5_the_log_decides_and_it_says_so_once(tmp_path, monkeypatch, caplog):
    job_in, _, names = _job(tmp_path, n_files=2, reads=3)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOG_NAME).write_text(
        f"[2026-01-01 10:00:00.000] [error] Failed to open file {job_in / names[1]}: bad\n")
    import bcorch.workers.output_check as oc
    monkeypatch.setattr(oc, "_said_once", set())
    monkeypatch.setitem(sys.modules, "pod5", None)
    for _ in range(2):
        checked = OutputChecker().apply(RunResult(JobState.DONE, 0), job_in, out, names)
        assert checked.state is JobState.DONE and list(checked.failed_files) == [names[1]]
    assert caplog.text.count("the pod5 library is not installed") == 1


def test_log_lines_name_files_by_link_target_or_bare_name(tmp_path):
    job_in, _, names = _job(tmp_path, n_files=3, reads=2)
    log = tmp_path / "b.log"
    log.write_text(f"[x] [warning] Skipping file {(job_in / names[0]).resolve()} (no reads)\n"
                   f"[x] [error] Failed to open file '{names[2]}': truncated\n"
                   f"[x] [info] Failed to open file {names[1]} (an info line is not a skip)\n")
    assert set(skipped_in_log(log, job_in, names)) == {names[0], names[2]}


# -- against the real manager -----------------------------------------------------------

def test_clean_run_every_read_once(tmp_path, procs):
    site = DoradoSite(tmp_path, procs, n_files=6)
    root = models_dir(tmp_path)
    engine = site.engine(site.config({"kind": "dorado", "dorado_path": DORADO,
                                      "models_directory": str(root)}))
    assert engine.wait(90) == 0, engine.log()[-3000:]
    assert site.files() == {"DONE": 6}
    counts = read_ids_under([site.output_dir / "pass"])
    assert sorted(counts) == site.good_read_ids() and max(counts.values()) == 1
    # the first batch is manager.batch_size (4) files; the rest is sized by the engine's pace
    assert len(argv_records(tmp_path, "dorado")) >= 2


def test_corrupt_file_retried_then_quarantined_others_done(tmp_path, procs):
    site = DoradoSite(tmp_path, procs, n_files=5, corrupt=1, max_attempts=2)
    root = models_dir(tmp_path)
    engine = site.engine(site.config({"kind": "dorado", "dorado_path": DORADO,
                                      "models_directory": str(root)}))
    assert engine.wait(90) == 0, engine.log()[-3000:]
    assert site.files() == {"DONE": 5, "QUARANTINED": 1}
    quarantined = site.quarantined()
    assert list(quarantined) == ["corrupt_0.pod5"]
    assert "Failed to open file" in quarantined["corrupt_0.pod5"]
    runs_with_corrupt = [r for r in argv_records(tmp_path, "dorado")]
    assert len(runs_with_corrupt) >= 2  # the first try and the retry alone
    counts = read_ids_under([site.output_dir / "pass"])
    assert sorted(counts) == site.good_read_ids() and max(counts.values()) == 1


def test_abort_134_is_failed_with_dorados_message(tmp_path, procs):
    site = DoradoSite(tmp_path, procs, n_files=2, max_attempts=1,
                      env={"FAKE_DORADO_MODE": "abort"})
    root = models_dir(tmp_path)
    engine = site.engine(site.config({"kind": "dorado", "dorado_path": DORADO,
                                      "models_directory": str(root)}))
    assert engine.wait(90) == 0, engine.log()[-3000:]
    quarantined = site.quarantined()
    assert len(quarantined) == 2 and site.files() == {"QUARANTINED": 2}
    for reason in quarantined.values():
        assert "dorado aborted (SIGABRT, exit 134)" in reason and "CUDA error" in reason
    assert "FAILED: dorado aborted" in engine.log()
    failed_out = list(site.output_dir.glob("FAILEDOUTPUT_*"))
    assert failed_out and "c10::Error" in (failed_out[0] / LOG_NAME).read_text()


def test_hang_is_stopped_after_the_stall_timeout(tmp_path, procs):
    site = DoradoSite(tmp_path, procs, n_files=1, max_attempts=1,
                      env={"FAKE_DORADO_MODE": "hang"})
    root = models_dir(tmp_path)
    engine = site.engine(site.config({"kind": "dorado", "dorado_path": DORADO,
                                      "models_directory": str(root), "stall_timeout_s": 1.0}))
    assert engine.wait(60) == 0, engine.log()[-3000:]
    [reason] = site.quarantined().values()
    assert "basecaller stalled (no output for 1s)" in reason
    assert "wrote nothing for" in engine.log()
    pids = [r["pid"] for r in argv_records(tmp_path, "dorado")]
    import psutil
    assert pids and not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                            for p in pids)


def test_missing_model_exits_78_and_the_slot_is_failed(tmp_path, procs):
    site = DoradoSite(tmp_path, procs, n_files=2)
    root = models_dir(tmp_path)  # holds hac only
    config = site.config({"kind": "dorado", "dorado_path": DORADO,
                          "models_directory": str(root)}, engine={"model": "sup@v5.2.0"})
    sock = tmp_path / "ctl" / "c.sock"
    b = ManagedProcess([sys.executable, "-m", "bcorch.orchestrator", "--config", str(config),
                        "--gpus", "virtual:1", "--socket", str(sock)], tmp_path / "bcorch.log",
                       env=site.env)
    procs.append(b)
    b.start()
    assert b.wait(60) == 78, b.log()[-3000:]
    log = b.log()
    assert "-> FAILED (configuration error (exit 78" in log
    assert "restart after backoff" not in log
    assert "no 'sup' model v5.2.0 for model complex 'sup@v5.2.0'" in log and str(root) in log
    assert site.files() == {"PENDING": 2}, "no file was taken"
    assert argv_records(tmp_path, "dorado") == []


# -- the ready-made bc_scripts for the script runner ------------------------------------

def test_dorado_basecall_script_passes_the_four_arguments_through(tmp_path, monkeypatch):
    from support import REPO
    from bcorch.workers.runners.script import ScriptRunner
    model_dir = tmp_path / "models" / "my model; $(touch pwned)"
    model_dir.mkdir(parents=True)
    job_in, written, names = _job(tmp_path, n_files=2, corrupt=1)
    runner = ScriptRunner(str(REPO / "scripts" / "dorado_basecall.sh"), 5555)
    monkeypatch.chdir(tmp_path)
    result, out = _run(tmp_path, monkeypatch, runner, job_in, names, model=str(model_dir),
                       DORADO=DORADO, DORADO_EXTRA_ARGS="--no-trim --min-qscore 9")
    assert result.state is JobState.DONE, (out / LOG_NAME).read_text()
    [record] = argv_records(tmp_path, "dorado")
    assert record["argv"] == ["basecaller", str(model_dir), str(job_in), "--device", "cuda:0",
                              "--output-dir", str(out / "pass"), "--emit-fastq",
                              "--no-trim", "--min-qscore", "9"]
    checked = OutputChecker().apply(result, job_in, out, names)
    assert checked.state is JobState.DONE and list(checked.failed_files) == ["corrupt_0.pod5"]
    assert not (tmp_path / "pwned").exists()


def test_supervisor_basecall_script_against_a_running_server(tmp_path, monkeypatch, procs):
    from support import REPO
    from bcorch.workers.runners.base import ProcessHandle
    from bcorch.workers.runners.script import ScriptRunner
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "hac.cfg").write_text("#\n")
    env = fake_env(tmp_path, FAKE_DORADO_MODELS=str(tmp_path / "cfgs"), FAKE_SERVER_STARTUP_S="0",
                   SUPERVISOR=str(FAKES / "ont_basecaller_supervisor"), SUPERVISOR_NUM_CLIENTS="3")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    sock = str(tmp_path / "basecall.sock")
    server = ManagedProcess([str(FAKES / "dorado_basecall_server"), "--config", "hac.cfg",
                             "--device", "cuda:0", "--port", sock, "--log_path",
                             str(tmp_path / "slog")], tmp_path / "server.log", env=env)
    procs.append(server)
    server.start()
    wait_until(lambda: "Starting server on port" in server.log(), 30, what="the fake server")
    job_in, written, names = _job(tmp_path, n_files=2)
    script = str(REPO / "scripts" / "supervisor_basecall.sh")
    results = {}
    for port in ("/nonexistent/socket", sock):  # the seed's PORT: where the server listens
        out = tmp_path / f"TMPOUTPUT_{len(results)}"
        handle = ProcessHandle([script, str(job_in), str(out), "hac.cfg", port], out,
                               interpret=ScriptRunner._interpret)
        results[port] = (wait_until(handle.poll, 60, what="supervisor script"), out)
    bad, _ = results["/nonexistent/socket"]
    assert bad.state is JobState.FAILED and bad.returncode == 1
    good, out = results[sock]
    assert good.state is JobState.DONE, (out / LOG_NAME).read_text()
    [record] = [r for r in argv_records(tmp_path, "ont_basecaller_supervisor")]
    assert record["argv"][-4:] == ["--port", sock, "--num_clients", "3"]
    assert sorted(read_ids_under([out / "pass"])) == sorted(r for v in written.values() for r in v)


def test_gzipped_fastq_is_read_and_unknown_formats_leave_it_to_the_log(tmp_path):
    import gzip
    job_in, written, names = _job(tmp_path, n_files=2, reads=3)
    out = tmp_path / "out"
    (out / "pass").mkdir(parents=True)
    with gzip.open(out / "pass" / "calls.fastq.gz", "wt") as fh:
        fh.write("".join(f"@{r} x\nA\n+\n!\n" for r in written[names[0]]))
    checked = OutputChecker().apply(RunResult(JobState.DONE, 0), job_in, out, names)
    assert list(checked.failed_files) == [names[1]]
    (out / "pass" / "calls.sam").write_text("@HD\tVN:1.6\n")
    checked = OutputChecker().apply(RunResult(JobState.DONE, 0), job_in, out, names)
    assert checked.state is JobState.DONE and checked.failed_files == {}
