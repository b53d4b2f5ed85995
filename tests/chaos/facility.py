"""A facility for the chaos tests: sequencing runs in the MinKNOW layout under one watch root,
appearing over time, one real `bcmanager --watch-root` behind the cuttable proxy, and the
same bcorch "hosts" as the single-run site (chaos.cluster).

Each run gets its own model three ways: the `[facility]` default, a `[[facility.rules]]`
rule and the run's own `bcorch.toml`. Every run's POD5 files are written to a staging
folder first; a run appears whole (its directory renamed into the root with half of its
files, so its settings are there when it is found), the rest of its files arrive later,
and MinKNOW's `final_summary_*.txt` closes it.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from bcorch.config_writer import write_config
from bcorch.orchestrator.local_cluster import manager_argv, rules_toml
from bcorch.orchestrator.pod5_dataset import minknow_run_name, write_dataset
from support import ManagedProcess, ManagerProcess, free_port, wait_until

from .cluster import INCOMPLETE_GRACE_S, SETTLE_S, TOKEN, Cluster
from .proxy import Proxy

GROUP = "chaos"
OUTPUT = "basecalls"
RULE = {"sample": "methyl*", "model": "sup,5mCG_5hmCG", "priority": 2.0}


@dataclass(frozen=True)
class RunKind:
    sample: str
    model: str
    toml: str | None = None


KINDS = (
    RunKind("plain", "hac"),                                    # the [facility] default
    RunKind("methylation", RULE["model"]),                      # the rule (priority 2)
    RunKind("own_settings", "fast", '[run]\nmodel = "fast"\n'),  # the run's bcorch.toml
)


@dataclass
class SiteRun:
    number: int
    kind: RunKind
    rel: str
    written: dict[str, list[str]] = field(default_factory=dict)   # name in pod5/ -> read ids
    corrupt: list[str] = field(default_factory=list)
    delivered: int = 0
    appeared: bool = False

    @property
    def reads(self) -> set[str]:
        return {r for ids in self.written.values() for r in ids}


class FacilityManager(ManagerProcess):
    """`bcmanager --watch-root ROOT` with ManagerProcess's start, get, post and status."""

    def __init__(self, tmp: Path, root: Path, config: Path, *, port: int | None = None,
                 token: str = ""):
        self.port = port or free_port()
        self.token = token
        self.url = f"http://127.0.0.1:{self.port}"
        argv = manager_argv(config, "--watch-root", str(root), "--port", str(self.port),
                            "--token", token)
        ManagedProcess.__init__(self, argv, tmp / f"manager-{self.port}.log")


