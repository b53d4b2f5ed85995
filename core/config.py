"""The one typed model of config.toml, validated on load.

It lives in the neutral core beside the wire protocol because the file is shared by every
command (manager, orchestrator, engine).
Every key, its default and a one-line comment are in the repository's config.toml;
tests check that the two agree.

A wrong type, an unknown key or a missing required key raises ConfigError, whose
message is one line naming the key; the commands turn it into exit code 78.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import os
import re
import sys
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from .protocol import DEFAULT_PORT, EXIT_CONFIG, MAX_BATCH_SIZE, is_valid_id

TOKEN_ENV = "BCORCH_TOKEN"
MAX_CONFIG_BYTES = 1 << 20          # config.toml is a few kB; `--config /dev/zero` must not hang
URL_SCHEMES = ("http://", "https://")
MAX_SECONDS = 365 * 24 * 3600.0   # a duration above a year is a typo for "never"; timers overflow
MAX_INT = 2 ** 31 - 1             # the default ceiling of an integer key (SQLite, C timers)
TOKEN_RE = re.compile(r"([\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?)?")  # header-safe ASCII


class ConfigError(ValueError):
    """A configuration problem; str() is one line naming the key."""

    exit_code = EXIT_CONFIG


@dataclass
class ManagerConfig:
    url: str = f"http://127.0.0.1:{DEFAULT_PORT}"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str = ""
    input_dir: str = ""
    output_dir: str = ""
    db: str = ""
    batch_size: int = 10
    startup_share: float = 0.02
    report_back_interval: float = 90.0
    max_attempts: int = 3
    scan_interval_s: float = 10.0
    settle_s: float = 30.0
    incomplete_grace_s: float = 600.0
    close_on_final_summary: bool = True
    input_closed: bool = False
    threads: int = 16
    request_timeout_s: float = 10.0
    allow_simulated: bool = False
    lock_refresh_s: float = 10.0
    watch_root: str = ""


@dataclass
class EngineConfig:
    input_dir: str = ""
    output_dir: str = ""
    engine_id: str = ""
    model: str = "hac"
    optimal_request_size: int = 0
    polling_interval: float = 1.0
    busy_pause_s: float = 0.0
    work_until_none_left: bool = False
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    request_retries: int = 3


@dataclass
class RunnerConfig:
    kind: Literal["script", "dorado", "dorado-server", "simulate"] = "dorado"
    bc_script: str = ""
    port: int = 5555
    samples_per_s: float = 2_000_000.0
    startup_s: float = 0.0
    startup_per: Literal["batch", "engine"] = "batch"
    stop_grace_s: float = 10.0
    stall_timeout_s: float = 900.0
    dorado_path: str = "dorado"
    models_directory: str = ""
    emit: Literal["fastq", "bam"] = "fastq"
    extra_args: list[str] = field(default_factory=list)
    fail_fraction: float = 0.1
    min_read_fraction: float = 1.0
    server_path: str = "dorado_basecall_server"
    supervisor_path: str = "ont_basecaller_supervisor"
    server_use_tcp: bool = False
    server_start_timeout_s: float = 600.0
    num_clients: int = 4


@dataclass
class OrchestratorConfig:
    gpus: str = "all"
    control_socket: str = ""
    hang_timeout_s: float = 60.0
    restart_backoff_max_s: float = 300.0
    healthy_reset_s: float = 600.0
    max_restarts: int = 5
    restart_window_s: float = 600.0
    on_manager_failure: Literal["wait", "drain"] = "wait"
    manager_down_timeout_s: float = 3600.0
    drain_timeout_s: float = 300.0
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    exit_when_done: bool = True
    first_contact_timeout_s: float = 120.0
    engine_start: Literal["zygote", "spawn"] = "zygote"


MODEL_RE = re.compile(r"[A-Za-z0-9._@,/-]{1,200}")
KIT_RE = re.compile(r"[A-Za-z0-9._-]{0,64}")
RULE_MATCH_KEYS = ("protocol_group", "sample", "flow_cell")
RUN_SETTING_KEYS = ("model", "kit", "emit", "priority")
EMIT_FORMATS = ("fastq", "bam")
MIN_PRIORITY, MAX_PRIORITY = 0.001, 1000.0  # a million to one; past it the fair share's sums overflow


def setting_problem(key: str, value: Any) -> str:
    """Why a run setting (model, kit, emit, priority) is unusable; "" when it is fine.

    One check for the config defaults, the rules and a run's bcorch.toml, so a value is
    refused the same way wherever it is written. A leading "-" is refused for model and kit
    because they become basecaller arguments and must not read as flags.
    """
    if key == "model":
        if not isinstance(value, str):
            return f"expected a string, got {value!r}"[:300]
        if not MODEL_RE.fullmatch(value) or value.startswith("-"):
            return (f"expected a dorado model complex or name ([A-Za-z0-9._@,/-], 1 to 200 "
                    f"characters, not starting with '-'), got {value!r}"[:300])
    elif key == "kit":
        if not isinstance(value, str):
            return f"expected a string, got {value!r}"[:300]
        if not KIT_RE.fullmatch(value) or value.startswith("-"):
            return (f"expected a kit name such as 'SQK-NBD114-24' ([A-Za-z0-9._-], at most 64 "
                    f"characters; \"\" = none), got {value!r}"[:300])
    elif key == "emit":
        if value not in EMIT_FORMATS:
            return f"expected one of 'fastq', 'bam', got {value!r}"[:300]
    elif key == "priority":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number above 0, got {value!r}"[:300]
        if not (math.isfinite(value) and value > 0):
            return f"expected a number above 0, got {value!r}"[:300]
        if not MIN_PRIORITY <= value <= MAX_PRIORITY:
            return f"expected a number from {MIN_PRIORITY:g} to {MAX_PRIORITY:g}, got {value!r}"
    else:
        return "unknown key"
    return ""


@dataclass
class FacilityRule:
    """One [[facility.rules]] table: globs that pick runs, and the settings they get.

    A matcher left "" matches every run; the rule applies when all its matchers match. A
    field the run does not have (a flow cell in a name that does not parse) matches no glob.
    A setting left None is not changed by the rule (kit = "" sets "no kit").
    """
    protocol_group: str = ""
    sample: str = ""
    flow_cell: str = ""
    model: Optional[str] = None
    kit: Optional[str] = None
    emit: Optional[str] = None
    priority: Optional[float] = None

    def matches(self, protocol_group: str, sample: str, flow_cell: str) -> bool:
        return all(not pattern or (value != "" and fnmatch.fnmatchcase(value, pattern))
                   for pattern, value in ((self.protocol_group, protocol_group),
                                          (self.sample, sample),
                                          (self.flow_cell, flow_cell)))

    def settings(self) -> dict[str, Any]:
        """The settings this rule sets (those not None)."""
        return {key: getattr(self, key) for key in RUN_SETTING_KEYS
                if getattr(self, key) is not None}


@dataclass
class FacilityConfig:
    model: str = "hac"
    kit: str = ""
    emit: Literal["fastq", "bam"] = "fastq"
    priority: float = 1.0
    output: Literal["beside", "mirror"] = "beside"
    output_root: str = ""
    switch_slack_s: float = 600.0
    late_watch_s: float = 7 * 24 * 3600.0
    shown_settled_s: float = 7 * 24 * 3600.0
    rules: list[FacilityRule] = field(default_factory=list)


def _check_rules(key: str, value: Any) -> list[FacilityRule]:
    """[[facility.rules]]: a list of tables; each names its problem as facility.rules[N].KEY.

    Rules are numbered from 1, in the order they are written.
    """
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected [[{key}]] tables, got {value!r}"[:300])
    rules = []
    known = list(RULE_MATCH_KEYS + RUN_SETTING_KEYS)
    for number, table in enumerate(value, start=1):
        where = f"{key}[{number}]"
        if isinstance(table, FacilityRule):
            table = {k: v for k, v in dataclasses.asdict(table).items() if v is not None}
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table, got {table!r}"[:300])
        for name in table:
            if name not in known:
                guess = difflib.get_close_matches(str(name), known, 1, 0.6)
                raise ConfigError(f"{where}.{name}: unknown key"
                                  + (f" (did you mean {where}.{guess[0]}?)" if guess else
                                     f" (expected {', '.join(known)})"))
        for name in RULE_MATCH_KEYS:
            if name in table and not isinstance(table[name], str):
                raise ConfigError(f"{where}.{name}: expected a string (a glob such as "
                                  f"'cancer_*'), got {table[name]!r}"[:300])
        if not any(table.get(name) for name in RULE_MATCH_KEYS):
            raise ConfigError(f"{where}: needs at least one of {', '.join(RULE_MATCH_KEYS)} "
                              f"(the defaults of [facility] apply to every run)")
        if not any(name in table for name in RUN_SETTING_KEYS):
            raise ConfigError(f"{where}: sets nothing (give at least one of "
                              f"{', '.join(RUN_SETTING_KEYS)})")
        for name in RUN_SETTING_KEYS:
            if name in table:
                problem = setting_problem(name, table[name])
                if problem:
                    raise ConfigError(f"{where}.{name}: {problem}")
        values = dict(table)
        if "priority" in values:
            values["priority"] = float(values["priority"])
        rules.append(FacilityRule(**values))
    return rules


@dataclass
class Config:
    manager: ManagerConfig = field(default_factory=ManagerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    facility: FacilityConfig = field(default_factory=FacilityConfig)
    source: str = ""

    @property
    def token(self) -> str:
        """The bearer token: config, else the environment (flags are applied into the config).

        A token from the environment is checked here, where it is read (ConfigError naming it).
        """
        if self.manager.token:
            return self.manager.token
        token = os.environ.get(TOKEN_ENV, "")
        problem = token_problem(token)
        if problem:
            raise ConfigError(f"{TOKEN_ENV} (environment): {problem}")
        return token

    def override(self, section: str, **values: Any) -> None:
        """Apply command-line flags (None means 'not given') with the same checks as the file."""
        target = getattr(self, section)
        hints = typing.get_type_hints(type(target))
        for key, value in values.items():
            if value is None:
                continue
            if key not in hints:
                guess = _did_you_mean(section, key)
                raise ConfigError(f"{section}.{key}: unknown key"
                                  + (f" (did you mean {guess}?)" if guess else ""))
            setattr(target, key, _check(f"{section}.{key}", value, hints[key]))
        _check_ranges(self)


SECTIONS: dict[str, type] = {
    "manager": ManagerConfig,
    "engine": EngineConfig,
    "runner": RunnerConfig,
    "orchestrator": OrchestratorConfig,
    "facility": FacilityConfig,
}


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is list:
        return "a list of strings"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[hint]


def _check(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
    elif origin is list and typing.get_args(hint) == (FacilityRule,):
        return _check_rules(key, value)
    elif origin is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}"[:300])


_MINIMUMS: dict[str, float] = {
    "manager.port": 0, "manager.batch_size": 1, "manager.report_back_interval": 1,
    "manager.startup_share": 0.001,
    "manager.max_attempts": 1, "manager.scan_interval_s": 0.05, "manager.settle_s": 0,
    "manager.incomplete_grace_s": 0,
    "manager.threads": 1, "manager.lock_refresh_s": 0.1, "manager.request_timeout_s": 0.5,
    "engine.optimal_request_size": 0, "engine.polling_interval": 0, "engine.busy_pause_s": 0,
    "engine.connect_timeout_s": 0.1, "engine.read_timeout_s": 0.1, "engine.request_retries": 0,
    "runner.port": 0, "runner.samples_per_s": 1, "runner.startup_s": 0,
    "runner.stop_grace_s": 0, "runner.stall_timeout_s": 1, "runner.fail_fraction": 0,
    "runner.min_read_fraction": 0, "runner.server_start_timeout_s": 1, "runner.num_clients": 1,
    "orchestrator.hang_timeout_s": 1, "orchestrator.restart_backoff_max_s": 0,
    "orchestrator.healthy_reset_s": 0, "orchestrator.max_restarts": 0,
    "orchestrator.restart_window_s": 0, "orchestrator.manager_down_timeout_s": 0,
    "orchestrator.drain_timeout_s": 0, "orchestrator.metrics_port": 0,
    "orchestrator.first_contact_timeout_s": 0,
    "facility.switch_slack_s": 0, "facility.late_watch_s": 0,
    "facility.shown_settled_s": 0,
}
_MAXIMUMS: dict[str, float] = {
    "manager.port": 65535, "runner.port": 65535, "orchestrator.metrics_port": 65535,
    "manager.batch_size": MAX_BATCH_SIZE, "engine.optimal_request_size": MAX_BATCH_SIZE,
    "manager.startup_share": 0.5,
    "runner.fail_fraction": 1, "runner.min_read_fraction": 1,
    "manager.threads": 1024, "runner.num_clients": 256, "engine.request_retries": 1000,
    "runner.samples_per_s": 1e12,
}


def _maximum(key: str) -> float:
    """The ceiling of a numeric key: its own, else MAX_INT for integers and MAX_SECONDS for
    durations (every other float key is a duration)."""
    if key in _MAXIMUMS:
        return _MAXIMUMS[key]
    section, name = key.split(".")
    return MAX_INT if typing.get_type_hints(SECTIONS[section])[name] is int else MAX_SECONDS


def token_problem(token: str) -> str:
    """Why a bearer token cannot be sent in an Authorization header; "" when it can."""
    if not TOKEN_RE.fullmatch(token):
        return ("expected printable ASCII, no line breaks, no space at either end (it is "
                "sent in an HTTP header)")
    return ""


def url_problem(url: str) -> str:
    """Why manager.url cannot be called; "" when it can."""
    example = f"as in http://HOST:{DEFAULT_PORT}"
    if not url.startswith(URL_SCHEMES):
        return f"needs http:// or https:// ({example}), got {url!r}"[:300]
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"not a valid URL ({exc}; {example}), got {url!r}"[:300]
    if not parts.hostname or any(c.isspace() for c in url):
        return f"needs a host name, and no spaces ({example}), got {url!r}"[:300]
    if port == 0:
        return f"needs a port from 1 to 65535 ({example}), got {url!r}"[:300]
    return ""


def _check_ranges(config: Config) -> None:
    for key, low in _MINIMUMS.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        high = _maximum(key)
        if not low <= value <= high:  # also refuses NaN
            raise ConfigError(f"{key}: expected a value from {low:g} to {high:g}, "
                              f"got {value!r}"[:300])
    problem = url_problem(config.manager.url)
    if problem:
        raise ConfigError(f"manager.url: {problem}")
    for key in ("manager.host", "orchestrator.metrics_host"):
        section, name = key.split(".")
        host = getattr(getattr(config, section), name)
        if not host.strip() or host != host.strip():
            raise ConfigError(f"{key}: expected an address to bind such as 127.0.0.1 (0.0.0.0 "
                              f"for every interface), got {host!r}"[:300])
    problem = token_problem(config.manager.token)
    if problem:
        raise ConfigError(f"manager.token: {problem}")
    if not config.engine.model.strip():
        raise ConfigError("engine.model: expected a dorado model such as 'hac', got ''")
    if config.engine.engine_id and not is_valid_id(config.engine.engine_id):
        raise ConfigError(f"engine.engine_id: expected [A-Za-z0-9._-]{{1,64}}, "
                          f"got {config.engine.engine_id!r}")
    _check_facility(config.facility)


def _check_facility(facility: FacilityConfig) -> None:
    for key in RUN_SETTING_KEYS:
        problem = setting_problem(key, getattr(facility, key))
        if problem:
            raise ConfigError(f"facility.{key}: {problem}")
    if not math.isfinite(facility.switch_slack_s):
        raise ConfigError(f"facility.switch_slack_s: expected a finite number, "
                          f"got {facility.switch_slack_s!r}")
    if facility.output == "mirror" and not facility.output_root:
        raise ConfigError('facility.output_root: required when facility.output = "mirror" '
                          '(the root under which each run\'s outputs mirror the layout)')


def from_mapping(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Build a Config from parsed TOML, refusing unknown sections and keys."""
    config = Config(source=source)
    for section, values in data.items():
        if section in SECTIONS and not isinstance(values, Mapping):
            raise ConfigError(f"[{section}]: expected a table, got {values!r}"[:300])
    unknown = unknown_keys(data)
    if unknown:
        raise ConfigError(unknown)
    for section, values in data.items():
        config.override(section, **{k: _not_none(section, k, v) for k, v in values.items()})
    _check_ranges(config)
    return config


