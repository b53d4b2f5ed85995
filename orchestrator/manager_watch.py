"""Whether the manager answers: the loop's view, and a probe that never blocks the loop.

`ManagerWatch` is plain state the loop owns (up, or down since when; when to probe
next, with a delay of 1 s doubling to 10 s). `probe_async` asks `<url>/heartbeat`
from a short-lived thread with a bounded timeout and hands the answer back through
a callback (which only records an event for the loop). `RunWatch` asks `/status` in the
same way, to learn whether the manager was ever reached and whether the run is complete.
"""
from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

PROBE_FIRST_DELAY_S = 1.0
# Capped low: every second between the manager's return and the next probe is idle time of
# every GPU on the host (60 s cost up to 60 s per GPU in the recovery benchmark); one
# GET /heartbeat per host every 10 s is nothing to a manager.
PROBE_MAX_DELAY_S = 10.0
PROBE_TIMEOUT_S = 3.0


@dataclass
class ManagerWatch:
    url: str
    down_since: float | None = None
    next_probe_at: float | None = None
    probe_delay_s: float = PROBE_FIRST_DELAY_S
    probing: bool = False
    last_error: str = ""
    probes: int = 0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def suspect(self, now: float, reason: str) -> None:
        """An engine says the manager failed: probe soon (the engine may be wrong)."""
        if self.next_probe_at is None or self.next_probe_at > now:
            self.next_probe_at = now
        self.last_error = reason

    def mark_down(self, now: float, reason: str) -> None:
        if self.down_since is None:
            self.down_since = now
            self.probe_delay_s = PROBE_FIRST_DELAY_S
            self.next_probe_at = now + self.probe_delay_s
            log.warning("manager %s is down (%s); probing /heartbeat with backoff", self.url, reason)
        self.last_error = reason

    def probe_due(self, now: float) -> bool:
        return not self.probing and self.next_probe_at is not None and now >= self.next_probe_at

    def on_probe(self, ok: bool, detail: str, now: float) -> bool:
        """Record a probe's answer; True when the manager just came back."""
        self.probing = False
        self.probes += 1
        if ok:
            came_back = self.down_since is not None
            if came_back:
                log.info("manager %s answers again after %.1f s", self.url, now - self.down_since)
            self.down_since = None
            self.next_probe_at = None
            self.probe_delay_s = PROBE_FIRST_DELAY_S
            self.last_error = ""
            return came_back
        if self.down_since is None:
            self.mark_down(now, detail)
        else:
            self.probe_delay_s = min(self.probe_delay_s * 2, PROBE_MAX_DELAY_S)
            self.next_probe_at = now + self.probe_delay_s
            self.last_error = detail
            log.info("manager %s still down (%s); next probe in %.0f s",
                     self.url, detail, self.probe_delay_s)
        return False

    def snapshot(self, now: float) -> dict:
        return {"url": self.url, "reachable": not self.down,
                "down_for_s": round(now - self.down_since, 1) if self.down_since is not None else None,
                "next_probe_in_s": (round(max(0.0, self.next_probe_at - now), 1)
                                    if self.next_probe_at is not None else None),
                "last_error": self.last_error}


def probe_once(url: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """(answers, detail) for GET <url>/heartbeat."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/heartbeat", timeout=timeout) as resp:
            body = resp.read(65536)
            if resp.status != 200:
                return False, f"/heartbeat answered HTTP {resp.status}"
        json.loads(body)
        return True, "ok"
    except urllib.error.HTTPError as exc:
        return False, f"/heartbeat answered HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"/heartbeat: {reason}"[:200]


RUN_POLL_S = 5.0


def run_complete(status: dict) -> bool:
    """The manager's /status says the run is over: the input is closed, no file is PENDING
    or ASSIGNED (every one is DONE, QUARANTINED or a DUPLICATE of one) and none is waiting
    to become ready. This is the
    rule by which the manager tells an engine that nothing is left. A manager that says
    `complete` itself is taken at its word."""
    if isinstance(status.get("complete"), bool):
        return status["complete"]
    files = status.get("files")
    if status.get("input_closed") is not True or not isinstance(files, dict):
        return False
    return (files.get("PENDING", 0) == 0 and files.get("ASSIGNED", 0) == 0
            and not status.get("files_waiting"))


@dataclass
class RunWatch:
    """The run as /status shows it: has bcorch ever reached the manager, and is the run over.

    Polled every RUN_POLL_S from the start. It never marks the manager down (that is the
    engines' and the probe's call); it only answers two questions for the loop.
    """

    url: str
    token: str
    started_at: float
    next_poll_at: float | None = None
    polling: bool = False
    reached: bool = False
    complete: bool = False
    last_error: str = "no answer yet"

    def __post_init__(self) -> None:
        if self.next_poll_at is None:
            self.next_poll_at = self.started_at

    def poll_due(self, now: float) -> bool:
        return not self.polling and self.next_poll_at is not None and now >= self.next_poll_at

    def on_answer(self, reached: bool, complete: bool, detail: str, now: float) -> None:
        self.polling = False
        self.reached = self.reached or reached
        self.complete = complete
        self.last_error = "" if reached else detail
        self.next_poll_at = now + RUN_POLL_S


def fetch_status(url: str, token: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, bool, str]:
    """(reached, complete, detail) for GET <url>/status: reached = the manager answered."""
    request = urllib.request.Request(url.rstrip("/") + "/status")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        return True, False, f"/status answered HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, False, f"/status: {reason}"[:200]
    try:
        status = json.loads(body)
    except ValueError:
        return True, False, "/status answered something that is not JSON"
    return True, isinstance(status, dict) and run_complete(status), "ok"


def fetch_status_async(url: str, token: str, done: Callable[[bool, bool, str], None]) -> None:
    threading.Thread(target=lambda: done(*fetch_status(url, token)),
                     name="bcorch-run-watch", daemon=True).start()


def probe_async(url: str, done: Callable[[bool, str], None]) -> None:
    def run() -> None:
        ok, detail = probe_once(url)
        done(ok, detail)

    threading.Thread(target=run, name="bcorch-manager-probe", daemon=True).start()
