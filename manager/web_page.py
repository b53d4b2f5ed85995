"""The live page: `GET /`, one self-contained HTML page that polls the manager's JSON routes.

The page (static/page.html, inline CSS and JS, no CDN) is the same bytes for everyone and
holds no data: it fetches /status, /live and /files?state=QUARANTINED every few seconds.

Logging in without a header: with a token set, `/?token=T` once answers 303 to `/` with an
HttpOnly, SameSite=Strict cookie (its value, and what it authorises, are manager.auth's:
the one owner of the token check). Nothing here logs a query string.

/live adds what /status does not say: a per-minute throughput history per run (files,
bytes and reads; the last hour, kept in memory, sampled from /status at most every
SAMPLE_EVERY_S seconds whenever any request arrives) and, per engine, its host and GPU, a
state and the age of its job.
Engines send neither host nor GPU: both come from the engine id, which bcorch forms as
`<engine.engine_id or hostname>-gpu<index>` (bcorch.ids.engine_id_for).
"""
from __future__ import annotations

import base64
import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs

from .auth import COOKIE, TokenAuth
from .live_history import SAMPLE_EVERY_S, ThroughputHistory
from .service import Answer

log = logging.getLogger("bcmanager.http")

SINGLE_RUN = ""          # the history key of the one run of a single-run manager
SILENT_AFTER_S = 60.0    # an engine not heard of for longer (and 2 lease intervals) is GONE
_ENGINE_ID = re.compile(r"(?P<host>.+)-gpu(?P<gpu>[0-9]+)")
_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.S)

StartResponse = Callable[..., Any]


def engine_place(engine_id: str) -> tuple[str, str]:
    """(host, GPU index) from an engine id `<host>-gpu<index>`; (id, "") for other ids."""
    m = _ENGINE_ID.fullmatch(engine_id)
    return (m["host"], m["gpu"]) if m else (engine_id, "")


def engine_state(jobs_in_flight: int, silent_s: float, lease_s: float) -> str:
    """What the manager can tell of an engine: BUSY (holds a lease), IDLE (asked for work
    lately) or GONE (not heard of for longer than SILENT_AFTER_S and two lease intervals)."""
    if jobs_in_flight:
        return "BUSY"
    return "IDLE" if silent_s <= max(SILENT_AFTER_S, 2 * lease_s) else "GONE"


@dataclass(frozen=True)
class Page:
    """The page's bytes and the Content-Security-Policy that lets only its own inline code run."""

    html: bytes
    csp: str


