"""FairShare: weighted shares of GPU time, no banked credit, model affinity within slack.

The simulations are event-driven (a virtual clock, engines finishing batches of random
length), and measure the GPU-seconds each run was given themselves, from the batches' actual
durations, rather than trusting FairShare's own bookkeeping.
"""
from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

import pytest

from bcorch.manager.fair_share import Demand, FairShare


@dataclass
class SimRun:
    priority: float
    model: str
    duration: tuple[float, float]      # actual batch durations: uniform in this range
    away: tuple[float, float] = (0.0, 0.0)   # not ready (not joined yet, paused) in [from, to)
    estimate_s: float = 10.0            # what the manager charges at start


@dataclass
class Sim:
    fair: FairShare
    runs: dict[str, SimRun]
    engines: int
    seed: int = 1
    correct: bool = True                # report actual durations at finish
    picks: list[tuple[float, str, str]] = field(default_factory=list)   # (t, engine, run)
    served: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # run -> (t, s)
    worst_lag: float = 0.0          # largest spread of served_s / priority seen after a start

    def run(self, until: float) -> None:
        rng = random.Random(self.seed)
        now = 0.0
        self.fair._clock = lambda: now
        ids = itertools.count()
        free = [(0.0, f"gpu{e}", None, 0.0) for e in range(self.engines)]
        heapq.heapify(free)
        while free:
            now, engine, job, actual = heapq.heappop(free)
            if now >= until:
                continue
            if job is not None:
                self.fair.finished(job[0], actual if self.correct else None)
                self.served.setdefault(job[1], []).append((job[2], actual))
            ready = [Demand(r, s.priority, s.model) for r, s in self.runs.items()
                     if not s.away[0] <= now < s.away[1]]
            chosen = self.fair.pick(engine, ready)
            if chosen is None:
                heapq.heappush(free, (now + 1.0, engine, None, 0.0))
                continue
            spec = self.runs[chosen.run_id]
            job_id = f"job{next(ids)}"
            self.fair.started(job_id, chosen.run_id, engine, chosen.model, spec.estimate_s)
            self.picks.append((now, engine, chosen.run_id))
            served = self.fair.served_s()
            level = [served[r.run_id] / r.priority for r in ready]
            self.worst_lag = max(self.worst_lag, max(level) - min(level))
            duration = rng.uniform(*spec.duration)
            heapq.heappush(free, (now + duration, engine, (job_id, chosen.run_id, now), duration))

    def gpu_s(self, run_id: str, start: float = 0.0, end: float = float("inf")) -> float:
        """GPU-seconds of batches of run_id that started in [start, end)."""
        return sum(s for t, s in self.served.get(run_id, []) if start <= t < end)

    def shares(self, start: float = 0.0, end: float = float("inf")) -> dict[str, float]:
        totals = {r: self.gpu_s(r, start, end) for r in self.runs}
        whole = sum(totals.values())
        return {r: v / whole for r, v in totals.items()}


def test_shares_converge_to_priority_ratios_with_wrong_estimates():
    runs = {"a": SimRun(1, "hac", (2, 20)), "b": SimRun(1, "hac", (5, 10)),
            "c": SimRun(2, "hac", (1, 30))}
    sim = Sim(FairShare(switch_slack_s=600), runs, engines=4)
    sim.run(until=40_000)
    shares = sim.shares()
    assert shares["a"] == pytest.approx(0.25, abs=0.01), shares
    assert shares["b"] == pytest.approx(0.25, abs=0.01), shares
    assert shares["c"] == pytest.approx(0.50, abs=0.01), shares


def test_without_the_actual_times_the_estimates_would_skew_the_shares():
    """The correction in finished() is what makes the shares right when estimates are off."""
    runs = {"a": SimRun(1, "hac", (18, 22)), "b": SimRun(1, "hac", (4, 6))}
    corrected = Sim(FairShare(switch_slack_s=0), runs, engines=2)
    corrected.run(until=20_000)
    assert corrected.shares()["a"] == pytest.approx(0.5, abs=0.02)
    estimated = Sim(FairShare(switch_slack_s=0), runs, engines=2, correct=False)
    estimated.run(until=20_000)
    assert estimated.shares()["a"] > 0.75      # equal batch counts, four times the GPU time


