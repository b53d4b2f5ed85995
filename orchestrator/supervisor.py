"""The supervisor: one loop that owns every GPU slot (an arbiter, like gunicorn's).

Signal handlers, the control pipe and the manager probes only post events to a queue
and wake the loop through a socket pair. The loop waits on the engines' pipes, their
process sentinels and that socket until the next deadline (at most 1 s), then hands each
event to the slot it concerns. The slot decides (`slot.py`); the loop carries the
`Decision` out: spawn an engine, send it a command, stop its process tree. Nothing in the
loop blocks for longer than a pipe read; every time is on the injected monotonic clock.
"""
from __future__ import annotations

import enum
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from bcorch.config import Config, ConfigError, load
from bcorch.ids import engine_id_for, short_hostname
from bcorch.protocol import EXIT_CONFIG, EXIT_OK, EXIT_PROTOCOL
from bcorch.workers import channel

from . import engine_process
from .commands import COMMANDS, GpuArg
from .control import ControlServer
from .gpus import Gpu, GpuMonitor
from .manager_watch import ManagerWatch, RunWatch, fetch_status_async, probe_async
from .metrics import MetricsServer
from .proctree import KILL_GRACE_S, ProcessTree, Reaper
from .rolling import RollingRestart
from .slot import (AfterExit, Decision, Do, EngineProcess, Failure, RestartPolicy, Slot,
                   SlotState, World)
from .zygote import Launcher

log = logging.getLogger(__name__)

TICK_S = 1.0
HEALTH_INTERVAL_S = 5.0
MAX_MESSAGES_PER_TICK = 200
_SEND = {Do.SEND_DRAIN: channel.Cmd.DRAIN, Do.SEND_RESUME: channel.Cmd.RESUME,
         Do.SEND_STOP: channel.Cmd.STOP}


class HostState(str, enum.Enum):
    RUNNING = "RUNNING"
    DRAINING = "DRAINING"     # every engine finishes its batch; bcorch exits after
    STOPPING = "STOPPING"     # every engine stops its batch now (reported STOPPED)


