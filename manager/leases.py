"""Lease deadlines on the manager's monotonic clock (engines send no timestamps).

Deadlines are deliberately not stored in the database: a restarted manager grants
every live job one fresh interval anyway (engines could not reach it while it was
down), so a keep-alive only touches memory. The caller serialises access.
"""
from __future__ import annotations

import time
from typing import Callable


class Leases:
    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self._clock = clock
        self._deadline: dict[str, float] = {}
        self._engine: dict[str, str] = {}

    def grant(self, job_id: str, engine_id: str) -> None:
        self._deadline[job_id] = self._clock() + self.interval
        self._engine[job_id] = engine_id

    def refresh(self, job_id: str) -> bool:
        """Extend a live lease; False when there is none (expired, finished or unknown)."""
        if job_id not in self._deadline:
            return False
        self._deadline[job_id] = self._clock() + self.interval
        return True

    def drop(self, job_id: str) -> None:
        self._deadline.pop(job_id, None)
        self._engine.pop(job_id, None)

    def expired(self) -> list[str]:
        now = self._clock()
        return [job for job, deadline in self._deadline.items() if deadline < now]

    def engine_of(self, job_id: str) -> str | None:
        return self._engine.get(job_id)

    def by_engine(self) -> dict[str, list[str]]:
        jobs: dict[str, list[str]] = {}
        for job, engine in self._engine.items():
            jobs.setdefault(engine, []).append(job)
        return jobs

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._deadline

    def __len__(self) -> int:
        return len(self._deadline)