def test_finished_with_the_actual_time_corrects_the_charge():
    fair = FairShare(switch_slack_s=0)
    ready = [Demand("a", 1, "hac"), Demand("b", 1, "hac")]
    assert fair.pick("g0", ready).run_id == "a"
    fair.started("j1", "a", "g0", "hac", 10.0)
    assert fair.served_s() == {"a": 10.0, "b": 0.0}
    assert fair.pick("g1", ready).run_id == "b"
    fair.started("j2", "b", "g1", "hac", 10.0)
    fair.finished("j1", 2.0)                 # a ran much shorter than estimated
    fair.finished("j2", 30.0)                # b much longer
    assert fair.served_s() == {"a": 2.0, "b": 30.0}
    assert fair.pick("g0", ready).run_id == "a"
    fair.finished("j2", 99.0)                # a second report of a job is ignored
    fair.finished("nobody", 5.0)
    assert fair.served_s() == {"a": 2.0, "b": 30.0}


def test_finished_without_an_actual_time_keeps_the_estimate():
    fair = FairShare(switch_slack_s=0)
    fair.pick("g0", [Demand("a", 2, "hac")])
    fair.started("j1", "a", "g0", "hac", 8.0)
    fair.finished("j1", None)
    assert fair.served_s() == {"a": 8.0}


def test_a_late_run_gets_no_banked_credit_and_is_not_starved():
    runs = {"a": SimRun(1, "hac", (5, 15)), "b": SimRun(1, "hac", (5, 15)),
            "late": SimRun(1, "hac", (5, 15), away=(0, 10_000))}
    sim = Sim(FairShare(switch_slack_s=0), runs, engines=3)
    sim.run(until=20_000)
    first_late = min(t for t, _, r in sim.picks if r == "late")
    assert first_late < 10_000 + 20           # served at once: the next engine to free up
    soon = sim.shares(10_000, 10_600)         # had it banked 10,000 s it would take all of it
    assert soon["late"] == pytest.approx(1 / 3, abs=0.06), soon
    after = sim.shares(10_000, 20_000)
    for run_id in runs:
        assert after[run_id] == pytest.approx(1 / 3, abs=0.02), after


def test_a_run_that_pauses_and_resumes_does_not_catch_up_on_the_pause():
    runs = {"a": SimRun(1, "hac", (5, 15)), "b": SimRun(1, "hac", (5, 15), away=(5_000, 8_000))}
    sim = Sim(FairShare(switch_slack_s=0), runs, engines=2)
    sim.run(until=16_000)
    assert sim.shares(6_000, 8_000)["a"] == 1.0                  # a alone during the pause
    assert sim.shares(8_000, 8_600)["b"] == pytest.approx(0.5, abs=0.1)   # no burst after it
    assert sim.shares(8_000, 16_000)["b"] == pytest.approx(0.5, abs=0.03)


def test_no_run_starves_with_very_unequal_priorities():
    runs = {"big": SimRun(50, "hac", (5, 15)), "small": SimRun(1, "hac", (5, 15))}
    sim = Sim(FairShare(switch_slack_s=0), runs, engines=4)
    sim.run(until=30_000)
    assert sim.shares()["small"] == pytest.approx(1 / 51, abs=0.005)
    small_starts = sorted(t for t, _, r in sim.picks if r == "small")
    gaps = [b - a for a, b in zip(small_starts, small_starts[1:])]
    assert max(gaps) < 600                     # served regularly, not in rare bursts


def one_engine_picks(fair: FairShare, ready: list[Demand], n: int, finish: bool) -> list[str]:
    """The runs engine g0 picks for n batches of 10 s, each started (and finished, with
    finish) before the next pick."""
    order = []
    for i in range(n):
        choice = fair.pick("g0", ready)
        fair.started(f"j{i}", choice.run_id, "g0", choice.model, 10.0)
        if finish:
            fair.finished(f"j{i}", 10.0)
        order.append(choice.run_id)
    return order


def test_affinity_keeps_an_engine_on_its_model_within_slack_and_switches_beyond():
    fair = FairShare(switch_slack_s=100)
    ready = [Demand("a", 1, "hac"), Demand("b", 1, "sup")]
    order = one_engine_picks(fair, ready, 60, finish=True)
    stretches = [(run, len(list(group))) for run, group in itertools.groupby(order)]
    # a first: 11 batches take it 110 s ahead (beyond 100), then b runs until 110 s ahead of a
    assert stretches[:4] == [("a", 11), ("b", 22), ("a", 22), ("b", 5)], stretches
    assert fair.switches() == {"g0": 3}
    served = fair.served_s()
    assert abs(served["a"] - served["b"]) <= 100 + 10


