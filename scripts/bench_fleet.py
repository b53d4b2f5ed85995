"""Fleet efficiency (GPU time used / GPU time available) and the batch-size trade-off.

    python scripts/bench.py fleet [--gpus 1,4,8,16] [--per-gpu-s 60] [--quick]
                                  [--skip-original] [--skip-batch-size] [--out bench-out/fleet.json]

A real manager (subprocess, SQLite) and a real `bcorch --gpus virtual:N` (subprocess) with
the simulate runner at a fixed samples/s work through real POD5 files. Per run:

    ideal  = sum over reads of num_samples / samples_per_s  (+ startup_s per batch)
    wall   = time of the last DONE (jobs.finished in the manager's SQLite file)
             - the moment bcorch was launched
    efficiency = (ideal / N) / wall
    useful     = the same without startup_s (basecalling only; equal when startup_s = 0)

Three tables:
1. ours: our defaults (busy_pause_s 0, polling_interval 0.01 min), --per-gpu-s of ideal
   work per GPU, batches of --batch files of --file-s seconds each;
2. the original's timing (busy_pause_s 30, polling_interval 1 min) on the same kind of
   workload but only --original-per-gpu-s per GPU (a full one would take 4x as long);
3. batch size: optimal_request_size 1, 10, 100 with runner.startup_s 0 and 10 on
   --bs-gpus GPUs and --bs-files files.

Where the lost time went is printed too: start (bcorch launch -> an engine's first
batch assigned), gaps (a batch DONE -> the same engine's next batch assigned) and tail
(the first engine out of work -> the last DONE). `eff run` is the mean over engines of
ideal work / (its last DONE - its first batch assigned): the loop's own cost, start-up
left out.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cluster import Cluster, samples_in, save_results, wait_for, write_json  # noqa: E402
from bench_args import BenchParser, positive_int  # noqa: E402

READS_PER_FILE = 10
SAMPLES_PER_READ = 4000
SAMPLES_PER_FILE = READS_PER_FILE * SAMPLES_PER_READ


def write_files(directory: Path, n: int) -> None:
    from bcorch.orchestrator.pod5_dataset import write_dataset
    write_dataset(directory, n, reads_per_file=READS_PER_FILE, samples_per_read=SAMPLES_PER_READ,
                  seed=8)


def write_mixed_files(directory: Path, n: int, seconds: tuple[int, int] = (1, 15),
                      seed: int = 14) -> None:
    """n POD5 files of a random whole number of seconds of work each (in `seconds`, at
    SAMPLES_PER_FILE samples per second), with a noisy signal so that their VBZ-compressed
    size grows with their samples as real signal's does (a flat signal compresses to
    nearly nothing and every file would be the same size)."""
    import random
    import uuid

    import numpy as np
    import pod5
    from bcorch.orchestrator.pod5_dataset import SAMPLE_RATE, _run_info

    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    run_info = _run_info(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        n_samples = SAMPLES_PER_READ * rng.randint(*seconds)
        with pod5.Writer(directory / f"mixed_{i:05d}.pod5") as writer:
            for number in range(READS_PER_FILE):
                signal = (500 + noise.normal(0, 40, n_samples)).astype(np.int16)
                writer.add_read(pod5.Read(
                    read_id=uuid.UUID(int=rng.getrandbits(128), version=4),
                    pore=pod5.Pore(channel=1 + number, well=1, pore_type="not_set"),
                    calibration=pod5.Calibration(offset=-240.0, scale=0.18),
                    read_number=number, start_sample=number * 10 * SAMPLE_RATE,
                    median_before=210.0,
                    end_reason=pod5.EndReason(pod5.EndReasonEnum.SIGNAL_POSITIVE, False),
                    run_info=run_info, signal=signal))


def run_once(root: Path, dataset: Path, name: str, gpus: int, n_files: int, *, file_s: float,
             request_size: int, startup_s: float = 0.0, busy_pause_s: float = 0.0,
             polling_interval: float = 0.01, timeout_s: float = 1800.0,
             manager_batch_size: int | None = None, pattern: str = "*.pod5",
             manager_extra: dict | None = None, runner_extra: dict | None = None) -> dict:
    """One run of the whole job; returns its figures.

    request_size 0: engines leave the size to the manager (batches sized by work, first
    batch manager_batch_size files); otherwise they ask for that many files.
    manager_extra / runner_extra: more keys of those config sections (startup_share,
    startup_per).
    """
    work = root / name
    input_dir = work / "in"
    input_dir.mkdir(parents=True)
    sources = sorted(dataset.glob(pattern))[:n_files]
    for path in sources:
        os.link(path, input_dir / path.name)
    samples = samples_in(input_dir)
    rate = SAMPLES_PER_FILE / file_s
    cluster = Cluster(work, input_dir, gpus,
                      manager={"batch_size": manager_batch_size or request_size or 10,
                               "report_back_interval": 60.0, **(manager_extra or {})},
                      engine={"optimal_request_size": request_size, "busy_pause_s": busy_pause_s,
                              "polling_interval": polling_interval},
                      runner={"samples_per_s": rate, "startup_s": startup_s, **(runner_extra or {})})
    try:
        cluster.start_manager(input_closed=True, wait_files=n_files)
        cluster.start_bcorch()
        wait_for(lambda: cluster.all_done(n_files), timeout_s, f"{name}: all {n_files} files DONE",
                 interval=0.2)
        jobs = cluster.query("SELECT engine_id, created, finished, n_files FROM jobs "
                             "WHERE state = 'DONE' ORDER BY created")
        other = cluster.query("SELECT state, count(*) FROM jobs WHERE state != 'DONE' GROUP BY state")
    finally:
        cluster.close()
    shutil.rmtree(work, ignore_errors=True)
    start = cluster.bcorch_started_wall
    wall = max(j[2] for j in jobs) - start
    ideal = samples / rate + startup_s * len(jobs)
    by_engine: dict[str, list[tuple]] = {}
    for job in jobs:
        by_engine.setdefault(job[0], []).append(job)
    first = [rows[0][1] - start for rows in by_engine.values()]
    gaps = [b[1] - a[2] for rows in by_engine.values() for a, b in zip(rows, rows[1:])]
    last = [rows[-1][2] for rows in by_engine.values()]
    # Where each file holds the same samples, an engine's ideal work is its files x file_s
    # (for mixed files these two figures are not meaningful: printed as they come).
    batch = [j[2] - j[1] - (j[3] * file_s + startup_s) for j in jobs]
    running = [sum(r[3] * file_s + startup_s for r in rows) / (rows[-1][2] - rows[0][1])
               for rows in by_engine.values()]
    sizes = sorted(j[3] for j in jobs)
    return {
        "name": name, "gpus": gpus, "files": n_files, "samples": samples, "samples_per_s": rate,
        "request_size": request_size, "startup_s": startup_s, "busy_pause_s": busy_pause_s,
        "polling_interval_min": polling_interval, "batches": len(jobs),
        "not_done_jobs": dict(other), "engines_used": len(by_engine),
        "ideal_s": ideal, "ideal_per_gpu_s": ideal / gpus, "wall_s": wall,
        "efficiency": ideal / gpus / wall,
        "useful_efficiency": samples / rate / gpus / wall,
        "efficiency_while_running": statistics.mean(running),
        "first_batch_s": {"min": min(first), "max": max(first)},
        "gap_s": {"median": statistics.median(gaps) if gaps else 0.0,
                  "max": max(gaps) if gaps else 0.0, "n": len(gaps)},
        "tail_s": max(last) - min(last),
        "batch_files": {"min": sizes[0], "median": statistics.median(sizes), "max": sizes[-1]},
        "batch_over_ideal_s": {"median": statistics.median(batch), "max": max(batch)},
        "load_average": os.getloadavg(),
    }


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    head = (f"{'GPUs':>4} {'req':>4} {'start':>6} {'batches':>7} {'ideal/GPU s':>11} {'wall s':>8} "
            f"{'eff':>6} {'useful':>6} {'eff run':>7} {'1st batch s':>11} {'gap med/max ms':>15} {'batch+ ms':>9} {'tail s':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['gpus']:>4} {r['request_size']:>4} {r['startup_s']:>6g} {r['batches']:>7} "
              f"{r['ideal_per_gpu_s']:>11.1f} {r['wall_s']:>8.1f} {r['efficiency']:>6.3f} "
              f"{r['useful_efficiency']:>6.3f} {r['efficiency_while_running']:>7.3f} {r['first_batch_s']['max']:>11.2f} "
              f"{1000 * r['gap_s']['median']:>7.0f}/{1000 * r['gap_s']['max']:<7.0f} "
              f"{1000 * r['batch_over_ideal_s']['median']:>9.0f} {r['tail_s']:>7.2f}")


def _gpu_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}")
    if not values or any(v < 1 or v > 64 for v in values):
        raise argparse.ArgumentTypeError(f"GPU counts must be 1..64, got {text!r}")
    return values


def mixed_main(args: argparse.Namespace, argv: list[str]) -> int:
    """Batches sized by work (engines ask for 0 files) against fixed file counts, on
    files of 1 to 15 s of work with a per-batch start-up."""
    gpus = args.mixed_gpus
    n_files = max(gpus, round(gpus * args.mixed_per_gpu_s / 8.0))   # 8 s per file on average
    counts = [int(c) for c in args.mixed_file_counts.split(",") if c.strip() and int(c) > 0]
    root = Path(tempfile.mkdtemp(prefix="bench-mixed-"))
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                     "command": "python scripts/bench.py fleet " + " ".join(argv),
                     "load_average_at_start": os.getloadavg()}
    speed = args.mixed_speed
    runner_extra = {"startup_per": args.mixed_startup_per}
    rows = []
    try:
        dataset = root / "dataset"
        t = time.monotonic()
        write_mixed_files(dataset, n_files)
        print(f"wrote {n_files} POD5 files of 1 to 15 s in {time.monotonic() - t:.1f} s")
        originals = [int(c) for c in args.mixed_original.split(",") if c.strip() and int(c) > 0]
        plans = ([] if args.mixed_skip_work else [("work", 0, False)]) + \
            [(f"files-{c}", c, False) for c in counts] + \
            [(f"original-files-{c}", c, True) for c in originals]
        for label, size, original in plans:
            timing = {"busy_pause_s": 30.0 / speed, "polling_interval": 1.0 / speed} \
                if original else {}
            row = run_once(root, dataset, f"mixed-{label}", gpus, n_files, file_s=1.0 / speed,
                           request_size=size, startup_s=args.mixed_startup_s / speed,
                           manager_batch_size=args.mixed_first_batch, pattern="mixed_*.pod5",
                           runner_extra=runner_extra, **timing)
            row.update(sizing=label, speed=speed, startup_per=args.mixed_startup_per,
                       original_timing=original, wall_s_at_speed_1=row["wall_s"] * speed)
            if args.mixed_startup_per == "engine":     # run_once counts startup_s per batch
                busy = (row["samples"] / row["samples_per_s"]
                        + args.mixed_startup_s / speed * row["engines_used"])
                row["efficiency"] = busy / gpus / row["wall_s"]
            rows.append(row)
            print(f"{label}: batches {row['batches']} (files min/median/max "
                  f"{row['batch_files']['min']}/{row['batch_files']['median']:g}/"
                  f"{row['batch_files']['max']}), ideal/GPU {row['ideal_per_gpu_s']:.1f} s, "
                  f"wall {row['wall_s_at_speed_1']:.1f} s (at speed 1), efficiency {row['efficiency']:.3f}, "
                  f"useful {row['useful_efficiency']:.3f}, tail {row['tail_s']:.1f} s, "
                  f"load {row['load_average'][0]:.2f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["mixed"] = rows
    save_results(args.out, results)
    return 0


def main(argv: list[str]) -> int:
    p = BenchParser(prog="bench.py fleet", description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=_gpu_list, default=[1, 4, 8, 16], help="virtual GPU counts")
    p.add_argument("--per-gpu-s", type=float, default=60.0, help="ideal work per GPU (ours)")
    p.add_argument("--file-s", type=float, default=1.0, help="ideal seconds of one file")
    p.add_argument("--batch", type=positive_int, default=5,
                   help="files per batch (optimal_request_size)")
    p.add_argument("--original-per-gpu-s", type=float, default=10.0,
                   help="ideal work per GPU for the original's timing (0 = skip)")
    p.add_argument("--bs-gpus", type=positive_int, default=4, help="GPUs of the batch-size runs")
    p.add_argument("--bs-files", type=positive_int, default=40, help="files of the batch-size runs")
    p.add_argument("--bs-file-s", type=float, default=1.5, help="ideal seconds of one file there")
    p.add_argument("--skip-original", action="store_true")
    p.add_argument("--skip-batch-size", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 6 s per GPU, GPUs 1,4, short original and batch-size runs")
    p.add_argument("--mixed", action="store_true",
                   help="only the mixed-files table: --mixed-gpus GPUs, files of 1 to 15 s, "
                        "startup_s --mixed-startup-s, batches sized by work vs by file count")
    p.add_argument("--mixed-gpus", type=positive_int, default=4)
    p.add_argument("--mixed-per-gpu-s", type=float, default=600.0)
    p.add_argument("--mixed-startup-s", type=float, default=10.0)
    p.add_argument("--mixed-first-batch", type=positive_int, default=5,
                   help="manager.batch_size: the first batch's files, before the pace is known")
    p.add_argument("--mixed-file-counts", default="10",
                   help="comma-separated file-count batch sizes to compare (0 = none)")
    p.add_argument("--mixed-skip-work", action="store_true",
                   help="only the file-count batch sizes of the mixed table")
    p.add_argument("--mixed-original", default="",
                   help="comma-separated file counts to run with the original's timing "
                        "(busy_pause_s 30, polling_interval 1 min)")
    p.add_argument("--mixed-startup-per", choices=("batch", "engine"), default="batch",
                   help="engine: the dorado-server model (start-up paid once per engine)")
    p.add_argument("--mixed-speed", type=float, default=1.0,
                   help="run S times faster: file work, startup_s, busy_pause_s and "
                        "polling_interval all divided by S (efficiencies are ratios of "
                        "durations that all shrink by S, except the machine's own per-batch "
                        "cost of tens of ms, which weighs S times more)")
    p.add_argument("--out", default="bench-out/fleet.json")
    args = p.parse_args(argv)
    if args.mixed:
        if args.mixed_speed <= 0:
            p.error(f"--mixed-speed must be > 0, got {args.mixed_speed:g}")
        return mixed_main(args, argv)
    if args.quick:
        args.gpus, args.per_gpu_s, args.original_per_gpu_s = [1, 4], 6.0, 2.0
        args.bs_files, args.bs_file_s = 8, 0.5
    for flag, value in (("--per-gpu-s", args.per_gpu_s), ("--file-s", args.file_s),
                        ("--bs-file-s", args.bs_file_s)):
        if value <= 0:
            p.error(f"{flag} must be > 0, got {value:g}")
    if args.original_per_gpu_s < 0:
        p.error(f"--original-per-gpu-s must be >= 0, got {args.original_per_gpu_s:g}")

    files_per_gpu = max(args.batch, round(args.per_gpu_s / args.file_s / args.batch) * args.batch)
    orig_files_per_gpu = max(args.batch, round(args.original_per_gpu_s / args.file_s / args.batch)
                             * args.batch)
    needed = max([files_per_gpu * n for n in args.gpus] + [args.bs_files])
    root = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                     "command": "python scripts/bench.py fleet " + " ".join(argv),
                     "load_average_at_start": os.getloadavg()}
    try:
        dataset = root / "dataset"
        t = time.monotonic()
        write_files(dataset, needed)
        print(f"wrote {needed} POD5 files ({READS_PER_FILE} reads x {SAMPLES_PER_READ} samples) "
              f"in {time.monotonic() - t:.1f} s; load average {os.getloadavg()[0]:.2f}")

        ours = []
        for n in args.gpus:
            ours.append(run_once(root, dataset, f"ours-{n}", n, files_per_gpu * n, file_s=args.file_s,
                                 request_size=args.batch))
            print_table("ours so far", ours[-1:])
        results["ours"] = ours
        print_table(f"ours: busy_pause_s 0, polling_interval 0.01 min, {args.batch}-file batches "
                    f"of {args.batch * args.file_s:g} s", ours)

        if not args.skip_original and args.original_per_gpu_s > 0:
            orig = [run_once(root, dataset, f"original-{n}", n, orig_files_per_gpu * n,
                             file_s=args.file_s, request_size=args.batch, busy_pause_s=30.0,
                             polling_interval=1.0) for n in args.gpus]
            results["original"] = orig
            print_table("original's timing: busy_pause_s 30, polling_interval 1 min "
                        f"({orig_files_per_gpu * args.file_s:g} s of work per GPU)", orig)

        if not args.skip_batch_size:
            sizes = []
            for startup in (0.0, 10.0):
                for size in (1, 10, 100):
                    sizes.append(run_once(root, dataset, f"bs-{size}-{startup:g}", args.bs_gpus,
                                          args.bs_files, file_s=args.bs_file_s, request_size=size,
                                          startup_s=startup))
                    print_table("batch size so far", sizes[-1:])
            results["batch_size"] = sizes
            print_table(f"batch size: {args.bs_gpus} GPUs, {args.bs_files} files of "
                        f"{args.bs_file_s:g} s", sizes)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["load_average_at_end"] = os.getloadavg()
    out = write_json(args.out, results)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
