"""Read basecaller outputs back: which read ids were written, how many times."""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Iterable, Iterator


def fastq_read_ids(path: str | Path) -> Iterator[str]:
    """The read id of every record of a FASTQ file (first word of each header line)."""
    with open(path, "r", encoding="ascii", errors="replace") as fh:
        for number, line in enumerate(fh):
            if number % 4 == 0:
                if not line.startswith("@"):
                    raise ValueError(f"{path}: line {number + 1} is not a FASTQ header")
                yield line[1:].split(None, 1)[0] if line[1:].strip() else ""


def read_ids_under(dirs: Iterable[str | Path]) -> collections.Counter:
    """Counter of read ids over every *.fastq file under the given directories."""
    counts: collections.Counter = collections.Counter()
    for root in dirs:
        root = Path(root)
        if not root.exists():
            continue
        for path in sorted(root.rglob("*.fastq")):
            counts.update(fastq_read_ids(path))
    return counts
