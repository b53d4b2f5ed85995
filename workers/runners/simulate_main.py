"""A simulated basecaller: real POD5 input, synthetic FASTQ output, no GPU.

    python -m workers.runners.simulate_main --input-dir D --output-dir O [--samples-per-s R]
        [--model M] [--kit K] [--emit fastq|bam]

For each POD5 file in the job's input dir it reads every read's id and sample
count with the pod5 library, sleeps until num_samples / samples_per_s seconds of its
budget have passed (it sleeps, it does not burn CPU: many of these run side by side in
benchmarks), and writes pass/<stem>.fastq and fail/<stem>.fastq with every real read id, a
sequence and qualities derived from the read id (so reruns are identical). The header
records what the read was "basecalled" with: `@<id> simulated=true model=<M> [kit=<K>]
mean_qscore=<q>`. With --emit bam the same records go into unaligned BAM files
(pass/<stem>.bam, fail/<stem>.bam), those words in each record's DS:Z tag.
A read goes to fail/ for a deterministic share `fail_fraction` of read ids (a
simulated low q-score). A file the pod5 library cannot open is listed with its
error in failed_files.json; the rest of the batch is still done. Exit 0 unless
the command line or the output dir is unusable.

The budget is a deadline, not a sum of sleeps: the batch takes startup_s + samples /
samples_per_s from --started-at (the runner's spawn time on the shared monotonic clock),
so this process's own interpreter start, pod5 import and FASTQ writing are absorbed like
a GPU basecaller overlaps I/O with compute. Otherwise ~0.3 s of Python start-up per batch
would be counted as orchestration cost in the fleet benchmark. For the same reason it
runs at nice 10: its CPU (a GPU's, in real life) yields to the engines and the manager.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

from .base import FAILED_FILES_NAME

SAMPLES_PER_BASE = 10
MAX_BASES = 100_000
SIMULATE_NICE = 10


def _hash(read_id: str) -> bytes:
    return hashlib.blake2b(read_id.encode(), digest_size=16).digest()


def is_fail(read_id: str, fail_fraction: float) -> bool:
    return int.from_bytes(_hash(read_id)[:8], "big") / 2 ** 64 < fail_fraction


def simulated_call(read_id: str, num_samples: int, fail: bool, model: str,
                   kit: str = "") -> tuple[str, str, str]:
    """(description, sequence, qualities) of one read, derived from its id."""
    rng = random.Random(_hash(read_id))
    length = max(20, min(MAX_BASES, num_samples // SAMPLES_PER_BASE))
    seq = "".join(rng.choices("ACGT", k=length))
    low, high = (3, 9) if fail else (12, 30)
    qual = "".join(chr(33 + q) for q in rng.choices(range(low, high + 1), k=length))
    mean_q = 6 if fail else 20
    kit_word = f" kit={kit}" if kit else ""
    return f"simulated=true model={model}{kit_word} mean_qscore={mean_q}", seq, qual


def fastq_record(read_id: str, num_samples: int, fail: bool, model: str, kit: str = "") -> str:
    description, seq, qual = simulated_call(read_id, num_samples, fail, model, kit)
    return f"@{read_id} {description}\n{seq}\n+\n{qual}\n"


def write_bam(path: Path, records: list[tuple[str, int]], fail: bool, model: str,
              kit: str) -> None:
    """Unaligned BAM records (pysam), written beside and renamed into place."""
    import pysam

    tmp = path.with_name(f".{path.name}.tmp")
    header = {"HD": {"VN": "1.6", "SO": "unknown"},
              "PG": [{"ID": "basecaller", "PN": "bcorch-simulate", "CL": model}]}
    with pysam.AlignmentFile(str(tmp), "wb", header=header) as out:
        for read_id, n in records:
            description, seq, qual = simulated_call(read_id, n, fail, model, kit)
            record = pysam.AlignedSegment(out.header)
            record.query_name = read_id
            record.flag = 4
            record.query_sequence = seq
            record.query_qualities = pysam.qualitystring_to_array(qual)
            record.set_tags([("DS", description)])
            out.write(record)
    os.replace(tmp, path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def simulate_file(path: Path, out: Path, samples_per_s: float, fail_fraction: float,
                  model: str, due: float | None = None, kit: str = "",
                  emit: str = "fastq") -> tuple[int, int, int]:
    """Basecall one file (simulated); returns (reads, passed, samples).

    Sleeps until `due` + samples / samples_per_s on the monotonic clock (from now when
    due is None).
    """
    import pod5

    records: list[tuple[str, int]] = []
    with pod5.Reader(path) as reader:
        for read in reader.reads():
            records.append((str(read.read_id), int(read.num_samples)))
    samples = sum(n for _, n in records)
    due = (time.monotonic() if due is None else due) + samples / samples_per_s
    time.sleep(max(0.0, due - time.monotonic()))
    passed = [r for r in records if not is_fail(r[0], fail_fraction)]
    failed = [r for r in records if is_fail(r[0], fail_fraction)]
    stem = path.name[:-5] if path.name.endswith(".pod5") else path.name
    for folder, calls, fail in (("pass", passed, False), ("fail", failed, True)):
        if not calls:
            continue
        if emit == "bam":
            write_bam(out / folder / f"{stem}.bam", calls, fail, model, kit)
        else:
            _write_atomic(out / folder / f"{stem}.fastq",
                          "".join(fastq_record(r, n, fail, model, kit) for r, n in calls))
    return len(records), len(passed), samples


class _Parser(argparse.ArgumentParser):
    """A bad flag is one line on stderr and exit 2 (not the usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="simulate_main", description=__doc__.splitlines()[0])
    parser.add_argument("--input-dir", required=True, type=Path)
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--model", default="hac")
    parser.add_argument("--kit", default="")
    parser.add_argument("--emit", choices=("fastq", "bam"), default="fastq")
    parser.add_argument("--samples-per-s", type=float, default=2_000_000.0)
    parser.add_argument("--startup-s", type=float, default=0.0)
    parser.add_argument("--fail-fraction", type=float, default=0.1)
    parser.add_argument("--started-at", type=float, default=None,
                        help="time.monotonic() of the spawn; the budget counts from it")
    args = parser.parse_args(argv)
    numbers = (args.samples_per_s, args.startup_s, args.fail_fraction,
               0.0 if args.started_at is None else args.started_at)
    if not all(math.isfinite(n) for n in numbers):
        parser.error("--samples-per-s, --startup-s, --fail-fraction and --started-at must be "
                     "finite numbers")
    origin = time.monotonic() if args.started_at is None else min(args.started_at, time.monotonic())
    try:
        os.nice(SIMULATE_NICE)
    except OSError:
        pass
    if args.samples_per_s <= 0 or not 0 <= args.fail_fraction <= 1 or args.startup_s < 0:
        parser.error("--samples-per-s must be > 0, --fail-fraction in [0, 1], --startup-s >= 0")
    print(f"SIMULATION: bcorch simulated basecaller, no real basecalling is done "
          f"(model {args.model!r}, kit {args.kit!r}, {args.emit}, "
          f"{args.samples_per_s:g} samples/s, fail_fraction {args.fail_fraction:g})", flush=True)
    try:
        names = sorted(os.listdir(args.input_dir))
    except OSError as exc:
        print(f"SIMULATION: --input-dir: cannot list it: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        for sub in ("pass", "fail"):
            (args.output_dir / sub).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"simulate_main: --output-dir: cannot create {str(args.output_dir / sub)!r} "
              f"({exc.strerror or type(exc).__name__})", file=sys.stderr, flush=True)
        return 2
    due = origin + args.startup_s
    time.sleep(max(0.0, due - time.monotonic()))
    failed: dict[str, str] = {}
    started = time.monotonic()
    for name in names:
        path = args.input_dir / name
        if name.startswith(".") or path.is_dir():
            continue
        try:
            reads, passed, samples = simulate_file(path, args.output_dir, args.samples_per_s,
                                                   args.fail_fraction, args.model, due,
                                                   kit=args.kit, emit=args.emit)
            due += samples / args.samples_per_s
        except Exception as exc:  # whatever pod5/pyarrow raise for a bad file
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            failed[name] = reason
            print(f"SIMULATION: {name}: cannot read: {reason}", flush=True)
            continue
        print(f"SIMULATION: {name}: {reads} reads, {samples} samples, {passed} pass, "
              f"{reads - passed} fail", flush=True)
    _write_atomic(args.output_dir / FAILED_FILES_NAME, json.dumps(failed, indent=1))
    print(f"SIMULATION: done in {time.monotonic() - started:.2f}s, "
          f"{len(failed)} file(s) failed", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skips the ~50 ms interpreter teardown (pyarrow), so a batch ends on its deadline.
    os._exit(code)
