"""Basecaller runners, chosen by `runner.kind` (see base.Runner for the interface)."""
from __future__ import annotations

import logging
from typing import Callable

from ..protocol.config import Config, ConfigError
from .base import RunHandle, RunResult, Runner


def _script(conf: Config, log) -> Runner:
    from .script import ScriptRunner
    return ScriptRunner(conf.runner.bc_script, conf.runner.port,
                        stall_timeout_s=conf.runner.stall_timeout_s, logger=log)


def _simulate(conf: Config, log) -> Runner:
    from .simulate import SimulateRunner
    return SimulateRunner(conf.runner.samples_per_s, conf.runner.startup_s,
                          conf.runner.fail_fraction, stall_timeout_s=conf.runner.stall_timeout_s,
                          logger=log)


# runner.kind -> factory. The "dorado" and "dorado-server" runners are added here by a
# later issue; until then choosing them is a configuration error.
RUNNERS: dict[str, Callable[[Config, logging.Logger | logging.LoggerAdapter], Runner]] = {
    "script": _script,
    "simulate": _simulate,
}


def make_runner(conf: Config, log: logging.Logger | logging.LoggerAdapter | None = None) -> Runner:
    factory = RUNNERS.get(conf.runner.kind)
    if factory is None:
        raise ConfigError(f"runner.kind: the {conf.runner.kind!r} runner is not available yet "
                          f"(available: {', '.join(sorted(RUNNERS))})")
    return factory(conf, log or logging.getLogger("workers.runners"))


__all__ = ["RUNNERS", "RunHandle", "RunResult", "Runner", "make_runner"]
