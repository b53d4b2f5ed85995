"""A careless user at every command line: bad flags, bad config files, bad environment, a
"manager" or "bcorch" that is something else. Each gets one line on stderr naming what is
wrong and a non-zero exit (78 for configuration), never a traceback, and nothing is served
or written. Most cases call main(argv) in this process; the config fuzz cases that need a
real process per command are in test_fuzz_config.py, the control pipe's in test_fuzz_control.py.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bcorch import config
from bcorch.config import ConfigError
from bcorch.manager import cli as manager_cli
from bcorch.orchestrator import cli as bcorch_cli
from bcorch.workers import engine_cli
from support import REPO


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --- config files and values ---------------------------------------------------------------

@pytest.mark.parametrize("data, key", [
    ({"manager": {"report_back_interval": float("nan")}}, "manager.report_back_interval"),
    ({"manager": {"settle_s": float("nan")}}, "manager.settle_s"),
    ({"orchestrator": {"hang_timeout_s": float("inf")}}, "orchestrator.hang_timeout_s"),
    ({"engine": {"polling_interval": float("nan")}}, "engine.polling_interval"),
    ({"runner": {"fail_fraction": float("nan")}}, "runner.fail_fraction"),
    ({"runner": {"samples_per_s": float("inf")}}, "runner.samples_per_s"),
    ({"manager": {"lock_refresh_s": 1e300}}, "manager.lock_refresh_s"),  # timer overflow
    ({"manager": {"request_timeout_s": 1e300}}, "manager.request_timeout_s"),
    ({"manager": {"threads": 10 ** 13}}, "manager.threads"),
    ({"manager": {"max_attempts": 10 ** 20}}, "manager.max_attempts"),  # past SQLite's integer
    ({"engine": {"request_retries": 10 ** 15}}, "engine.request_retries"),
    ({"manager": {"url": "http://"}}, "manager.url"),
    ({"manager": {"url": "http://[::1"}}, "manager.url"),
    ({"manager": {"url": "http://127.0.0.1:70000"}}, "manager.url"),
    ({"manager": {"url": "http://127.0.0.1:x"}}, "manager.url"),
    ({"manager": {"url": "http:// spaces /"}}, "manager.url"),
    ({"manager": {"host": ""}}, "manager.host"),  # "" would bind every interface
    ({"orchestrator": {"metrics_host": " "}}, "orchestrator.metrics_host"),
    ({"manager": {"token": "a\nb"}}, "manager.token"),
    ({"manager": {"token": "s3cret "}}, "manager.token"),  # the header would drop the space
    ({"manager": {"token": "caf\u00e9"}}, "manager.token"),
    ({"engine": {"model": ""}}, "engine.model"),
])
def test_unusable_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        config.from_mapping(data)
    assert str(err.value).startswith(key + ":"), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("priority", [1e-320, 1e-9, 1e300])
def test_run_priority_far_from_one_is_refused_wherever_it_is_written(priority):
    """1e-320 made a run's virtual time inf (and inf - inf = nan in the fair share)."""
    with pytest.raises(ConfigError, match=r"^facility.priority: expected a number from 0.001 to 1000"):
        config.from_mapping({"facility": {"priority": priority}})
    with pytest.raises(ConfigError, match=r"^facility.rules\[1\].priority: expected"):
        config.from_mapping({"facility": {"rules": [{"sample": "a", "priority": priority}]}})
    assert config.setting_problem("priority", priority)  # a run's own bcorch.toml


def test_config_file_that_is_not_utf8_or_cannot_be_read(tmp_path):
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[manager]\nhost = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(latin1)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="--config: cannot read"):  # a path through a file
        config.load(tmp_path / "afile" / "config.toml")


def test_config_file_far_larger_than_a_config_is_refused_before_it_is_parsed(tmp_path):
    """`--config /dev/zero` read forever; a size cap also bounds a huge file by mistake."""
    big = tmp_path / "big.toml"
    big.write_text("# a comment line of a config file, repeated\n" * 50_000)  # about 2 MB
    with pytest.raises(ConfigError, match="larger than"):
        config.load(big)


def test_token_from_the_environment_that_cannot_be_sent(monkeypatch):
    monkeypatch.setenv("BCORCH_TOKEN", "s3cret\r\nX-Injected: 1")
    with pytest.raises(ConfigError, match="BCORCH_TOKEN"):
        config.from_mapping({}).token
    monkeypatch.setenv("BCORCH_TOKEN", "s3cret")
    assert config.from_mapping({}).token == "s3cret"


