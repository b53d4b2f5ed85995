"""The live page's throughput history: cumulative counts sampled over time, read per minute."""
from __future__ import annotations

import bisect
import collections
from typing import Any

SAMPLE_EVERY_S = 5.0
MINUTE_S = 60
HISTORY_MINUTES = 60


class ThroughputHistory:
    """Cumulative (files, bytes) DONE of one run, sampled over time, read as per-minute amounts.

    Samples closer than SAMPLE_EVERY_S / 2 are thinned (the newest moves on), so at most
    one in 2 s or so is kept, for HISTORY_MINUTES + 1 minutes;
    the amount of a minute is the change of the cumulative counts, linearly interpolated
    between samples, over that minute (from the first sample in the minute sampling began;
    None for the minutes before)."""

    def __init__(self) -> None:
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()

    def record(self, now: float, files_done: int, bytes_done: int) -> None:
        samples = self._samples
        if len(samples) >= 2 and now - samples[-2][0] < SAMPLE_EVERY_S / 2:
            samples[-1] = (now, files_done, bytes_done)   # the newest moves on: thinned
        else:
            self._samples.append((now, files_done, bytes_done))
        while self._samples and self._samples[0][0] < now - (HISTORY_MINUTES + 1) * MINUTE_S:
            self._samples.popleft()

    def _at(self, t: float) -> tuple[float, float] | None:
        samples = self._samples
        if not samples or t <= samples[0][0] - MINUTE_S:
            return None
        if t < samples[0][0]:    # the minute sampling began in counts from its first sample
            return float(samples[0][1]), float(samples[0][2])
        i = bisect.bisect_right(samples, t, key=lambda s: s[0])
        if i >= len(samples):
            return float(samples[-1][1]), float(samples[-1][2])
        (t0, f0, b0), (t1, f1, b1) = samples[i - 1], samples[i]
        share = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
        return f0 + (f1 - f0) * share, b0 + (b1 - b0) * share

    def per_minute(self, now: float) -> dict[str, Any]:
        """The last HISTORY_MINUTES whole minutes and the current one (its amount so far)."""
        first = (int(now) // MINUTE_S - HISTORY_MINUTES) * MINUTE_S
        edges = [first + i * MINUTE_S for i in range(HISTORY_MINUTES + 1)] + [now]
        values = [self._at(t) for t in edges]
        files: list[float | None] = []
        size: list[float | None] = []
        for a, b in zip(values, values[1:]):
            if a is None or b is None:
                files.append(None)
                size.append(None)
            else:
                files.append(round(max(0.0, b[0] - a[0]), 2))
                size.append(round(max(0.0, b[1] - a[1])))
        return {"start": first, "minute_s": MINUTE_S, "files": files, "bytes": size}
