"""BCKeepAlive: the thread that holds a batch's lease and sends its final report.

The seed's meaning, made robust (DESIGN.md §2):
- keep-alives go out every report_back_interval / 2, waiting on an event, so
  terminate_keepalive() wakes the thread at once instead of after a sleep;
- a failed keep-alive is retried (jittered, short delays) while the lease can
  still be alive; the lease is lost when the manager answers `late` or when no
  keep-alive has succeeded for a whole interval. Then BCManager_PB is set and
  `on_lease_lost` is called at once (the engine stops the basecaller there);
- the final /completed is sent by this thread and retried while the lease can
  still be alive; a `late` answer means the work went to someone else: logged,
  counted as a lost lease, never as our success.
"""
from __future__ import annotations

import enum
import logging
import random
import threading
import time
from typing import Any, Callable, Mapping

from .client import ManagerClient, ManagerRefused, ManagerUnreachable
from bcorch.protocol import Batch, JobState, ProtocolError

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """The manager expired our lease (or we could not renew it for a whole interval)."""


class ReportOutcome(str, enum.Enum):
    PENDING = "PENDING"          # no final report yet
    OK = "OK"                    # the manager accepted the final state
    LATE = "LATE"                # the manager had already given the job to someone else
    UNREACHABLE = "UNREACHABLE"  # not delivered while the lease could still be alive
    SKIPPED = "SKIPPED"          # the lease was lost before the report
    REFUSED = "REFUSED"          # the manager refuses this engine's configuration (exit 78)


