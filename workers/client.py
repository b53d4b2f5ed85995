"""The engine's HTTP client for BCManager (DESIGN.md §3).

One requests.Session per engine; every call has explicit connect and read
timeouts. Connection errors, timeouts and 5xx answers are retried a bounded
number of times with full-jitter exponential backoff (so engines that lost the
manager together do not come back in step); a 4xx answer is never retried: it
is a protocol error carrying the manager's one-line reason.
"""
from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import requests

from bcorch.protocol import (CONFIG_REFUSED, RATE_FIELD, READ_FIELDS, SIMULATED_FIELD,
                             STARTUP_FIELD, Batch, JobState, ProtocolError)

log = logging.getLogger(__name__)

# An idle engine's long poll (/assignwork wait_s). Short: a stop or drain waits for the
# request in flight, and an engine's exit joins it.
LONG_POLL_S = 5


class ManagerUnreachable(ConnectionError):
    """The manager did not answer (or answered 5xx) after the bounded retries."""


class ManagerRefused(ProtocolError):
    """The manager answered 4xx: our request broke the protocol (or the token is wrong)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status

    @property
    def refuses_configuration(self) -> bool:
        """The manager refuses what this engine is configured to do (e.g. a simulate runner
        on a manager without manager.allow_simulated): a configuration error, exit 78."""
        return self.status == CONFIG_REFUSED


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `attempt` (0-based): uniform(0, min(cap, base*2^attempt))."""
    return (rng or random).uniform(0.0, min(cap, base * (2 ** attempt)))


@dataclass(frozen=True)
class Completion:
    ok: bool
    late: bool