# --- bcorch --------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, names", [
    (["status", "--timeout", "-1"], "--timeout"),
    (["status", "--timeout", "nan"], "--timeout"),
    (["drain", "--timeout", "inf"], "--timeout"),
    (["stop", "--timeout", "1e308"], "--timeout"),
    (["status", "--watch", "nan"], "--watch"),
    (["status", "--watch", "inf"], "--watch"),
    # each case also carries a flag the old code refused, so it never started anything
    (["--manager-url", "http://[::1", "--gpus", "virtual:0"], "--manager-url"),
    (["--manager-url", "http://", "--gpus", "virtual:0"], "--manager-url"),
    (["demo", "--gpus", "100000", "--runs", "0"], "--gpus"),
    (["demo", "--files", "999999999", "--runs", "0"], "--files"),
    (["demo", "--files", "2", "--runs", "5", "--gpus", "0"], "--runs"),
    (["--gpus"], "--gpus"),
    (["--gpus", "virtual:\u00b2"], "--gpus"),   # a superscript two: isdigit() but not int()
    (["gpus", "--gpus", "virtual:\u00b2"], "--gpus"),
])
def test_bcorch_bad_flags(argv, names, tmp_path, capsys):
    if argv[0] in ("status", "drain", "stop"):
        argv += ["--socket", str(tmp_path / "none" / "s.sock")]
    assert bcorch_cli.main(argv) == 78
    line = one_line(capsys.readouterr().err)
    assert names in line and not line.startswith("bcorch: bcorch"), line


def test_bcorch_config_that_is_not_utf8_and_demo_workdir_that_is_a_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    assert bcorch_cli.main(["--config", str(bad), "--gpus", "virtual:1"]) == 78
    assert "not UTF-8" in one_line(capsys.readouterr().err)
    assert bcorch_cli.main(["status", "--config", str(bad)]) == 78
    assert "not UTF-8" in one_line(capsys.readouterr().err)
    afile = tmp_path / "afile"
    afile.write_text("precious")
    assert bcorch_cli.main(["demo", "--workdir", str(afile)]) == 78
    assert "--workdir" in one_line(capsys.readouterr().err)
    assert afile.read_text() == "precious"


@pytest.mark.parametrize("value", ["virtual:0", "virtual:\u00b2", "virtual:x"])
def test_bad_gpus_from_the_config_name_the_key_not_the_flag(value, tmp_path, capsys):
    """orchestrator.gpus set badly in the config file names that key; the same value given
    with --gpus names the flag."""
    from bcorch.config_writer import write_config

    cfg = write_config(tmp_path / "c.toml", orchestrator={"gpus": value})
    assert bcorch_cli.main(["--config", str(cfg)]) == 78
    line = one_line(capsys.readouterr().err)
    assert "orchestrator.gpus" in line and "--gpus:" not in line, line
    assert bcorch_cli.main(["--config", str(cfg), "--gpus", value]) == 78
    line = one_line(capsys.readouterr().err)
    assert "--gpus:" in line and "orchestrator.gpus" not in line, line


def test_gpu_indices_that_are_digits_to_python_but_not_numbers():
    from bcorch.orchestrator.gpus import Gpu, GpuSelectionError, choose

    found = [Gpu(index=i, uuid=f"GPU-{i}", name="H100", memory_total=0, virtual=False)
             for i in range(2)]
    with pytest.raises(GpuSelectionError, match="--gpus"):
        choose("0,\u00b2", found)


def test_bcorch_demo_refuses_a_workdir_with_files_in_it(tmp_path, capsys):
    """The demo removes its workspace when it succeeds: a --workdir of the user's files
    would have gone with it. (--runs 0: the old code stopped there, before any work.)"""
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    assert bcorch_cli.main(["demo", "--workdir", str(mine), "--runs", "0"]) == 78
    assert "--workdir" in one_line(capsys.readouterr().err)
    assert (mine / "notes.txt").read_text() == "precious"


def _answer_every_request(server: socket.socket, answer: bytes) -> None:
    """Serve `answer` as it is to each connection, after reading its request, until closed."""
    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(answer)
    threading.Thread(target=serve, daemon=True).start()


