"""Check a real GPU host end to end: NVML discovery, and `bcorch --gpus all` with the simulate
runner against a real manager, every read once.

For a machine with NVIDIA GPUs and no dorado (the CI machines have no GPU, so this is the one
place the NVML path runs for real). Prints what it saw and exits 0 only if:
- `bcorch gpus --json` lists at least one GPU with a UUID and memory;
- `bcorch --gpus all` starts one engine per GPU, its status shows NVML health figures,
  it exits 0 by itself when the run is complete, and every read is in the output once.

    python scripts/gpu_host_check.py [--files 8] [--workdir DIR]
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_args import BenchParser, positive_int  # noqa: E402

from bcorch.orchestrator.control import ControlError, request
from bcorch.orchestrator.local_cluster import LocalCluster
from bcorch.orchestrator.pod5_dataset import write_dataset
from bcorch.orchestrator.status_view import render_status
from bcorch.workers.read_ids import read_ids_under


def nvml_gpus() -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "bcorch.orchestrator", "gpus", "--json"],
                         capture_output=True, text=True, timeout=60)
    print(f"$ bcorch gpus --json  (exit {out.returncode})\n{out.stdout}{out.stderr}")
    if out.returncode != 0:
        return []
    data = json.loads(out.stdout)
    return data if isinstance(data, list) else data.get("gpus", [])


def main() -> int:
    p = BenchParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=positive_int, default=8)
    p.add_argument("--workdir")
    args = p.parse_args()
    gpus = nvml_gpus()
    if not gpus:
        print("FAIL: NVML found no GPU")
        return 1
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bcorch-gpucheck-"))
    cluster = LocalCluster(workdir, gpus="all", runner={"samples_per_s": 400_000.0})
    expected = write_dataset(cluster.input_dir, args.files, 50, 4000, seed=7)
    reads = {r for ids in expected.values() for r in ids}
    slots_seen: list[dict] = []
    busy_table = "(no slot was seen holding a batch)"
    try:
        cluster.start_manager()
        bcorch = cluster.start_bcorch()
        deadline = time.monotonic() + 180
        while bcorch.running() and time.monotonic() < deadline:
            try:
                reply = request(cluster.socket, {"cmd": "status"}, timeout=2.0)
            except (ControlError, OSError):
                reply = {}
            slots_seen = reply.get("slots") or slots_seen
            if any(slot.get("job_id") for slot in reply.get("slots") or []):
                busy_table = render_status(reply)
            time.sleep(0.5)
        code = bcorch.returncode
        status = cluster.status() or {}
    finally:
        cluster.close()
    print("bcorch status slots (last answer before it exited):")
    print(json.dumps(slots_seen, indent=1)[:6000])
    print(f"`bcorch status` while a batch was held:\n{busy_table}")
    print(f"manager files: {status.get('files')}; bcorch exit {code}")
    found = read_ids_under([cluster.output_dir / "pass", cluster.output_dir / "fail"])
    missing, doubled = reads - set(found), found.doubled()
    print(f"reads: {len(reads)} written, {sum(found.values())} in the output, "
          f"missing {len(missing)}, doubled {len(doubled)}")
    ok = code == 0 and not missing and not doubled and len(slots_seen) == len(gpus)
    if not ok:
        print((workdir / "bcorch.log").read_text()[-4000:])
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
