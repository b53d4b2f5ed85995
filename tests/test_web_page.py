"""The live page (manager/web_page.py): log-in cookie, what it authorises, /live, the history."""
from __future__ import annotations

import http.client
import re
import sys
from urllib.parse import urlsplit

from manager_helpers import assign, start_manager, wait_counts, write_files
from support import REPO, wait_until
from bcorch.manager.live_history import MINUTE_S, SAMPLE_EVERY_S, ThroughputHistory
from bcorch.manager.web_page import COOKIE, LivePage, engine_place, engine_state, load_page

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

TOKEN = "s3cret-token-Zq81"


def request(url: str, path: str, method: str = "GET", headers: dict | None = None,
            body: bytes | None = None) -> tuple[int, dict[str, list[str]], bytes]:
    """One request, redirects not followed: (status, headers by lower-case name, body)."""
    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        seen: dict[str, list[str]] = {}
        for name, value in resp.getheaders():
            seen.setdefault(name.lower(), []).append(value)
        return resp.status, seen, resp.read()
    finally:
        conn.close()


def log_in(url: str) -> str:
    """`/?token=` once: the cookie header the browser would send afterwards."""
    status, headers, _ = request(url, f"/?token={TOKEN}")
    assert status == 303, headers
    (set_cookie,) = headers["set-cookie"]
    return set_cookie.split(";", 1)[0]


def test_token_once_sets_an_httponly_strict_cookie_that_is_not_the_token(procs, tmp_path):
    m = start_manager(procs, tmp_path, token=TOKEN)
    status, headers, body = request(m.url, f"/?token={TOKEN}")
    assert status == 303 and headers["location"] == ["/"] and body == b""
    (set_cookie,) = headers["set-cookie"]
    attributes = [a.strip() for a in set_cookie.split(";")]
    name, value = attributes[0].split("=", 1)
    assert name == COOKIE and re.fullmatch(r"[0-9a-f]{64}", value)
    assert TOKEN not in set_cookie
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(attributes[1:])

    status, headers, page = request(m.url, "/", headers={"Cookie": attributes[0]})
    assert status == 200 and headers["content-type"] == ["text/html; charset=utf-8"]
    assert b"<canvas" in page or b"canvas" in page
    assert TOKEN.encode() not in page
    assert "script-src 'sha256-" in headers["content-security-policy"][0]


def test_the_cookie_authorises_only_the_pages_read_only_routes(procs, tmp_path):
    m = start_manager(procs, tmp_path, token=TOKEN)
    cookie = {"Cookie": log_in(m.url)}
    for path in ("/status", "/live", "/files?state=QUARANTINED"):
        status, _, body = request(m.url, path, headers=cookie)
        assert status == 200, (path, body)
        assert request(m.url, path)[0] == 401, path
    for method, path in (("GET", "/assignwork?engineid=e-gpu0"), ("GET", "/metrics"),
                         ("POST", "/close-input")):
        status, _, body = request(m.url, path, method, headers=cookie)
        assert status == 401, (path, body)
    among_others = {"Cookie": f'theme="dark\\"; a b=c; {cookie["Cookie"]}; x=1'}
    assert request(m.url, "/status", headers=among_others)[0] == 200
    assert m.status()["input_closed"] is False   # the bearer token still works, unchanged
    forged = {"Cookie": f"{COOKIE}={TOKEN}"}
    assert request(m.url, "/status", headers=forged)[0] == 401
    assert request(m.url, "/", headers=forged)[0] == 401


def test_a_wrong_or_missing_token_is_a_one_line_401_and_no_token_reaches_the_log(procs, tmp_path):
    m = start_manager(procs, tmp_path, token=TOKEN, extra=("--log-level", "DEBUG"))
    wrong = "not-the-token-Xy7"
    for path in ("/", f"/?token={wrong}", "/?token=", f"/?token={TOKEN}&token={TOKEN}"):
        status, headers, body = request(m.url, path)
        assert status == 401 and "set-cookie" not in headers, path
        assert body.count(b"\n") == 1 and b"/?token=" in body, body
    assert request(m.url, "/", "POST")[0] == 405
    log_in(m.url)
    text = m.log()
    assert "401" in text                        # the refusals are logged ...
    assert TOKEN not in text and wrong not in text   # ... without the query string


