"""Shared by the fake dorado executables: argv records, dorado-style log lines, reading
POD5 files with the pod5 library, and writing FASTQ and (unaligned) BAM records."""
from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import struct
import sys
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


def fastq(read_id: str, samples: int, model: str) -> str:
    seq, qual = sequence(read_id, samples)
    return f"@{read_id}\tst:Z:2026-11-01T09:00:00Z\tDS:Z:basecall_model={model}\n{seq}\n+\n{qual}\n"


def _bgzf_block(data: bytes) -> bytes:
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = deflate.compress(data) + deflate.flush()
    header = struct.pack("<BBBBIBBHBBHH", 31, 139, 8, 4, 0, 0, 255, 6, 66, 67, 2,
                         len(body) + 25)
    return header + body + struct.pack("<II", zlib.crc32(data), len(data))


def bam(records: list[tuple[str, int]], model: str) -> bytes:
    """An unaligned BAM file (BGZF blocks, no references) holding the given reads."""
    text = f"@HD\tVN:1.6\tSO:unknown\n@PG\tID:basecaller\tPN:fake-dorado\tCL:{model}\n".encode()
    payload = b"BAM\1" + struct.pack("<i", len(text)) + text + struct.pack("<i", 0)
    codes = {c: i for i, c in enumerate("=ACMGRSVTWYHKDBN")}
    for read_id, samples in records:
        seq, qual = sequence(read_id, samples)
        name = read_id.encode() + b"\0"
        packed = bytearray()
        for i in range(0, len(seq), 2):
            hi = codes[seq[i]] << 4
            lo = codes[seq[i + 1]] if i + 1 < len(seq) else 0
            packed.append(hi | lo)
        body = struct.pack("<iiBBHHHIiii", -1, -1, len(name), 0, 4680, 0, 4, len(seq), -1, -1, 0)
        body += name + bytes(packed) + bytes(ord(q) - 33 for q in qual)
        payload += struct.pack("<i", len(body)) + body
    out = b"".join(_bgzf_block(payload[i:i + 60000]) for i in range(0, len(payload), 60000))
    return out + _bgzf_block(b"")


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def bam_read_names(path: Path) -> list[str]:
    """Read names of a BAM written by bam() (for the fakes' own tests)."""
    data = gzip.decompress(path.read_bytes())
    (l_text,) = struct.unpack_from("<i", data, 4)
    offset = 8 + l_text + 4
    names = []
    while offset < len(data):
        (size,) = struct.unpack_from("<i", data, offset)
        l_name = data[offset + 12]
        names.append(data[offset + 36: offset + 36 + l_name - 1].decode())
        offset += 4 + size
    return names
