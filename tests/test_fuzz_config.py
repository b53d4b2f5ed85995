"""Broken configuration files stop every command with exit 78 and one line naming the key:
`bcmanager`, `bcorch` and `bcorch engine`, run as real processes."""
from __future__ import annotations

import subprocess
import sys

import pytest

from support import REPO

CASES = [
    ("[manager]\nbatch_size = \"ten\"\n", "manager.batch_size"),
    ("[manager]\nreport_back_interval = [1, 2]\n", "manager.report_back_interval"),
    ("[engine]\nbogus_key = 1\n", "engine.bogus_key"),
    ("[runner]\nsamples_per_s = \"fast\"\n", "runner.samples_per_s"),
    ("[runner]\nextra_args = \"--flag\"\n", "runner.extra_args"),
    ("[orchestrator]\nhang_timeout_s = -1\n", "orchestrator.hang_timeout_s"),
    ("[orchestrator]\nmax_restarts = true\n", "orchestrator.max_restarts"),
    ("[nosuchsection]\nx = 1\n", "[nosuchsection]"),
    ("manager = 5\n", "[manager]"),
    ("[manager\nport = 1\n", "not valid TOML"),
    ("[engine]\nengine_id = \"../../etc\"\n", "engine.engine_id"),
    ("[manager]\nurl = \"127.0.0.1:40765\"\n", "manager.url: needs http:// or https://"),
    ("[manager]\nprot = 1\n[runner]\nkinds = \"dorado\"\n",
     "manager.prot: unknown key (did you mean manager.port?); "
     "runner.kinds: unknown key (did you mean runner.kind?)"),
]


def _commands(tmp_path, config):
    d = str(tmp_path)
    return {
        "bcmanager": [sys.executable, "-m", "bcorch.manager", "--config", config, "--input-dir", d,
                      "--output-dir", d, "--port", "0"],
        "bcorch": [sys.executable, "-m", "bcorch.orchestrator", "--config", config, "--gpus",
                   "virtual:1", "--socket", str(tmp_path / "ctl" / "s.sock")],
        "bcorch engine": [sys.executable, "-m", "bcorch.orchestrator", "engine", "--gpu", "0",
                          "--config", config],
    }


@pytest.mark.parametrize("text,key", CASES, ids=[k for _, k in CASES])
def test_bad_config_exits_78_naming_the_key(tmp_path, text, key):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    for name, argv in _commands(tmp_path, str(config)).items():
        out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 78, (name, out.returncode, out.stderr[-1000:])
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and key in lines[0], (name, out.stderr)
        assert "Traceback" not in out.stderr


def test_missing_sections_name_the_required_key(tmp_path):
    config = tmp_path / "partial.toml"
    config.write_text("[runner]\nkind = \"simulate\"\n")  # no [manager], no [engine]
    out = subprocess.run([sys.executable, "-m", "bcorch.manager", "--config", str(config)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 78 and len(out.stderr.strip().splitlines()) == 1
    assert "input_dir" in out.stderr or "--input-dir" in out.stderr, out.stderr
    # An engine needs no directories in its config: the manager's batches name them (issue 12 §5).
