"""Bad input over real HTTP: every answer is a 4xx with a one-line reason, never a 5xx."""
from __future__ import annotations

import http.client
import json
import socket

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from manager_helpers import assign, start_manager, wait_counts, write_files

TOKEN = "t0ken-for-tests"


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    from support import ManagerProcess  # module scope: one server for the whole table
    tmp = tmp_path_factory.mktemp("mgr")
    (tmp / "in").mkdir()
    (tmp / "out").mkdir()
    write_files(tmp / "in", [f"r{i}.pod5" for i in range(3)])
    m = ManagerProcess(tmp, tmp / "in", tmp / "out", token=TOKEN)
    try:
        m.start()
        wait_counts(m, PENDING=3)
        yield m
    finally:
        m.close()


def raw(m, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN,
        headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", m.port, timeout=10)
    try:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, data
    finally:
        conn.close()


BAD = [
    ("GET", "/assignwork", None, 400, "engineid is required"),
    ("GET", "/assignwork?engineid=../../etc", None, 400, "engineid must match"),
    ("GET", "/assignwork?engineid=a/b", None, 400, "engineid must match"),
    ("GET", "/assignwork?engineid=..", None, 400, "engineid must match"),
    ("GET", "/assignwork?engineid=" + "x" * 65, None, 400, "engineid must match"),
    ("GET", "/assignwork?engineid=gpu%00", None, 400, "engineid must match"),
    ("GET", "/assignwork?engineid=a&engineid=b", None, 400, "given 2 times"),
    ("GET", "/assignwork?engineid=a&batchsize=abc", None, 400, "batchsize must be an integer"),
    ("GET", "/assignwork?engineid=a&batchsize=10001", None, 400, "from 0 to 10000"),
    ("GET", "/assignwork?engineid=a&batchsize=-1", None, 400, "batchsize"),
    ("GET", "/assignwork?engineid=a&batchsize=1.5", None, 400, "batchsize"),
    ("GET", "/assignwork?engineid=a&batchsize=99999999999999999999", None, 400, "batchsize"),
    ("POST", "/assignwork", b'{"engineid": "a", "batchsize": true}', 400, "batchsize"),
    ("POST", "/assignwork", b'{"engineid": 7}', 400, "engineid must match"),
    ("POST", "/assignwork", b'{"engineid": "a"', 400, "not valid JSON"),
    ("POST", "/assignwork", b'["engineid"]', 400, "JSON object"),
    ("POST", "/assignwork", b'\xff\xfe', 400, "not valid JSON"),
    ("GET", "/keepalive?job_id=j1", None, 400, "job_state is required"),
    ("GET", "/keepalive?job_id=../j1&job_state=STARTED", None, 400, "job_id must match"),
    ("GET", "/keepalive?job_id=j1&job_state=DONE", None, 400, "job_state must be one of"),
    ("GET", "/keepalive?job_id=j1&job_state=BOGUS", None, 400, "job_state must be one of"),
    ("GET", "/completed?job_id=j1&job_state=PROCESSING", None, 400, "job_state must be one of"),
    ("GET", "/completed?job_id=j1&job_state=DONE&failed_files=../../x.pod5", None, 400,
     "failed_files entry"),
    ("POST", "/completed", b'{"job_id": "j1", "job_state": "DONE", "failed_files": 3}', 400,
     "failed_files must be"),
    ("POST", "/completed", b'{"job_id": "j1", "job_state": "FAILED", "reason": ["x"]}', 400,
     "reason must be a string"),
    ("POST", "/completed", b'{"job_id": "j1", "job_state": "DONE", '
                           b'"failed_files": {"a.pod5": 5}}', 400, "must be a string"),
    ("GET", "/files?state=NOPE", None, 400, "state must be one of"),
    ("GET", "/files?state=DONE&limit=0", None, 400, "limit"),
    ("GET", "/nothing", None, 404, "no route"),
    ("GET", "/../status", None, 404, "no route"),
    ("GET", "/status/../../etc/passwd", None, 404, "no route"),
    ("GET", "/%2e%2e/status", None, 404, "no route"),
    ("DELETE", "/status", None, 405, "accepts"),
    ("PUT", "/assignwork", b"{}", 405, "accepts"),
    ("GET", "/close-input", None, 405, "accepts"),
]


@pytest.mark.parametrize("method,path,body,status,reason", BAD,
                         ids=[f"{m} {p[:40]}" for m, p, *_ in BAD])
def test_bad_requests_get_4xx_with_a_reason(manager, method, path, body, status, reason):
    code, data = raw(manager, method, path, body,
                     headers={"Content-Type": "application/json"} if body else None)
    assert code == status, data
    error = json.loads(data)["error"]
    assert reason in error and "\n" not in error


def test_unknown_job_is_late_not_an_error(manager):
    code, data = raw(manager, "GET", "/keepalive?job_id=j999999-ffff&job_state=PROCESSING")
    assert (code, json.loads(data)) == (200, {"late": True})
    code, data = raw(manager, "GET", "/completed?job_id=j999999-ffff&job_state=DONE")
    assert (code, json.loads(data)) == (200, {"ok": False, "late": True})


def test_unknown_failed_file_is_400_and_changes_nothing(manager):
    batch = assign(manager, "gpu-bad", 1)
    body = json.dumps({"job_id": batch["jobid"], "job_state": "DONE",
                       "failed_files": ["0099_not-in-batch.pod5"]}).encode()
    code, data = raw(manager, "POST", "/completed", body)
    assert code == 400 and "not in job" in json.loads(data)["error"]
    code, data = raw(manager, "GET", f"/keepalive?job_id={batch['jobid']}&job_state=PROCESSING")
    assert json.loads(data) == {"late": False}
    code, data = raw(manager, "GET", f"/completed?job_id={batch['jobid']}&job_state=STOPPED")
    assert json.loads(data) == {"ok": True}


@pytest.mark.parametrize("token", [None, "", "wrong", TOKEN + "x", TOKEN[:-1]])
def test_every_route_but_heartbeat_needs_the_token(manager, token):
    for method, path in [("GET", "/assignwork?engineid=a"), ("GET", "/status"),
                         ("GET", "/keepalive?job_id=j1&job_state=STARTED"),
                         ("GET", "/completed?job_id=j1&job_state=DONE"),
                         ("GET", "/files?state=DONE"), ("POST", "/close-input")]:
        code, data = raw(manager, method, path, b"{}" if method == "POST" else None, token=token)
        assert code == 401, (path, data)
    code, data = raw(manager, "GET", "/heartbeat", token=None)
    assert code == 200 and json.loads(data)["status"] == "ok"
    code, data = raw(manager, "GET", "/status")
    assert code == 200 and TOKEN not in data.decode()


def test_oversized_body_is_413_without_reading_it(manager):
    """Headers announce 2 MiB; the answer must come before (and without) the body."""
    with socket.create_connection(("127.0.0.1", manager.port), timeout=10) as sock:
        sock.sendall(b"POST /completed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                     b"Content-Length: " + str(2 << 20).encode() + b"\r\n\r\n{")
        status_line = sock.makefile("rb").readline()
    assert status_line.split()[1] == b"413", status_line
    assert raw(manager, "GET", "/status")[0] == 200


def test_token_never_logged(manager):
    raw(manager, "GET", "/status", token="wrong-guess")
    assert TOKEN not in manager.log() and "wrong-guess" not in manager.log()


_param = st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0x2FFF), max_size=80)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(["/assignwork", "/keepalive", "/completed", "/files"]),
       fields=st.dictionaries(st.sampled_from(["engineid", "batchsize", "job_id", "job_state",
                                               "failed_files", "reason", "state", "limit"]),
                              st.one_of(_param, st.integers(-2**70, 2**70), st.booleans(),
                                        st.none(), st.lists(_param, max_size=3),
                                        st.dictionaries(_param, _param, max_size=2)),
                              max_size=5),
       as_post=st.booleans())
def test_no_input_makes_a_5xx(manager, route, fields, as_post):
    if as_post:
        code, _ = raw(manager, "POST", route, json.dumps(fields).encode(),
                      headers={"Content-Type": "application/json"})
    else:
        from urllib.parse import urlencode
        flat = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in fields.items()}
        code, _ = raw(manager, "GET", route + "?" + urlencode(flat))
    assert code < 500
