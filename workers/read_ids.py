"""Which read ids a basecaller wrote: the one reader of FASTQ, FASTQ.gz and BAM outputs.

Used by the engine's output check (did each input file's reads reach the output?) and by the
demo's and the tests' verification (is every input read in the output exactly once?), so the
two apply the same rules:

- a record's read id is the first word of a FASTQ header, or a BAM record's query name;
- a split read (dorado splits chimeric reads) is written as children with new ids and the
  parent's id in a `pi:Z:` tag (a FASTQ header tag, or the BAM tag `pi`); the parent counts
  as written through any of its children;
- files are recognised by name: `.fastq`, `.fq` (optionally `.gz`) and `.bam`. SAM, CRAM and
  FASTA outputs raise UnreadableOutput (as does a FASTQ whose record is not a header), so a
  caller never mistakes an output it cannot read for an empty one.

BAM needs pysam, a dependency of bcorch for this reason (dorado writes BAM unless told
--emit-fastq); a runner that will write BAM calls require_bam_reader() at start, so an install
without it is a configuration error (exit 78), never an unchecked batch.
"""
from __future__ import annotations

import collections
import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

FASTQ_SUFFIXES = (".fastq", ".fq", ".fastq.gz", ".fq.gz")
BAM_SUFFIXES = (".bam",)
OTHER_READ_SUFFIXES = (".sam", ".cram", ".fasta", ".fa", ".fasta.gz", ".fa.gz")

_PI_TAG = re.compile(r"(?:^|\s)pi:Z:(\S+)")


class UnreadableOutput(ValueError):
    """A read file this reader cannot read (its format, or a malformed record)."""


@dataclass(frozen=True)
class Record:
    read_id: str
    parent_id: Optional[str] = None  # set for a split read's child


class WrittenReads(collections.Counter):
    """Counter {read id: records written with that id}, and the parents of split reads.

    `in` asks "was this read written?" (itself or as a split read's parent); the counts
    find duplicates (a read id written twice).
    """

    def __init__(self) -> None:
        super().__init__()
        self.parents: collections.Counter = collections.Counter()
        self.parent_of: dict[str, str] = {}   # a split read's child id -> its parent's id

    def add(self, record: Record) -> None:
        self[record.read_id] += 1
        if record.parent_id is not None and record.parent_id != record.read_id:
            self.parents[record.parent_id] += 1
            self.parent_of[record.read_id] = record.parent_id

    def origin(self, read_id: str) -> str:
        """The input read a written record comes from (its parent for a split read)."""
        return self.parent_of.get(read_id, read_id)

    def __contains__(self, read_id: object) -> bool:
        return super().__contains__(read_id) or read_id in self.parents

    def doubled(self) -> list[str]:
        return sorted(read_id for read_id, n in self.items() if n > 1)


def require_bam_reader(key: str) -> None:
    """ConfigError naming `key` when BAM output could not be read here (pysam missing)."""
    from bcorch.config import ConfigError

    try:
        import pysam  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"{key}: BAM output needs pysam to check its read ids, and it cannot be "
                          f"imported ({exc}); pip install pysam, or set runner.emit = \"fastq\"") \
            from None


def is_read_file(name: str) -> bool:
    return name.endswith(FASTQ_SUFFIXES + BAM_SUFFIXES + OTHER_READ_SUFFIXES)


def records_in(path: str | Path) -> Iterator[Record]:
    """Every record of one read file; UnreadableOutput for a format or record it cannot read."""
    name = Path(path).name
    if name.endswith(FASTQ_SUFFIXES):
        return _fastq_records(Path(path))
    if name.endswith(BAM_SUFFIXES):
        return _bam_records(Path(path))
    raise UnreadableOutput(f"{path}: not FASTQ or BAM; cannot read its read ids")


def read_ids_in(path: str | Path) -> Iterator[str]:
    """The read id of every record of one read file."""
    return (record.read_id for record in records_in(path))


def read_files_under(dirs: Iterable[str | Path]) -> Iterator[Path]:
    """Read files (by name) under the given directories, sorted; missing directories are empty."""
    for root in dirs:
        found = []
        for dirpath, _dirs, files in os.walk(root):
            found.extend(Path(dirpath) / name for name in files if is_read_file(name))
        yield from sorted(found)


def read_ids_under(dirs: Iterable[str | Path]) -> WrittenReads:
    """Every record of every read file under the given directories."""
    written = WrittenReads()
    for path in read_files_under(dirs):
        for record in records_in(path):
            written.add(record)
    return written


_SETTING_WORD = re.compile(r"(?:^|\s)(model|kit)=(\S+)")


def settings_under(dirs: Iterable[str | Path]) -> dict[str, dict[str, str]]:
    """{read id: {"model": ..., "kit": ...}}: what each read was basecalled with, as the
    simulated basecaller and the test fakes record it (the `model=` and `kit=` words of a
    FASTQ header, or of a BAM record's DS tag; a read without them maps to {}). Real
    dorado does not write these words: this checks simulations and tests (facility mode
    runs each run's batches with that run's model)."""
    found: dict[str, dict[str, str]] = {}
    for path in read_files_under(dirs):
        if path.name.endswith(FASTQ_SUFFIXES):
            opener = gzip.open if path.name.endswith(".gz") else open
            with opener(path, "rt", encoding="ascii", errors="replace") as fh:
                for number, line in enumerate(fh):
                    if number % 4 == 0 and line.startswith("@") and line[1:].strip():
                        read_id, *rest = line[1:].split(None, 1)
                        found[read_id] = dict(_SETTING_WORD.findall(" ".join(rest)))
        elif path.name.endswith(BAM_SUFFIXES):
            import pysam

            with pysam.AlignmentFile(str(path), "rb", check_sq=False) as bam:
                for record in bam.fetch(until_eof=True):
                    text = str(record.get_tag("DS")) if record.has_tag("DS") else ""
                    found[record.query_name] = dict(_SETTING_WORD.findall(text))
    return found


def _fastq_records(path: Path) -> Iterator[Record]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="ascii", errors="replace") as fh:
        for number, line in enumerate(fh):
            if number % 4:
                continue
            if not line.startswith("@"):
                raise UnreadableOutput(f"{path}: line {number + 1} is not a FASTQ header")
            header = line[1:]
            read_id = header.split(None, 1)[0] if header.strip() else ""
            parent = _PI_TAG.search(header)
            yield Record(read_id, parent.group(1) if parent else None)


def _bam_records(path: Path) -> Iterator[Record]:
    import pysam

    try:
        bam = pysam.AlignmentFile(str(path), "rb", check_sq=False)
    except (OSError, ValueError) as exc:
        raise UnreadableOutput(f"{path}: not a readable BAM ({exc})") from None
    with bam:
        try:
            for record in bam.fetch(until_eof=True):
                parent = str(record.get_tag("pi")) if record.has_tag("pi") else None
                yield Record(record.query_name, parent)
        except OSError as exc:  # truncated or corrupt
            raise UnreadableOutput(f"{path}: BAM cannot be read to the end ({exc})") from None
