"""Basecaller runners, chosen by `runner.kind` (see base.Runner for the interface)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from bcorch.config import Config, ConfigError
from .base import RunHandle, RunResult, Runner


def _script(conf: Config, log) -> Runner:
    from .script import ScriptRunner
    return ScriptRunner(conf.runner.bc_script, conf.runner.port,
                        stall_timeout_s=conf.runner.stall_timeout_s, logger=log)


def _simulate(conf: Config, log) -> Runner:
    from .simulate import SimulateRunner
    return SimulateRunner(conf.runner.samples_per_s, conf.runner.startup_s,
                          conf.runner.fail_fraction, stall_timeout_s=conf.runner.stall_timeout_s,
                          logger=log, startup_once=conf.runner.startup_per == "engine")


def _dorado(conf: Config, log, place: "Placement") -> Runner:
    from .dorado import DoradoRunner
    r = conf.runner
    return DoradoRunner(r.dorado_path, conf.engine.model, r.models_directory, r.emit,
                        r.extra_args, device_index=place.device_index,
                        stall_timeout_s=r.stall_timeout_s, logger=log)


def _dorado_server(conf: Config, log, place: "Placement") -> Runner:
    from .dorado_server import DoradoServerRunner
    r = conf.runner
    return DoradoServerRunner(
        server_path=r.server_path, supervisor_path=r.supervisor_path, model=conf.engine.model,
        output_root=conf.engine.output_dir or conf.manager.output_dir,
        engine_id=place.engine_id, device_index=place.device_index, gpu_index=place.gpu_index,
        base_port=r.port, use_tcp=r.server_use_tcp, num_clients=r.num_clients,
        extra_args=r.extra_args, emit=r.emit, start_timeout_s=r.server_start_timeout_s,
        stall_timeout_s=r.stall_timeout_s, stop_grace_s=r.stop_grace_s, logger=log)


@dataclass(frozen=True)
class Placement:
    """Where the engine runs: its id, its GPU on the host, the CUDA index inside it."""

    engine_id: str = "engine"
    gpu_index: int = 0
    device_index: int = 0


def _placed(factory: Callable[[Config, Any], Runner]) -> Callable[[Config, Any, Placement], Runner]:
    return lambda conf, log, _place: factory(conf, log)


# runner.kind -> factory(conf, logger, placement).
RUNNERS: dict[str, Callable[[Config, Any, Placement], Runner]] = {
    "script": _placed(_script),
    "simulate": _placed(_simulate),
    "dorado": _dorado,
    "dorado-server": _dorado_server,
}


def make_runner(conf: Config, log: logging.Logger | logging.LoggerAdapter | None = None,
                placement: Placement | None = None) -> Runner:
    factory = RUNNERS.get(conf.runner.kind)
    if factory is None:
        raise ConfigError(f"runner.kind: the {conf.runner.kind!r} runner is not available "
                          f"(available: {', '.join(sorted(RUNNERS))})")
    return factory(conf, log or logging.getLogger("workers.runners"), placement or Placement())


__all__ = ["Placement", "RUNNERS", "RunHandle", "RunResult", "Runner", "make_runner"]