def load_page() -> Page:
    html = resources.files(__package__).joinpath("static", "page.html").read_text("utf-8")
    hashes = {"script": [], "style": []}
    for kind, body in _INLINE.findall(html):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        hashes[kind].append(f"'sha256-{digest}'")
    csp = (f"default-src 'none'; script-src {' '.join(hashes['script'])}; "
           f"style-src {' '.join(hashes['style'])}; connect-src 'self'; img-src 'self' data:; "
           f"base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return Page(html.encode(), csp)


class LivePage:
    """`GET /` (the page and its log-in) and the /live JSON route."""

    def __init__(self, manager: Any, auth: TokenAuth | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self.manager = manager
        self.auth = auth or TokenAuth()
        self._clock = clock
        self._monotonic = monotonic
        self._page: Page | None = None
        self._lock = threading.Lock()
        self._sampled_at: float | None = None
        self._history: dict[str, ThroughputHistory] = {}
        self._job_seen: dict[str, float] = {}   # short job id -> wall time first seen live

    # -- GET / ---------------------------------------------------------------------------

    def index(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return self._text(start_response, 405, "405 Method Not Allowed: the page is read-only "
                              "(GET)", method, [("Allow", "GET, HEAD")])
        try:
            query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True,
                             max_num_fields=20)
        except ValueError:
            query = {}
        given = query.get("token")
        if given is not None:
            if self.auth.required and not (len(given) == 1 and self.auth.token_valid(given[0])):
                log.info("GET / -> 401 wrong token in ?token= (the value is not logged)")
                return self._refused(start_response, method)
            headers = [("Location", "/"), ("Cache-Control", "no-store"),
                       ("Referrer-Policy", "no-referrer")]
            if self.auth.required:
                headers.append(("Set-Cookie", f"{COOKIE}={self.auth.session}; Path=/; HttpOnly; "
                                              f"SameSite=Strict"))
            start_response("303 See Other", [*headers, ("Content-Length", "0")])
            return [b""]
        if not self.auth.authorizes(environ):
            return self._refused(start_response, method)
        if self._page is None:
            self._page = load_page()
        payload = b"" if method == "HEAD" else self._page.html
        start_response("200 OK", [
            ("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(payload))),
            ("Cache-Control", "no-store"), ("Content-Security-Policy", self._page.csp),
            ("Referrer-Policy", "no-referrer"), ("X-Content-Type-Options", "nosniff")])
        return [payload]

    def _refused(self, start_response: StartResponse, method: str) -> Iterable[bytes]:
        return self._text(start_response, 401, "401 Unauthorized: wrong or missing token; open "
                          "this page once as /?token=YOUR_TOKEN", method)

    @staticmethod
    def _text(start_response: StartResponse, status: int, line: str, method: str,
              headers: list[tuple[str, str]] = ()) -> Iterable[bytes]:
        payload = b"" if method == "HEAD" else (
            f"<!doctype html><title>bcmanager</title><p>{line}</p>\n").encode()
        reason = {401: "Unauthorized", 405: "Method Not Allowed"}[status]
        start_response(f"{status} {reason}", [
            ("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(payload))),
            ("Cache-Control", "no-store"), *headers])
        return [payload]

    # -- /live ---------------------------------------------------------------------------

    def sample(self) -> None:
        """Called on every request: at most every SAMPLE_EVERY_S, record the runs' DONE
        counts and the live jobs, in a short thread of its own so that no engine's request
        waits for /status."""
        now_m = self._monotonic()
        with self._lock:
            if self._sampled_at is not None and now_m - self._sampled_at < SAMPLE_EVERY_S:
                return
            self._sampled_at = now_m
        threading.Thread(target=self._sample_status, name="live-page-sample", daemon=True).start()

    def _sample_status(self) -> None:
        try:
            self._record(self.manager.status())
        except Exception:
            log.exception("live page: sampling /status failed")

    def _record(self, status: dict) -> None:
        now = self._clock()
        with self._lock:
            self._sampled_at = self._monotonic()
            runs = _runs_progress(status)
            self._history = {key: self._history.get(key) or ThroughputHistory()
                             for key, _, _ in runs}   # a run no longer in /status is forgotten
            for key, progress, reads in runs:
                self._history[key].record(now, int(progress.get("files_done", 0)),
                                          int(progress.get("bytes_done", 0)), reads)
            live = {j for jobs in (status.get("jobs") or {}).values() for j in jobs}
            self._job_seen = {j: self._job_seen.get(j, now) for j in live}

    def live(self, params: Any = None) -> Answer:
        status = self.manager.status()
        self._record(status)
        now = self._clock()
        with self._lock:
            history = {key: h.per_minute(now) for key, h in self._history.items()}
            seen = dict(self._job_seen)
        lease_s = float(status.get("report_back_interval") or 0)
        jobs = status.get("jobs") or {}
        engines = []
        for engine_id, info in sorted((status.get("engines") or {}).items()):
            held = sorted(jobs.get(engine_id, ()), key=lambda j: seen.get(j, now))
            host, gpu = engine_place(engine_id)
            silent_s = max(0.0, now - float(info.get("last_seen") or 0))
            engines.append({
                "id": engine_id, "host": host, "gpu": gpu,
                "state": engine_state(int(info.get("jobs_in_flight") or len(held)), silent_s,
                                      lease_s),
                "job": held[0] if held else None, "jobs": len(held),
                "job_age_s": round(now - seen.get(held[0], now), 1) if held else None,
                "last_seen_s": round(silent_s, 1)})
        return Answer(200, {"now": now, "sample_every_s": SAMPLE_EVERY_S, "history": history,
                            "engines": engines})


def _runs_progress(status: dict) -> list[tuple[str, dict, int | None]]:
    """(history key, progress, reads) of each run: status["runs"] in facility mode, else the
    one; reads is the run's known total (None while unknown, or from an older manager)."""
    runs = status.get("runs")
    if isinstance(runs, list):
        return [(str(r.get("run_id")), r.get("progress") or {}, _reads_total(r))
                for r in runs if isinstance(r, dict)]
    return [(SINGLE_RUN, status.get("progress") or {}, _reads_total(status))]


def _reads_total(counts: dict) -> int | None:
    total = (counts.get("reads") or {}).get("total")
    return total if isinstance(total, int) and not isinstance(total, bool) else None
