"""The manager's /metrics: Prometheus text format read from the real state, behind the token."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bcorch.orchestrator.pod5_dataset import write_dataset
from manager_helpers import assign, basecall, complete, start_manager, wait_counts, write_files
from support import ManagerProcess, http_json, wait_until

TOKEN = "s3cret-token"


def scrape(manager, token: str = TOKEN) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one real scrape."""
    req = urllib.request.Request(manager.url + "/metrics")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_needs_the_token(procs, tmp_path):
    manager = start_manager(procs, tmp_path, token=TOKEN)
    with pytest.raises(urllib.error.HTTPError) as err:
        scrape(manager, token="")
    assert err.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as err:
        scrape(manager, token="wrong")
    assert err.value.code == 401
    m = scrape(manager)
    assert m[("bcmanager_jobs_in_flight", ())] == 0
    assert m[("bcmanager_request_duration_seconds_count", (("code", "401"), ("route", "/metrics")))] == 2


def test_metrics_follow_assignments_completions_and_quarantine(procs, tmp_path):
    manager = start_manager(procs, tmp_path, token=TOKEN, batch_size=2, max_attempts=1)
    write_files(tmp_path / "in", [f"run/f{i}.pod5" for i in range(5)])
    wait_counts(manager, PENDING=5)
    m = scrape(manager)
    assert m[("bcmanager_files", (("state", "PENDING"),))] == 5
    assert m[("bcmanager_assignments_total", ())] == 0

    first = assign(manager, "gpu0")
    second = assign(manager, "gpu1")
    m = scrape(manager)
    assert m[("bcmanager_files", (("state", "ASSIGNED"),))] == 4
    assert m[("bcmanager_jobs_in_flight", ())] == 2
    assert m[("bcmanager_engine_jobs_in_flight", (("engine", "gpu0"),))] == 1
    assert m[("bcmanager_assignments_total", ())] == 2

    assert complete(manager, first["jobid"], "DONE")[0] == 200
    assert complete(manager, second["jobid"], "FAILED", reason="bad files")[0] == 200
    m = scrape(manager)
    assert m[("bcmanager_files", (("state", "DONE"),))] == 2
    assert m[("bcmanager_files_quarantined", ())] == 2
    assert m[("bcmanager_jobs_finished_total", (("state", "FAILED"),))] == 1
    assert m[("bcmanager_jobs_in_flight", ())] == 0
    assert ("bcmanager_engine_jobs_in_flight", (("engine", "gpu0"),)) not in m
    assigned = m[("bcmanager_request_duration_seconds_count",
                  (("code", "200"), ("route", "/assignwork")))]
    assert assigned == 2


def test_latency_histogram_counts_errors_and_bounds_route_labels(procs, tmp_path):
    manager = start_manager(procs, tmp_path, token=TOKEN)
    assert manager.get("/assignwork", engineid="bad/id")[0] == 400
    assert manager.get("/no-such-route-" + "x" * 50)[0] == 404
    m = scrape(manager)
    assert m[("bcmanager_request_duration_seconds_count",
              (("code", "400"), ("route", "/assignwork")))] == 1
    assert m[("bcmanager_request_duration_seconds_count", (("code", "404"), ("route", "other")))] == 1
    assert not any("no-such-route" in str(labels) for _, labels in m)


def test_live_page_has_its_own_route_label(procs, tmp_path):
    manager = start_manager(procs, tmp_path, token=TOKEN)
    for url, token, code in [("/", TOKEN, 200), ("/", "", 401), ("/?token=wrong", "", 401),
                             ("//", TOKEN, 404), ("/page-" + "x" * 30, TOKEN, 404)]:
        assert http_json(manager.url + url, token)[0] == code, url
    m = scrape(manager)
    assert m[("bcmanager_request_duration_seconds_count", (("code", "200"), ("route", "/")))] == 1
    assert m[("bcmanager_request_duration_seconds_count", (("code", "401"), ("route", "/")))] == 2
    assert m[("bcmanager_request_duration_seconds_count", (("code", "404"), ("route", "other")))] == 2
    assert ("bcmanager_request_duration_seconds_count", (("code", "404"), ("route", "/"))) not in m


def test_lease_expiry_is_counted(procs, tmp_path):
    manager = start_manager(procs, tmp_path, token=TOKEN, report_back_interval=1.0)
    write_files(tmp_path / "in", ["a.pod5"])
    wait_counts(manager, PENDING=1)
    assign(manager, "gpu0")
    wait_until(lambda: scrape(manager)[("bcmanager_lease_expiries_total", ())] == 1, 30,
               what="the expiry in /metrics")
    m = scrape(manager)
    assert m[("bcmanager_files", (("state", "PENDING"),))] == 1
    assert m[("bcmanager_jobs_in_flight", ())] == 0


