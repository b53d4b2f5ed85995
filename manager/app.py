"""The WSGI application: routes, parameter parsing and validation, bearer-token auth.

Routes take GET query parameters (as the original BCManager) or a POST JSON object
with the same fields. Every problem with a request is a 4xx with a one-line
{"error": ...}; a 500 means a bug in the manager and is logged with its traceback.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs

from bcorch.protocol import (MAX_BATCH_SIZE, RATE_FIELD, READS_FAIL_FIELD, READS_PASS_FIELD,
                              SIMULATED_FIELD, STARTUP_FIELD, JobState as WireState,
                              ProtocolError, parse_flag, parse_job_state, parse_pace_value,
                              parse_read_count, short_job_id, validate_file_name, validate_id)

from .auth import TokenAuth
from .facility import Facility, UnknownRun
from .facility_app import run_routes
from .facility_metrics import FacilityMetrics
from .metrics import CollectorMetrics, Metrics
from .service import Answer, Manager
from .states import FileState
from .store import ReadCount, UnknownFailedFile
from .web_page import LivePage

log = logging.getLogger("bcmanager.http")

MAX_BODY = 1 << 20
MAX_REASON = 1000
MAX_LIST_LIMIT = 100_000
MAX_WAIT_S = 30
HOLD_KEY = "bcorch.hold_s"   # environ: the server may hold this answer that long (Held)
_INT_RE = re.compile(r"[0-9]{1,7}")
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
            403: "Forbidden", 500: "Internal Server Error", 503: "Service Unavailable"}

StartResponse = Callable[..., Any]


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()):
        super().__init__(message)
        self.status = status
        self.headers = list(headers)


@dataclass(frozen=True)
class RawAnswer:
    """A non-JSON answer (the Prometheus text format of /metrics)."""

    payload: bytes
    content_type: str


@dataclass(frozen=True)
class Held:
    """An empty /assignwork answer that the server may hold up to `seconds`, asking the app
    again whenever work may be ready (a long poll; manager.asgi). A server that cannot hold
    requests sends the answer at once."""

    answer: Answer
    seconds: float


class Params:
    """The request's fields, from the query string and (for POST) a JSON object body."""

    def __init__(self, values: dict[str, list[Any]]):
        self._values = values

    def one(self, name: str, required: bool = True) -> Any:
        values = self._values.get(name)
        if not values:
            if required:
                raise HTTPError(400, f"parameter {name} is required")
            return None
        if len(values) > 1:
            raise HTTPError(400, f"parameter {name} is given {len(values)} times")
        return values[0]

    def many(self, name: str) -> list[Any]:
        return self._values.get(name, [])


def _every_run(params: Params) -> bool:
    """The `runs` parameter of /status and /metrics: 'all' lists a facility's every run,
    'recent' (the default) leaves out runs settled before facility.shown_settled_s; one
    run's manager has no others."""
    which = params.one("runs", required=False)
    if which not in (None, "all", "recent"):
        raise HTTPError(400, f"parameter runs must be 'all' (every run) or 'recent' "
                             f"(the default), got {str(which)[:40]!r}")
    return which == "all"


