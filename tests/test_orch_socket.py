"""The documented ways to reach bcorch's control socket work as written (issue 12 §6).

scripts/bcorch.sbatch runs for real under bash, with a stand-in `srun` (it runs the
command, taking --jobid=<id> into SLURM_JOB_ID as Slurm does) and fake engines; then
`srun --jobid=<id> --overlap -w <node> bcorch status` from a shell whose XDG_RUNTIME_DIR differs
must find the node's socket. The README's socat line is run where socat exists.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from bcorch.config_writer import write_config
import pytest

from support import ManagedProcess, wait_until

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

FAKE_SRUN = """#!/usr/bin/env bash
# Stand-in for Slurm's srun: options are dropped (--jobid=<id> becomes SLURM_JOB_ID),
# the command runs in their place.
while [[ $# -gt 0 && $1 == -* ]]; do
    case $1 in
        --jobid=*) export SLURM_JOB_ID=${1#--jobid=} ;;
        -w|--nodelist|--jobid) [[ $1 == --jobid ]] && export SLURM_JOB_ID=$2; shift ;;
    esac
    shift
done
exec "$@"
"""


@pytest.fixture
def slurm_bin(tmp_path):
    """A bin directory with `srun`, `bcorch` (this checkout) and BCORCH for the script
    (bcorch with fake engines on one virtual GPU)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "srun": FAKE_SRUN,
        "bcorch": f"#!/bin/sh\nexec {sys.executable} -m bcorch.orchestrator \"$@\"\n",
        # `stop`: the script's trap asks bcorch to drain on its socket (no --gpus there)
        "bcorch-fake": f"#!/bin/sh\n[ \"$1\" = stop ] && exec {sys.executable} -m "
                       f"bcorch.orchestrator \"$@\"\n"
                       f"exec {sys.executable} {HERE / 'test_orch_fakes.py'} "
                       f"\"$@\" --gpus virtual:1\n",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def env_of(bin_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_RUNTIME_DIR", "SLURM_JOB_ID")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def test_sbatch_socket_is_found_by_srun_jobid_bcorch_status(tmp_path, slurm_bin, procs):
    job = str(random.randrange(10**8, 10**9))
    config = tmp_path / "config.toml"
    write_config(config, orchestrator={"hang_timeout_s": 3.0, "first_contact_timeout_s": 0})
    batch = ManagedProcess(["bash", str(ROOT / "scripts" / "bcorch.sbatch"), str(config)],
                           tmp_path / "sbatch.log")
    batch.env = env_of(slurm_bin, SLURM_JOB_ID=job, BCORCH=str(slurm_bin / "bcorch-fake"),
                       FAKE_MODES=str(tmp_path / "modes.json"))     # no XDG_RUNTIME_DIR
    (tmp_path / "modes.json").write_text("{}")
    procs.append(batch)
    batch.start()
    expected = Path(f"/tmp/bcorch-{os.getuid()}") / f"control-{job}.sock"
    wait_until(lambda: expected.exists() or batch.proc.poll() is not None, 30,
               what=f"the job's socket {expected}")
    assert batch.proc.poll() is None, batch.log()

    # a login shell: another XDG_RUNTIME_DIR, no SLURM_JOB_ID; srun --jobid sets it
    login = tmp_path / "run-user"
    login.mkdir(mode=0o700)
    client_env = env_of(slurm_bin, XDG_RUNTIME_DIR=str(login))

    def status() -> subprocess.CompletedProcess:
        return subprocess.run(["srun", f"--jobid={job}", "-w", "node1", "bcorch", "status",
                               "--json"], env=client_env, capture_output=True, text=True,
                              timeout=60)
    reply = wait_until(lambda: (r := status()).returncode == 0
                       and json.loads(r.stdout)["slots"][0]["state"] == "RUNNING" and r, 30,
                       what="bcorch status through srun --jobid")
    assert json.loads(reply.stdout)["ok"]
    where = subprocess.run(["srun", f"--jobid={job}", "-w", "node1", "bcorch", "socket"],
                           env=client_env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(expected)

    batch.signal(signal.SIGTERM)
    assert batch.wait(60) == 0, batch.log()
    assert not expected.exists()


def test_readme_socket_commands_reach_bcorch(tmp_path, slurm_bin, procs):
    """`$(bcorch socket)` names the socket bcorch listens on by default, with and without
    XDG_RUNTIME_DIR; the README's socat line runs verbatim where socat is installed."""
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    env = env_of(slurm_bin, XDG_RUNTIME_DIR=str(runtime), FAKE_MODES=str(tmp_path / "m.json"))
    (tmp_path / "m.json").write_text("{}")
    config = tmp_path / "config.toml"
    write_config(config, orchestrator={"first_contact_timeout_s": 0})
    b = ManagedProcess([str(slurm_bin / "bcorch-fake"), "--config", str(config)],
                       tmp_path / "bcorch.log")
    b.env = env
    procs.append(b)
    b.start()
    sock = runtime / "bcorch" / "control.sock"
    wait_until(lambda: sock.exists() or b.proc.poll() is not None, 30, what="default socket")
    assert b.proc.poll() is None, b.log()
    printed = subprocess.run(["bcorch", "socket"], env=env, capture_output=True, text=True,
                             timeout=60).stdout.strip()
    assert printed == str(sock)
    if shutil.which("socat"):
        out = subprocess.run(["bash", "-c", "echo '{\"cmd\": \"status\"}' | socat - "
                              "UNIX-CONNECT:$(bcorch socket)"], env=env, capture_output=True,
                             text=True, timeout=60).stdout
    else:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(printed)
            s.sendall(b'{"cmd": "status"}\n')
            out = s.makefile().readline()
    assert json.loads(out)["ok"]
    b.signal(signal.SIGTERM)
    assert b.wait(30) == 0


def test_restart_help_and_parser_agree_that_gpu_is_required(capsys):
    from bcorch.orchestrator.cli import main
    with pytest.raises(SystemExit):
        main(["restart", "--help"])
    text = capsys.readouterr().out
    assert "--gpu GPU" in text and "default: every GPU" not in text
    assert main(["restart", "--socket", "/nonexistent/s.sock"]) == 78
    assert "the following arguments are required: --gpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["drain", "--help"])
    assert "(default: every GPU)" in capsys.readouterr().out
