"""scripts/bcorch.sbatch under a real one-node Slurm (Debian's slurm-wlm and munge).

munged, slurmctld and slurmd run on localhost as this test's user, from files in tmp_path:
a munge key and socket of their own (slurm.conf's AuthInfo=socket=...), free ports, no
cgroups (proctrack/linuxproc, task/none), a node with 16 CPUs and four file-backed `gpu`
GRES so the script's own #SBATCH lines are accepted as written. bcorch runs virtual GPUs and
the simulate runner against a real manager on loopback.

If a daemon cannot start, the test fails with its log; it never skips. Every daemon and
every job step is killed in the finalizer, also when the test fails.
"""
from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bcorch.config_writer import write_config
from bcorch.orchestrator.pod5_dataset import write_dataset
from bcorch.workers.read_ids import read_ids_under
from support import REPO, ManagerProcess, free_port, kill_tree, wait_until

pytestmark = pytest.mark.slow

SBATCH_SCRIPT = REPO / "scripts" / "bcorch.sbatch"
DAEMONS = ("munged", "slurmctld", "slurmd")
FINAL_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def log_tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return f"({path.name}: no log)"
    return f"--- {path.name} ---\n" + "\n".join(
        path.read_text(errors="replace").splitlines()[-lines:])


class OneNodeSlurm:
    """munged + slurmctld + slurmd on localhost, configured under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.user = pwd.getpwuid(os.getuid()).pw_name
        # UNIX socket paths are limited to 107 bytes: the munge socket goes in a short folder
        self.sockets = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
        self.conf = root / "slurm.conf"
        self.first_job_id = 10_000 + int.from_bytes(os.urandom(3), "big") % 10_000_000
        self.procs: dict[str, subprocess.Popen] = {}
        self.jobs: list[str] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for name in ("XDG_RUNTIME_DIR", "SLURM_JOB_ID", "SLURM_JOBID"):
            self.env.pop(name, None)

    def log(self, name: str) -> Path:
        """The daemon's log: its stderr (-D/--foreground and no log file in slurm.conf)."""
        return self.root / f"{name}.log"

    def logs(self) -> str:
        return "\n".join(log_tail(self.log(name)) for name in DAEMONS)

    def write_config(self) -> None:
        r = self.root
        for d in ("state", "spool"):
            (r / d).mkdir()
        gpus = [r / f"gpu{i}" for i in range(4)]  # GRES need device files; any file will do
        for g in gpus:
            g.touch()
        subprocess.run(["mungekey", "--create", f"--keyfile={r / 'munge.key'}"], check=True,
                       capture_output=True, timeout=30)
        self.conf.write_text(f"""\
ClusterName=bcorchtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={self.user}
SlurmdUser={self.user}
AuthType=auth/munge
AuthInfo=socket={self.sockets / 'munge.sock'}
CredType=cred/munge
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
MinJobAge=600
FirstJobId={self.first_job_id}
GresTypes=gpu
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=16 Gres=gpu:4 State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        (r / "gres.conf").write_text(
            f"NodeName={self.node} Name=gpu File={r}/gpu[0-{len(gpus) - 1}]\n")

    def _daemon(self, name: str, argv: list[str]) -> None:
        with open(self.log(name), "ab") as log:
            self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=self.env,
                                                start_new_session=True)

    def start(self) -> None:
        self.write_config()
        r = self.root
        self._daemon("munged", ["munged", "--foreground", "--force",
                                f"--socket={self.sockets / 'munge.sock'}",
                                f"--key-file={r / 'munge.key'}", f"--pid-file={r / 'munged.pid'}",
                                f"--seed-file={r / 'munged.seed'}", f"--log-file={r / 'munged.file.log'}"])
        self._wait_up(lambda: (self.sockets / "munge.sock").exists(), "munged's socket")
        self._daemon("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait_up(lambda: self.scontrol("ping").returncode == 0
                      and "is UP" in self.scontrol("ping").stdout, "slurmctld to answer ping")
        self._daemon("slurmd", ["slurmd", "-D", "-N", self.node])
        self._wait_up(lambda: self.node_state() == "IDLE", f"node {self.node} IDLE")

    def _wait_up(self, condition, what: str, timeout: float = 30.0) -> None:
        def up() -> bool:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited with {proc.returncode} while waiting "
                                         f"for {what}")
            return bool(condition())
        try:
            wait_until(up, timeout, interval=0.2, what=what)
        except AssertionError as exc:
            raise AssertionError(f"Slurm did not start: {exc}\n{self.logs()}") from None

    def run(self, *argv: str, env: dict | None = None, timeout: float = 30.0,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=env or self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("scontrol", *args)

    def node_state(self) -> str:
        out = self.scontrol("show", "node", self.node, "-o").stdout
        m = re.search(r"\bState=(\S+)", out)
        return m.group(1) if m else ""

    def sbatch(self, *args: str, env: dict, cwd: Path) -> str:
        done = self.run("sbatch", "--parsable", *args, env={**self.env, **env}, cwd=cwd)
        assert done.returncode == 0, f"sbatch: {done.stderr}\n{self.logs()}"
        job = done.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job: str) -> dict[str, str]:
        out = self.scontrol("show", "job", "-o", job).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job: str, states: set[str], timeout: float, log: Path) -> dict:
        def reached() -> dict | None:
            info = self.job(job)
            return info if info.get("JobState") in states else None
        try:
            return wait_until(reached, timeout, interval=0.3, what=f"job {job} in {states}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.job(job)}\n{log_tail(log, 60)}\n"
                                 f"{self.logs()}") from None

    def close(self) -> None:
        """Cancel every job, kill every job step and daemon with its process group."""
        if self.jobs and "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--signal=KILL", "--full", *self.jobs, timeout=10)
            except (OSError, subprocess.SubprocessError):
                pass
        steps = []  # slurmstepd leaves slurmd's session: find them by their job ids
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if cmd.startswith("slurmstepd:") and any(f"[{j}." in cmd for j in self.jobs):
                steps.append(p.pid)
        for pid in steps:
            kill_tree(pid)
        for name in reversed(DAEMONS):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        shutil.rmtree(self.sockets, ignore_errors=True)


@pytest.fixture
def slurm(tmp_path):
    missing = [d for d in ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scancel")
               if not shutil.which(d)]
    assert not missing, (f"Slurm is not installed ({', '.join(missing)} missing): "
                         "apt-get install slurm-wlm munge (.ci/run does)")
    cluster = OneNodeSlurm(tmp_path / "slurm")
    cluster.root.mkdir()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


class Site:
    """A manager over POD5 files on loopback, and a bcorch config for the sbatch script."""

    def __init__(self, tmp: Path, procs, n_files: int, samples_per_s: float,
                 drain_timeout_s: float = 5.0):
        self.tmp = tmp
        self.input_dir, self.output_dir = tmp / "input", tmp / "output"
        self.input_dir.mkdir()
        self.output_dir.mkdir()
        self.written = write_dataset(self.input_dir, n_files, reads_per_file=5,
                                     samples_per_read=4000)
        self.manager = ManagerProcess(tmp, self.input_dir, self.output_dir, batch_size=2,
                                      report_back_interval=60.0, input_closed=True)
        procs.append(self.manager)
        self.manager.start()
        wait_until(lambda: sum(self.manager.status()["files"].values()) == n_files, 30,
                   what="the manager to find the input files")
        self.config = write_config(
            tmp / "bcorch.toml",
            manager={"url": self.manager.url},
            engine={"polling_interval": 0.02, "work_until_none_left": True},
            runner={"kind": "simulate", "samples_per_s": samples_per_s, "stop_grace_s": 2.0},
            orchestrator={"drain_timeout_s": drain_timeout_s, "hang_timeout_s": 30.0})
        self.bin = tmp / "bin"
        self.bin.mkdir()
        bcorch = self.bin / "bcorch"
        bcorch.write_text(f"#!/bin/sh\nexec {sys.executable} -m bcorch.orchestrator \"$@\"\n")
        bcorch.chmod(0o755)
        self.job_env = {"BCORCH": str(bcorch), "BCORCH_GPUS": "virtual:2",
                        "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}"}

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(self.manager.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def assert_every_read_once(self) -> None:
        expected = sorted(r for ids in self.written.values() for r in ids)
        counts = read_ids_under([self.output_dir / "pass", self.output_dir / "fail"])
        assert sorted(counts) == expected
        assert max(counts.values()) == 1, [r for r, n in counts.items() if n > 1][:5]


def test_sbatch_job_basecalls_every_read_once(slurm, tmp_path, procs):
    site = Site(tmp_path, procs, n_files=6, samples_per_s=2e6)
    job = slurm.sbatch(str(SBATCH_SCRIPT), str(site.config), env=site.job_env, cwd=tmp_path)
    out = tmp_path / f"bcorch-{job}.out"
    info = slurm.wait_job(job, FINAL_STATES, 90, out)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log_tail(out, 60)}"
    assert info["ExitCode"] == "0:0"
    site.assert_every_read_once()
    assert site.manager.status()["files"]["DONE"] == 6


def submit_until_two_batches_run(slurm, site: Site, tmp_path: Path) -> tuple[str, Path]:
    """sbatch the site's job; wait until it runs with two batches in flight: (job id, its
    output file)."""
    job = slurm.sbatch(str(SBATCH_SCRIPT), str(site.config), env=site.job_env, cwd=tmp_path)
    out = tmp_path / f"bcorch-{job}.out"
    started = slurm.wait_job(job, {"RUNNING"} | FINAL_STATES, 30, out)
    assert started["JobState"] == "RUNNING", f"{started}\n{log_tail(out, 60)}"
    wait_until(lambda: sum(site.manager.status()["jobs_in_flight"].values()) == 2, 60,
               what=f"two batches in flight\n{log_tail(out)}")
    return job, out


def test_scancel_drains_and_a_new_job_finishes_the_run(slurm, tmp_path, procs):
    site = Site(tmp_path, procs, n_files=16, samples_per_s=1e4)  # 2 s of work a file
    job, out = submit_until_two_batches_run(slurm, site, tmp_path)

    # the documented way to see a job's node from a login shell (docs/operations.md)
    login = {**slurm.env, "PATH": site.job_env["PATH"]}
    status = slurm.run("srun", f"--jobid={job}", "--overlap", "-w", slurm.node,
                       "bcorch", "status", "--json", env=login, timeout=60)
    assert status.returncode == 0, f"{status.stderr}\n{log_tail(out)}"
    slots = json.loads(status.stdout)["slots"]
    assert [s["state"] for s in slots] == ["RUNNING", "RUNNING"]

    done_before = site.manager.status()["files"]["DONE"]
    cancelled = slurm.run("scancel", job)
    assert cancelled.returncode == 0, cancelled.stderr
    slurm.wait_job(job, {"CANCELLED"} | FINAL_STATES, 60, out)
    wait_until(lambda: site.manager.status()["files"]["ASSIGNED"] == 0, 30,
               what=f"every batch reported back\n{log_tail(out, 60)}")
    assert site.metric("bcmanager_jobs_finished_total", state="STOPPED") >= 1, log_tail(out, 60)
    assert site.metric("bcmanager_lease_expiries_total") == 0
    files = site.manager.status()["files"]
    assert files["PENDING"] > 0 and files["DONE"] >= done_before, files
    assert files.get("QUARANTINED", 0) == 0, files

    job2 = slurm.sbatch(str(SBATCH_SCRIPT), str(site.config), env=site.job_env, cwd=tmp_path)
    info = slurm.wait_job(job2, FINAL_STATES, 90, tmp_path / f"bcorch-{job2}.out")
    assert info["JobState"] == "COMPLETED", log_tail(tmp_path / f"bcorch-{job2}.out", 60)
    site.assert_every_read_once()


def test_term_to_the_batch_script_lets_batches_finish(slurm, tmp_path, procs):
    """What --signal=B:TERM@600 does before the time limit (and `scancel --batch
    --signal=TERM`): only the batch script is signalled; it asks each bcorch to drain on its
    control socket, so the basecallers keep running and the batches in progress end DONE."""
    site = Site(tmp_path, procs, n_files=12, samples_per_s=1e4, drain_timeout_s=60.0)
    job, out = submit_until_two_batches_run(slurm, site, tmp_path)
    assigned = site.manager.status()["files"]["ASSIGNED"]

    signalled = slurm.run("scancel", "--batch", "--signal=TERM", job)
    assert signalled.returncode == 0, signalled.stderr
    info = slurm.wait_job(job, FINAL_STATES, 90, out)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log_tail(out, 60)
    files = site.manager.status()["files"]
    assert files["ASSIGNED"] == 0 and files["DONE"] >= assigned and files["PENDING"] > 0, files
    assert site.metric("bcmanager_jobs_finished_total", state="STOPPED") == 0, log_tail(out, 60)
    assert site.metric("bcmanager_lease_expiries_total") == 0
    assert "draining bcorch on every node" in out.read_text()
