"""The settings one run is basecalled with: model, kit, output format and priority.

Three layers, later ones winning key by key:
1. the [facility] defaults of config.toml;
2. every [[facility.rules]] table that matches the run (protocol_group / sample / flow_cell
   globs), in the order written, so a later rule overrides an earlier one;
3. the run directory's own bcorch.toml, table [run] (keys model, kit, emit, priority).

Every value is checked by the same function as the config (bcorch.config.setting_problem).
A bad one raises RunSettingsError, one line naming the key and where it was written; the
Facility quarantines that run with it as the reason and the other runs go on.
"""
from __future__ import annotations

import errno
import os
import stat
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from bcorch.config import RUN_SETTING_KEYS, FacilityConfig, setting_problem

from .run_discovery import RunDir

RUN_FILE = "bcorch.toml"
RUN_TABLE = "run"
RUN_FILE_MAX_BYTES = 64 * 1024


class RunSettingsError(ValueError):
    """A run's settings cannot be used; str() is one line naming the key and its source."""


@dataclass(frozen=True)
class RunSettings:
    model: str
    kit: str
    emit: str
    priority: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "settings") -> "RunSettings":
        """Settings read back (from the facility database), checked like any other source."""
        missing = [key for key in RUN_SETTING_KEYS if key not in values]
        if missing:
            raise RunSettingsError(f"{source}: missing {', '.join(missing)}")
        merged: dict[str, Any] = {}
        _apply(merged, {k: values[k] for k in RUN_SETTING_KEYS}, source + ".")
        return cls(**merged)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]


def _apply(settings: dict[str, Any], values: Mapping[str, Any], where: str) -> None:
    """Check values (key -> value) and lay them over settings; where prefixes the key."""
    for key, value in values.items():
        problem = setting_problem(key, value)
        if problem:
            raise RunSettingsError(_one_line(f"{where}{key}: {problem}"))
        settings[key] = float(value) if key == "priority" else value


def _read_regular(path: Path, limit: int) -> bytes:
    """Up to limit bytes of a regular file. Opened without blocking, so that a named pipe
    (or a device) in its place is refused instead of waiting for a writer for ever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(limit)
    finally:
        os.close(fd)


def read_run_file(run_path: Path) -> dict[str, Any]:
    """The [run] table of run_path/bcorch.toml ({} when there is no such file).

    Anything else in the file (another table, a key outside [run], an unknown key in it) is
    an error, so a typo is reported instead of silently ignored.
    """
    path = Path(run_path) / RUN_FILE
    try:
        raw = _read_regular(path, RUN_FILE_MAX_BYTES + 1)
    except FileNotFoundError:
        return {}
    except IsADirectoryError:
        raise RunSettingsError(f"{path}: is a directory, expected a TOML file") from None
    except OSError as exc:
        raise RunSettingsError(_one_line(
            f"{path}: cannot read it ({exc.strerror or exc.__class__.__name__})")) from None
    if len(raw) > RUN_FILE_MAX_BYTES:
        raise RunSettingsError(f"{path}: larger than {RUN_FILE_MAX_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RunSettingsError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise RunSettingsError(_one_line(f"{path}: not valid TOML ({exc})")) from None
    for key, value in data.items():
        if key != RUN_TABLE:
            what = "table" if isinstance(value, Mapping) else "key"
            raise RunSettingsError(_one_line(
                f"{path}: unknown {what} {key!r} (settings go in a [run] table: "
                f"{', '.join(RUN_SETTING_KEYS)})"))
    table = data.get(RUN_TABLE, {})
    if not isinstance(table, Mapping):
        raise RunSettingsError(_one_line(f"{path}: run: expected a [run] table, got {table!r}"))
    for key in table:
        if key not in RUN_SETTING_KEYS:
            raise RunSettingsError(_one_line(
                f"{path}: run.{key}: unknown key (expected {', '.join(RUN_SETTING_KEYS)})"))
    return dict(table)


def run_file_stamp(run_path: Path | str) -> tuple[int, int] | None:
    """(mtime in ns, size) of the run's bcorch.toml, None when there is none: a change
    between two stamps means it was written again."""
    try:
        st = (Path(run_path) / RUN_FILE).stat()
    except FileNotFoundError:
        return None
    except OSError:
        return (-1, -1)
    return (st.st_mtime_ns, st.st_size)


def settings_for(run: RunDir, facility: FacilityConfig) -> RunSettings:
    """The run's settings: config defaults, then matching rules in order, then its bcorch.toml."""
    settings: dict[str, Any] = {}
    _apply(settings, {key: getattr(facility, key) for key in RUN_SETTING_KEYS}, "facility.")
    for number, rule in enumerate(facility.rules, start=1):
        if rule.matches(run.protocol_group, run.sample, run.flow_cell):
            _apply(settings, rule.settings(), f"facility.rules[{number}].")
    run_file = read_run_file(run.path)
    _apply(settings, run_file, f"{Path(run.path) / RUN_FILE}: run.")
    return RunSettings(**settings)