def test_reads_are_counted_and_unknown_reads_are_told_apart_from_zero(procs, tmp_path):
    """bcmanager_reads_total{kind} sums what engines reported; bcmanager_read_jobs_total
    {reads} counts the DONE jobs that reported (known) and those that did not (unknown, an
    original engine): "0 reads" and "not reported" differ, and a FAILED job is in neither."""
    manager = start_manager(procs, tmp_path, token=TOKEN, batch_size=1, max_attempts=1)
    write_files(tmp_path / "in", [f"f{i}.pod5" for i in range(4)])
    wait_counts(manager, PENDING=4)
    m = scrape(manager)
    assert [m[("bcmanager_reads_total", (("kind", k),))] for k in ("pass", "fail")] == [0, 0]
    assert [m[("bcmanager_read_jobs_total", (("reads", k),))] for k in ("known", "unknown")] \
        == [0, 0]

    original = assign(manager, "gpu0")
    assert complete(manager, original["jobid"], "DONE")[0] == 200   # no counts: unknown
    m = scrape(manager)
    assert m[("bcmanager_reads_total", (("kind", "pass"),))] == 0
    assert m[("bcmanager_read_jobs_total", (("reads", "known"),))] == 0
    assert m[("bcmanager_read_jobs_total", (("reads", "unknown"),))] == 1

    for passed, failed in ((30, 4), (0, 0)):
        batch = assign(manager, "gpu1")
        assert complete(manager, batch["jobid"], "DONE", reads_pass=passed,
                        reads_fail=failed)[0] == 200
    failed_job = assign(manager, "gpu1")
    assert complete(manager, failed_job["jobid"], "FAILED", reason="bad", reads_pass=9,
                    reads_fail=9)[0] == 200
    m = scrape(manager)
    assert m[("bcmanager_reads_total", (("kind", "pass"),))] == 30
    assert m[("bcmanager_reads_total", (("kind", "fail"),))] == 4
    assert m[("bcmanager_read_jobs_total", (("reads", "known"),))] == 2
    assert m[("bcmanager_read_jobs_total", (("reads", "unknown"),))] == 1
    reads = http_json(manager.url + "/status", TOKEN)[1]["reads"]
    assert (reads["pass"], reads["fail"], reads["jobs_counted"], reads["jobs_done"]) == \
        (30, 4, 2, 3)


def _reads_metrics(manager) -> tuple[float, float, float, float]:
    m = scrape(manager)
    return (m[("bcmanager_reads_total", (("kind", "pass"),))],
            m[("bcmanager_reads_total", (("kind", "fail"),))],
            m[("bcmanager_read_jobs_total", (("reads", "known"),))],
            m[("bcmanager_read_jobs_total", (("reads", "unknown"),))])


def _status_reads(manager) -> tuple[float, float, float, float]:
    r = http_json(manager.url + "/status", TOKEN)[1]["reads"]
    return (r["pass"] or 0, r["fail"] or 0, r["jobs_counted"],
            r["jobs_done"] - r["jobs_counted"])


def test_reads_metrics_agree_with_status_after_a_rebuild_from_the_journal(procs, tmp_path):
    """A new database (another host) is rebuilt from the journal beside the outputs: its
    DONE jobs are counted in bcmanager_read_jobs_total whether their reads came back or
    not, and the metrics say what /status says."""
    write_dataset(tmp_path / "in", 3, reads_per_file=4, samples_per_read=400)
    manager = start_manager(procs, tmp_path, token=TOKEN, batch_size=1)
    wait_counts(manager, PENDING=3)
    for _ in range(3):
        batch = assign(manager, "h-gpu0")
        ids = basecall(batch, tmp_path)
        assert complete(manager, batch["jobid"], "DONE", reads_pass=len(ids) - 1,
                        reads_fail=1)[0] == 200
    assert _reads_metrics(manager) == _status_reads(manager) == (9, 3, 3, 0)
    manager.close()
    again = ManagerProcess(tmp_path, tmp_path / "in", tmp_path / "out", port=manager.port,
                           token=TOKEN, extra=["--db", str(tmp_path / "other-host.sqlite")])
    procs.append(again)
    again.start()
    assert again.status()["files"]["DONE"] == 3
    rebuilt = _reads_metrics(again)
    assert rebuilt == _status_reads(again)
    assert rebuilt[2] + rebuilt[3] == 3, rebuilt   # every DONE job: known or unknown