def _int_param(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _INT_RE.fullmatch(value):
        number = int(value)
    else:
        raise HTTPError(400, f"parameter {name} must be an integer from {low} to {high}, "
                             f"got {str(value)[:40]!r}")
    if not low <= number <= high:
        raise HTTPError(400, f"parameter {name} must be an integer from {low} to {high}, got {number}")
    return number


def _checked(check: Callable[[Any, str], Any], value: Any, name: str) -> Any:
    try:
        return check(value, name)
    except ProtocolError as exc:
        raise HTTPError(400, f"parameter {exc}") from None


def _failed_files(params: Params) -> dict[str, str]:
    """failed_files: JSON list or {name: reason}; GET repeated params or comma-separated."""
    raw = params.many("failed_files")
    items: dict[str, str] = {}
    for value in raw:
        if isinstance(value, dict):
            pairs = list(value.items())
        elif isinstance(value, list):
            pairs = [(v, "") for v in value]
        elif isinstance(value, str):
            pairs = [(v, "") for v in value.split(",") if v]
        else:
            raise HTTPError(400, "parameter failed_files must be a list of file names "
                                 "or an object {name: reason}")
        for name, why in pairs:
            _checked(validate_file_name, name, "failed_files entry")
            if not isinstance(why, str):
                raise HTTPError(400, f"parameter failed_files: the reason for {name!r} "
                                     "must be a string")
            items[name] = why[:MAX_REASON]
    if len(items) > MAX_BATCH_SIZE:
        raise HTTPError(400, f"parameter failed_files names more than {MAX_BATCH_SIZE} files")
    return items


def _holder_named(params: Params) -> str | None:
    """The optional engineid of /keepalive and /completed: it must be the job's holder."""
    value = params.one("engineid", required=False)
    return None if value is None else _checked(validate_id, value, "engineid")


def _pace_value(params: Params, name: str) -> float | None:
    value = params.one(name, required=False)
    return None if value is None else _checked(parse_pace_value, value, name)


def _read_count(params: Params) -> ReadCount | None:
    """reads_pass and reads_fail of a completion: both, or neither (reads unknown)."""
    values = {name: params.one(name, required=False)
              for name in (READS_PASS_FIELD, READS_FAIL_FIELD)}
    missing = [name for name, value in values.items() if value is None]
    if len(missing) == 2:
        return None
    if missing:
        other = READS_FAIL_FIELD if missing[0] == READS_PASS_FIELD else READS_PASS_FIELD
        raise HTTPError(400, f"parameter {missing[0]} is missing: it is sent together with "
                             f"{other}")
    return ReadCount(*(_checked(parse_read_count, value, name)
                       for name, value in values.items()))


def _simulated(params: Params) -> bool:
    value = params.one(SIMULATED_FIELD, required=False)
    return False if value is None else _checked(parse_flag, value, SIMULATED_FIELD)


class App:
    """Serves a Manager (single-run mode) or a Facility (facility mode: /runs routes too)."""

    def __init__(self, manager: Manager | Facility, token: str = ""):
        self.manager = manager
        self.auth = TokenAuth(token)
        self.page = LivePage(manager, self.auth)   # GET / and /live (manager.web_page)
        self.routes: dict[str, tuple[frozenset[str], bool, Callable[[Params], Answer]]] = {
            "/assignwork": (frozenset({"GET", "POST"}), True, self.assignwork),
            "/keepalive": (frozenset({"GET", "POST"}), True, self.keepalive),
            "/completed": (frozenset({"GET", "POST"}), True, self.completed),
            "/heartbeat": (frozenset({"GET", "HEAD"}), False, self.heartbeat),
            "/status": (frozenset({"GET", "HEAD"}), True, self.status),
            "/files": (frozenset({"GET", "HEAD"}), True, self.files),
            "/close-input": (frozenset({"POST"}), True, self.close_input),
            "/metrics": (frozenset({"GET", "HEAD"}), True, self.metrics_text),
            "/live": (frozenset({"GET", "HEAD"}), True, self.page.live),
        }
        self.metrics: CollectorMetrics
        if isinstance(manager, Manager):
            self.metrics = Metrics(manager)
        else:   # facility mode's own: the metrics' run label and the /runs routes
            self.metrics = FacilityMetrics(manager)
            self.routes.update(run_routes(manager, HTTPError))

    # -- WSGI --------------------------------------------------------------------------

    def __call__(self, environ: dict, start_response: StartResponse) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        self.page.sample()
        if path == "/":   # the live page and its log-in: HTML, not JSON
            return self.page.index(environ, start_response)
        try:
            answer = self._dispatch(environ, method, path)
            if isinstance(answer, Held):
                environ[HOLD_KEY] = answer.seconds
                answer = answer.answer
            if isinstance(answer, RawAnswer):
                payload = b"" if method == "HEAD" else answer.payload
                start_response("200 OK", [("Content-Type", answer.content_type),
                                          ("Content-Length", str(len(payload)))])
                return [payload]
            status, body, headers = answer.status, answer.body, []
        except HTTPError as exc:
            status, body, headers = exc.status, {"error": str(exc)}, exc.headers
        except Exception:  # a bug: log it, never show a traceback to the client
            log.exception("%s %s: internal error", method, path[:200])
            status, body, headers = 500, {"error": "internal error (see the manager's log)"}, []
        if status >= 400:
            log.info("%s %s -> %d %s", method, path[:200], status, body.get("error", ""))
        payload = b"" if method == "HEAD" else json.dumps(body).encode()
        start_response(f"{status} {_REASONS.get(status, 'Error')}",
                       [("Content-Type", "application/json"),
                        ("Content-Length", str(len(payload))), *headers])
        return [payload]

    def _dispatch(self, environ: dict, method: str, path: str) -> Answer | RawAnswer | Held:
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/")
        route = self.routes.get(path)
        if route is None:
            raise HTTPError(404, f"no route {path[:100]!r} (routes: {', '.join(self.routes)})")
        methods, needs_token, handler = route
        if method not in methods:
            raise HTTPError(405, f"{path} accepts {', '.join(sorted(methods))}, not {method[:20]}",
                            [("Allow", ", ".join(sorted(methods)))])
        if needs_token:
            self._authorize(environ)
        return handler(self._params(environ, method))

    def _authorize(self, environ: dict) -> None:
        if not self.auth.authorizes(environ):
            raise HTTPError(401, "missing or wrong token (Authorization: Bearer <token>)",
                            [("WWW-Authenticate", 'Bearer realm="bcmanager"')])

    @staticmethod
    def _params(environ: dict, method: str) -> Params:
        try:
            values: dict[str, list[Any]] = parse_qs(environ.get("QUERY_STRING", ""),
                                                    keep_blank_values=True, strict_parsing=False,
                                                    max_num_fields=MAX_BATCH_SIZE + 100)
        except ValueError as exc:
            raise HTTPError(400, f"query string: {exc}") from None
        if method != "POST":
            return Params(values)
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise HTTPError(400, "Content-Length is not a number") from None
        if length > MAX_BODY:
            raise HTTPError(413, f"request body over {MAX_BODY} bytes")
        raw = environ["wsgi.input"].read(length) if length > 0 else b""
        if raw.strip():
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise HTTPError(400, f"body is not valid JSON: {str(exc)[:100]}") from None
            except RecursionError:
                raise HTTPError(400, "body is not valid JSON: nested too deeply") from None
            if not isinstance(body, dict):
                raise HTTPError(400, "body must be a JSON object")
            for key, value in body.items():
                values[key] = [value]
        return Params(values)

    # -- routes ------------------------------------------------------------------------

    def heartbeat(self, params: Params) -> Answer:
        return Answer(200, {"status": "ok", "inactivity_interval": self.manager.interval})

    def assignwork(self, params: Params) -> Answer:
        engine_id = _checked(validate_id, params.one("engineid"), "engineid")
        size = params.one("batchsize", required=False)
        wanted = 0 if size is None else _int_param(size, "batchsize", 0, MAX_BATCH_SIZE)
        wait = params.one("wait_s", required=False)
        wait_s = 0 if wait is None else _int_param(wait, "wait_s", 0, MAX_WAIT_S)
        answer = self.manager.assign(engine_id, wanted, simulated=_simulated(params))
        if wait_s and answer.status == 200 and answer.body.get("batch_size") == 0 \
                and not answer.body.get("input_closed"):  # input_closed here: nothing left
            return Held(answer, wait_s)
        return answer

    def keepalive(self, params: Params) -> Answer:
        job_id = _checked(validate_id, params.one("job_id"), "job_id")
        state = self._state(params, frozenset({WireState.STARTED, WireState.PROCESSING}))
        return self.manager.keepalive(job_id, state, engine_id=_holder_named(params))

    def completed(self, params: Params) -> Answer:
        job_id = _checked(validate_id, params.one("job_id"), "job_id")
        engine_id = _holder_named(params)
        simulated = _simulated(params)
        state = self._state(params, frozenset({WireState.DONE, WireState.FAILED, WireState.STOPPED}))
        reason = params.one("reason", required=False) or ""
        if not isinstance(reason, str):
            raise HTTPError(400, "parameter reason must be a string")
        try:
            return self.manager.complete(job_id, state, _failed_files(params), reason[:MAX_REASON],
                                         engine_id=engine_id, simulated=simulated,
                                         rate=_pace_value(params, RATE_FIELD),
                                         startup_s=_pace_value(params, STARTUP_FIELD),
                                         reads=_read_count(params))
        except UnknownFailedFile as exc:
            raise HTTPError(400, f"parameter {exc}") from None

    @staticmethod
    def _state(params: Params, allowed: frozenset[WireState]) -> WireState:
        try:
            return parse_job_state(params.one("job_state"), allowed)
        except ProtocolError as exc:
            raise HTTPError(400, f"parameter {exc}") from None

    def status(self, params: Params) -> Answer:
        """GET /status[?runs=all] (_every_run)."""
        return Answer(200, self.manager.status(every_run=_every_run(params)))

    def files(self, params: Params) -> Answer:
        raw = params.one("state")
        try:
            state = FileState(raw)
        except ValueError:
            raise HTTPError(400, f"parameter state must be one of "
                                 f"{', '.join(s.value for s in FileState)}, got {str(raw)[:40]!r}") from None
        limit_raw = params.one("limit", required=False)
        limit = 1000 if limit_raw is None else _int_param(limit_raw, "limit", 1, MAX_LIST_LIMIT)
        try:
            found = self.manager.files_in_state(state, limit, params.one("run", required=False))
        except UnknownRun as exc:
            raise HTTPError(400, str(exc)) from None
        files = [{**f, "job_id": f["job_id"] and short_job_id(f["job_id"])} for f in found]
        return Answer(200, {"state": state.value, "count": len(files), "files": files})

    def metrics_text(self, params: Params) -> RawAnswer:
        """GET /metrics[?runs=all]: a facility's per-run series for every run, not only
        those /status shows (facility.shown_settled_s); one run's manager has no others."""
        return RawAnswer(*self.metrics.exposition(every_run=_every_run(params)))

    def close_input(self, params: Params) -> Answer:
        return self.manager.close_input()
