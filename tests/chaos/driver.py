"""The seeded chaos driver: a shuffled plan of faults, injected one after the other.

The seed fixes the order of the faults, the gaps between them, their durations and
their victims (as far as the victims exist at that moment), so a failing seed can be
run again. Pacing uses the monotonic clock; correctness never depends on it: the
test's end checks wait on conditions.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil

from bcorch.orchestrator.pod5_dataset import write_pod5

from .cluster import INCOMPLETE_GRACE_S, SETTLE_S, Cluster, Host
from .proxy import Mode

log = logging.getLogger("chaos.driver")

PLAN = {   # the single-run site (chaos.cluster.Cluster)
    "kill_engine": 3,          # kill -9 a random engine process
    "kill_basecaller": 3,      # kill -9 a random basecaller process
    "stop_engine": 1,          # SIGSTOP an engine past the hang timeout, then SIGCONT
    "kill_manager": 2,         # kill -9 the manager, start it again on the same database
    "cut_network": 1,          # proxy refuses connections, then hangs them
    "drain_resume": 1,         # bcorch drain --gpu N, later bcorch resume --gpu N
    "delete_database": 1,      # kill -9 the manager, delete its database (-wal, -shm), start it
    "rename_done_file": 1,     # move a DONE input file to another folder under a new name
    "paused_writer": 1,        # a new file written half, paused past settle_s, then finished
}

FACILITY_PLAN = {   # the facility site (chaos.facility.FacilitySite)
    "kill_engine": 3,
    "kill_basecaller": 2,
    "stop_engine": 1,
    "kill_manager": 2,
    "cut_network": 1,
    "drain_resume": 1,
    "pause_resume_run": 1,     # bcmanager run pause RUN, later run resume RUN
    "new_run": 2,              # the next run directory appears under the root
}


@dataclass
class Event:
    at: float
    name: str
    detail: str


@dataclass
class ChaosDriver:
    cluster: Cluster
    seed: int
    hang_timeout_s: float
    gap_s: tuple[float, float] = (1.0, 2.5)
    events: list[Event] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=lambda: dict(PLAN))
    pauses: list[tuple[str, bool]] = field(default_factory=list)   # (run, held while paused)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.plan = [name for name, n in self.faults.items() for _ in range(n)]
        self.rng.shuffle(self.plan)
        self._t0 = time.monotonic()

    def run(self, keep_going: Callable[[], bool],
            between: Callable[[], None] = lambda: None) -> list[Event]:
        """Inject the whole plan, one fault after the other, while keep_going() holds;
        between() is called before each fault (a facility's files keep arriving)."""
        self._t0 = time.monotonic()
        for name in self.plan:
            self._pause(self.rng.uniform(*self.gap_s))
            between()
            if not keep_going():
                self._record("stopped", "the work finished before the plan did")
                break
            detail = getattr(self, name)()
            self._record(name, detail)
        return self.events

    def summary(self) -> str:
        return "; ".join(f"{e.at:.1f}s {e.name} {e.detail}" for e in self.events)

    def _record(self, name: str, detail: str) -> None:
        event = Event(round(time.monotonic() - self._t0, 1), name, detail)
        self.events.append(event)
        log.info("chaos seed %d: %.1fs %s %s", self.seed, event.at, name, detail)

    @staticmethod
    def _pause(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))

    # -- victims -----------------------------------------------------------------------

    def _engines(self) -> list[tuple[Host, int, int]]:
        found = []
        for host in self.cluster.hosts:
            try:
                slots = host.status()["slots"]
            except Exception as exc:  # noqa: BLE001 - a busy host is no victim this time
                log.info("chaos: %s status failed: %s", host.name, exc)
                continue
            found += [(host, s["gpu"], s["pid"]) for s in slots if s.get("pid")]
        return found

    # -- faults ------------------------------------------------------------------------

    def kill_engine(self) -> str:
        engines = self._engines()
        if not engines:
            return "no engine running"
        host, gpu, pid = self.rng.choice(engines)
        _signal(pid, signal.SIGKILL)
        return f"{host.name} gpu{gpu} pid {pid}"

    def kill_basecaller(self) -> str:
        victims = [(h, p) for h in self.cluster.hosts for p in h.basecallers()]
        if not victims:
            return "no basecaller running"
        host, proc = self.rng.choice(victims)
        _signal(proc.pid, signal.SIGKILL)
        return f"{host.name} basecaller pid {proc.pid}"

    def stop_engine(self) -> str:
        engines = self._engines()
        if not engines:
            return "no engine running"
        host, gpu, pid = self.rng.choice(engines)
        _signal(pid, signal.SIGSTOP)
        self._pause(self.hang_timeout_s + self.rng.uniform(1.0, 2.0))
        _signal(pid, signal.SIGCONT)  # the orchestrator has replaced it by now, or does so
        return f"{host.name} gpu{gpu} pid {pid}"

    def kill_manager(self) -> str:
        old = self.cluster.manager
        old.proc.kill()
        old.proc.wait(timeout=30)
        down = self.rng.uniform(0.5, 3.0)
        self._pause(down)
        self.cluster.restart_manager()
        return f"pid {old.pid} down {down:.1f}s"

    def delete_database(self) -> str:
        """The manager's host loses its disk: only the journal beside the outputs remains."""
        old = self.cluster.manager
        old.proc.kill()
        old.proc.wait(timeout=30)
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(f"{self.cluster.db}{suffix}")
            except FileNotFoundError:
                pass
        self.cluster.restart_manager()
        return f"pid {old.pid}, database {self.cluster.db.name} deleted"

    def rename_done_file(self) -> str:
        code, body = self.cluster.manager.get("/files", state="DONE", limit=1000)
        done = sorted(f["path"] for f in body.get("files", ())) if code == 200 else []
        done = [p for p in done if p in self.cluster.written]
        if not done:
            return "no DONE file yet"
        old = self.rng.choice(done)
        new = f"renamed/{self.rng.randrange(10**6):06d}_{os.path.basename(old)}"
        (self.cluster.input_dir / "renamed").mkdir(exist_ok=True)
        os.rename(self.cluster.input_dir / old, self.cluster.input_dir / new)
        self.cluster.written[new] = self.cluster.written.pop(old)
        return f"{old} -> {new}"

    def paused_writer(self) -> str:
        """MinKNOW pausing mid-file (a mux scan): half the file, a pause, then the rest."""
        n = len([e for e in self.events if e.name == "paused_writer"])
        rel = f"paused_{n}.pod5"
        whole = self.cluster.tmp / f"whole_{rel}"
        ids = write_pod5(whole, 5, 2000, random.Random(self.seed * 1000 + n))
        data = whole.read_bytes()
        target = self.cluster.input_dir / rel
        with open(target, "wb") as fh:
            fh.write(data[: len(data) // 2])
        pause = self.rng.uniform(SETTLE_S + 0.5, INCOMPLETE_GRACE_S + 1.5)
        self._pause(pause)
        with open(target, "ab") as fh:
            fh.write(data[len(data) // 2:])
        self.cluster.written[rel] = ids
        return f"{rel} paused {pause:.1f}s (settle_s {SETTLE_S}, grace {INCOMPLETE_GRACE_S})"

    def cut_network(self) -> str:
        refuse, hang = self.rng.uniform(1.5, 3.0), self.rng.uniform(2.0, 5.0)
        self.cluster.proxy.set_mode(Mode.REFUSE)
        self._pause(refuse)
        self.cluster.proxy.set_mode(Mode.HANG)
        self._pause(hang)
        self.cluster.proxy.set_mode(Mode.FORWARD)
        return f"refused {refuse:.1f}s, hung {hang:.1f}s"

    def new_run(self) -> str:
        """A sequencer starts a run: its directory appears under the watch root."""
        return self.cluster.appear() or "no run left to appear"

    def pause_resume_run(self) -> str:
        """Pause an ACTIVE run (the /runs route behind `bcmanager run pause`), check that it
        gets no new batch while paused (DONE stays within DONE + ASSIGNED at the pause),
        then resume it."""
        views = self.cluster.runs_view()
        active = sorted(rel for rel, r in views.items() if r["state"] == "ACTIVE")
        waiting = [rel for rel in active if views[rel]["files"]["PENDING"] > 0]
        if not active:
            return "no ACTIVE run"
        run_id = views[self.rng.choice(waiting or active)]["run_id"]
        code, body = self.cluster.manager.post("/runs/pause", {"run": run_id})
        if code != 200:
            return f"{run_id}: pause answered {code} {body}"
        at_pause = body["run"]["files"]
        most = at_pause["DONE"] + at_pause["ASSIGNED"]
        paused_s = self.rng.uniform(2.0, 4.0)
        self._pause(paused_s)
        view = next(r for r in self.cluster.runs_view().values() if r["run_id"] == run_id)
        held = view["state"] == "PAUSED" and view["files"]["DONE"] <= most
        code, _ = self.cluster.manager.post("/runs/resume", {"run": run_id})
        self.pauses.append((run_id, held and code == 200))
        return (f"{run_id} paused {paused_s:.1f}s: {view['state']}, DONE "
                f"{view['files']['DONE']} <= {most}: {held}; resume {code}")

    def drain_resume(self) -> str:
        host = self.rng.choice(self.cluster.hosts)
        gpu = self.rng.randrange(host.gpus)
        drained = _bcorch("drain", "--gpu", str(gpu), "--socket", str(host.socket))
        self._pause(self.rng.uniform(2.0, 4.0))
        resumed = _bcorch("resume", "--gpu", str(gpu), "--socket", str(host.socket))
        return f"{host.name} gpu{gpu} drain rc={drained} resume rc={resumed}"


def _signal(pid: int, sig: int) -> None:
    try:
        psutil.Process(pid).send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def _bcorch(*argv: str) -> int:
    """The real control command line, as an operator would type it."""
    out = subprocess.run([sys.executable, "-m", "bcorch.orchestrator", *argv], capture_output=True,
                         text=True, timeout=60)
    if out.returncode != 0:
        log.warning("chaos: bcorch %s -> %d: %s", " ".join(argv), out.returncode,
                    out.stderr.strip())
    return out.returncode