def test_without_a_token_the_page_is_open_and_a_token_in_the_url_is_dropped(procs, tmp_path):
    m = start_manager(procs, tmp_path)
    status, headers, page = request(m.url, "/?token=anything")
    assert status == 303 and headers["location"] == ["/"] and "set-cookie" not in headers
    status, headers, page = request(m.url, "/")
    assert status == 200 and b"<title>bcmanager" in page
    assert request(m.url, "/", "HEAD")[2] == b""


def test_live_names_each_engines_host_gpu_state_and_job(procs, tmp_path):
    m = start_manager(procs, tmp_path, token=TOKEN)
    write_files(tmp_path / "in", [f"f{i}.pod5" for i in range(3)])
    wait_counts(m, PENDING=3)
    assert assign(m, "hostA-gpu3", 1)["batch_size"] == 1
    assign(m, "odd_engine", 0)            # the rest
    assert assign(m, "idle-gpu0", 0)["batch_size"] == 0
    code, live = m.get("/live")
    assert code == 200, live
    status = m.status()
    engines = {e["id"]: e for e in live["engines"]}
    a = engines["hostA-gpu3"]
    assert (a["host"], a["gpu"], a["state"], a["jobs"]) == ("hostA", "3", "BUSY", 1)
    assert [a["job"]] == status["jobs"]["hostA-gpu3"]
    assert 0 <= a["job_age_s"] < 60
    odd = engines["odd_engine"]
    assert (odd["host"], odd["gpu"], odd["state"]) == ("odd_engine", "", "BUSY")
    idle = engines["idle-gpu0"]
    assert (idle["host"], idle["gpu"], idle["state"], idle["job"]) == ("idle", "0", "IDLE", None)
    history = live["history"][""]
    assert len(history["files"]) == len(history["bytes"]) == 61


def test_engine_ids_give_host_and_gpu():
    assert engine_place("node-07.cluster-gpu12") == ("node-07.cluster", "12")
    assert engine_place("a-gpu1-gpu0") == ("a-gpu1", "0")
    assert engine_place("gpu0") == ("gpu0", "")
    assert engine_state(1, 10_000, 60) == "BUSY"
    assert engine_state(0, 30, 15) == "IDLE"
    assert engine_state(0, 100, 60) == "IDLE"     # within two lease intervals
    assert engine_state(0, 121, 60) == "GONE"


