"""The benchmarks' command lines follow the project's rule for bad input (scripts/cli_sweep.py,
tests/test_cli_bad_input.py): one line on stderr naming the flag and exit 78, as bcorch and
bcmanager do for every configuration error, never argparse's usage block and exit 2.
Every scripts/bench*.py builds its parser as BenchParser and uses the types below.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, NoReturn

EXIT_CONFIG = 78


class BenchParser(argparse.ArgumentParser):
    """argparse, with a bad flag answered in one line and exit 78."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        refuse(f"{self.prog}: {' '.join(message.split())}")


def refuse(line: str) -> NoReturn:
    """End the benchmark for bad input: `line` on stderr, exit 78."""
    print(line, file=sys.stderr)
    raise SystemExit(EXIT_CONFIG)


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text!r}")
        return value
    parse.__name__ = f"int_at_least_{low}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive_float(text: str) -> float:
    """A finite number above 0 (argparse type): seconds, rates."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
    return value