def _unix_server(path: Path, answer: bytes) -> socket.socket:
    """A control socket that is not bcorch's: it answers every request with `answer`."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(8)
    _answer_every_request(server, answer)
    return server


@pytest.mark.parametrize("answer", [b'{"ok": true}\n', b'{"ok": true, "slots": [{"gpu": 0}]}\n'])
def test_bcorch_commands_answered_by_a_socket_that_is_not_bcorch(answer, tmp_path, capsys):
    server = _unix_server(tmp_path / "other.sock", answer)
    try:
        for cmd in ("status", "drain", "stop"):
            assert bcorch_cli.main([cmd, "--socket", str(tmp_path / "other.sock")]) == 1, cmd
            assert "not bcorch's" in one_line(capsys.readouterr().err), cmd
    finally:
        server.close()


# --- bcmanager -----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, names", [
    (["--port", "abc"], "--port"),
    (["--port"], "--port"),
    (["--log-level", "bogus"], "--log-level"),
    (["--bogus"], "--bogus"),
    (["files"], "'files'"),
    (["run", "bogus", "r1"], "action"),
    (["run", "pause"], "run"),
    (["close-input", "--json"], "--json"),
    (["status", "--watch", "nan", "--url", "http://127.0.0.1:9"], "--watch"),
    (["status", "--watch", "inf", "--url", "http://127.0.0.1:9"], "--watch"),
    (["status", "--url", "http://[::1"], "manager.url"),
    (["runs", "--url", "http://127.0.0.1:70000"], "manager.url"),
    (["status", "--url", "http://127.0.0.1:9", "--token", "a\nb"], "manager.token"),
])
def test_bcmanager_bad_flags_are_one_line_and_78(argv, names, capsys):
    assert manager_cli.main(argv) == 78
    line = one_line(capsys.readouterr().err)
    assert names in line and not line.startswith("bcmanager: bcmanager"), line


def _http_server(answer: bytes) -> tuple[socket.socket, int]:
    """A TCP server on loopback that reads a request and sends `answer` as it is."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    _answer_every_request(server, answer)
    return server, server.getsockname()[1]


def _http(status: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            .encode() + body)


@pytest.mark.parametrize("answer", [
    b"NOT HTTP AT ALL\r\n\r\n",                         # not an HTTP server
    _http("200 OK", b'{"hello": 1}'),                    # JSON, but not a bcmanager's
    _http("200 OK", b"[1, 2]"),
    _http("200 OK", b"<html>a login page</html>"),
    _http("500 Oops", b"boom\nsecond line\n"),           # multi-line error page
], ids=["not-http", "other-json", "json-list", "html", "500-multiline"])
def test_bcmanager_client_against_something_else_is_one_line_75(answer, capsys):
    server, port = _http_server(answer)
    url = f"http://127.0.0.1:{port}"
    try:
        for argv in (["status"], ["status", "--json"], ["runs"], ["runs", "--json"],
                     ["run", "pause", "r1"], ["close-input"]):
            assert manager_cli.main(argv + ["--url", url]) == 75, argv
            assert url in one_line(capsys.readouterr().err)
    finally:
        server.close()


