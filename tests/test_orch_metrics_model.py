"""bcorch's metrics name the model each GPU basecalls with, never the run (unbounded)."""
from __future__ import annotations

from bcorch.orchestrator.metrics import SlotCollector


def _slot(gpu: int, **fields) -> dict:
    return {"gpu": gpu, "engine_id": f"h1-gpu{gpu}", "state": "RUNNING", "restarts": 0,
            "batches_done": 1, "files_done": 4, "batch_size": 4, "health": None,
            "job_id": None, "run_id": None, "model": None, **fields}


def test_metrics_name_the_model_of_each_busy_gpu_and_no_run():
    snapshot = {"host": "h1", "uptime_s": 5.0, "manager": {"reachable": True}, "slots": [
        _slot(0, job_id="j000001-aa", run_id="PAW12345", model="sup,5mCG_5hmCG"),
        _slot(1, job_id="j000002-bb", model="hac"),
        _slot(2)]}
    families = list(SlotCollector(lambda: snapshot).collect())
    models = {(s.labels["gpu"], s.labels["model"]): s.value
              for f in families if f.name == "bcorch_slot_model" for s in f.samples}
    assert models == {("0", "sup,5mCG_5hmCG"): 1.0, ("1", "hac"): 1.0}, "an idle GPU has none"
    labels = {name for f in families for s in f.samples for name in s.labels}
    assert "run" not in labels and "run_id" not in labels
