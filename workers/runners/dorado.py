"""The `dorado` runner: `dorado basecaller MODEL JOB_INPUT_DIR --device cuda:N ...` per batch.

Written against dorado 1.x (the `basecaller` subcommand and flags are unchanged in 2.x):

    dorado basecaller <model> <job input dir> --device cuda:<n>
        --output-dir <job output dir>/pass [--emit-fastq] [--models-directory D]
        [--kit-name KIT] <extra_args>

- Per batch (facility mode): the batch's model, kit and output format replace the engine's
  (`engine.model`, none, `runner.emit`) when the manager's answer carries them. A batch's
  model that is not installed here FAILS that batch (BatchSettingsError); the engine goes on.
  A batch's kit replaces a `--kit-name` given in `runner.extra_args`.

- `<model>` is a model complex (`hac`, `sup@v5.2.0`, `hac,5mCG_5hmCG`), a model name
  (`dna_r10.4.1_e8.2_400bps_hac@v5.2.0`) or a model directory. In a cluster nothing is
  downloaded at run time: the model must already be in `runner.models_directory` (or be
  a directory), checked before the first batch; a missing one is a configuration error
  (exit 78) naming the model and where it looked.
- Output goes into the job's `pass/` through `--output-dir` (dorado writes its own
  directory structure below it), never to the engine's stdout; the log (dorado's
  stdout and stderr) is the job's basecaller.log.
- `--device cuda:<n>`: n is the index inside the engine, where CUDA_VISIBLE_DEVICES
  already names one GPU, so under bcorch it is 0.
- Exit 0 is not trusted: workers/output_check.py compares read ids after the run.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

from bcorch.protocol import JobState
from bcorch.config import ConfigError
from ..read_ids import require_bam_reader
from .base import (LOG_NAME, BatchSettingsError, ProcessHandle, RunHandle, RunResult,
                   Runner, batch_emit)

TIERS = ("fast", "hac", "sup")
_COMPLEX = re.compile(r"(?P<tier>fast|hac|sup)(?:@(?P<version>v\d+(?:\.\d+)*|latest))?"
                      r"(?P<mods>(?:,[A-Za-z0-9_]+)*)")
_ERROR_LINE = re.compile(r"\[(?:error|critical)\]|terminate called|c10::Error|what\(\)|"
                         r"Segmentation fault|out of memory", re.IGNORECASE)


def find_executable(value: str, key: str) -> str:
    """An executable given by name (on PATH) or path; ConfigError naming the key otherwise."""
    if not value:
        raise ConfigError(f"{key}: required")
    if os.sep in value:
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"{key}: no such file {value!r}")
        if not os.access(path, os.X_OK):
            raise ConfigError(f"{key}: {value!r} is not executable")
        return str(path.resolve())
    found = shutil.which(value)
    if found is None:
        raise ConfigError(f"{key}: {value!r} is not on PATH (give the full path)")
    return found


def is_model_path(model: str) -> bool:
    return os.sep in model or model.startswith(".") or model.startswith("~")


def check_model(model: str, models_directory: str) -> None:
    """Refuse a model that dorado would have to download; ConfigError says where we looked."""
    if not model:
        raise ConfigError("engine.model: required for the dorado runner")
    if is_model_path(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise ConfigError(f"engine.model: model directory {model!r} does not exist")
        return
    if not models_directory:
        raise ConfigError(f"runner.models_directory: required for model {model!r} (dorado must "
                          f"not download models at run time; run `dorado download` beforehand)")
    root = Path(models_directory)
    if not root.is_dir():
        raise ConfigError(f"runner.models_directory: no such directory {models_directory!r}")
    complex_ = _COMPLEX.fullmatch(model)
    if complex_ is None:
        if not (root / model).is_dir():
            raise ConfigError(f"engine.model: model {model!r} not found in "
                              f"runner.models_directory {models_directory!r}")
        return
    tier, version = complex_.group("tier"), complex_.group("version")
    suffix = f"_{tier}@{version}" if version and version != "latest" else f"_{tier}@v"
    names = [p.name for p in root.iterdir() if p.is_dir()]
    simplex = [n for n in names if _is_simplex(n, suffix)]
    if not simplex:
        raise ConfigError(f"engine.model: no {tier!r} model{' ' + version if version else ''} "
                          f"for model complex {model!r} in runner.models_directory "
                          f"{models_directory!r} (expected a directory like "
                          f"dna_r10.4.1_e8.2_400bps{suffix}...)")
    for mod in filter(None, complex_.group("mods").split(",")):
        if not any(f"{suffix}" in n and f"_{mod}@v" in n for n in names):
            raise ConfigError(f"engine.model: no {mod!r} modification model for model complex "
                              f"{model!r} in runner.models_directory {models_directory!r}")


def _is_simplex(name: str, suffix: str) -> bool:
    """`dna_..._hac@v5.2.0` (not a modification model `..._hac@v5.2.0_5mCG@v1`)."""
    at = name.find(suffix)
    return at > 0 and "_" not in name[at + len(suffix):] if suffix.endswith("@v") \
        else name.endswith(suffix)


def last_error_line(log_path: Path, limit: int = 65536) -> str:
    """The last line of the log that looks like an error (or the last line)."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - limit))
            lines = fh.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    lines = [line.strip() for line in lines if line.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.search(line):
            return line[:300]
    return lines[-1][:300] if lines else ""


def describe_exit(program: str, code: int, log_path: Path) -> str:
    if code in (-6, 134):
        how = "aborted (SIGABRT, exit 134)"
    elif code < 0:
        how = f"killed by signal {-code}"
    else:
        how = f"exited with {code}"
    detail = last_error_line(log_path)
    return f"{program} {how}" + (f": {detail}" if detail else "")


class DoradoRunner(Runner):
    kind = "dorado"

    def __init__(self, dorado_path: str, model: str, models_directory: str = "",
                 emit: str = "fastq", extra_args: Sequence[str] = (), device_index: int = 0,
                 stall_timeout_s: float = 0.0,
                 logger: logging.Logger | logging.LoggerAdapter | None = None):
        self.dorado = find_executable(dorado_path, "runner.dorado_path")
        self.models_directory = models_directory
        check_model(model, models_directory)
        if emit == "bam":
            require_bam_reader("runner.emit")
        self.model = model
        self.emit = emit
        self.extra_args = list(extra_args)
        self.device = f"cuda:{device_index}"
        self.stall_timeout_s = stall_timeout_s
        self.log = logger or logging.getLogger(__name__)

    def argv(self, input_dir: Path, output_dir: Path, model: str, *, kit: str = "",
             emit: str = "") -> list[str]:
        argv = [self.dorado, "basecaller", model, str(input_dir), "--device", self.device,
                "--output-dir", str(output_dir / "pass")]
        if (emit or self.emit) == "fastq":
            argv.append("--emit-fastq")
        if self.models_directory:
            argv += ["--models-directory", self.models_directory]
        extra = self.extra_args
        if kit:
            argv += ["--kit-name", kit]
            extra = _without_option(extra, "--kit-name")
        return argv + extra

    def start(self, input_dir: Path, output_dir: Path, model: str, batch: Sequence[str], *,
              kit: str = "", emit: str = "") -> RunHandle:
        emit = batch_emit(emit, self.emit)
        try:
            check_model(model, self.models_directory)
            if emit == "bam":
                require_bam_reader("runner.emit")
        except ConfigError as exc:
            if model == self.model and emit == self.emit:
                raise
            raise BatchSettingsError(str(exc)) from None
        log_path = output_dir / LOG_NAME

        def interpret(code: int) -> RunResult:
            if code == 0:
                return RunResult(JobState.DONE, code)
            return RunResult(JobState.FAILED, code, reason=describe_exit("dorado", code, log_path))

        return ProcessHandle(self.argv(input_dir, output_dir, model, kit=kit, emit=emit),
                             output_dir, interpret=interpret,
                             stall_timeout_s=self.stall_timeout_s, logger=self.log)


def _without_option(args: Sequence[str], option: str) -> list[str]:
    """args less `option VALUE` and `option=VALUE`."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out
