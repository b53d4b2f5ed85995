"""`bcorch demo` as the README says to run it, with --keep, and interrupted with Ctrl-C."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from bcorch.workers.read_ids import read_ids_under, settings_under
from support import REPO, ManagedProcess, kill_tree, wait_gone, wait_until

BCORCH = str(Path(sys.executable).parent / "bcorch")
SUMMARY = re.compile(r"basecalled (\d+) of (\d+) files, (\d+) of (\d+) reads in [0-9.]+s")


def readme_demo_args() -> list[str]:
    """The arguments of `bcorch demo` in the README's demo command (its first ```sh block
    that runs the demo), so the README and this test cannot drift apart."""
    blocks = re.findall(r"```sh\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)
    command = next(b for b in blocks if "bcorch demo" in b)
    for step in command.split("&&"):
        words = shlex.split(step)
        if len(words) >= 2 and Path(words[0]).name == "bcorch" and words[1] == "demo":
            return words[1:]
    raise AssertionError(f"no `bcorch demo` step in the README command {command!r}")


def run_demo(argv: list[str], timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run for the demo, except that a demo that overruns is killed with its whole
    tree: the manager and bcorch it started must not outlive the test."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"bcorch demo ran over {timeout} s\n{out}{err}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_a_demo_that_overruns_is_killed_with_its_children(tmp_path):
    """run_demo's own guarantee, with a stand-in that starts a child and hangs."""
    marker = tmp_path / "child.pid"
    hang = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(600)']); open(sys.argv[1], 'w').write(str(c.pid)); "
            "time.sleep(600)")
    with pytest.raises(AssertionError, match="ran over"):
        run_demo([sys.executable, "-c", hang, str(marker)], timeout=5)
    assert wait_gone([psutil.Process(int(marker.read_text()))], 10) == []


def test_readme_demo_command_runs_and_verifies(tmp_path):
    args = readme_demo_args()
    result = run_demo([BCORCH, *args, "--files", "8"], cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    found = SUMMARY.search(result.stdout)
    assert found, result.stdout
    assert found.group(1) == found.group(2) == "8"
    assert found.group(3) == found.group(4) == "800"
    assert "every input read exactly once in the output: yes" in result.stdout
    for gpu in range(4):  # the default is four virtual GPUs, each with its line
        assert re.search(rf"-gpu{gpu}\s+\d+ reads", result.stdout), result.stdout
    assert "\x1b[" not in result.stdout, "no terminal: plain lines, no redraw codes"
    assert list(tmp_path.glob("bcorch-demo-*")) == [], "the workspace is removed without --keep"


def test_keep_leaves_the_workspace_with_its_outputs(tmp_path):
    work = tmp_path / "ws"
    result = run_demo([BCORCH, "demo", "--files", "3", "--gpus", "2", "--keep",
                       "--workdir", str(work)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"workspace kept in {work}" in result.stdout
    assert len(list((work / "input").rglob("*.pod5"))) == 3
    assert list((work / "output" / "pass").glob("*.fastq"))
    assert (work / "bcmanager.sqlite").exists() and (work / "bcorch.toml").exists()


@pytest.mark.parametrize("flag,value", [("--files", "0"), ("--runs", "0")])
def test_bad_arguments_are_one_line_errors(flag, value):
    result = subprocess.run([BCORCH, "demo", flag, value], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert flag in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


RUN_SUMMARY = re.compile(r"^  run (\d)  (\S+)\s+prio (\S+)\s+(\d+) of (\d+) reads  "
                         r"GPU\s+([0-9.]+)s  (\w+)\s+model check: (\w+) .* summary: (\w+)$", re.M)


@pytest.mark.slow
def test_runs_demo_shares_the_gpus_between_three_runs_each_with_its_model(tmp_path):
    """`bcorch demo --runs 3`: three MinKNOW runs appear over time under one root; a facility
    manager serves them to two virtual GPUs; each run's reads are in its own output once,
    basecalled with its own model (checked here on disk too, not only by the demo)."""
    work = tmp_path / "ws"
    result = run_demo([BCORCH, "demo", "--runs", "3", "--files", "12", "--gpus", "2", "--keep",
                       "--workdir", str(work)])
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "verification: every read of every run exactly once in its run's output, " \
           "with its run's model: yes" in out, out
    runs = {int(m.group(1)): m.groups() for m in RUN_SUMMARY.finditer(out)}
    assert sorted(runs) == [1, 2, 3], out
    assert {n: (g[1], g[2]) for n, g in runs.items()} == \
        {1: ("hac", "1"), 2: ("sup,5mCG_5hmCG", "2"), 3: ("sup", "1")}, out
    for n, g in runs.items():
        assert g[3] == g[4] == "400" and float(g[5]) > 0, out       # every read; GPU time
        assert g[6:] == ("COMPLETE", "yes", "yes"), out
    # the progress display has a line per run while they share the GPUs, and a line per GPU
    assert re.search(r"^  run 2  sup,5mCG_5hmCG\s+prio 2  (ACTIVE|CLOSED)", out, re.M), out
    assert re.search(r"^  gpu1  ", out, re.M), out

    outputs = sorted((work / "runs").glob("demo_facility/*/*/basecalls"))
    assert len(outputs) == 3, outputs
    models = {}
    for output in outputs:
        written = read_ids_under([output / "pass", output / "fail"])
        assert len(written) == 400 and not written.doubled(), output
        settings = settings_under([output / "pass", output / "fail"])
        found = {s.get("model") for s in settings.values()}
        assert len(found) == 1, (output, found)
        models[output.parent.parent.name] = found.pop()
        summary = json.loads((output / "bcorch_summary.json").read_text())
        assert summary["state"] == "COMPLETE" and summary["files_done"] == 4, summary
        assert list(output.parent.glob("final_summary_*.txt")), "closed by MinKNOW's summary"
    assert models == {"sample_hac": "hac", "methylation": "sup,5mCG_5hmCG",
                      "sample_sup": "sup"}, models


def test_ctrl_c_stops_everything_and_keeps_the_workspace(tmp_path, procs):
    work = tmp_path / "ws"
    demo = ManagedProcess([BCORCH, "demo", "--files", "40", "--gpus", "2", "--workdir", str(work)],
                          tmp_path / "demo.log")
    procs.append(demo)
    demo.start()
    wait_until(lambda: list((work / "output").glob("TMPOUTPUT_*")), 60,
               what=f"batches handed out\n{demo.log()}")
    tree = psutil.Process(demo.pid).children(recursive=True)
    assert len(tree) >= 4, "manager, bcorch and its engines are running"
    demo.signal(signal.SIGINT)
    assert demo.wait(60) == 130, demo.log()
    assert wait_gone(tree, timeout=10) == []
    assert "interrupted" in demo.log() and f"workspace kept in {work}" in demo.log()
    import sqlite3
    with sqlite3.connect(work / "bcmanager.sqlite") as db:
        states = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        files = dict(db.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall())
    assert states.get("LIVE", 0) == 0, f"every batch was reported back: {states}"
    # A batch running at the signal is STOPPED; under load the signal may fall between two
    # batches, so what holds either way is that no file is left held by a batch.
    assert files.get("ASSIGNED", 0) == 0 and set(files) <= {"DONE", "PENDING"}, files
    assert states.get("STOPPED", 0) >= 1 or files.get("DONE", 0) < 40, (states, files)
