"""What an operator installs and deploys: `pip install .`, the Slurm script, the systemd units."""
from __future__ import annotations

import configparser
import os
import shutil
import signal
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from support import REPO, ManagedProcess, wait_until
from bcorch.config import OrchestratorConfig, RunnerConfig

SCRIPTS = REPO / "scripts"
UNITS = ("bcorch.service", "bcmanager.service")


def repository_copy(dest: Path) -> Path:
    """The files git would ship (tracked + untracked not ignored), so the build writes its
    build/ and egg-info into a copy, never into the shared working tree."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_gives_working_commands(tmp_path):
    source = repository_copy(tmp_path / "src")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False)
    py, bin_dir = env_dir / "bin" / "python", env_dir / "bin"
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "."], cwd=source,
                             capture_output=True, text=True, timeout=900, env=clean_env)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    for exe in ("bcorch", "bcmanager"):
        helped = subprocess.run([str(bin_dir / exe), "--help"], capture_output=True, text=True,
                                timeout=120, cwd=tmp_path, env=clean_env)
        assert helped.returncode == 0 and helped.stdout.startswith("usage: "), helped.stderr
        version = subprocess.run([str(bin_dir / exe), "--version"], capture_output=True,
                                 text=True, timeout=120, cwd=tmp_path, env=clean_env)
        assert version.returncode == 0 and version.stdout.startswith(f"{exe} 0."), version.stderr
    where = subprocess.run(
        [str(py), "-c", "import bcorch.manager.metrics, bcorch.orchestrator.cli, bcorch.protocol, "
                        "prometheus_client, uvicorn, httptools, pynvml, psutil, requests, pysam;"
                        "print(bcorch.orchestrator.cli.__file__);"
                        "print(bcorch.manager.metrics.__file__)"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=clean_env)
    assert where.returncode == 0, where.stderr
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, env=clean_env).stdout.strip()
    for module_file in where.stdout.split():
        assert module_file.startswith(site), f"{module_file} is not installed in {site}"
        assert not module_file.startswith(str(REPO)) and not module_file.startswith(str(source))
    assert not list(Path(site).glob("__editable__*")), "the install must not be editable"
    generic = [name for name in ("manager", "workers", "orchestrator", "core")
               if (Path(site) / name).exists()]
    assert generic == [], "only the package bcorch may be installed at the top level"


def test_the_editable_install_maps_the_top_level_folders_into_bcorch(tmp_path):
    """The test suite runs from an editable install (the README's command): from any directory
    bcorch.<part> must load the repository's own folders."""
    where = subprocess.run(
        [sys.executable, "-c", "import bcorch, bcorch.manager.store, bcorch.workers.engine, "
                               "bcorch.orchestrator.supervisor as s; print(bcorch.__file__);"
                               "print(s.__file__)"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert where.stdout.split() == [str(REPO / "core" / "__init__.py"),
                                    str(REPO / "orchestrator" / "supervisor.py")]


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((SCRIPTS / name).read_text(), source=name)
    return parser


def seconds(value: str) -> float:
    return float(value[:-1]) * {"s": 1, "m": 60, "h": 3600}[value[-1]] if value[-1].isalpha() \
        else float(value)


@pytest.mark.parametrize("name", UNITS)
def test_unit_files_parse_and_match_the_drain(name):
    u = unit(name)
    assert set(u.sections()) == {"Unit", "Service", "Install"}
    service = u["Service"]
    exe = service["ExecStart"].split()[0]
    assert Path(exe).name == name.split(".")[0]
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "78", "a configuration error is not retried"
    assert u["Install"]["WantedBy"] == "multi-user.target"
    if name == "bcorch.service":
        drain = OrchestratorConfig().drain_timeout_s + RunnerConfig().stop_grace_s
        assert seconds(service["TimeoutStopSec"]) > drain, "systemd must outwait the drain"
        assert "--gpus all" in service["ExecStart"]


def test_units_pass_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (the parse checks above still ran)")
    bin_dir = Path(sys.executable).parent
    paths = []
    for name in UNITS:  # same units, ExecStart pointing at this venv's real executables
        text = (SCRIPTS / name).read_text().replace("/opt/bcorch/.venv/bin/", f"{bin_dir}/")
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *paths],
                            capture_output=True, text=True, timeout=120)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if str(tmp_path) in line]
    assert result.returncode == 0 and problems == [], result.stdout + result.stderr


def test_sbatch_script_is_valid_bash_with_one_task_per_node_and_a_signal_lead():
    script = SCRIPTS / "bcorch.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "#SBATCH --ntasks-per-node=1" in text
    lead = int(text.split("#SBATCH --signal=B:TERM@")[1].split()[0])
    assert lead > OrchestratorConfig().drain_timeout_s, "the drain must fit in the lead time"
    assert os.access(script, os.X_OK)


def test_sbatch_script_forwards_sigterm_so_bcorch_drains(tmp_path, procs):
    """Run the script outside Slurm with `srun` and `bcorch` stand-ins on PATH: SIGTERM to the
    batch script must become `bcorch stop` (a drain asked on the control socket; the stand-in
    TERMs the running one instead), and the script must wait for the drain."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                               'exec "$@"\n')
    marker, pid = tmp_path / "drained", tmp_path / "bcorch.pid"
    (fake / "bcorch").write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ $1 == stop ]]; then echo "$@" > {tmp_path / "stop-args"}; '
        f'kill -TERM "$(cat {pid})"; exit 0; fi\n'
        f"trap 'sleep 0.5; echo drained > {marker}; exit 0' TERM\n"
        f"echo $$ > {pid}\n"
        f"echo \"$@\" > {tmp_path / 'args.tmp'}; mv {tmp_path / 'args.tmp'} {tmp_path / 'args'}\n"
        "while true; do sleep 0.1; done\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    config = tmp_path / "config.toml"
    config.write_text("")
    job = ManagedProcess(["bash", str(SCRIPTS / "bcorch.sbatch"), str(config)],
                         tmp_path / "job.log",
                         env={"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
                              "XDG_RUNTIME_DIR": str(tmp_path / "run")})
    procs.append(job)
    job.start()
    wait_until(lambda: (tmp_path / "args").exists(), 30, what=f"bcorch started\n{job.log()}")
    assert (tmp_path / "args").read_text().split() == ["--config", str(config), "--gpus", "all"]
    job.signal(signal.SIGTERM)
    assert job.wait(30) == 0, job.log()
    assert (tmp_path / "stop-args").read_text().split() == ["stop", "--config", str(config)]
    assert marker.read_text().strip() == "drained", "the script waited for the drain"


def test_sbatch_script_refuses_a_missing_config(tmp_path):
    result = subprocess.run(["bash", str(SCRIPTS / "bcorch.sbatch"), str(tmp_path / "nope.toml")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 78 and "nope.toml" in result.stderr
