"""The live page's throughput history: cumulative counts sampled over time, read per minute."""
from __future__ import annotations

import bisect
import collections
from typing import Any, NamedTuple

SAMPLE_EVERY_S = 5.0
MINUTE_S = 60
HISTORY_MINUTES = 60


class Sample(NamedTuple):
    """Cumulative counts of one run at one time; reads None while they are unknown (no DONE
    batch of the run reported its reads)."""

    t: float
    files: float
    bytes: float
    reads: float | None


class ThroughputHistory:
    """Cumulative files, bytes and reads DONE of one run, sampled over time, read as
    per-minute amounts.

    Samples closer than SAMPLE_EVERY_S / 2 are thinned (the newest moves on), so at most
    one in 2 s or so is kept, for HISTORY_MINUTES + 1 minutes;
    the amount of a minute is the change of the cumulative counts, linearly interpolated
    between samples, over that minute (from the first sample in the minute sampling began;
    None for the minutes before, and for reads where either end's reads are unknown)."""

    def __init__(self) -> None:
        self._samples: collections.deque[Sample] = collections.deque()

    def record(self, now: float, files_done: int, bytes_done: int,
               reads: int | None = None) -> None:
        samples = self._samples
        sample = Sample(now, files_done, bytes_done, reads)
        if len(samples) >= 2 and now - samples[-2].t < SAMPLE_EVERY_S / 2:
            samples[-1] = sample   # the newest moves on: thinned
        else:
            samples.append(sample)
        while samples and samples[0].t < now - (HISTORY_MINUTES + 1) * MINUTE_S:
            samples.popleft()

    def _at(self, t: float) -> Sample | None:
        samples = self._samples
        if not samples or t <= samples[0].t - MINUTE_S:
            return None
        if t < samples[0].t:    # the minute sampling began in counts from its first sample
            return samples[0]
        i = bisect.bisect_right(samples, t, key=lambda s: s.t)
        if i >= len(samples):
            return samples[-1]
        a, b = samples[i - 1], samples[i]
        share = (t - a.t) / (b.t - a.t) if b.t > a.t else 1.0
        reads = None if a.reads is None or b.reads is None else \
            a.reads + (b.reads - a.reads) * share
        return Sample(t, a.files + (b.files - a.files) * share,
                      a.bytes + (b.bytes - a.bytes) * share, reads)

    def per_minute(self, now: float) -> dict[str, Any]:
        """The last HISTORY_MINUTES whole minutes and the current one (its amount so far)."""
        first = (int(now) // MINUTE_S - HISTORY_MINUTES) * MINUTE_S
        edges = [first + i * MINUTE_S for i in range(HISTORY_MINUTES + 1)] + [now]
        values = [self._at(t) for t in edges]
        files: list[float | None] = []
        size: list[float | None] = []
        reads: list[float | None] = []
        for a, b in zip(values, values[1:]):
            if a is None or b is None:
                files.append(None)
                size.append(None)
                reads.append(None)
                continue
            files.append(round(max(0.0, b.files - a.files), 2))
            size.append(round(max(0.0, b.bytes - a.bytes)))
            reads.append(None if a.reads is None or b.reads is None
                         else round(max(0.0, b.reads - a.reads), 1))
        return {"start": first, "minute_s": MINUTE_S, "files": files, "bytes": size,
                "reads": reads}
