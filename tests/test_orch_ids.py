"""Engine ids: one rule (`<engine.engine_id or hostname>-gpu<index>`, at most 64 characters)."""
from __future__ import annotations

from bcorch.config import from_mapping
from bcorch.ids import engine_id_for
from bcorch.orchestrator.gpus import virtual_gpus
from bcorch.orchestrator.supervisor import Supervisor
from bcorch.protocol import is_valid_id


def test_a_long_prefix_keeps_the_gpu_suffix():
    """Regression: a 59-character engine.engine_id lost `-gpuN` and every GPU had one id."""
    prefix = "p" * 59
    ids = [engine_id_for(i, prefix) for i in range(16)]
    assert len(set(ids)) == 16
    assert all(is_valid_id(i) and len(i) <= 64 for i in ids)
    assert ids[11] == "p" * 58 + "-gpu11"
    assert ids[3] == "p" * 59 + "-gpu3"


def test_supervisor_gives_every_gpu_its_own_id_with_a_long_configured_prefix():
    config = from_mapping({"engine": {"engine_id": "n" * 62}})
    sup = Supervisor(config, virtual_gpus(4), hostname="h")
    ids = [s.engine_id for s in sup.slots]
    assert len(set(ids)) == 4 and all(i.endswith(f"-gpu{n}") for n, i in enumerate(ids))


def test_the_hostname_is_the_prefix_when_none_is_configured():
    sup = Supervisor(from_mapping({}), virtual_gpus(2), hostname="node7")
    assert [s.engine_id for s in sup.slots] == ["node7-gpu0", "node7-gpu1"]
    assert engine_id_for(2, "rig") == "rig-gpu2"


def test_bcorch_engine_follows_the_same_rule(tmp_path):
    """`bcorch engine --gpu N` takes engine.engine_id as the prefix too; only --engine-id
    (and the supervisor's spawn spec) name a whole id."""
    from bcorch.workers.engine import BCEngine
    config = from_mapping({"engine": {"engine_id": "rig", "input_dir": str(tmp_path),
                                      "output_dir": str(tmp_path)},
                           "runner": {"kind": "simulate"}})
    assert BCEngine(None, 2, conf=config).engine_id == "rig-gpu2"
    assert BCEngine(None, 2, conf=config, engine_id="whole-id").engine_id == "whole-id"
