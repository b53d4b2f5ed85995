"""Whether the manager answers: the loop's view, and a probe that never blocks the loop.

`ManagerWatch` is plain state the loop owns (up, or down since when; when to probe
next, with a delay of 1 s doubling to 10 s). `probe_async` asks `<url>/heartbeat`
from a short-lived thread with a bounded timeout and hands the answer back through
a callback (which only records an event for the loop).
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


def probe_async(url: str, done: Callable[[bool, str], None]) -> None:
    def run() -> None:
        ok, detail = probe_once(url)
        done(ok, detail)

    threading.Thread(target=run, name="bcorch-manager-probe", daemon=True).start()