def _all_keys() -> list[str]:
    return [f"{section}.{name}" for section, cls in SECTIONS.items()
            for name in typing.get_type_hints(cls)]


def _did_you_mean(section: str, key: str) -> str:
    """The closest known key: same section first, then a key of the same name elsewhere."""
    same = difflib.get_close_matches(key, list(typing.get_type_hints(SECTIONS[section])), 1, 0.6)
    if same:
        return f"{section}.{same[0]}"
    moved = [k for k in _all_keys() if k.split(".")[1] == key]
    if moved:
        return moved[0]
    near = difflib.get_close_matches(f"{section}.{key}", _all_keys(), 1, 0.6)
    return near[0] if near else ""


def unknown_keys(data: Mapping[str, Any]) -> str:
    """One line naming every unknown section and key, each with a "did you mean"; "" if none."""
    problems: list[str] = []
    for section, values in data.items():
        if section not in SECTIONS:
            guess = difflib.get_close_matches(str(section), list(SECTIONS), 1, 0.6)
            hint = f"did you mean [{guess[0]}]?" if guess else f"expected one of {', '.join(SECTIONS)}"
            problems.append(f"[{section}]: unknown section ({hint})")
            continue
        known = typing.get_type_hints(SECTIONS[section])
        for key in values:
            if key not in known:
                guess = _did_you_mean(section, str(key))
                problems.append(f"{section}.{key}: unknown key"
                                + (f" (did you mean {guess}?)" if guess else ""))
    if len(problems) > 1:
        return f"{len(problems)} unknown keys: " + "; ".join(problems)
    return problems[0] if problems else ""


