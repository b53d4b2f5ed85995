"""How much work one batch holds: the sizing policy, pure (no store, no clock, no HTTP).

Work is measured in a file's bytes on disk (VBZ-compressed signal, roughly proportional
to its samples); the manager reads no POD5 read table (it has no pod5 dependency).

Each engine reports, with a DONE batch, the rate it basecalled at (bytes per second of
basecalling) and its start-up per batch (what the batch cost the GPU outside basecalling:
from the end of the engine's previous basecall to this one's process start, waiting for
work left out, plus the runner's own start-up such as a model load where the runner
measures it; docs/engine.md, "The pace it reports"). From those:

- steady state: a batch holds enough work that start-up is at most `share` of the batch's
  time: work >= startup * (1 - share) / share seconds at the engine's rate, and never less
  than MIN_STEADY_S seconds of it (`steady_work`);
- end of a closed run: what is left is split so that the engines finish together, with
  one more piece (one more start-up) only where that start-up costs less than the
  imbalance it removes (`finish_together`);
- until an engine's (or the fleet's) pace is known, the batch is counted in files.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable

SMOOTHING = 0.5   # weight of a new report in an engine's running pace
END_OF_RUN = "end of run"
MIN_STEADY_S = 10.0
"""The least work of a steady batch, in seconds at the engine's rate, whatever its start-up.

An engine whose runner starts in no time (a dorado-server with its model loaded, the
simulate runner with `startup_s` 0) still costs 25-50 ms per batch on a loaded host:
process start and exit, output check, /completed and /assignwork, measured in
docs/benchmarks.md. The share alone then sized ~1.3-s batches: 2 % of the GPU spent
on them. Bigger batches cost nothing at the end of a closed run (`finish_together`
splits what is left) nor in an open one (a batch takes the files there are, it never
waits for more), and 10 s is still short beside a lease or a fair-share turn."""


@dataclass(frozen=True)
class Pace:
    """An engine's measured speed: work units (bytes) per second, and start-up per batch."""

    rate: float
    startup_s: float

    def seconds(self, work: float) -> float:
        return work / self.rate


class PaceBook:
    """The paces engines reported: each engine's own (smoothed), and the fleet's median."""

    def __init__(self) -> None:
        self._paces: dict[str, Pace] = {}

    def record(self, engine_id: str, rate: float, startup_s: float) -> Pace:
        old = self._paces.get(engine_id)
        if old is not None:
            rate = old.rate + SMOOTHING * (rate - old.rate)
            startup_s = old.startup_s + SMOOTHING * (startup_s - old.startup_s)
        pace = self._paces[engine_id] = Pace(rate, startup_s)
        return pace

    def own(self, engine_id: str) -> Pace | None:
        return self._paces.get(engine_id)

    def fleet(self) -> Pace | None:
        if not self._paces:
            return None
        return Pace(statistics.median(p.rate for p in self._paces.values()),
                    statistics.median(p.startup_s for p in self._paces.values()))

    def of(self, engine_id: str) -> Pace | None:
        """The engine's own pace, else the fleet's (a new engine of the same kind)."""
        return self.own(engine_id) or self.fleet()

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {e: {"rate": p.rate, "startup_s": p.startup_s}
                for e, p in sorted(self._paces.items())}


def steady_work(pace: Pace, share: float) -> float:
    """The least work (bytes) whose batch spends at most `share` of its time starting up,
    and at least MIN_STEADY_S seconds of it."""
    return pace.rate * max(pace.startup_s * (1.0 - share) / share, MIN_STEADY_S)


def finish_together(now: float, pace: Pace, pending_s: float,
                    others_free_at: Iterable[float]) -> float:
    """Seconds of work this engine should take of pending_s, at the end of a closed run.

    others_free_at: when each other active engine is expected to be free (its batch
    done). An engine that takes a piece pays one start-up. With k engines taking pieces,
    they all finish at the water level T_k (sum of T_k - free_i - startup = pending_s);
    the run ends at max(T_k, the latest other engine). Each more piece costs one more
    start-up: k is chosen to minimise end + startup * (k - 1), so a piece is split off
    only where it shortens the run by more than the start-up it adds. Returns the
    whole pending_s when no split pays.
    """
    s = pace.startup_s
    free = sorted(max(t, now) for t in others_free_at)
    latest = free[-1] if free else now
    best_cost = float("inf")
    best_level = now + s + pending_s
    starts = [now]
    for other in [None] + free:
        if other is not None:
            starts.append(other)
        level = (pending_s + sum(a + s for a in starts)) / len(starts)
        if any(a + s >= level for a in starts):
            break   # this engine would get nothing: more pieces do not help
        cost = max(level, latest) + s * (len(starts) - 1)
        if cost < best_cost - 1e-9:
            best_cost, best_level = cost, level
    return min(pending_s, max(0.0, best_level - now - s))


@dataclass(frozen=True)
class Sizing:
    """What one batch may hold: at most `files` files and, when set, about `work` bytes."""

    files: int
    work: float | None = None
    why: str = "file count"

    @property
    def nearest(self) -> bool:
        """An end-of-run share is a target to come close to, not a floor (files are whole:
        overshooting by one 15-s file would leave that engine last by 15 s)."""
        return self.why == END_OF_RUN


def size_batch(*, pace: Pace | None, files_cap: int, share: float, closed: bool,
               now: float = 0.0, pending_work: float = 0.0,
               others_free_at: Iterable[float] = ()) -> Sizing:
    """The batch for one request.

    files_cap: the engine's batchsize, else the manager's limit. pace None: unknown yet,
    the batch is counted in files. Otherwise the steady batch (start-up at most `share`);
    at the end of a closed run the engine's share of what is left when that is smaller
    than two steady batches (one batch then finishes its part of the run).
    """
    if pace is None or pace.rate <= 0:
        return Sizing(files_cap)
    steady = steady_work(pace, share)
    if not closed:
        return Sizing(files_cap, steady, "steady")
    mine = finish_together(now, pace, pace.seconds(pending_work), others_free_at) * pace.rate
    if mine < 2 * steady:
        return Sizing(files_cap, mine, END_OF_RUN)
    return Sizing(files_cap, steady, "steady")
