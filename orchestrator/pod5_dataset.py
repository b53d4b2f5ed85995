"""Write real POD5 files with the pod5 library (demo, tests, benchmarks).

Reads get random ids from a seeded generator and a signal of a chosen length, so a
run is reproducible and its read ids are known: the caller gets, for every file
written, the list of its read ids.
"""
from __future__ import annotations

import datetime as dt
import random
import uuid
from pathlib import Path

SAMPLE_RATE = 5000


def _run_info(seed: int):
    import pod5

    started = dt.datetime(2026, 11, 1, 9, 0, tzinfo=dt.timezone.utc)
    return pod5.RunInfo(
        acquisition_id=f"bcorch-demo-{seed:08x}",
        acquisition_start_time=started,
        adc_max=2047,
        adc_min=-2048,
        context_tags={"sample_frequency": str(SAMPLE_RATE), "experiment_type": "genomic_dna",
                      "sequencing_kit": "sqk-lsk114", "basecall_config_filename": "none"},
        experiment_name="bcorch-demo",
        flow_cell_id="PAW00000",
        flow_cell_product_code="FLO-PRO114M",
        protocol_name="sequencing/sequencing_PRO114_DNA_e8_2_400K:FLO-PRO114M:SQK-LSK114",
        protocol_run_id=str(uuid.UUID(int=seed)),
        protocol_start_time=started,
        sample_id="demo-sample",
        sample_rate=SAMPLE_RATE,
        sequencing_kit="sqk-lsk114",
        sequencer_position="1A",
        sequencer_position_type="PromethION",
        software="bcorch dataset generator (MinKNOW-like run information)",
        system_name="bcorch-demo-host",
        system_type="PromethION 24",
        tracking_id={"device_id": "1A", "flow_cell_id": "PAW00000", "run_id": f"{seed:032x}"},
    )


def write_pod5(path: Path, n_reads: int, samples_per_read: int | tuple[int, int],
               rng: random.Random, run_info=None) -> list[str]:
    """Write one POD5 file of n_reads reads; return their read ids (as strings)."""
    import numpy as np
    import pod5

    run_info = run_info or _run_info(rng.getrandbits(32))
    ids: list[str] = []
    path.parent.mkdir(parents=True, exist_ok=True)
    with pod5.Writer(path) as writer:
        for number in range(n_reads):
            read_id = uuid.UUID(int=rng.getrandbits(128), version=4)
            n = (samples_per_read if isinstance(samples_per_read, int)
                 else rng.randint(*samples_per_read))
            signal = np.full(n, 500, dtype=np.int16)
            signal[:: max(1, n // 64)] = 900
            writer.add_read(pod5.Read(
                read_id=read_id,
                pore=pod5.Pore(channel=1 + number % 512, well=1, pore_type="not_set"),
                calibration=pod5.Calibration(offset=-240.0, scale=0.18),
                read_number=number,
                start_sample=number * 10 * SAMPLE_RATE,
                median_before=210.0,
                end_reason=pod5.EndReason(pod5.EndReasonEnum.SIGNAL_POSITIVE, False),
                run_info=run_info,
                signal=signal,
            ))
            ids.append(str(read_id))
    return ids


def write_dataset(directory: Path, n_files: int, reads_per_file: int = 50,
                  samples_per_read: int | tuple[int, int] = 4000, seed: int = 1,
                  subdirs: int = 0) -> dict[str, list[str]]:
    """Write n_files POD5 files under directory (spread over `subdirs` sub-folders).

    Returns {path relative to directory: [read ids]}.
    """
    rng = random.Random(seed)
    run_info = _run_info(seed)
    written: dict[str, list[str]] = {}
    for i in range(n_files):
        rel = Path(f"batch_{i % subdirs}") / f"reads_{i:05d}.pod5" if subdirs else Path(f"reads_{i:05d}.pod5")
        written[str(rel)] = write_pod5(directory / rel, reads_per_file, samples_per_read, rng, run_info)
    return written


def write_corrupt(path: Path, size: int = 4096, seed: int = 0) -> None:
    """A file with a .pod5 name that the pod5 library cannot open."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"NOT-A-POD5" + bytes(rng.getrandbits(8) for _ in range(size)))


def minknow_run_name(number: int, seed: int = 1) -> str:
    """A run directory's name as MinKNOW writes it: {start}_{device}_{flow_cell}_{short_run_id}."""
    short_run_id = f"{random.Random(seed * 7919 + number).getrandbits(32):08x}"
    device = f"P2S-{number % 24 + 1:02d}-A"
    return f"20261126_{1200 + number:04d}_{device}_PAW{number:05d}_{short_run_id}"
