"""After every batch: did each input file's reads reach the output?

An exit code of 0 does not mean every read was basecalled: dorado skips a POD5
file it cannot open, prints one error line and still exits 0. So after a run that
ended DONE the engine compares

- the read ids of each input file (pod5 `Reader.read_ids`: the read table only,
  no signal is decoded), with
- the read ids written under the job's output dir (workers/read_ids.py: FASTQ headers,
  BAM query names; a split read counts for its parent through `pi:Z:`),

and parses the basecaller's log for the per-file errors dorado prints when it
skips a file. The outcome, per input file:

- all (or at least `min_read_fraction`) of its reads are in the output: done;
- none of them: a failed file `{name: reason}`; the manager retries or quarantines
  exactly that file, the rest of the batch is DONE (nothing of it was written, so
  merging the rest cannot duplicate reads);
- some but fewer than `min_read_fraction`: the whole batch is FAILED, because its
  written part cannot be separated from the calls file it shares with the other
  files; FAILED output is set aside by the manager, never merged, so a retry
  cannot write those reads twice.

When a side cannot be read (no pod5 library; SAM, CRAM or FASTA output; a malformed
output file) the log decides alone, and the engine says so.

The same reading of the outputs counts the reads written (issue 16): the records in the
job's `pass/` and `fail/` folders, which are what the manager merges into OUTPUT_DIR. The
engine reports them with a DONE batch (protocol.READS_PASS_FIELD, READS_FAIL_FIELD); when
the check could not read the outputs, the count is unknown and nothing is reported.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from bcorch.protocol import READS_FAIL_FIELD, READS_PASS_FIELD, JobState
from .read_ids import UnreadableOutput, WrittenReads, read_files_under, records_in
from .runners.base import LOG_NAME, RunResult

LOG_TAIL_BYTES = 4 * 1024 * 1024

# dorado's per-file messages when it skips an input (spdlog format: "[date] [level] text").
_SKIP_LINE = re.compile(
    r"\[(?:error|warning|warn)\]\s+(?:Failed to open file|Skipping file|Could not open file|"
    r"Failed to read file|Error opening file|Failed to load)\s*:?\s*(?P<rest>.+)",
    re.IGNORECASE)

_said_once: set[str] = set()

WARM_UP_MODULES = ("pod5",)
WARM_UP_NICE = 10           # as the simulated basecaller (simulate_main.SIMULATE_NICE)
WARM_UP_WAIT_S = 20.0       # the check waits this long at most for the warm-up to finish
_warm_up: threading.Thread | None = None
_warm_up_nice: tuple[int, int] | None = None   # (its thread id, the nice value it had)


def _once(log: logging.Logger | logging.LoggerAdapter, key: str, message: str) -> None:
    if key not in _said_once:
        _said_once.add(key)
        log.warning("%s", message)


@dataclass(frozen=True)
class ReadsWritten:
    """Records written into a job's pass/ and fail/ folders (a split read's children count
    one each: they are records of the output)."""

    passed: int
    failed: int

    def fields(self) -> dict[str, int]:
        """The optional /completed fields that carry it."""
        return {READS_PASS_FIELD: self.passed, READS_FAIL_FIELD: self.failed}


@dataclass
class CheckReport:
    """What the check found; `apply` turns it into the batch's result."""

    failed_files: dict[str, str] = field(default_factory=dict)
    partial: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    method: str = ""
    reads: ReadsWritten | None = None   # None: the outputs were not read


@dataclass(frozen=True)
class Checked:
    """A batch's result after the check, and the reads it wrote (None: not known)."""

    result: RunResult
    reads: ReadsWritten | None = None


