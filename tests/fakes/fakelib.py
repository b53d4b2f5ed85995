"""Shared by the fake dorado executables: argv records, dorado-style log lines, reading
POD5 files with the pod5 library, and writing FASTQ and (unaligned, with pysam) BAM records."""
from __future__ import annotations

import datetime as dt
import json
import os
import sys
import tempfile
import uuid
import zlib
from pathlib import Path


def record_argv(program: str) -> None:
    """Append {"program", "argv", "pid", "cuda_visible_devices"} to $FAKE_ARGV_LOG (JSON lines)."""
    target = os.environ.get("FAKE_ARGV_LOG")
    if target:
        with open(target, "a") as fh:
            fh.write(json.dumps({"program": program, "argv": sys.argv[1:], "pid": os.getpid(),
                                 "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")})
                     + "\n")


def say(level: str, message: str) -> None:
    """One spdlog-style line on stderr, as dorado prints them."""
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    print(f"[{stamp}] [{level}] {message}", file=sys.stderr, flush=True)


def read_pod5(path: Path) -> tuple[list[tuple[str, int]], dict[str, str]]:
    """[(read id, samples)] and run info fields of a POD5 file; raises if unreadable."""
    import pod5

    reads, info = [], {}
    with pod5.Reader(path) as reader:
        for read in reader.reads():
            reads.append((str(read.read_id), int(read.num_samples)))
            if not info:
                ri = read.run_info
                info = {"experiment": ri.experiment_name or "no_experiment",
                        "sample": ri.sample_id or "no_sample", "flow_cell": ri.flow_cell_id,
                        "position": ri.sequencer_position, "run": ri.protocol_run_id[:8],
                        "start": ri.acquisition_start_time.strftime("%Y%m%d_%H%M")}
    return reads, info


def sequence(read_id: str, samples: int) -> tuple[str, str]:
    length = max(20, min(5000, samples // 10))
    seed = zlib.crc32(read_id.encode())
    seq = "".join("ACGT"[(seed >> (i % 29)) & 3] for i in range(length))
    return seq, "5" * length


def split_reads(records: list[tuple[str, int]]) -> list[tuple[str, int, str | None]]:
    """dorado's read splitting acted out: each read becomes two children with new ids and the
    parent's id in `pi:Z:` (records are (read id, samples, parent id or None))."""
    out = []
    for read_id, samples in records:
        for part in (1, 2):
            child = str(uuid.uuid5(uuid.UUID(read_id), f"split-{part}"))
            out.append((child, samples // 2, read_id))
    return out


def _unsplit(records) -> list[tuple[str, int, str | None]]:
    return [r if len(r) == 3 else (*r, None) for r in records]


def description(model: str, given: str = "", kit: str = "") -> str:
    """The DS:Z tag's text: the model dorado resolved, and what the fake was given on its
    command line (`model=` the model argument, `kit=` the --kit-name), so a test can tell
    which run's settings basecalled each read."""
    words = [f"basecall_model={model}", f"model={given or model}"]
    if kit:
        words.append(f"kit={kit}")
    return " ".join(words)


def fastq(records, model: str, given: str = "", kit: str = "") -> str:
    """FASTQ text with dorado's header tags (and `pi:Z:` for a split read's child)."""
    out = []
    for read_id, samples, parent in _unsplit(records):
        seq, qual = sequence(read_id, samples)
        tags = f"\tst:Z:2026-11-01T09:00:00Z\tDS:Z:{description(model, given, kit)}"
        if parent:
            tags += f"\tpi:Z:{parent}"
        out.append(f"@{read_id}{tags}\n{seq}\n+\n{qual}\n")
    return "".join(out)


def bam(records, model: str, given: str = "", kit: str = "") -> bytes:
    """An unaligned BAM file, written by pysam as dorado writes one (no references, the
    read group and model in tags, DS as in `description`; `pi:Z:` for a split read's
    child)."""
    import pysam

    header = {"HD": {"VN": "1.6", "SO": "unknown"},
              "PG": [{"ID": "basecaller", "PN": "fake-dorado", "CL": model}]}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "calls.bam")
        with pysam.AlignmentFile(path, "wb", header=header) as out:
            for read_id, samples, parent in _unsplit(records):
                seq, qual = sequence(read_id, samples)
                record = pysam.AlignedSegment(out.header)
                record.query_name = read_id
                record.flag = 4
                record.query_sequence = seq
                record.query_qualities = pysam.qualitystring_to_array(qual)
                tags = [("st", "2026-11-01T09:00:00Z"), ("RG", f"fake_{model}"),
                        ("DS", description(model, given, kit))]
                if parent:
                    tags.append(("pi", parent))
                record.set_tags(tags)
                out.write(record)
        with open(path, "rb") as fh:
            return fh.read()


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