class FacilitySite(Cluster):
    """The chaos site in facility mode: `input_dir` and `output_dir` are the watch root (the
    engines' shared mounts); `runs` are the site's runs, in the order they appear."""

    def __init__(self, tmp: Path, procs: list, *, runs: int, files: int, corrupt: int = 1,
                 reads: int = 5, samples: int = 2000, seed: int = 0,
                 manager: dict | None = None):
        self.tmp, self.procs = tmp, procs
        self.root = self.input_dir = self.output_dir = tmp / "root"
        self.root.mkdir()
        self.staging = tmp / "staging"
        self.state_dir = tmp / "state"
        self.runs = [self._stage(n, files, reads, samples, seed, corrupt if n == 0 else 0)
                     for n in range(runs)]
        self.written = {}   # the single-run faults that use it are not in the facility plan
        self.corrupt = []
        self.db = self.state_dir / "bcfacility.sqlite"
        self.manager_config = write_config(tmp / "manager.toml", manager={
            "settle_s": SETTLE_S, "scan_interval_s": 0.2,
            "incomplete_grace_s": INCOMPLETE_GRACE_S, "allow_simulated": True,
            "db": str(self.db), **(manager or {})}, facility={"model": "hac"})
        with open(self.manager_config, "a") as fh:
            fh.write(rules_toml([RULE]))
        self.manager = self._new_manager(None).start()
        self.proxy = Proxy(self.manager.port).start()
        self.hosts = []

    def _stage(self, n: int, files: int, reads: int, samples: int, seed: int,
               corrupt: int) -> SiteRun:
        kind = KINDS[n % len(KINDS)]
        run = SiteRun(n, kind, f"{GROUP}/{kind.sample}/{minknow_run_name(n + 1, seed)}")
        skeleton = self._skeleton(run)
        (skeleton / "pod5").mkdir(parents=True)
        if kind.toml:
            (skeleton / "bcorch.toml").write_text(kind.toml)
        run.written = write_dataset(self._staged(run), files, reads_per_file=reads,
                                    samples_per_read=samples, seed=seed * 100 + n)
        for i in range(corrupt):
            name = f"corrupt_{i}.pod5"
            (self._staged(run) / name).write_bytes(b"this is not a POD5 file\n" * 64)
            run.corrupt.append(name)
        return run

    def _skeleton(self, run: SiteRun) -> Path:
        return self.staging / "skeletons" / str(run.number)

    def _staged(self, run: SiteRun) -> Path:
        return self.staging / "files" / str(run.number)

    def _new_manager(self, port: int | None) -> ManagerProcess:
        m = FacilityManager(self.tmp, self.root, self.manager_config, port=port, token=TOKEN)
        self.procs.append(m)
        return m

    # -- runs appearing, files arriving, runs ending ---------------------------------------

    def run_dir(self, run: SiteRun) -> Path:
        return self.root / run.rel

    def output(self, run: SiteRun) -> Path:
        return self.run_dir(run) / OUTPUT

    def to_appear(self) -> list[SiteRun]:
        return [r for r in self.runs if not r.appeared]

    def appear(self) -> str:
        """The next run appears with the first half of its files; "" when none is left."""
        waiting = self.to_appear()
        if not waiting:
            return ""
        run = waiting[0]
        self.run_dir(run).parent.mkdir(parents=True, exist_ok=True)
        os.rename(self._skeleton(run), self.run_dir(run))
        run.appeared = True
        self._deliver(run, (len(run.written) + len(run.corrupt)) // 2)
        return f"{run.rel} ({run.kind.model}), {run.delivered} files"

    def _deliver(self, run: SiteRun, upto: int) -> None:
        names = sorted(run.written) + run.corrupt
        for name in names[run.delivered:upto]:
            os.rename(self._staged(run) / name, self.run_dir(run) / "pod5" / name)
        run.delivered = max(run.delivered, upto)

    def trickle(self, files: int = 4) -> None:
        """Up to `files` more files arrive in each run that has appeared."""
        for run in self.runs:
            if run.appeared:
                self._deliver(run, min(run.delivered + files,
                                       len(run.written) + len(run.corrupt)))

    def end_runs(self) -> None:
        """Every run appears, gets the rest of its files, then MinKNOW's final summary."""
        while self.appear():
            pass
        for run in self.runs:
            self._deliver(run, len(run.written) + len(run.corrupt))
            flow_cell = run.rel.rsplit("/", 1)[-1].split("_")[3]
            (self.run_dir(run) / f"final_summary_{flow_cell}_chaos.txt").write_text("done\n")
        shutil.rmtree(self.staging, ignore_errors=True)

    def runs_view(self) -> dict[str, dict]:
        """{rel: RUN} from GET /runs ({} while the manager does not answer)."""
        try:
            code, body = self.manager.get("/runs")
        except OSError:
            return {}
        return {r["rel"]: r for r in body["runs"]} if code == 200 else {}

    def close_input(self) -> None:
        """Close the facility (no new runs) once every run has been found."""
        wait_until(lambda: len(self.runs_view()) == len(self.runs), 60,
                   what="every run found by the manager")
        code, body = self.manager.post("/close-input", {})
        assert code == 200, body
