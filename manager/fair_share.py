"""Which run an engine's next batch comes from: weighted fair share of GPU time, model affinity.

Each run has a virtual time: the GPU-seconds it has been given divided by its priority. The
next batch goes to the run with the least virtual time, so over time every run gets GPU time
in proportion to its priority and none starves. A batch is charged when it starts (at its
estimated duration, so engines picking at the same moment spread over the runs) and corrected
when it ends (its actual duration).

A run that joins, or comes back after it had no work (paused, waiting for files), starts at
the least settled virtual time of the runs already active (what their finished batches
took, not the estimates of those still running), never below it: time it did not use is
not banked, so it cannot take the GPUs for itself when it returns.

Model affinity: a model switch costs the engine a model load. An engine keeps getting batches
of the model it last ran while such a run's virtual time is within switch_slack_s of the
least; beyond that it switches to the least-served run. So a run falls at most about
switch_slack_s GPU-seconds (at priority 1) plus a batch per engine behind its share.

Thread-safe: the manager's routes call it from several threads.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence


@dataclass(frozen=True)
class Demand:
    run_id: str
    priority: float
    model: str


@dataclass
class _Run:
    virtual_s: float
    priority: float = 1.0
    served_s: float = 0.0


@dataclass(frozen=True)
class _Job:
    run_id: str
    engine_id: str
    charged_s: float
    weight: float
    started_at: float


def _seconds(value: float) -> float:
    """A usable duration: finite and not negative (else 0)."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else 0.0


class FairShare:
    def __init__(self, switch_slack_s: float, clock: Callable[[], float] = time.monotonic):
        self.switch_slack_s = max(0.0, float(switch_slack_s))
        self._clock = clock
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._active: set[str] = set()
        self._floor = 0.0            # least virtual time of the active runs; never goes down
        self._jobs: dict[str, _Job] = {}
        self._engine_model: dict[str, str] = {}
        self._switches: dict[str, int] = {}
        self._first_start: Optional[float] = None

    def pick(self, engine_id: str, ready: Sequence[Demand]) -> Optional[Demand]:
        """The run this engine's next batch should come from; None when nothing is ready.

        ready: the runs that have work now and are not paused, cancelled or quarantined.
        """
        with self._lock:
            demands: dict[str, Demand] = {}
            for demand in ready:
                demands.setdefault(demand.run_id, demand)
            self._admit(demands)
            if not demands:
                return None
            virtual = {run_id: self._runs[run_id].virtual_s for run_id in demands}
            least = min(virtual.values())

            def order(demand: Demand) -> tuple:
                return virtual[demand.run_id], -demand.priority, demand.run_id

            last_model = self._engine_model.get(engine_id)
            if last_model is not None:
                same_model = [d for d in demands.values() if d.model == last_model
                              and virtual[d.run_id] - least <= self.switch_slack_s]
                if same_model:
                    return min(same_model, key=order)
            return min(demands.values(), key=order)

    def _admit(self, demands: dict[str, Demand]) -> None:
        """Bring joining runs up to the active runs' least virtual time; note priorities."""
        staying = [self._settled(r) for r in demands if r in self._active]
        reference = min(staying) if staying else self._floor
        for run_id, demand in demands.items():
            run = self._runs.get(run_id)
            if run is None:
                run = self._runs[run_id] = _Run(virtual_s=reference)
            elif run_id not in self._active:
                run.virtual_s = max(run.virtual_s, reference)
            if math.isfinite(demand.priority) and demand.priority > 0:
                run.priority = float(demand.priority)
        self._active = set(demands)
        if demands:
            self._floor = max(self._floor, min(self._settled(r) for r in demands))

    def _settled(self, run_id: str) -> float:
        """The run's virtual time without the estimates of its batches still running.

        A joining run is levelled with this, not with virtual_s: an estimate (60 s before an
        engine's pace is known) may be far above what the batch takes, and a run levelled
        with it would find itself far ahead once the estimate is corrected, and wait."""
        pending = sum(j.charged_s / j.weight for j in self._jobs.values() if j.run_id == run_id)
        return self._runs[run_id].virtual_s - pending

    def started(self, job_id: str, run_id: str, engine_id: str, model: str,
                estimate_s: float) -> None:
        """A batch of run_id began on engine_id: charge its estimate, count a model switch."""
        with self._lock:
            if job_id in self._jobs:
                return
            run = self._runs.get(run_id)
            if run is None:
                run = self._runs[run_id] = _Run(virtual_s=self._floor)
            charge = _seconds(estimate_s)
            run.virtual_s += charge / run.priority
            run.served_s += charge
            now = self._clock()
            if self._first_start is None:
                self._first_start = now
            self._jobs[job_id] = _Job(run_id, engine_id, charge, run.priority, now)
            last_model = self._engine_model.get(engine_id)
            self._switches.setdefault(engine_id, 0)
            if last_model is not None and last_model != model:
                self._switches[engine_id] += 1
            self._engine_model[engine_id] = model

    def finished(self, job_id: str, actual_s: Optional[float]) -> None:
        """The batch ended (done, failed or expired); actual_s corrects the charge (None keeps it).

        Unknown jobs (a run forgotten meanwhile, a job from before a restart) are ignored.
        """
        with self._lock:
            job = self._jobs.pop(job_id, None)
            if job is None or actual_s is None:
                return
            run = self._runs.get(job.run_id)
            if run is None:
                return
            delta = _seconds(actual_s) - job.charged_s
            run.virtual_s += delta / job.weight
            run.served_s += delta

    def forget_run(self, run_id: str) -> None:
        """Drop a run (finished, cancelled, removed) and its batches in flight."""
        with self._lock:
            self._runs.pop(run_id, None)
            self._active.discard(run_id)
            for job_id in [j for j, job in self._jobs.items() if job.run_id == run_id]:
                del self._jobs[job_id]

    def switches(self) -> dict[str, int]:
        """Model switches per engine (the first model an engine loads is not a switch)."""
        with self._lock:
            return dict(self._switches)

    def switches_per_hour(self) -> float:
        """All engines' model switches per hour since the first batch started."""
        with self._lock:
            if self._first_start is None:
                return 0.0
            hours = (self._clock() - self._first_start) / 3600.0
            return sum(self._switches.values()) / hours if hours > 0 else 0.0

    def served_s(self) -> dict[str, float]:
        """GPU-seconds given to each run (batches in flight counted at their estimate)."""
        with self._lock:
            return {run_id: run.served_s for run_id, run in self._runs.items()}