def _not_none(section: str, key: str, value: Any) -> Any:
    # TOML has no null, but a dict given by a caller might.
    if value is None:
        raise ConfigError(f"{section}.{key}: a value is required")
    return value


def load(path: str | os.PathLike[str] | None) -> Config:
    """Load config.toml (or defaults when path is None)."""
    if path is None:
        return from_mapping({}, "<defaults>")
    p = Path(path)
    try:
        with p.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"--config: {str(p)!r} is larger than {MAX_CONFIG_BYTES} bytes, "
                              f"not a config file")
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file {str(p)!r}") from None
    except IsADirectoryError:
        raise ConfigError(f"--config: {str(p)!r} is a directory") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(" ".join(f"{p}: not valid TOML ({exc})".split())) from None
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {str(p)!r} "
                          f"({exc.strerror or type(exc).__name__})") from None
    return from_mapping(data, str(p))


def require(config: Config, key: str, hint: str = "") -> Any:
    """Return a key that has no useful default, or raise a one-line ConfigError."""
    section, name = key.split(".")
    value = getattr(getattr(config, section), name)
    if value in ("", None):
        raise ConfigError(f"{key}: required{' (' + hint + ')' if hint else ''}")
    return value


def defaults_as_dict() -> dict[str, dict[str, Any]]:
    """Every key with its default, section by section (for docs and tests)."""
    return {name: dataclasses.asdict(cls()) for name, cls in SECTIONS.items()}