class OutputChecker:
    """Checks one finished batch; cheap: read ids only."""

    def __init__(self, min_read_fraction: float = 1.0,
                 logger: logging.Logger | logging.LoggerAdapter | None = None):
        self.min_read_fraction = min_read_fraction
        self.log = logger or logging.getLogger(__name__)

    @staticmethod
    def warm_up() -> None:
        """Import pod5 now (called while a basecaller runs), not after the basecaller exits.

        The import (pyarrow) costs ~0.25 s of CPU; done in the check it lands on every
        engine's first batch, after the basecaller, when GPUs could already have new work.
        It runs in a thread of its own at nice WARM_UP_NICE (Linux sets a thread's nice
        value alone), so the engine's loop is not held up and, on a host with fewer cores
        than GPUs, the engines still starting and the manager assigning their first
        batches go first: 16 engines importing pyarrow at normal priority held the last
        first batch back by seconds (docs/benchmarks.md, issue 14 §3).
        """
        global _warm_up
        if _warm_up is not None or all(m in sys.modules for m in WARM_UP_MODULES):
            return
        _warm_up = threading.Thread(target=_import_niced, args=(WARM_UP_MODULES,),
                                    name="output-check-warm-up", daemon=True)
        _warm_up.start()

    @staticmethod
    def warmed_up(timeout: float = WARM_UP_WAIT_S) -> None:
        """Wait (at most `timeout`) for a warm-up still importing; the check needs it."""
        thread, niced = _warm_up, _warm_up_nice
        if thread is None or not thread.is_alive():
            return
        if niced is not None:   # it is on the critical path now: back to normal if allowed
            try:
                os.setpriority(os.PRIO_PROCESS, *niced)
            except OSError:
                pass
        thread.join(timeout)

    def apply(self, result: RunResult, input_dir: Path, output_dir: Path,
              batch: Sequence[str]) -> RunResult:
        """The batch's result after the check (only a DONE result is checked)."""
        return self.checked(result, input_dir, output_dir, batch).result

    def checked(self, result: RunResult, input_dir: Path, output_dir: Path,
                batch: Sequence[str]) -> Checked:
        """The batch's result after the check, with the reads a DONE batch wrote."""
        if result.state is not JobState.DONE:
            return Checked(result)
        self.warmed_up()
        report = self.check(input_dir, output_dir, batch)
        for note in report.notes:
            self.log.warning("output check: %s", note)
        if report.partial:
            name, reason = next(iter(report.partial.items()))
            return Checked(RunResult(JobState.FAILED, result.returncode,
                                     {**result.failed_files, **report.failed_files},
                                     reason=f"output check ({report.method}): {name}: {reason}"
                                            + (f" (and {len(report.partial) - 1} more file(s))"
                                               if len(report.partial) > 1 else "")))
        failed = {**report.failed_files, **result.failed_files}
        if failed and len(failed) >= len(batch):
            return Checked(RunResult(JobState.FAILED, result.returncode, failed,
                                     reason=f"output check ({report.method}): no file of the "
                                            f"batch reached the output "
                                            f"({next(iter(failed.values()))})"))
        return Checked(RunResult(JobState.DONE, result.returncode, failed, result.reason),
                       report.reads)

    def check(self, input_dir: Path, output_dir: Path, batch: Sequence[str]) -> CheckReport:
        report = CheckReport()
        from_log = skipped_in_log(output_dir / LOG_NAME, input_dir, batch)
        inputs = input_read_ids(input_dir, batch, self.log)
        written = written_reads(output_dir, self.log) if inputs is not None else None
        if inputs is None or written is None:
            report.method = "basecaller log only"
            report.failed_files.update(from_log)
            return report
        outputs, report.reads = written
        report.method = "read ids"
        for name in batch:
            ids = inputs.get(name)
            if isinstance(ids, str):  # the pod5 library cannot read it: neither could dorado
                report.failed_files[name] = from_log.get(name) or f"unreadable POD5: {ids}"
                continue
            if not ids:
                continue
            found = sum(1 for read_id in ids if read_id in outputs)
            if found == len(ids):
                if name in from_log:
                    report.notes.append(f"{name}: every read is in the output although the "
                                        f"log says: {from_log[name]}")
                continue
            if found == 0:
                reason = from_log.get(name) or "none of its reads is in the output"
                report.failed_files[name] = f"{reason} (0 of {len(ids)} reads written)"
            elif found / len(ids) < self.min_read_fraction:
                report.partial[name] = (f"only {found} of {len(ids)} reads in the output "
                                        f"(runner.min_read_fraction = {self.min_read_fraction:g})")
            else:
                report.notes.append(f"{name}: {len(ids) - found} of {len(ids)} reads not in the "
                                    f"output (within runner.min_read_fraction)")
        return report


