"""The engine -> orchestrator heartbeat contract (workers/channel.py)."""
from __future__ import annotations

from bcorch.workers.channel import EngineState, as_heartbeat, heartbeat

OLD_ENGINE_BEAT = {"type": "heartbeat", "engine_id": "host-gpu0", "state": "WORKING",
                   "job_id": "j000001-00aa", "batch_size": 4, "batch_elapsed_s": 2.5,
                   "basecaller_pid": 4321, "batches_done": 1, "files_done": 4,
                   "files_failed": 0, "last_error": ""}


def test_a_heartbeat_names_the_run_and_the_model_it_works_on():
    beat = heartbeat(engine_id="host-gpu0", state=EngineState.WORKING, job_id="j000001-00aa",
                     batch_size=4, batch_elapsed_s=2.5, basecaller_pid=4321, batches_done=1,
                     files_done=4, files_failed=0, last_error="", run_id="PAW12345",
                     model="sup,5mCG_5hmCG")
    assert (beat["run_id"], beat["model"]) == ("PAW12345", "sup,5mCG_5hmCG")
    assert as_heartbeat(dict(beat)) == beat


def test_an_older_engines_heartbeat_without_run_and_model_is_accepted():
    beat = as_heartbeat(dict(OLD_ENGINE_BEAT))
    assert beat is not None, "an engine of an older bcorch must still be heard"
    assert (beat["run_id"], beat["model"]) == (None, None)
    assert {k: beat[k] for k in OLD_ENGINE_BEAT} == OLD_ENGINE_BEAT


def test_a_heartbeat_without_a_required_key_is_refused_and_extra_keys_are_kept():
    missing = {k: v for k, v in OLD_ENGINE_BEAT.items() if k != "files_done"}
    assert as_heartbeat(missing) is None
    beat = as_heartbeat({**OLD_ENGINE_BEAT, "run_id": "r1", "model": "hac", "future_key": 7})
    assert beat is not None and (beat["run_id"], beat["model"], beat["future_key"]) == (
        "r1", "hac", 7)
