"""How many reads were basecalled: what engines report with DONE, and its sums (issue 16).

An engine reports the reads a DONE batch wrote (protocol.READS_PASS_FIELD and
READS_FAIL_FIELD); the original engine reports nothing, so a job's reads may be unknown.
Totals therefore carry how many DONE jobs they count: `jobs_counted` of `jobs_done`. With
none counted while some are done the totals are null (unknown), never 0; with some
counted they are the reads of those jobs (a lower bound of the reads written).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping


@dataclass(frozen=True)
class ReadCount:
    """The reads one DONE batch wrote into its pass/ and fail/ folders."""

    passed: int
    failed: int


@dataclass
class ReadTotals:
    """Reads of DONE jobs, and how many DONE jobs reported theirs."""

    passed: int = 0
    failed: int = 0
    jobs_counted: int = 0
    jobs_done: int = 0

    def add_job(self, reads: ReadCount | None) -> None:
        """One more DONE job, with its reads or without (unknown)."""
        self.jobs_done += 1
        if reads is not None:
            self.jobs_counted += 1
            self.passed += reads.passed
            self.failed += reads.failed

    @property
    def known(self) -> bool:
        """Whether the totals say anything: some job counted, or none done yet."""
        return self.jobs_counted > 0 or self.jobs_done == 0

    def to_dict(self) -> dict[str, Any]:
        """The `reads` object of /status, /runs and bcorch_summary.json."""
        known = self.known
        return {"pass": self.passed if known else None,
                "fail": self.failed if known else None,
                "total": self.passed + self.failed if known else None,
                "jobs_counted": self.jobs_counted, "jobs_done": self.jobs_done}

    @classmethod
    def from_dict(cls, value: object) -> "ReadTotals | None":
        """Totals from a `reads` object (None for an absent or malformed one: a summary
        written before reads were counted)."""
        if not isinstance(value, Mapping):
            return None
        try:
            return cls(int(value.get("pass") or 0), int(value.get("fail") or 0),
                       int(value["jobs_counted"]), int(value["jobs_done"]))
        except (KeyError, TypeError, ValueError):
            return None

    @classmethod
    def summed(cls, parts: Iterable["ReadTotals"]) -> "ReadTotals":
        total = cls()
        for part in parts:
            total.passed += part.passed
            total.failed += part.failed
            total.jobs_counted += part.jobs_counted
            total.jobs_done += part.jobs_done
        return total


def describe(reads: Mapping[str, Any] | None) -> str:
    """One line for people: "1,234 reads (1,200 pass, 34 fail)", with how many batches it
    counts when some are unknown; "unknown" when none reported them."""
    totals = ReadTotals.from_dict(reads)
    if totals is None:
        return "unknown (this manager does not count reads)"
    if not totals.known:
        return (f"unknown (none of {totals.jobs_done} done batches reported its reads: "
                f"an engine that does not count them)")
    text = (f"{totals.passed + totals.failed:,} ({totals.passed:,} pass, "
            f"{totals.failed:,} fail)")
    if totals.jobs_counted < totals.jobs_done:
        text = (f"at least {text}: counted for {totals.jobs_counted} of {totals.jobs_done} "
                f"done batches")
    return text