def test_bcmanager_refuses_a_token_it_cannot_send_before_taking_the_lock(tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.setenv("BCORCH_TOKEN", "line\nbreak")
    assert manager_cli.main(["status", "--url", "http://127.0.0.1:9"]) == 78
    assert "BCORCH_TOKEN" in one_line(capsys.readouterr().err)
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    # a real process: the old code served with a token no engine can send
    out = subprocess.run([sys.executable, "-m", "bcorch.manager", "--input-dir",
                          str(tmp_path / "in"), "--output-dir", str(tmp_path / "out"), "--db",
                          str(tmp_path / "db.sqlite"), "--port", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 78
    assert "BCORCH_TOKEN" in one_line(out.stderr)
    assert os.listdir(tmp_path / "out") == [] and not (tmp_path / "db.sqlite").exists()


def test_bcmanager_output_directory_that_is_a_file_names_its_key(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "root").mkdir()
    afile = tmp_path / "afile"
    afile.write_text("precious")
    assert manager_cli.main(["--input-dir", str(tmp_path / "in"), "--output-dir", str(afile),
                             "--port", "0"]) == 78
    assert "manager.output_dir: " in one_line(capsys.readouterr().err)
    mirror = tmp_path / "mirror.toml"
    mirror.write_text(f'[manager]\nwatch_root = "{tmp_path / "root"}"\n'
                      f'[facility]\noutput = "mirror"\noutput_root = "{afile}"\n')
    assert manager_cli.main(["--config", str(mirror), "--port", "0"]) == 78
    assert "facility.output_root: " in one_line(capsys.readouterr().err)
    assert afile.read_text() == "precious"


# --- bcorch engine and the simulated basecaller ---------------------------------------------

@pytest.mark.parametrize("argv, names", [
    ([], "--gpu"),
    (["--gpu", "abc"], "--gpu"),
    (["--gpu", "-1"], "--gpu"),
    (["--gpu", "0", "--log-level", "x"], "--log-level"),
    (["--gpu", "0", "--manager-url", "http://[::1"], "manager.url"),
])
def test_engine_bad_flags_are_one_line_and_78(argv, names, capsys):
    assert engine_cli.main(argv) == 78
    assert names in one_line(capsys.readouterr().err)


def test_engine_config_that_cannot_be_read(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for name in ("config.toml", "config.json"):  # config.toml, and the original JSON format
        assert engine_cli.main(["--gpu", "0", "--config", str(tmp_path / "afile" / name)]) == 78
        assert "cannot read" in one_line(capsys.readouterr().err)


def test_simulated_basecaller_bad_numbers_and_output_dir(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "afile").write_text("precious")
    base = [sys.executable, "-m", "bcorch.workers.runners.simulate_main"]
    within = ["--input-dir", str(tmp_path / "in")]
    for extra, names in ((["--input-dir", str(tmp_path / "nope"), "--output-dir",
                           str(tmp_path / "o")], "--input-dir"),
                         (within + ["--output-dir", str(tmp_path / "afile" / "out")],
                          "--output-dir"),
                         (within + ["--output-dir", str(tmp_path / "o"), "--samples-per-s",
                                    "nan"], "--samples-per-s"),
                         (within + ["--output-dir", str(tmp_path / "o"), "--startup-s", "inf"],
                          "--startup-s")):
        out = subprocess.run(base + extra, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, (extra, out.stdout, out.stderr)
        assert names in one_line(out.stderr), out.stderr
    assert (tmp_path / "afile").read_text() == "precious"
    assert not (tmp_path / "o").exists()


# --- the benchmark scripts -----------------------------------------------------------------

BENCH_PARTS = ["manager", "engine", "orchestrator", "output_check", "fleet", "recovery",
               "overhead", "connections", "live", "facility"]


# bench_soak.py with every pass skipped: a bad count is all that is left to see
SOAK_NOTHING = ("--minutes", "0", "--facility-minutes", "0", "--in-process-batches", "0",
                "--http-batches", "0", "--facility-in-process-batches", "0")


def _bench(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60,
                          cwd=REPO, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("argv, names", [
    *[((f"scripts/bench.py", part, "--bogus"), "--bogus") for part in BENCH_PARTS],
    (("scripts/bench.py", "output_check", "--files", "-1"), "--files"),
    (("scripts/bench.py", "bogus"), "bogus"),
    (("scripts/bench.py",), "manager|engine"),
    (("scripts/bench_latency.py", "--files", "x"), "--files"),
    (("scripts/gpu_host_check.py", "--files", "0"), "--files"),
    (("scripts/bench.py", "orchestrator", "ready", "--trials", "0"), "--trials"),
    (("scripts/bench.py", "orchestrator", "ready", "--gpus", "-1", "--trials", "0"), "--gpus"),
    (("scripts/bench_soak.py", *SOAK_NOTHING, "--in-process-batches", "1",
      "--horizon-batches", "0"), "--horizon-batches"),
    (("scripts/bench_soak.py", *SOAK_NOTHING, "--http-batches", "-1", "--out", "/dev/null"),
     "--http-batches"),
])
def test_bench_scripts_refuse_bad_flags_in_one_line_and_78(argv, names):
    """The benchmarks follow the rule of every other command (scripts/bench_args.py): not
    argparse's usage block and exit 2, nor a run with a negative count."""
    done = _bench(*argv)
    assert done.returncode == 78, (done.returncode, done.stderr)
    line = one_line(done.stderr)
    assert names in line and not line.startswith("usage:"), line