def test_without_slack_the_engine_switches_whenever_its_model_falls_behind():
    fair = FairShare(switch_slack_s=0)
    ready = [Demand("a", 1, "hac"), Demand("b", 1, "sup")]
    order = one_engine_picks(fair, ready, 6, finish=False)
    assert order == ["a", "b", "b", "a", "a", "b"]    # a tie keeps the loaded model
    assert fair.switches() == {"g0": 3}


def test_affinity_prefers_the_least_served_run_of_the_engines_model():
    fair = FairShare(switch_slack_s=1000)
    ready = [Demand("x", 1, "hac"), Demand("y", 1, "hac"), Demand("z", 1, "sup")]
    assert fair.pick("g0", ready).run_id == "x"
    fair.started("j0", "x", "g0", "hac", 50.0)
    fair.started("j1", "z", "g1", "sup", 10.0)
    assert fair.pick("g0", ready).run_id == "y"     # its model, and less served than x
    assert fair.pick("g1", ready).run_id == "z"     # keeps sup: 10 s behind is within slack
    assert fair.pick("g2", ready).run_id == "y"     # a new engine takes the least served


def test_a_run_joining_starts_level_with_the_active_runs():
    fair = FairShare(switch_slack_s=0)
    fair.pick("g0", [Demand("x", 1, "hac")])
    fair.started("j0", "x", "g0", "hac", 50.0)
    ready = [Demand("x", 1, "hac"), Demand("y", 1, "hac")]
    # y joins level with what x's finished batches took (nothing yet), not x's running estimate
    assert fair.pick("g1", ready).run_id == "y"
    fair.started("j1", "y", "g1", "hac", 50.0)
    fair.finished("j0", 50.0)
    fair.finished("j1", 50.0)
    assert fair.pick("g0", ready).run_id == "x"     # 50 s each: a tie, not a debt
    fair.started("j2", "x", "g0", "hac", 1.0)
    assert fair.pick("g0", ready).run_id == "y"


def test_engines_settle_on_models_and_shares_stay_even():
    runs = {"a": SimRun(1, "hac", (8, 12)), "b": SimRun(1, "sup", (8, 12))}
    sim = Sim(FairShare(switch_slack_s=600), runs, engines=2)
    sim.run(until=36_000)
    assert sum(sim.fair.switches().values()) <= 2
    assert sim.shares()["a"] == pytest.approx(0.5, abs=0.02)


def test_lag_stays_within_slack_plus_a_batch_per_engine():
    runs = {"a": SimRun(1, "hac", (10, 10)), "b": SimRun(1, "sup", (10, 10)),
            "c": SimRun(2, "fast", (10, 10))}
    slack = 300.0
    sim = Sim(FairShare(switch_slack_s=slack), runs, engines=3)
    sim.run(until=20_000)
    assert sim.worst_lag <= slack + 3 * 10 + 10, sim.worst_lag
    assert sim.worst_lag >= slack / 2          # affinity did hold engines on their models
    assert sum(sim.fair.switches().values()) >= 10     # and it switches to keep the bound


def test_switches_are_counted_per_engine_and_the_first_load_is_not_one():
    fair = FairShare(switch_slack_s=0)
    fair.started("j1", "a", "g0", "hac", 1)
    fair.started("j2", "a", "g0", "hac", 1)
    fair.started("j3", "b", "g0", "sup", 1)
    fair.started("j4", "a", "g1", "hac", 1)
    fair.started("j5", "a", "g0", "hac", 1)
    fair.started("j5", "b", "g0", "sup", 1)       # the same job again: no charge, no switch
    assert fair.switches() == {"g0": 2, "g1": 0}
    assert fair.served_s() == {"a": 4.0, "b": 1.0}


def test_switches_per_hour_counts_from_the_first_batch():
    now = [100.0]
    fair = FairShare(switch_slack_s=0, clock=lambda: now[0])
    assert fair.switches_per_hour() == 0.0
    fair.started("j1", "a", "g0", "hac", 1)
    now[0] += 1800
    fair.started("j2", "b", "g0", "sup", 1)
    fair.started("j3", "a", "g0", "hac", 1)
    assert fair.switches_per_hour() == pytest.approx(4.0)