class Supervisor:
    def __init__(self, config: Config, gpus: list[Gpu], *, config_path: str | None = None,
                 manager_url: str | None = None, socket_path: Path | None = None,
                 target: engine_process.Target | None = None,
                 monitor: GpuMonitor | None = None, hostname: str | None = None,
                 log_level: str = "INFO", clock: Callable[[], float] = time.monotonic):
        """`manager_url` is the --manager-url flag (None: manager.url, reloaded on SIGHUP)."""
        if not gpus:
            raise ConfigError("--gpus: no GPU selected")
        self.config = config
        self.config_path = config_path
        self._manager_url_flag = manager_url
        self.target = target or engine_process.default_target()
        self.monitor = monitor
        self.hostname = hostname or short_hostname()
        self.log_level = log_level
        self.clock = clock
        policy = RestartPolicy.from_config(config.orchestrator)
        self.slots = [Slot(g, engine_id_for(g.index, config.engine.engine_id, self.hostname),
                           policy) for g in gpus]
        self.started_at = clock()
        self.manager = ManagerWatch(manager_url or config.manager.url)
        self.run_watch = RunWatch(self.manager.url, config.token, self.started_at)
        self.control = ControlServer(socket_path, self.post_control) if socket_path else None
        # The loop replaces (never mutates) this snapshot; the metrics thread only reads it.
        self.published: dict | None = None
        self.metrics = (MetricsServer(config.orchestrator.metrics_host,
                                      config.orchestrator.metrics_port, lambda: self.published)
                        if config.orchestrator.metrics_port else None)
        self.host_state = HostState.RUNNING
        self.exit_code = EXIT_OK
        self.host_reason = ""
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self._ctx = multiprocessing.get_context("spawn")
        self._rolling = RollingRestart()
        self._reaper = Reaper()
        self._launcher: Launcher | None = None     # made at the first start (it may set a subreaper)
        self._adopted: set[int] = set()             # orphans of dead engines, to wait for
        self._next_health = 0.0
        self._old_handlers: dict[int, Any] = {}
        self._control_handlers = {"status": self._control_status, "stop": self._control_stop,
                                  "drain": Slot.operator_drain, "resume": Slot.operator_resume,
                                  "restart": Slot.operator_restart}
        assert set(self._control_handlers) == set(COMMANDS)

    @property
    def orch(self):
        return self.config.orchestrator

    # --- events from other threads and signal handlers -------------------------------
    def post(self, event: tuple) -> None:
        """Record an event for the loop; safe from signal handlers and other threads."""
        self._events.put(event)
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def post_control(self, request: dict, reply: Callable[[dict], None]) -> None:
        self.post(("control", request, reply))

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.post(("signal", signum))

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    # --- the loop ------------------------------------------------------------------
    def run(self) -> int:
        """Supervise until done; the exit code of bcorch (0, 75 or 78)."""
        self._install_signals()
        try:
            if self.control is not None:
                self.control.start()
            if self.metrics is not None:
                self._start_metrics()
            if self.monitor is not None:
                self.monitor.open()
            log.info("bcorch on %s supervising %d GPU(s): %s; manager %s", self.hostname,
                     len(self.slots), ", ".join(f"gpu{s.gpu.index}={s.gpu.uuid}" for s in self.slots),
                     self.manager.url)
            for slot in self.slots:
                self._spawn(slot, "first start", counted=False, after_outage=False)
            while True:
                self._handle_events()
                self._read_pipes()
                self.step(self.clock())
                code = self._finished()
                if code is not None:
                    log.info("bcorch exits with %d (%s)", code, self.host_reason or "all engines done")
                    return code
                self._wait(self.clock())
        finally:
            self._shutdown()

    def step(self, now: float) -> None:
        """One pass over everything time-driven: exits, slot deadlines, manager, health."""
        for slot in self.slots:
            engine = slot.engine
            if engine is not None and engine.process is not None and engine.process.exitcode is not None:
                self._read_pipe(slot)
                self._engine_exited(slot, engine.process.exitcode, now)
            else:
                self._carry_out(slot, slot.tick(self.world(), now), now)
        self._check_manager(now)
        self._check_run(now)
        self._check_health(now)
        self._check_rolling(now)
        self._reaper.reap(now)
        if self._adopted:
            self._adopted = Launcher.reap(self._adopted)
        if self._launcher is not None and self.host_state is HostState.RUNNING:
            self._launcher.check()
        if self.metrics is not None:
            self.published = self.snapshot(now)

    def world(self) -> World:
        m = self.manager
        return World(host_state=self.host_state.value, manager_down=m.down,
                     manager_known_up=not m.down and not m.probing and m.next_probe_at is None,
                     wait_for_manager=self.orch.on_manager_failure == "wait")

    def _carry_out(self, slot: Slot, decision: Decision, now: float) -> None:
        """The one place a slot's decision becomes an action on processes and pipes."""
        do = decision.do
        if do is Do.NOTHING:
            return
        if do is Do.SPAWN:
            self._spawn(slot, decision.reason, decision.counted, decision.after_outage)
        elif do in _SEND:
            if slot.engine is None or not channel.send(slot.engine.conn, channel.command(_SEND[do])):
                slot.log.info("could not send %s (pipe closed)", _SEND[do].value)
        elif do in (Do.TERM_TREE, Do.KILL_TREE):
            tree = slot.engine.tree if slot.engine is not None else None
            if tree is not None and do is Do.TERM_TREE:
                tree.terminate()
            elif tree is not None:
                tree.kill()
        elif do is Do.SUSPECT_MANAGER:
            self.manager.suspect(now, decision.reason)
        elif do is Do.REMEMBER_TREE and slot.engine is not None and slot.engine.tree is not None:
            slot.engine.tree.remember_children()

    def _start_metrics(self) -> None:
        assert self.metrics is not None
        try:
            self.metrics.start()
        except OSError as exc:
            raise ConfigError(f"orchestrator.metrics_port: cannot serve metrics on "
                              f"{self.metrics.host}:{self.metrics.port}: {exc}") from None

    def _wait(self, now: float) -> None:
        objects: list[Any] = [self._wake_r]
        for slot in self.slots:
            if slot.engine is not None:
                if slot.engine.conn is not None:
                    objects.append(slot.engine.conn)
                if slot.engine.process is not None:
                    objects.append(slot.engine.process.sentinel)
        timeout = max(0.0, min(TICK_S, self.next_deadline(now) - now))
        multiprocessing.connection.wait(objects, timeout)
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def next_deadline(self, now: float) -> float:
        deadlines = [now + TICK_S, self.manager.next_probe_at, self._reaper.next_deadline(),
                     *(slot.next_deadline() for slot in self.slots)]
        return min(d for d in deadlines if d is not None)

    def _handle_events(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            self.handle(event, self.clock())

    def handle(self, event: tuple, now: float) -> None:
        kind = event[0]
        if kind == "signal":
            self._on_signal_event(event[1], now)
        elif kind == "control":
            _, request, reply = event
            try:
                answer = self._on_control(request, now)
            except Exception as exc:  # a bug must not take the loop down
                log.exception("control request %r failed", request)
                answer = {"ok": False, "error": f"internal error: {exc}"}
            reply(answer)
        elif kind == "probe":
            _, ok, detail = event
            if ok:
                self.run_watch.reached = True
            self.manager.on_probe(ok, detail, now)
        elif kind == "run":
            _, reached, complete, detail = event
            self.run_watch.on_answer(reached, complete, detail, now)

    # --- engine messages -----------------------------------------------------------
    def _read_pipes(self) -> None:
        for slot in self.slots:
            self._read_pipe(slot)

    def _read_pipe(self, slot: Slot) -> None:
        engine = slot.engine
        if engine is None or engine.conn is None:
            return
        try:
            for msg in engine_process.messages(engine.conn, MAX_MESSAGES_PER_TICK, lambda exc:
                                               slot.log.warning("unreadable message: %s", exc)):
                now = self.clock()
                self._carry_out(slot, slot.on_engine_message(msg, self.world(), now), now)
        except EOFError:
            engine.conn.close()
            engine.conn = None
        if slot.holds_batch:
            self.run_watch.reached = True

    # --- engines start and end -------------------------------------------------------
    def _spec(self, slot: Slot, after_outage: bool) -> channel.SpawnSpec:
        return channel.SpawnSpec(
            config_path=self.config_path, gpu_index=slot.gpu.index, device_index=0,
            env={"CUDA_VISIBLE_DEVICES": slot.gpu.uuid}, manager_url=self.manager.url,
            engine_id=slot.engine_id, log_level=self.log_level, after_outage=after_outage)

    def _spawn(self, slot: Slot, reason: str, counted: bool, after_outage: bool) -> None:
        """Start the slot's engine; after_outage asks it to spread its first request."""
        now = self.clock()
        try:
            proc, conn = self._engine_launcher().start(self._spec(slot, after_outage),
                                                       f"bcorch-engine-gpu{slot.gpu.index}")
        except OSError as exc:
            self._carry_out(slot, slot.start_failed(str(exc), reason, self.world(), now), now)
            return
        slot.started(EngineProcess(pid=proc.pid, started_at=now, process=proc, conn=conn,
                                   tree=ProcessTree(proc.pid)), reason, counted, now)

    def _engine_launcher(self) -> Launcher:
        if self._launcher is None:
            self._launcher = Launcher(self._ctx, self.target,
                                      use_zygote=self.orch.engine_start == "zygote")
        return self._launcher

    def _engine_exited(self, slot: Slot, code: int, now: float) -> None:
        engine = slot.engine
        assert engine is not None
        self._collect_orphans(slot, engine, now)
        engine.process.join(timeout=0)
        if engine.conn is not None:
            engine.conn.close()
        self._carry_out(slot, slot.on_exit(code, self.world(), now), now)

    def _collect_orphans(self, slot: Slot, engine: EngineProcess, now: float) -> None:
        """Descendants of an engine that died (a basecaller of a killed engine) go too."""
        alive = engine.tree.leftovers() if engine.tree is not None else []
        if alive:
            slot.log.warning("engine left %d process(es) behind (%s); stopping them",
                             len(alive), ", ".join(str(p.pid) for p in alive))
            self._reaper.add(alive, now)
            self._adopted.update(p.pid for p in alive)

    # --- the host drains or stops ------------------------------------------------------
    def _begin_host_drain(self, now: float, reason: str, exit_code: int) -> None:
        if self.host_state is not HostState.RUNNING:
            return
        log.warning("bcorch drains: %s", reason)
        self.host_state, self.host_reason, self.exit_code = HostState.DRAINING, reason, exit_code
        self._rolling.cancel()
        for slot in self.slots:
            self._carry_out(slot, slot.host_drains(f"bcorch drains: {reason}", now), now)

    def _stop_now(self, now: float, reason: str, exit_code: int | None = None) -> None:
        log.warning("bcorch stops now: %s", reason)
        if self.host_state is HostState.RUNNING:
            self.host_reason = reason
        if exit_code is not None:
            self.exit_code = exit_code
        self.host_state = HostState.STOPPING
        self._rolling.cancel()
        for slot in self.slots:
            self._carry_out(slot, slot.stop(f"bcorch stops: {reason}", now), now)

    def _on_signal_event(self, signum: int, now: float) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            self._reload_and_roll(now)
        elif self.host_state is HostState.RUNNING:
            self._begin_host_drain(now, f"{name} received", EXIT_OK)
        else:
            self._stop_now(now, f"second signal ({name})")

    # --- manager, run and GPU health -----------------------------------------------------
    def _check_manager(self, now: float) -> None:
        m = self.manager
        if m.probe_due(now):
            m.probing = True
            probe_async(m.url, lambda ok, detail: self.post(("probe", ok, detail)))
        if not m.down or self.host_state is not HostState.RUNNING:
            return
        if self.orch.on_manager_failure == "drain":
            self._begin_host_drain(now, f"manager unreachable ({m.last_error}); "
                                        f"on_manager_failure = drain", EXIT_PROTOCOL)
        elif now - m.down_since >= self.orch.manager_down_timeout_s:
            self._begin_host_drain(now, f"manager down for more than "
                                        f"{self.orch.manager_down_timeout_s:g} s", EXIT_PROTOCOL)

    def _check_run(self, now: float) -> None:
        """The run is over (exit 0), or the manager was never reached (exit 75)."""
        run = self.run_watch
        if run.poll_due(now):
            run.polling = True
            fetch_status_async(self.manager.url, self.config.token,
                               lambda *answer: self.post(("run", *answer)))
        if self.host_state is not HostState.RUNNING:
            return
        if run.complete and self.orch.exit_when_done:
            self._begin_host_drain(now, "the manager reports the run complete (input closed, "
                                        "every file DONE or QUARANTINED)", EXIT_OK)
            return
        limit = self.orch.first_contact_timeout_s
        if not run.reached and limit > 0 and now - run.started_at >= limit:
            log.error("manager %s not reached in the %g s since bcorch started (%s); exiting 75 "
                      "(orchestrator.first_contact_timeout_s)", self.manager.url, limit,
                      run.last_error)
            self._stop_now(now, f"manager {self.manager.url} never reached ({run.last_error})",
                           EXIT_PROTOCOL)

    def _check_health(self, now: float) -> None:
        if self.monitor is None or now < self._next_health:
            return
        self._next_health = now + HEALTH_INTERVAL_S
        samples = self.monitor.sample()
        for slot in self.slots:
            health = samples.get(slot.gpu.uuid)
            if health is not None:
                problem = slot.watch.update(health)
                if problem:
                    self._carry_out(slot, slot.gpu_unhealthy(problem, now), now)

    # --- SIGHUP: reload, then restart engines one by one --------------------------------
    def _reload_and_roll(self, now: float) -> None:
        if self.host_state is not HostState.RUNNING:
            return
        if self.config_path:
            try:
                new = load(self.config_path)
            except ConfigError as exc:
                log.error("SIGHUP: configuration not reloaded, engines keep running: %s", exc)
                return
            self.config = new
            policy = RestartPolicy.from_config(new.orchestrator)
            for slot in self.slots:
                slot.policy = policy
            if self._manager_url_flag is None:
                self.manager.url = self.run_watch.url = new.manager.url
            self.run_watch.token = new.token
            log.info("SIGHUP: configuration %s reloaded", self.config_path)
        log.info("SIGHUP: restarting %d engine(s) one by one", self._rolling.begin(self.slots))
        self._check_rolling(now)

    def _check_rolling(self, now: float) -> None:
        slot = self._rolling.next_slot()
        if slot is not None:
            self._carry_out(slot, slot.drain(AfterExit.RESTART, "graceful restart (SIGHUP)", now),
                            now)

    # --- the control pipe ---------------------------------------------------------------
    def _on_control(self, request: dict, now: float) -> dict:
        command = COMMANDS[request["cmd"]]
        handler = self._control_handlers[command.name]
        if command.gpu is GpuArg.NONE:
            return handler(now)
        gpu = request.get("gpu")
        targets = [s for s in self.slots if gpu is None or s.gpu.index == gpu]
        if not targets:
            return {"ok": False, "error": f"no GPU {gpu} here (GPUs: "
                    f"{', '.join(str(s.gpu.index) for s in self.slots)})"}
        if not command.while_leaving and self.host_state is not HostState.RUNNING:
            return {"ok": False, "error": f"bcorch is {self.host_state.value.lower()}; "
                                          f"cannot {command.name}"}
        for slot in targets:
            self._carry_out(slot, handler(slot, now), now)
        return {"ok": True, "slots": [{"gpu": s.gpu.index, "state": s.state.value,
                                       "reason": s.reason} for s in targets]}

    def _control_status(self, now: float) -> dict:
        return {"ok": True, **self.snapshot(now)}

    def _control_stop(self, now: float) -> dict:
        self._begin_host_drain(now, "stop requested on the control pipe", EXIT_OK)
        return {"ok": True, "state": self.host_state.value}

    def snapshot(self, now: float | None = None) -> dict:
        now = self.clock() if now is None else now
        return {"host": self.hostname, "pid": os.getpid(), "state": self.host_state.value,
                "reason": self.host_reason, "uptime_s": round(now - self.started_at, 1),
                "config": self.config_path, "on_manager_failure": self.orch.on_manager_failure,
                "exit_when_done": self.orch.exit_when_done,
                "manager": {**self.manager.snapshot(now), "reached": self.run_watch.reached,
                            "run_complete": self.run_watch.complete},
                "slots": [s.snapshot(now) for s in self.slots]}

    # --- the end ---------------------------------------------------------------------
    def _finished(self) -> int | None:
        if any(s.state.has_process or s.engine is not None for s in self.slots) or self._reaper:
            return None
        if self.host_state is not HostState.RUNNING:
            return self.exit_code
        states = [s.state for s in self.slots]
        if any(s.parked for s in self.slots) or SlotState.BACKOFF in states:
            return None
        if all(st is SlotState.STOPPED for st in states):
            self.host_reason = "every engine finished with nothing left"
            return EXIT_OK
        failed = [s for s in self.slots if s.state is SlotState.FAILED]
        if failed and all(s.failure is Failure.CONFIG for s in failed):
            self.host_reason = "every engine failed with a configuration error"
            return EXIT_CONFIG
        return None

    def _shutdown(self) -> None:
        """Last resort on the way out: nothing this bcorch started may outlive it."""
        live = [(s, s.engine) for s in self.slots if s.engine is not None]
        now = self.clock()
        for slot, engine in live:
            if engine.process is not None and engine.process.exitcode is None:
                slot.log.warning("stopping the engine's process tree: bcorch is exiting")
                engine.tree.terminate()
        deadline = time.monotonic() + KILL_GRACE_S + 1
        for slot, engine in live:
            if engine.process is None:
                continue
            engine.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if engine.process.exitcode is None:
                engine.tree.kill()
                engine.process.join(timeout=5)
            self._collect_orphans(slot, engine, now)
            if engine.conn is not None:
                engine.conn.close()
        self._reaper.kill_all()
        if self._launcher is not None:
            self._adopted = Launcher.reap(self._adopted)
            self._launcher.close()
        if self.control is not None:
            self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.monitor is not None:
            self.monitor.close()
        self._restore_signals()
        self._wake_r.close()
        self._wake_w.close()
