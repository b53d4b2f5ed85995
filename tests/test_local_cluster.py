"""The one config writer and the one local cluster that the demo, the benchmarks and the tests use."""
from __future__ import annotations

import math

import pytest

from bcorch import config as config_mod
from bcorch.config_writer import write_config
from bcorch.orchestrator.local_cluster import LocalCluster
from bcorch.orchestrator.pod5_dataset import write_dataset
from bcorch.workers.read_ids import read_ids_under
from support import wait_until


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


def test_local_cluster_runs_a_batch_and_close_stops_everything(tmp_path):
    cluster = LocalCluster(tmp_path, gpus=1, runner={"samples_per_s": 5e6})
    written = write_dataset(cluster.input_dir, 2, reads_per_file=3, samples_per_read=400)
    try:
        cluster.start_manager(wait_files=2)
        bcorch = cluster.start_bcorch()
        wait_until(lambda: cluster.all_done(2), 60, what=f"both files done\n{bcorch.log()[-2000:]}")
        assert bcorch.wait(60) == 0, bcorch.log()[-2000:]   # work_until_none_left, input closed
    finally:
        cluster.close()
    assert not cluster.manager.running() and cluster.manager.returncode == 0
    found = read_ids_under([cluster.output_dir / "pass", cluster.output_dir / "fail"])
    assert sorted(found) == sorted(r for ids in written.values() for r in ids)
    assert found.doubled() == []
