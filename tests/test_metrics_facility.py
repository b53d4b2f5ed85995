"""A facility's /metrics per run (issue 16): read counts with a `run` label, from a run's
store while it is served and from its bcorch_summary.json once it is COMPLETE.

A real `bcmanager --watch-root` on loopback, real POD5 files in the MinKNOW layout; the
test plays the engine by hand (tests/test_facility.py helpers).
"""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from test_facility import assign, basecall, make_run, pending, started, wait_runs
from test_facility import root  # noqa: F401 - the fixture


def scrape(fac) -> dict[tuple[str, tuple], float]:
    code, text = fac.get("/metrics")
    assert code == 200, text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def run_reads(m: dict, run_id: str) -> dict[str, float]:
    """{pass, fail, known, unknown} of one run in a scrape."""
    return {**{kind: m[("bcmanager_reads_total", (("kind", kind), ("run", run_id)))]
               for kind in ("pass", "fail")},
            **{reads: m[("bcmanager_read_jobs_total", (("reads", reads), ("run", run_id)))]
               for reads in ("known", "unknown")}}


def test_reads_per_run_while_served_and_once_complete(procs, tmp_path, root):
    """Run 1's batches report their reads (one read each to fail/), run 2's do not (an
    original engine): each run's counters say so, and run 1's stay the same once it is
    COMPLETE and answered from its summary; summed over runs they are /status's reads."""
    fac = started(procs, tmp_path, root)
    counted, _ = make_run(root, 1, 2, reads=3)
    unknown, _ = make_run(root, 2, 1, reads=2)
    wait_runs(fac, lambda r: pending(r, counted) == 2 and pending(r, unknown) == 1,
              "both runs found")
    for _ in range(3):
        batch = assign(fac, size=1)
        assert batch["batch_size"] == 1, batch
        written = basecall(fac, batch)
        fields = {"job_id": batch["jobid"], "job_state": "DONE"}
        if batch["run_id"] == counted:
            fields.update(reads_pass=len(written) - 1, reads_fail=1)
        code, body = fac.get("/completed", **fields)
        assert (code, body) == (200, {"ok": True})

    served = scrape(fac)
    assert run_reads(served, counted) == {"pass": 4, "fail": 2, "known": 2, "unknown": 0}
    assert run_reads(served, unknown) == {"pass": 0, "fail": 0, "known": 0, "unknown": 1}
    reads = fac.get("/status")[1]["reads"]
    assert (reads["pass"], reads["fail"], reads["jobs_counted"], reads["jobs_done"]) == \
        (4, 2, 2, 3)

    code, body = fac.post("/runs/close", {"run": counted})
    assert code == 200, body
    wait_runs(fac, lambda r: r[counted]["state"] == "COMPLETE", "run 1 COMPLETE")
    settled = scrape(fac)
    assert settled[("bcmanager_run_state", (("run", counted), ("state", "COMPLETE")))] == 1
    assert run_reads(settled, counted) == run_reads(served, counted)
    assert run_reads(settled, unknown) == run_reads(served, unknown)