def _import_niced(modules: Sequence[str]) -> None:
    """Import `modules` from this thread, first lowering this thread's priority."""
    global _warm_up_nice
    try:
        tid = threading.get_native_id()
        nice = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, nice + WARM_UP_NICE)
        _warm_up_nice = (tid, nice)
    except (OSError, AttributeError):
        pass
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            pass


def input_read_ids(input_dir: Path, batch: Sequence[str],
                   log: logging.Logger | logging.LoggerAdapter) -> dict[str, list[str] | str] | None:
    """{file name: its read ids, or the error text}; None when pod5 is not installed."""
    try:
        import pod5
    except ImportError:
        _once(log, "pod5", "output check: the pod5 library is not installed; checking the "
                           "basecaller log only (install bcorch[pod5] to compare read ids)")
        return None
    found: dict[str, list[str] | str] = {}
    for name in batch:
        try:
            with pod5.Reader(input_dir / name) as reader:
                found[name] = [str(r) for r in reader.read_ids]
        except Exception as exc:  # whatever pod5/pyarrow raise for a bad file
            found[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return found


def output_read_ids(output_dir: Path,
                    log: logging.Logger | logging.LoggerAdapter) -> WrittenReads | None:
    """Every read id written under output_dir (a split read also counts for its parent).

    None when some output cannot be read (SAM, CRAM, FASTA, a malformed file): the log
    decides then.
    """
    written = written_reads(output_dir, log)
    return written[0] if written is not None else None


def written_reads(output_dir: Path, log: logging.Logger | logging.LoggerAdapter
                  ) -> tuple[WrittenReads, ReadsWritten] | None:
    """Every read id written under output_dir, and the records in its pass/ and fail/
    folders (read files elsewhere are not merged, so they are not counted as written).

    None when some output cannot be read (SAM, CRAM, FASTA, a malformed file).
    """
    written = WrittenReads()
    counts = {"pass": 0, "fail": 0}
    try:
        for path in read_files_under([output_dir]):
            top = path.relative_to(output_dir).parts[0]
            n = 0
            for record in records_in(path):
                written.add(record)
                n += 1
            if top in counts:
                counts[top] += n
    except UnreadableOutput as exc:
        log.warning("output check: %s; checking the basecaller log only", exc)
        return None
    return written, ReadsWritten(counts["pass"], counts["fail"])


def skipped_in_log(log_path: Path, input_dir: Path, batch: Sequence[str]) -> dict[str, str]:
    """{file name: the log line} for each batch file the basecaller says it skipped.

    A line names the file by its path in the job's input dir, by the symlink's target,
    or by bare name; all three are matched to the batch's names.
    """
    by_path: dict[str, str] = {}
    for name in batch:
        by_path[name] = name
        by_path[str(input_dir / name)] = name
        try:
            by_path[os.path.realpath(input_dir / name)] = name
        except OSError:
            pass
    try:
        with open(log_path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - LOG_TAIL_BYTES))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return {}
    skipped: dict[str, str] = {}
    for line in text.splitlines():
        match = _SKIP_LINE.search(line)
        if not match:
            continue
        name = _match_file(match.group("rest"), by_path)
        if name is not None and name not in skipped:
            skipped[name] = line.strip()[:300]
    return skipped


def _match_file(rest: str, by_path: dict[str, str]) -> str | None:
    rest = rest.strip()
    for candidate in sorted(by_path, key=len, reverse=True):  # longest (full path) first
        if rest.startswith(candidate) or rest.startswith(f"'{candidate}") \
                or rest.startswith(f'"{candidate}'):
            return by_path[candidate]
    return None
