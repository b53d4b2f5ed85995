#!/usr/bin/env python3
"""Benchmarks: one entry point, one subcommand per part (each prints a table and writes JSON).

    python scripts/bench.py manager ...
    python scripts/bench.py engine ...
    python scripts/bench.py orchestrator ...
    python scripts/bench.py fleet ...          (GPU-time efficiency, original timing, batch size)
    python scripts/bench.py recovery ...       (kill -9, SIGSTOP, lease expiry, manager restart)
    python scripts/bench.py overhead ...       (bcorch and engine CPU / RSS, idle and loaded)
    python scripts/bench.py live ...           (files arriving over time: start-up share, lag)
    python scripts/bench.py connections ...    (HTTP servers: throughput, idle and slowloris clients)
    python scripts/bench.py facility ...       (many runs, one manager: scan, assign, switches)
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

PARTS = {"manager": "bench_manager", "engine": "bench_engine", "orchestrator": "bench_orchestrator",
         "output_check": "bench_output_check", "fleet": "bench_fleet", "recovery": "bench_recovery",
         "overhead": "bench_overhead", "connections": "bench_connections",
         "live": "bench_live", "facility": "bench_facility"}


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if not argv or argv[0] not in PARTS:
        from bench_args import refuse
        got = f"got {argv[0]!r}" if argv else "got none"
        refuse(f"bench.py: the first argument is the part to measure, one of "
               f"{'|'.join(PARTS)} ({got})")
    return importlib.import_module(PARTS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