class BCKeepAlive(threading.Thread):
    """Keeps one job's lease alive and sends its completion."""

    def __init__(self, client: ManagerClient, job_id: str, report_back_interval: float,
                 starting_state: JobState = JobState.PROCESSING,
                 on_lease_lost: Callable[[str], None] | None = None,
                 logger: logging.Logger | logging.LoggerAdapter | None = None):
        super().__init__(name=f"keepalive-{job_id}", daemon=True)
        self.client = client
        self.job_id = job_id
        self.report_back_interval = float(report_back_interval)
        self.starting_state = starting_state
        self.final_state: JobState | None = None
        self.failed_files: dict[str, str] = {}
        self.reason = ""
        self.pace: dict[str, float] = {}   # rate and startup_s sent with DONE (batch sizing)
        self.reads: dict[str, int] = {}    # reads_pass and reads_fail sent with DONE, if known
        self.keep_alive_url = client.url + "/keepalive"
        self.keep_alive_terminate_url = client.url + "/completed"
        self.BCManager_PB = False
        self.lost_reason = ""
        self.outcome = ReportOutcome.PENDING
        self.keepalives_sent = 0
        self.log = logger or log
        self._on_lease_lost = on_lease_lost
        self._wake = threading.Event()
        self._deadline: float | None = None
        self._last_success = time.monotonic()  # the assignment itself started the lease

    @classmethod
    def started_instance(cls, answer: Batch | Mapping[str, Any], starting_state: JobState, conf,
                         client: ManagerClient | None = None,
                         on_lease_lost: Callable[[str], None] | None = None,
                         logger: logging.Logger | logging.LoggerAdapter | None = None
                         ) -> "BCKeepAlive":
        """Build the keep-alive for an /assignwork answer and start it (as the seed does)."""
        batch = answer if isinstance(answer, Batch) else Batch.from_answer(answer)
        if batch.empty:
            raise ValueError("an empty batch has no lease to keep alive")
        instance = cls(client or ManagerClient.from_config(conf), batch.jobid,
                       batch.report_back_interval, starting_state, on_lease_lost, logger)
        instance.start()
        return instance

    # -- what the engine calls ----------------------------------------------------------

    def finish(self, final_state: JobState, failed_files: Mapping[str, str] | None = None,
               reason: str = "", deadline: float | None = None) -> None:
        """Ask the thread to send the final report; returns at once.

        `deadline` (monotonic) bounds the report's retries, e.g. when the engine must exit.
        """
        if not final_state.final:
            raise ValueError(f"{final_state.value} is not a final state")
        self.final_state = final_state
        self.failed_files = dict(failed_files or {})
        self.reason = reason
        self._deadline = deadline
        self._wake.set()

    def terminate_keepalive(self, final_state: JobState, failed_files: Mapping[str, str] | None = None,
                            reason: str = "", deadline: float | None = None) -> ReportOutcome:
        """Send the final report and block until the thread ends."""
        self.finish(final_state, failed_files, reason, deadline)
        self.join()
        return self.outcome

    def shutdown_if_broken_keepalive(self) -> None:
        """Raise LeaseLost when the lease is gone (the engine then stops and exits 75)."""
        if self.BCManager_PB:
            raise LeaseLost(self.lost_reason or "lease lost")

    # -- the thread ---------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._keep_alive_until_finished()
            if self.BCManager_PB:
                self.outcome = ReportOutcome.SKIPPED
                return
            self._report()
        except Exception as exc:  # never die silently: a dead thread would look like a live lease
            self.log.exception("keep-alive thread of job %s failed", self.job_id)
            self._lose(f"keep-alive thread failed: {exc}")
            if self.outcome is ReportOutcome.PENDING:
                self.outcome = ReportOutcome.SKIPPED

    def _keep_alive_until_finished(self) -> None:
        period = self.report_back_interval / 2
        next_send = time.monotonic() + period
        while not self._wake.wait(max(0.0, next_send - time.monotonic())):
            now = time.monotonic()
            try:
                late = self.client.keep_alive(self.job_id, self.starting_state, retries=0,
                                              timeout=self._call_timeout())
            except (ManagerUnreachable, ProtocolError) as exc:
                if self._lease_expired():
                    self._lose(f"no keep-alive succeeded for {self.report_back_interval:g}s "
                               f"(last error: {exc})")
                    return
                delay = self._retry_delay()
                self.log.warning("keep-alive of job %s failed (%s); retrying in %.2fs",
                                 self.job_id, exc, delay)
                next_send = time.monotonic() + delay
                continue
            self.keepalives_sent += 1
            if late:
                self._lose("the manager answered late: the lease expired")
                return
            self._last_success = now
            next_send = now + period

    def _report(self) -> None:
        assert self.final_state is not None
        deadline = self._last_success + self.report_back_interval
        if self._deadline is not None:
            deadline = min(deadline, self._deadline)
        attempt = 0
        while True:
            try:
                answer = self.client.completed(self.job_id, self.final_state, self.failed_files,
                                               self.reason, retries=0,
                                               timeout=self._call_timeout(deadline),
                                               **({"pace": self.pace} if self.pace else {}),
                                               **({"reads": self.reads} if self.reads else {}))
            except (ManagerUnreachable, ProtocolError) as exc:
                if isinstance(exc, ManagerRefused) and exc.refuses_configuration:
                    self.outcome = ReportOutcome.REFUSED
                    self._lose(str(exc))
                    return
                attempt += 1
                delay = self._retry_delay()
                if time.monotonic() + delay >= deadline:
                    self.outcome = ReportOutcome.UNREACHABLE
                    self._lose(f"final report {self.final_state.value} of job {self.job_id} not "
                               f"delivered after {attempt} attempt(s): {exc}")
                    return
                self.log.warning("final report of job %s failed (%s); retrying in %.2fs",
                                 self.job_id, exc, delay)
                time.sleep(delay)
                continue
            if answer.ok:
                self.outcome = ReportOutcome.OK
                self.log.info("job %s reported %s", self.job_id, self.final_state.value)
            else:
                self.outcome = ReportOutcome.LATE
                self._lose(f"the manager answered late to the final report "
                           f"{self.final_state.value}: job {self.job_id} was given to someone else")
            return

    # -- helpers ------------------------------------------------------------------------

    def _lease_expired(self) -> bool:
        return time.monotonic() - self._last_success >= self.report_back_interval

    def _retry_delay(self) -> float:
        """Short, jittered: several tries fit into what is left of the lease."""
        top = max(0.05, min(2.0, self.report_back_interval / 8))
        return random.uniform(top / 2, top)

    def _call_timeout(self, deadline: float | None = None) -> tuple[float, float]:
        """A call may not outlive the lease (nor the caller's deadline)."""
        left = self._last_success + self.report_back_interval - time.monotonic()
        if deadline is not None:
            left = min(left, deadline - time.monotonic())
        connect, read = self.client.timeout
        cap = max(0.2, left)
        return (min(connect, cap), min(read, cap))

    def _lose(self, reason: str) -> None:
        if self.BCManager_PB:
            return
        self.lost_reason = reason
        self.BCManager_PB = True
        self.log.error("lease of job %s lost: %s", self.job_id, reason)
        if self._on_lease_lost is not None:
            try:
                self._on_lease_lost(reason)
            except Exception:
                self.log.exception("stopping the basecaller after the lease loss failed")