def test_forget_run_drops_its_share_and_its_batches():
    fair = FairShare(switch_slack_s=0)
    ready = [Demand("a", 1, "hac"), Demand("b", 1, "hac")]
    fair.pick("g0", ready)
    fair.started("j1", "a", "g0", "hac", 100.0)
    fair.started("j2", "b", "g1", "hac", 10.0)
    fair.forget_run("a")
    assert fair.served_s() == {"b": 10.0}
    assert fair.pick("g0", [Demand("b", 1, "hac")]).run_id == "b"
    fair.finished("j2", 10.0)
    # a run of the same id found again starts fresh, at the active runs' level ...
    assert fair.pick("g0", [Demand("b", 1, "hac"), Demand("a", 1, "hac")]).run_id == "a"
    assert fair.served_s()["a"] == 0.0
    fair.finished("j1", 500.0)         # ... and the old run's batch ending is not charged to it
    assert fair.served_s() == {"a": 0.0, "b": 10.0}
    fair.started("j3", "a", "g0", "hac", 5.0)
    assert fair.pick("g0", [Demand("b", 1, "hac"), Demand("a", 1, "hac")]).run_id == "b"
    fair.forget_run("never-seen")      # harmless


def test_nothing_ready_is_none_and_duplicates_count_once():
    fair = FairShare(switch_slack_s=0)
    assert fair.pick("g0", []) is None
    ready = [Demand("a", 1, "hac"), Demand("a", 1, "hac"), Demand("b", 1, "hac")]
    assert fair.pick("g0", ready).run_id == "a"


def test_a_priority_change_applies_to_later_batches():
    fair = FairShare(switch_slack_s=0)
    for n in range(4):
        pick = fair.pick("g0", [Demand("a", 1, "hac"), Demand("b", 1, "hac")])
        fair.started(f"j{n}", pick.run_id, "g0", "hac", 10.0)
    picks = []
    for n in range(4, 16):
        pick = fair.pick("g0", [Demand("a", 3, "hac"), Demand("b", 1, "hac")])
        fair.started(f"j{n}", pick.run_id, "g0", "hac", 10.0)
        picks.append(pick.run_id)
    assert picks.count("a") == 9 and picks.count("b") == 3


def test_bad_estimates_charge_nothing_rather_than_break_the_shares():
    fair = FairShare(switch_slack_s=0)
    fair.started("j1", "a", "g0", "hac", float("nan"))
    fair.started("j2", "a", "g0", "hac", -5.0)
    fair.finished("j1", float("inf"))
    assert fair.served_s() == {"a": 0.0}


def test_threads_picking_at_once_keep_the_books_straight():
    import threading
    fair = FairShare(switch_slack_s=50)
    ready = [Demand("a", 1, "hac"), Demand("b", 2, "sup")]

    def engine(n: int) -> None:
        for k in range(500):
            choice = fair.pick(f"g{n}", ready)
            job = f"{n}-{k}"
            fair.started(job, choice.run_id, f"g{n}", choice.model, 2.0)
            fair.finished(job, 1.0)

    threads = [threading.Thread(target=engine, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    served = fair.served_s()
    assert sum(served.values()) == pytest.approx(8 * 500 * 1.0)
    assert served["b"] / sum(served.values()) == pytest.approx(2 / 3, abs=0.05)


def test_a_run_joining_while_estimates_run_high_is_not_held_back():
    """Two engines on run A with 60-s estimates that take 0.5 s: B (priority 2) joining then
    must not be levelled with A's estimates, or it waits until A has caught up 120 s."""
    fs = FairShare(switch_slack_s=0)
    a, b = Demand("A", 1.0, "hac"), Demand("B", 2.0, "hac")
    for n, engine in enumerate(("e1", "e2")):
        assert fs.pick(engine, [a]) == a
        fs.started(f"a{n}", "A", engine, "hac", 60.0)
    assert fs.pick("e3", [a, b]) == b            # B joins while A's estimates are charged
    fs.started("b0", "B", "e3", "hac", 0.5)
    fs.finished("b0", 0.5)
    fs.finished("a0", 0.5)
    fs.finished("a1", 0.5)
    picks = []
    for n in range(24):
        got = fs.pick("e1", [a, b])
        fs.started(f"j{n}", got.run_id, "e1", "hac", 0.5)
        fs.finished(f"j{n}", 0.5)
        picks.append(got.run_id)
    assert 14 <= picks.count("B") <= 18, "".join(picks)   # about 2:1 for priority 2