class ManagerClient:
    """Calls /assignwork, /keepalive, /completed and /heartbeat of one manager."""

    def __init__(self, url: str, *, token: str = "", connect_timeout: float = 5.0,
                 read_timeout: float = 30.0, retries: int = 3, backoff_base_s: float = 0.5,
                 backoff_cap_s: float = 10.0, cancel: threading.Event | None = None,
                 logger: logging.Logger | logging.LoggerAdapter | None = None,
                 simulated: bool = False):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"manager url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        # Sent with /assignwork and /completed (an optional field) so that a manager not
        # started for simulation refuses simulated basecalls instead of marking files DONE.
        self.simulated = simulated
        self.timeout = (connect_timeout, read_timeout)
        self.retries = retries
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.cancel = cancel or threading.Event()
        self.log = logger or log
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "bcorch-engine"
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, conf, url: str | None = None, **kwargs: Any) -> "ManagerClient":
        return cls(url or conf.manager.url, token=conf.token,
                   connect_timeout=conf.engine.connect_timeout_s,
                   read_timeout=conf.engine.read_timeout_s,
                   retries=conf.engine.request_retries,
                   simulated=conf.runner.kind == "simulate", **kwargs)

    def close(self) -> None:
        self.session.close()

    # -- routes ------------------------------------------------------------------------

    def assign_work(self, engine_id: str, batchsize: int, retries: int | None = None,
                    wait_s: int = 0) -> Batch:
        """wait_s > 0: a long poll; the manager holds an empty answer until work is ready or
        wait_s passes (a manager that does not know wait_s answers at once, as before)."""
        fields: dict[str, Any] = {"engineid": engine_id, "batchsize": batchsize}
        if self.simulated:
            fields[SIMULATED_FIELD] = "true"
        timeout = None
        if wait_s > 0:
            fields["wait_s"] = wait_s
            timeout = (self.timeout[0], self.timeout[1] + wait_s)
        answer = self.call("GET", "/assignwork", fields, retries=retries, timeout=timeout)
        return Batch.from_answer(answer)

    def keep_alive(self, job_id: str, job_state: JobState, retries: int | None = 0,
                   timeout: tuple[float, float] | None = None) -> bool:
        """One keep-alive; True when the manager says the lease is gone (late)."""
        answer = self.call("GET", "/keepalive", {"job_id": job_id, "job_state": job_state.value},
                           retries=retries, timeout=timeout)
        late = answer.get("late") if isinstance(answer, Mapping) else None
        if not isinstance(late, bool):
            raise ProtocolError(f"/keepalive answer must be an object with a boolean 'late', "
                                f"got {str(answer)[:120]!r}")
        return late

    def completed(self, job_id: str, job_state: JobState,
                  failed_files: Mapping[str, str] | None = None, reason: str = "",
                  retries: int | None = 0,
                  timeout: tuple[float, float] | None = None,
                  pace: Mapping[str, float] | None = None,
                  reads: Mapping[str, int] | None = None) -> Completion:
        """Report a final state. Plain GET (as the original) unless there is more to say.

        pace: optional rate and startup_s (protocol.RATE_FIELD, STARTUP_FIELD) of the batch.
        reads: optional reads_pass and reads_fail (protocol.READ_FIELDS) a DONE batch wrote;
        both or neither. Like the pace, extra query parameters of the same GET, which a
        manager that does not know them (the original) ignores.
        """
        fields: dict[str, Any] = {"job_id": job_id, "job_state": job_state.value}
        for key in (RATE_FIELD, STARTUP_FIELD):
            if pace and pace.get(key) is not None:
                fields[key] = round(float(pace[key]), 6)
        if reads and all(reads.get(key) is not None for key in READ_FIELDS):
            fields.update({key: int(reads[key]) for key in READ_FIELDS})
        if self.simulated:
            fields[SIMULATED_FIELD] = "true"
        if failed_files or reason:
            if failed_files:
                fields["failed_files"] = dict(failed_files)
            if reason:
                fields["reason"] = reason[:500]
            answer = self.call("POST", "/completed", fields, retries=retries, timeout=timeout)
        else:
            answer = self.call("GET", "/completed", fields, retries=retries, timeout=timeout)
        if not isinstance(answer, Mapping) or not isinstance(answer.get("ok"), bool):
            raise ProtocolError(f"/completed answer must be an object with a boolean 'ok', "
                                f"got {str(answer)[:120]!r}")
        return Completion(ok=answer["ok"], late=bool(answer.get("late", False)))

    def heartbeat(self, retries: int | None = 0) -> Mapping[str, Any]:
        answer = self.call("GET", "/heartbeat", None, retries=retries)
        if not isinstance(answer, Mapping):
            raise ProtocolError(f"/heartbeat answer must be a JSON object, got {str(answer)[:120]!r}")
        return answer

    # -- transport ---------------------------------------------------------------------

    def call(self, method: str, route: str, fields: Mapping[str, Any] | None,
             retries: int | None = None, timeout: tuple[float, float] | None = None) -> Any:
        """One request with bounded, jittered retries; returns the parsed JSON body."""
        retries = self.retries if retries is None else retries
        attempt = 0
        while True:
            try:
                return self._once(method, route, fields, timeout or self.timeout)
            except ManagerUnreachable as exc:
                if attempt >= retries or self.cancel.is_set():
                    raise
                delay = full_jitter(attempt, self.backoff_base_s, self.backoff_cap_s)
                self.log.warning("%s failed (%s); retry %d/%d in %.2fs", route, exc, attempt + 1,
                                 retries, delay)
                attempt += 1
                if self.cancel.wait(delay):
                    raise

    def _once(self, method: str, route: str, fields: Mapping[str, Any] | None,
              timeout: tuple[float, float]) -> Any:
        url = self.url + route
        try:
            with self._lock:  # a Session is not safe for concurrent use
                if method == "GET":
                    resp = self.session.get(url, params=fields, timeout=timeout)
                else:
                    resp = self.session.post(url, json=fields, timeout=timeout)
        except requests.Timeout as exc:
            raise ManagerUnreachable(f"{route}: no answer from {self.url} within "
                                     f"{timeout[0]:g}s/{timeout[1]:g}s") from exc
        except requests.ConnectionError as exc:
            raise ManagerUnreachable(f"{route}: cannot connect to {self.url} "
                                     f"({type(exc).__name__})") from exc
        except requests.RequestException as exc:
            raise ManagerUnreachable(f"{route}: {type(exc).__name__}: {exc}"[:300]) from exc
        if resp.status_code >= 500:
            raise ManagerUnreachable(f"{route}: manager answered {resp.status_code} "
                                     f"{_reason(resp)}")
        if resp.status_code >= 400:
            raise ManagerRefused(f"{route}: manager refused the request ({resp.status_code}): "
                                 f"{_reason(resp)}", resp.status_code)
        try:
            return resp.json()
        except ValueError:
            raise ProtocolError(f"{route}: answer is not JSON: {resp.text[:80]!r}") from None


def _reason(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip().splitlines()[0][:200] if resp.text.strip() else ""
    if isinstance(body, Mapping):
        for key in ("error", "reason", "message"):
            if isinstance(body.get(key), str):
                return body[key][:200]
    return str(body)[:200]
