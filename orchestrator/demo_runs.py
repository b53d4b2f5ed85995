"""`bcorch demo --runs N`: facility mode on one machine.

N sequencing runs in the MinKNOW layout under one root appear one after the other while a
facility manager (`bcmanager --watch-root`) and bcorch with virtual GPUs and the simulate
runner are running. Each run gets its own model, by the three ways a facility sets one:
the `[facility]` default (hac), a `[[facility.rules]]` rule (sample "methyl*":
sup,5mCG_5hmCG at priority 2) and a `bcorch.toml` in the run directory (sup). A run's files
arrive over a few seconds, then MinKNOW's `final_summary_*.txt` closes it. Once every run
has been written the facility is closed (no new runs), so bcorch exits when every run is
COMPLETE. The end checks each run's output on disk: every read of the run exactly once,
every read basecalled with the run's model (the simulated basecaller writes the model into
each read's header), and its bcorch_summary.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from bcorch.workers.read_ids import read_ids_under, settings_under

from .demo import READS_PER_FILE, SAMPLES_PER_READ, samples_per_s, slot_lines
from .local_cluster import LocalCluster
from .pod5_dataset import minknow_run_name, write_dataset

PROTOCOL_GROUP = "demo_facility"
OUTPUT = "basecalls"          # facility.output = "beside": {run}/basecalls
APPEAR_GAP_S = 4.0            # a new run every APPEAR_GAP_S seconds
ARRIVAL_S = 6.0               # each run's files arrive over ARRIVAL_S seconds
METHYLATION_RULE = {"sample": "methyl*", "model": "sup,5mCG_5hmCG", "priority": 2.0}


@dataclass(frozen=True)
class RunKind:
    sample: str
    model: str
    priority: float
    how: str                  # where the run's settings come from, for the output
    toml: str | None = None   # the run directory's bcorch.toml


KINDS = (
    RunKind("sample_hac", "hac", 1.0, "[facility] default"),
    RunKind("methylation", METHYLATION_RULE["model"], METHYLATION_RULE["priority"],
            "[[facility.rules]] sample = \"methyl*\""),
    RunKind("sample_sup", "sup", 1.0, "the run's bcorch.toml", '[run]\nmodel = "sup"\n'),
)


@dataclass
class PlannedRun:
    """One run of the demo: where it goes, what it should be basecalled with, its files."""
    number: int
    kind: RunKind
    rel: str
    appear_at: float                      # seconds after the demo's start
    files: dict[str, list[str]] = field(default_factory=dict)   # name in pod5/ -> read ids
    moved: int = 0
    appeared: bool = False
    summarised: bool = False

    @property
    def reads(self) -> set[str]:
        return {r for ids in self.files.values() for r in ids}


class FacilityDemo:
    """The --runs scenario of orchestrator/demo.py: prepare, tick, progress, summary."""

    input_closed = False   # the facility stays open until every run has been written

    def __init__(self, workdir: Path, args: argparse.Namespace):
        self.args = args
        self.root = workdir / "runs"
        self.staging = workdir / "staging"
        per_run = max(1, args.files // args.runs)
        self.files_per_run = per_run
        self.cluster = LocalCluster(
            workdir, gpus=args.gpus, watch_root=self.root,
            manager={"report_back_interval": 15.0, "batch_size": 2},
            runner={"kind": "simulate",
                    "samples_per_s": samples_per_s(per_run * args.runs, args.gpus)},
            facility={"model": "hac", "output": "beside"}, facility_rules=[METHYLATION_RULE])
        self.runs = [self._plan(n) for n in range(args.runs)]
        self.started = time.monotonic()
        self.facility_closed = False

    def _plan(self, n: int) -> PlannedRun:
        kind = KINDS[n % len(KINDS)]
        sample = kind.sample if n < len(KINDS) else f"{kind.sample}_{n + 1}"
        rel = f"{PROTOCOL_GROUP}/{sample}/{minknow_run_name(n + 1, self.args.seed)}"
        return PlannedRun(n, kind, rel, appear_at=n * APPEAR_GAP_S)

    # -- before the manager starts ---------------------------------------------------------

    def prepare(self) -> None:
        """Write every run's POD5 files into a staging folder; tick() moves them in."""
        total = self.files_per_run * len(self.runs)
        print(f"bcorch demo: {len(self.runs)} runs of {self.files_per_run} POD5 files "
              f"({total} files) will appear under {self.root}, one every {APPEAR_GAP_S:g}s")
        self.root.mkdir(parents=True, exist_ok=True)
        for run in self.runs:
            skeleton = self._skeleton(run)
            (skeleton / "pod5").mkdir(parents=True)
            if run.kind.toml:
                (skeleton / "bcorch.toml").write_text(run.kind.toml)
            run.files = write_dataset(self._staged(run), self.files_per_run, READS_PER_FILE,
                                      SAMPLES_PER_READ, seed=self.args.seed * 1000 + run.number)
            print(f"  run {run.number + 1}: {run.rel}  model {run.kind.model} "
                  f"(priority {run.kind.priority:g}, from {run.kind.how})")

    def _skeleton(self, run: PlannedRun) -> Path:
        return self.staging / "skeletons" / str(run.number)

    def _staged(self, run: PlannedRun) -> Path:
        return self.staging / "files" / str(run.number)

    # -- while it runs -----------------------------------------------------------------------

    def tick(self) -> None:
        """Runs appear and their files arrive on schedule; MinKNOW's final summary closes
        each run; once every run is written, the facility is closed."""
        now = time.monotonic() - self.started
        for run in self.runs:
            if now >= run.appear_at:
                self._feed(run, now - run.appear_at)
        if not self.facility_closed and all(r.summarised for r in self.runs):
            self.facility_closed = self.cluster.close_input()

    def _feed(self, run: PlannedRun, age_s: float) -> None:
        run_dir = self.root / run.rel
        if not run.appeared:
            # The run directory appears whole (bcorch.toml already in it), as its settings
            # are read once, when the manager finds the run.
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self._skeleton(run), run_dir)
            run.appeared = True
        names = sorted(run.files)
        due = min(len(names), max(1, math.ceil(len(names) * age_s / ARRIVAL_S)))
        for name in names[run.moved:due]:
            os.rename(self._staged(run) / name, run_dir / "pod5" / name)
        run.moved = max(run.moved, due)
        if run.moved == len(names) and not run.summarised:
            flow_cell = run.rel.rsplit("/", 1)[-1].split("_")[3]
            (run_dir / f"final_summary_{flow_cell}_{run.number + 1:04d}.txt").write_text(
                "bcorch demo: the run is over\n")
            run.summarised = True

    def progress_lines(self, status: dict, slots: list[dict]) -> list[str]:
        """The totals, one line per run (its model, priority, state, files, GPU seconds),
        then one line per GPU slot."""
        by_rel = {r.get("rel"): r for r in status.get("runs", [])}
        elapsed = time.monotonic() - self.started
        files = status.get("files", {})
        done = files.get("DONE", 0) + files.get("QUARANTINED", 0)
        total = self.files_per_run * len(self.runs)
        switches = status.get("facility", {}).get("model_switches_total", 0)
        lines = [f"runs {len(by_rel)}/{len(self.runs)} found  files {done}/{total} "
                 f"({100 * done / total:.0f}%)  model switches {switches}  "
                 f"elapsed {elapsed:.0f}s"]
        for run in self.runs:
            view = by_rel.get(run.rel)
            label = f"  run {run.number + 1}  {run.kind.model:<15} prio {run.kind.priority:g}"
            if view is None:
                wait = run.appear_at - elapsed
                when = "not found yet" if wait <= 0 else f"appears in {wait:.0f}s"
                lines.append(f"{label}  {when}")
                continue
            f = view.get("files", {})
            run_done = f.get("DONE", 0) + f.get("QUARANTINED", 0)
            lines.append(f"{label}  {view['state']:<9} files {run_done:>3}/{len(run.files):<3} "
                         f"(found {sum(f.values()):>3})  GPU {view.get('served_s', 0.0):6.1f}s")
        return lines + slot_lines(slots)

    # -- at the end --------------------------------------------------------------------------

    def summary(self, elapsed: float, bcorch_exit: int, status: dict) -> int:
        """Per run: every read once in its output, every read with its model, COMPLETE with
        its bcorch_summary.json. 0 only when all of that holds for every run."""
        views = {r.get("rel"): r for r in self.cluster.runs() or status.get("runs", [])}
        total_reads = sum(len(r.reads) for r in self.runs)
        checks, found_reads, lines = [], 0, []
        for run in self.runs:
            check = _check_run(self.root / run.rel / OUTPUT, run, views.get(run.rel, {}))
            checks.append(check)
            found_reads += check["found"]
            lines.append(
                f"  run {run.number + 1}  {run.kind.model:<15} prio {run.kind.priority:g}  "
                f"{check['found']:>5} of {len(run.reads)} reads  GPU {check['gpu_s']:6.1f}s  "
                f"{check['state']:<9} model check: {'yes' if check['models_ok'] else 'NO'} "
                f"({check['wrong_model']} reads with another model)  "
                f"summary: {'yes' if check['summary'] else 'NO'}")
        switches = status.get("facility", {}).get("model_switches_total", 0)
        print()
        print(f"basecalled {found_reads} of {total_reads} reads of {len(self.runs)} runs in "
              f"{elapsed:.1f}s ({found_reads / max(elapsed, 1e-9):.0f} reads/s), "
              f"{switches} model switches")
        for line in lines:
            print(line)
        missing = sum(c["missing"] for c in checks)
        doubled = sum(c["doubled"] for c in checks)
        unknown = sum(c["unknown"] for c in checks)
        wrong = sum(c["wrong_model"] for c in checks)
        incomplete = sum(1 for c in checks if c["state"] != "COMPLETE" or not c["summary"])
        ok = not (missing or doubled or unknown or wrong or incomplete) and bcorch_exit == 0
        print(f"verification: every read of every run exactly once in its run's output, "
              f"with its run's model: {'yes' if ok else 'NO'} (missing {missing}, doubled "
              f"{doubled}, unknown {unknown}, wrong model {wrong}, runs not COMPLETE "
              f"{incomplete}; bcorch exit {bcorch_exit})")
        return 0 if ok else 1


def _check_run(output: Path, run: PlannedRun, view: dict) -> dict:
    dirs = [output / "pass", output / "fail"]
    written = read_ids_under(dirs)
    expected = run.reads
    origins = {written.origin(r) for r in written}
    models = settings_under(dirs)
    summary = output / "bcorch_summary.json"
    try:
        summarised = json.loads(summary.read_text()).get("state") == "COMPLETE"
    except (OSError, ValueError):
        summarised = False
    return {
        "found": len(origins & expected),
        "missing": len(expected - origins),
        "doubled": len(written.doubled()),
        "unknown": len(origins - expected),
        "wrong_model": sum(1 for s in models.values() if s.get("model") != run.kind.model),
        "models_ok": bool(models) and all(s.get("model") == run.kind.model
                                          for s in models.values()),
        "state": view.get("state", "?"),
        "gpu_s": float(view.get("served_s") or 0.0),
        "summary": summarised,
    }
