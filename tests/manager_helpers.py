"""Test helpers for the manager: start one on tmp dirs, and play an engine by hand.

The "engine" here is the test itself speaking the wire protocol; its basecaller
stand-in reads the batch's real POD5 files with the pod5 library and writes one
FASTQ record per read into the job's TMPOUTPUT_ dir.
"""
from __future__ import annotations

import time
from pathlib import Path

from support import ManagerProcess


def start_manager(procs, tmp_path: Path, **kw) -> ManagerProcess:
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    manager = ManagerProcess(tmp_path, inp, out, **kw)
    procs.append(manager)
    return manager.start()


def aged(path: Path, age: float = 3600) -> Path:
    t = time.time() - age
    import os
    os.utime(path, (t, t))
    return path


def write_files(root: Path, names, data: bytes = b"pod5?") -> None:
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        part = p.with_name(p.name + ".part")   # the scanner sees only whole files (settle_s 0)
        part.write_bytes(data)
        aged(part)
        part.rename(p)


def assign(m: ManagerProcess, engine: str = "gpu0", size: int = 0) -> dict:
    code, body = m.get("/assignwork", engineid=engine, batchsize=size)
    assert code == 200, body
    return body


def complete(m: ManagerProcess, job: str, state: str, **extra) -> tuple[int, dict]:
    return m.post("/completed", {"job_id": job, "job_state": state, **extra})


def keepalive(m: ManagerProcess, job: str, state: str = "PROCESSING") -> dict:
    code, body = m.get("/keepalive", job_id=job, job_state=state)
    assert code == 200, body
    return body


def basecall(batch: dict, tmp_path: Path) -> list[str]:
    """Read the batch's POD5 files through its symlinks; write FASTQ; return the read ids."""
    out_dir = tmp_path / "out" / batch["job_output_dir"]
    ids = write_fastq(batch, tmp_path / "in" / batch["job_input_dir"], out_dir)
    (out_dir / "basecaller.log").write_text(f"simulated basecaller: {len(ids)} reads\n")
    return ids


def write_fastq(batch: dict, in_dir: Path, out_dir: Path, header: str = "") -> list[str]:
    """What an engine does with a batch: read each POD5 file in in_dir, write one FASTQ record
    per read (header appended to each "@read_id") into out_dir/pass; return the read ids."""
    import pod5

    ids: list[str] = []
    for name in batch["batch"]:
        with pod5.Reader(in_dir / name) as reader:
            reads = [str(r.read_id) for r in reader.reads()]
        with open(out_dir / "pass" / (name + ".fastq"), "w") as fh:
            for rid in reads:
                fh.write(f"@{rid}{header}\nACGT\n+\n!!!!\n")
        ids += reads
    return ids


def wait_counts(m: ManagerProcess, **expected: int) -> dict:
    from support import wait_until

    def match():
        st = m.status()
        return st if all(st["files"][k] == v for k, v in expected.items()) else None
    return wait_until(match, 30, what=f"file counts {expected}")