def test_throughput_history_is_per_minute_over_the_last_hour():
    h = ThroughputHistory()
    start = 1_000_000 * MINUTE_S          # a minute boundary
    for second in range(0, 10 * MINUTE_S + 1, 5):   # 2 files a minute, 10 minutes
        h.record(start + second, second // 30, second * 100)
    now = start + 10 * MINUTE_S + 30
    minutes = h.per_minute(now)
    assert len(minutes["files"]) == 61 and minutes["start"] == start + 10 * MINUTE_S - 60 * MINUTE_S
    assert minutes["files"][:50] == [None] * 50               # before the first sample
    assert minutes["files"][50:60] == [2.0] * 10
    assert minutes["bytes"][50:60] == [6000] * 10
    assert minutes["files"][60] == 0.0    # the current minute: nothing since the last sample
    for second in range(0, 60):           # polled every second: thinned, the counts exact
        h.record(now + second, 21 + second // 6, 0)
    assert len(h._samples) <= 121 + 60 // 2 + 1        # at most one sample per 2 s
    assert h.per_minute(now + 60)["files"][-2:] == [6.0, 4.0]   # 20 -> 26 -> 30 (at +59 s)
    h.record(now + 2 * 3600, 0, 0)         # two hours later, counts restarted: old samples gone
    assert h.per_minute(now + 2 * 3600)["files"] == [None] * 60 + [0.0]


def test_the_page_ships_in_the_package_and_its_csp_admits_only_its_own_code():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "static/*.html" in data["tool"]["setuptools"]["package-data"]["bcorch.manager"]
    assert (REPO / "manager" / "static" / "page.html").is_file()
    page = load_page()
    html = page.html.decode()
    assert "http://" not in html and "https://" not in html     # no CDN, nothing external
    assert page.csp.count("'sha256-") == 2 and "unsafe" not in page.csp
    assert "innerHTML" not in html    # file names and reasons are shown as text, never markup


class _Facility:
    """Just what LivePage reads of a facility's /status (docs: facility.md, Status)."""

    def __init__(self):
        self.done = {"run-a": 0, "run-b": 0}

    def status(self) -> dict:
        return {"runs": [{"run_id": r, "progress": {"files_done": n, "bytes_done": 10 * n}}
                         for r, n in self.done.items()],
                "engines": {"h1-gpu0": {"last_seen": 0.0, "jobs_in_flight": 1}},
                "jobs": {"h1-gpu0": ["j000001-abcd"]}, "report_back_interval": 60}


def test_live_keeps_a_history_per_run_of_a_facility():
    facility, clock = _Facility(), [60_000.0 * MINUTE_S + 10]
    page = LivePage(facility, clock=lambda: clock[0], monotonic=lambda: clock[0])
    page.live()
    facility.done = {"run-a": 6, "run-b": 1}
    clock[0] += 30
    body = page.live().body
    assert set(body["history"]) == {"run-a", "run-b"}
    history = body["history"]
    assert history["run-a"]["files"][-1] == 6 and history["run-b"]["bytes"][-1] == 10
    (engine,) = body["engines"]
    assert (engine["host"], engine["gpu"], engine["job"], engine["job_age_s"]) == \
        ("h1", "0", "j000001-abcd", 30)
    del facility.done["run-b"]
    assert set(page.live().body["history"]) == {"run-a"}   # a run gone from /status: forgotten


def test_requests_sample_status_in_the_background_at_most_every_few_seconds():
    facility, clock, calls = _Facility(), [1000.0], []
    facility.status = lambda: calls.append(clock[0]) or _Facility.status(facility)
    page = LivePage(facility, clock=lambda: clock[0], monotonic=lambda: clock[0])
    for _ in range(5):          # a burst of engine requests: one sample
        page.sample()
    wait_until(lambda: len(calls) == 1, 10, what="the first sample")
    clock[0] += SAMPLE_EVERY_S
    page.sample()
    wait_until(lambda: len(calls) == 2, 10, what="the next sample")
    assert len(calls) == 2
    assert set(page.live().body["history"]) == {"run-a", "run-b"}


def test_throughput_history_has_reads_per_minute_and_none_while_unknown():
    h = ThroughputHistory()
    start = 1_000_000 * MINUTE_S
    for second in range(0, 5 * MINUTE_S + 1, 5):   # 2 files and 300 reads a minute
        h.record(start + second, second // 30, 0, second * 5)
    minutes = h.per_minute(start + 5 * MINUTE_S + 10)
    assert minutes["reads"][55:60] == [300.0] * 5 and len(minutes["reads"]) == 61
    assert minutes["reads"][:55] == [None] * 55
    unknown = ThroughputHistory()             # an engine that does not count: no reads line
    for second in range(0, 3 * MINUTE_S + 1, 5):
        unknown.record(start + second, second // 30, 0, None)
    counted = unknown.per_minute(start + 3 * MINUTE_S + 10)
    assert counted["files"][57:60] == [2.0] * 3
    assert counted["reads"] == [None] * 61


class _CountingFacility(_Facility):
    """A facility whose run-a reports its reads and run-b does not."""

    def __init__(self):
        super().__init__()
        self.reads = {"run-a": 0, "run-b": None}

    def status(self) -> dict:
        status = super().status()
        for run in status["runs"]:
            run["reads"] = {"total": self.reads[run["run_id"]]}
        return status


def test_live_has_reads_per_minute_of_each_run_that_reports_them():
    facility, clock = _CountingFacility(), [60_000.0 * MINUTE_S + 10]
    page = LivePage(facility, clock=lambda: clock[0], monotonic=lambda: clock[0])
    page.live()
    facility.done, facility.reads = {"run-a": 2, "run-b": 1}, {"run-a": 40, "run-b": None}
    clock[0] += 30
    history = page.live().body["history"]
    assert history["run-a"]["reads"][-1] == 40
    assert history["run-b"]["reads"][-1] is None and history["run-b"]["files"][-1] == 1


def test_live_has_reads_of_a_single_run_manager(procs, tmp_path):
    m = start_manager(procs, tmp_path)
    write_files(tmp_path / "in", ["a.pod5", "b.pod5"])
    wait_counts(m, PENDING=2)
    code, live = m.get("/live")
    reads = [r for r in live["history"][""]["reads"] if r is not None]
    assert code == 200 and reads and sum(reads) == 0     # 0 reads, known: nothing done yet
    batch = assign(m, "h-gpu0", 2)
    code, _ = m.get("/completed", job_id=batch["jobid"], job_state="DONE", reads_pass=7,
                    reads_fail=1)
    assert code == 200
    code, live = m.get("/live")
    assert code == 200   # a minute's edge may split them in two minutes (each rounded)
    assert abs(sum(r for r in live["history"][""]["reads"] if r is not None) - 8) <= 0.15
