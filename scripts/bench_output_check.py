"""Benchmark of the output check the engine runs after every batch (workers/output_check.py).

    python scripts/bench.py output_check [--files 10] [--reads 4000] [--repeat 5] [--json F]

Writes a batch of real POD5 files (pod5 library) and a FASTQ holding their reads, then
times OutputChecker.check: reading the inputs' read ids, the outputs' headers, the log.
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import platform
import os
import statistics
import tempfile
import time
from pathlib import Path

import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cluster import write_json  # noqa: E402
from bcorch.workers.output_check import OutputChecker  # noqa: E402
from bcorch.orchestrator.pod5_dataset import write_dataset  # noqa: E402
from bench_args import BenchParser, positive_int  # noqa: E402


def main(argv: list[str]) -> int:
    parser = BenchParser(prog="bench.py output_check", description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=positive_int, default=10)
    parser.add_argument("--reads", type=positive_int, default=4000)
    parser.add_argument("--samples", type=positive_int, default=400)
    parser.add_argument("--repeat", type=positive_int, default=5)
    parser.add_argument("--json", default="bench-out/output_check.json")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        written = write_dataset(tmp / "data", args.files, reads_per_file=args.reads,
                                samples_per_read=args.samples)
        job_in, out = tmp / "ASSIGNED_j_e", tmp / "TMPOUTPUT_j_e"
        job_in.mkdir()
        (out / "pass").mkdir(parents=True)
        names = []
        for rel in written:
            (job_in / Path(rel).name).symlink_to(tmp / "data" / rel)
            names.append(Path(rel).name)
        with open(out / "pass" / "calls.fastq", "w") as fh:
            for ids in written.values():
                for r in ids:
                    fh.write(f"@{r}\tst:Z:x\n{'ACGT' * 250}\n+\n{'5' * 1000}\n")
        (out / "basecaller.log").write_text("[info] > Finished\n" * 1000)
        checker = OutputChecker()
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            report = checker.check(job_in, out, names)
            times.append(time.perf_counter() - t0)
            assert not report.failed_files and not report.partial
        reads = args.files * args.reads
        rows.append({"files": args.files, "reads": reads, "median_s": statistics.median(times),
                     "max_s": max(times), "reads_per_s": reads / statistics.median(times)})
    print(f"{'files':>6} {'reads':>8} {'median s':>9} {'max s':>8} {'reads/s':>10}")
    for r in rows:
        print(f"{r['files']:>6} {r['reads']:>8} {r['median_s']:>9.3f} {r['max_s']:>8.3f} "
              f"{r['reads_per_s']:>10.0f}")
    write_json(args.json, {"machine": f"{os.cpu_count()} cores, {platform.machine()}",
                           "args": vars(args), "rows": rows})
    return 0
