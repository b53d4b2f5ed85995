"""Machine-searched bad input against a real manager process: only 2xx/4xx, and the
queue is unharmed afterwards (counts add up, every job can still be finished, a
normal round trip still works). Extends test_manager_input (one-field fuzzing) with
repeated parameters, any JSON body shape, wrong content types and odd headers."""
from __future__ import annotations

import http.client
import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from manager_helpers import assign, basecall, complete, start_manager, wait_counts
from bcorch.orchestrator.pod5_dataset import write_dataset

TOKEN = "fuzz-token"
N_FILES = 4
ROUTES = ["/assignwork", "/keepalive", "/completed", "/files", "/status", "/heartbeat",
          "/close-input", "/metrics", "/assignwork/", "/nope"]
FIELDS = ["engineid", "batchsize", "job_id", "job_state", "failed_files", "reason", "state",
          "limit"]

_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF,
                                       exclude_categories=("Cs",)), max_size=40)
_nasty = st.sampled_from(["../../etc/passwd", "..", "/", "a/../b", "%2e%2e", "\x00", "DONE",
                          "PROCESSING", "STOPPED", "PENDING", "0", "-1", "1e9", "99999999999",
                          "9" * 400, "gpu0", "j000001-0000", "", " ", "é", "🧬" * 30])
_scalar = st.one_of(_nasty, _text, st.integers(-2 ** 80, 2 ** 80), st.floats(),
                    st.booleans(), st.none())
_json = st.recursive(_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(FIELDS), _text),
                                                 inner, max_size=4)), max_leaves=12)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from support import ManagerProcess
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "in").mkdir()
    (tmp / "out").mkdir()
    write_dataset(tmp / "in", N_FILES, reads_per_file=2, samples_per_read=1000)
    m = ManagerProcess(tmp, tmp / "in", tmp / "out", token=TOKEN, batch_size=2)
    try:
        m.start()
        wait_counts(m, PENDING=N_FILES)
        yield m, tmp
    finally:
        m.close()


def send(m, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", m.port, timeout=10)
    try:
        conn.request(method, path, body=body,
                     headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _query(pairs) -> str:
    return "&".join(f"{quote(str(k), safe='')}={quote(v if isinstance(v, str) else json.dumps(v), safe='')}"
                    for k, v in pairs)


def _stop_every_live_job(m, tmp) -> None:
    # /status shows job id prefixes only (the id is the lease's capability): read the live
    # ids from the job directories, as someone with access to OUTPUT_DIR could.
    for job_dir in (tmp / "out").glob("TMPOUTPUT_*"):
        job = job_dir.name[len("TMPOUTPUT_"):].split("_", 1)[0]
        assert complete(m, job, "STOPPED")[0] == 200


def test_any_request_is_2xx_or_4xx_and_the_queue_survives(site):
    m, tmp = site
    live = assign(m, "fuzz-holder", 1)["jobid"]  # a real job id for the fuzzer to poke at
    ids = st.sampled_from([live, "fuzz-holder", "j999999-beef"])
    value = st.one_of(_json, ids)

    @settings(max_examples=250, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(route=st.sampled_from(ROUTES),
           pairs=st.lists(st.tuples(st.one_of(st.sampled_from(FIELDS), _text), value),
                          max_size=8),
           body=st.one_of(st.none(), _json.map(json.dumps), st.binary(max_size=300)),
           method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "OPTIONS"]),
           content_type=st.sampled_from(["application/json", "text/plain",
                                         "application/x-www-form-urlencoded",
                                         "multipart/form-data; boundary=x", "", "\u00ff"]))
    def fuzz(route, pairs, body, method, content_type):
        data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
        headers = {"Content-Type": content_type} if content_type.isascii() else {}
        code, _ = send(m, method, f"{route}?{_query(pairs)}", data if method != "GET" else None,
                       headers)
        assert code < 500, (method, route, pairs, body)

    fuzz()
    _check_unharmed(m, tmp)


def test_odd_framing_is_4xx(site):
    m, tmp = site
    for headers, body in [({"Content-Length": "-5"}, b""), ({"Content-Length": "abc"}, b""),
                          ({"Content-Length": str(10 ** 12)}, b"{}"),
                          ({"Content-Type": "application/json"}, b"[" * 50_000 + b"]" * 50_000),
                          ({"Content-Type": "application/json"}, json.dumps("a string").encode()),
                          ({"Content-Type": "application/json"}, b"\x00" * 1000),
                          ({"Content-Type": "application/json"}, b"{\"engineid\": \"\\ud800\"}")]:
        try:
            code, data = send(m, "POST", "/assignwork", body, headers)
        except (http.client.HTTPException, ConnectionError):
            continue  # the server may refuse to read a body it cannot frame: that is fine
        assert 400 <= code < 500, (headers, body[:40], data[:200])
    _check_unharmed(m, tmp)


def _check_unharmed(m, tmp) -> None:
    _stop_every_live_job(m, tmp)
    files = m.status()["files"]
    assert sum(files.values()) == N_FILES and files["ASSIGNED"] == 0, files
    # a normal round trip still works, with real POD5 files
    batch = assign(m, "after-fuzz", 1)
    assert batch["batch_size"] == 1
    ids = basecall(batch, tmp)
    assert ids and complete(m, batch["jobid"], "DONE") == (200, {"ok": True})
    assert m.status()["files"]["DONE"] >= 1
