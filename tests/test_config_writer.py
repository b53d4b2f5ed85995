"""The one config writer that the demo, the benchmarks and the tests use (the one local cluster,
LocalCluster, runs under tests/test_demo.py, whose `bcorch demo` is built on it)."""
from __future__ import annotations

import math

import pytest

from bcorch import config as config_mod
from bcorch.config_writer import write_config


def test_written_config_loads_with_simulation_defaults_the_caller_can_override(tmp_path):
    path = write_config(tmp_path / "sub" / "a.toml",
                        manager={"url": "http://127.0.0.1:1", "batch_size": 3, "settle_s": 0.5},
                        engine={"input_dir": str(tmp_path), "model": 'q"uo\\te'},
                        runner={"extra_args": ["--x", "y z"]})
    conf = config_mod.load(path)
    assert conf.runner.kind == "simulate" and conf.manager.allow_simulated is True
    assert conf.manager.batch_size == 3 and conf.manager.settle_s == 0.5
    assert conf.engine.model == 'q"uo\\te' and conf.runner.extra_args == ["--x", "y z"]

    real = config_mod.load(write_config(tmp_path / "b.toml", runner={"kind": "script"},
                                        manager={"allow_simulated": False}))
    assert real.runner.kind == "script" and real.manager.allow_simulated is False
    plain = (write_config(tmp_path / "c.toml", simulate=False, engine={"polling_interval": 2.0})
             .read_text())
    assert "simulate" not in plain and "allow_simulated" not in plain


@pytest.mark.parametrize("value, error", [(math.nan, ValueError), ({"a": 1}, TypeError),
                                          (None, TypeError)])
def test_values_toml_cannot_hold_are_refused_by_name(tmp_path, value, error):
    with pytest.raises(error, match="engine.model"):
        write_config(tmp_path / "x.toml", engine={"model": value})
