"""The supervisor: one loop that owns every GPU slot (an arbiter, like gunicorn's).

Signal handlers, the control pipe and the manager probe only post events to a
queue and wake the loop through a socket pair. The loop waits on the engines'
pipes, their process sentinels and that socket with a timeout of at most 1 s,
then handles events, messages, exits, hangs, backoffs and deadlines, all on the
monotonic clock. Nothing in the loop blocks for longer than a pipe read.
"""
from __future__ import annotations

import collections
import contextlib
import enum
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from bcorch.workers import channel
from bcorch.protocol import EXIT_CONFIG, EXIT_OK, EXIT_PROTOCOL
from bcorch.config import Config, ConfigError, load

from .control import ControlServer
from .gpus import Gpu, GpuMonitor
from .manager_watch import ManagerWatch, probe_async
from .metrics import MetricsServer
from .slot import AfterExit, RestartPolicy, Slot, SlotState, transition

log = logging.getLogger(__name__)

TICK_S = 1.0
KILL_GRACE_S = 1.0        # TERM -> KILL for a process tree we stop ourselves
STOP_GRACE_S = 10.0       # {"cmd": "stop"} -> the tree is killed if the engine is still there
HEALTH_INTERVAL_S = 5.0
MAX_MESSAGES_PER_TICK = 200


class HostState(str, enum.Enum):
    RUNNING = "RUNNING"
    DRAINING = "DRAINING"     # every engine finishes its batch; bcorch exits after
    STOPPING = "STOPPING"     # every engine stops its batch now (reported STOPPED)


def child_main(target: Callable[[Any, channel.SpawnSpec], Any], conn: Any,
               spec: channel.SpawnSpec) -> None:
    """Engine process entry: own process group (a terminal's ^C reaches bcorch only)."""
    try:
        os.setpgrp()
    except OSError:
        pass
    target(conn, spec)


def default_target() -> Callable[[Any, channel.SpawnSpec], Any]:
    from bcorch.workers.engine import run_engine_process
    return run_engine_process


def short_hostname() -> str:
    name = socket.gethostname().split(".")[0] or "host"
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)[:48]


def engine_id_for(gpu: Gpu, hostname: str, configured: str = "") -> str:
    return f"{configured or hostname}-gpu{gpu.index}"[:64]


def describe_exit(code: int | None) -> str:
    if code is None:
        return "?"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


class Supervisor:
    def __init__(self, config: Config, gpus: list[Gpu], *, config_path: str | None = None,
                 manager_url: str | None = None, socket_path: Path | None = None,
                 target: Callable[[Any, dict], Any] | None = None,
                 monitor: GpuMonitor | None = None, hostname: str | None = None,
                 log_level: str = "INFO", clock: Callable[[], float] = time.monotonic):
        if not gpus:
            raise ConfigError("--gpus: no GPU selected")
        self.config = config
        self.config_path = config_path
        self._manager_url_flag = manager_url
        self.target = target or default_target()
        self.monitor = monitor
        self.hostname = hostname or short_hostname()
        self.log_level = log_level
        self.clock = clock
        self.policy = RestartPolicy.from_config(config.orchestrator)
        self.slots = [Slot(g, engine_id_for(g, self.hostname, config.engine.engine_id))
                      for g in gpus]
        self.manager = ManagerWatch(manager_url or config.manager.url)
        self.control = ControlServer(socket_path, self.post_control) if socket_path else None
        # The loop replaces (never mutates) this snapshot; the metrics thread only reads it.
        self.published: dict | None = None
        self.metrics = (MetricsServer(config.orchestrator.metrics_host,
                                      config.orchestrator.metrics_port, lambda: self.published)
                        if config.orchestrator.metrics_port else None)
        self.host_state = HostState.RUNNING
        self.exit_code = EXIT_OK
        self.host_reason = ""
        self.stop_at: float | None = None
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self._ctx = multiprocessing.get_context("spawn")
        self._rolling: collections.deque[Slot] = collections.deque()
        self._rolling_current: Slot | None = None
        self._reaper: list[tuple[list[psutil.Process], float]] = []
        self._next_health = 0.0
        self._old_handlers: dict[int, Any] = {}
        self.started_at = clock()

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
            now = self.clock()
            for slot in self.slots:
                self._start(slot, now, "first start")
            while True:
                self._handle_events()
                self._read_pipes()
                now = self.clock()
                self._check_slots(now)
                self._check_manager(now)
                self._check_health(now)
                self._check_rolling(now)
                self._reap(now)
                if self.metrics is not None:
                    self.published = self.snapshot(now)
                code = self._finished()
                if code is not None:
                    log.info("bcorch exits with %d (%s)", code, self.host_reason or "all engines done")
                    return code
                self._wait(now)
        finally:
            self._shutdown()

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
            if slot.conn is not None:
                objects.append(slot.conn)
            if slot.process is not None:
                objects.append(slot.process.sentinel)
        timeout = max(0.0, min(TICK_S, self._next_deadline(now) - now))
        multiprocessing.connection.wait(objects, timeout)
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _next_deadline(self, now: float) -> float:
        deadlines = [now + TICK_S]
        hang = self.orch.hang_timeout_s
        for slot in self.slots:
            if slot.process is not None:
                last = slot.last_message_at or slot.started_at or now
                deadlines.append(last + hang)
            for d in (slot.restart_at, slot.drain_deadline, slot.kill_at):
                if d is not None:
                    deadlines.append(d)
            if slot.stop_sent_at is not None:
                deadlines.append(slot.stop_sent_at + STOP_GRACE_S)
        if self.manager.next_probe_at is not None:
            deadlines.append(self.manager.next_probe_at)
        deadlines.extend(kill_at for _, kill_at in self._reaper)
        return min(deadlines)

    def _handle_events(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            now = self.clock()
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
                self.manager.on_probe(ok, detail, now)

    # --- engine messages -----------------------------------------------------------
    def _read_pipes(self) -> None:
        for slot in self.slots:
            self._read_pipe(slot)

    def _read_pipe(self, slot: Slot) -> None:
        conn = slot.conn
        if conn is None:
            return
        for _ in range(MAX_MESSAGES_PER_TICK):
            try:
                if not conn.poll():
                    return
                msg = conn.recv()
            except (EOFError, OSError):
                conn.close()
                slot.conn = None
                return
            except Exception as exc:  # an unpicklable message: the child is broken
                slot.log.warning("unreadable message from engine: %s", exc)
                continue
            self._on_message(slot, msg, self.clock())

    def _on_message(self, slot: Slot, msg: Any, now: float) -> None:
        slot.last_message_at = now
        if not isinstance(msg, dict):
            slot.log.warning("ignoring a message that is not a dict: %r", msg)
            return
        kind = msg.get("type")
        if kind == channel.Msg.READY.value:
            slot.ready_at = now
            if slot.state is SlotState.STARTING:
                transition(slot, SlotState.RUNNING, "engine ready", now)
        elif kind == channel.Msg.HEARTBEAT.value:
            beat = channel.as_heartbeat(msg)
            if beat is None:
                slot.log.warning("ignoring a heartbeat without the keys of channel.Heartbeat: %r",
                                 msg)
                return
            old_pid = slot.heartbeat["basecaller_pid"] if slot.heartbeat else None
            slot.heartbeat = beat
            if beat["basecaller_pid"] and beat["basecaller_pid"] != old_pid:
                slot.known_tree = self._children(slot.pid)
        elif kind == channel.Msg.JOB_START.value:
            slot.log.info("job %s started (%s files)", msg.get("job_id"), msg.get("batch_size"))
        elif kind == channel.Msg.JOB_END.value:
            slot.log.info("job %s ended %s (%s files failed)", msg.get("job_id"),
                          msg.get("state"), msg.get("files_failed"))
        elif kind == channel.Msg.MANAGER_PROBLEM.value:
            reason = str(msg.get("reason", ""))[:200]
            slot.log.warning("engine reports a manager problem: %s", reason)
            if not self.manager.down:
                self.manager.suspect(now, reason)
        elif kind == channel.Msg.EXITING.value:
            slot.exiting_reason = str(msg.get("reason", ""))[:300]
            slot.log.info("engine exiting (code %s): %s", msg.get("code"), slot.exiting_reason)
        else:
            slot.log.debug("unknown message %r", msg)

    def _send(self, slot: Slot, cmd: channel.Cmd) -> None:
        if not channel.send(slot.conn, channel.command(cmd)):
            slot.log.info("could not send %s (pipe closed)", cmd.value)

    # --- per-slot checks -----------------------------------------------------------
    def _check_slots(self, now: float) -> None:
        for slot in self.slots:
            if slot.process is not None:
                if slot.process.exitcode is not None:
                    self._read_pipe(slot)
                    self._on_exit(slot, slot.process.exitcode, now)
                else:
                    self._check_alive(slot, now)
            elif slot.state is SlotState.BACKOFF:
                self._check_backoff(slot, now)

    def _check_alive(self, slot: Slot, now: float) -> None:
        last = slot.last_message_at or slot.started_at or now
        if not slot.hung and now - last > self.orch.hang_timeout_s:
            slot.hung = True
            self._kill_tree(slot, now, f"no message for {now - last:.1f} s "
                                       f"(hang_timeout_s = {self.orch.hang_timeout_s:g})")
        if slot.kill_at is not None and now >= slot.kill_at:
            slot.kill_at = None
            for proc in slot.kill_list:
                _signal(proc, signal.SIGKILL)
        if (slot.drain_deadline is not None and now >= slot.drain_deadline
                and slot.stop_sent_at is None):
            slot.log.warning("drain_timeout_s (%g) passed; stopping the batch (reported STOPPED)",
                             self.orch.drain_timeout_s)
            self._send_stop(slot, now)
        if (slot.stop_sent_at is not None and now - slot.stop_sent_at >= STOP_GRACE_S
                and not slot.kill_list):
            self._kill_tree(slot, now, f"still running {STOP_GRACE_S:g} s after stop")

    def _send_stop(self, slot: Slot, now: float) -> None:
        if slot.stop_sent_at is None:
            slot.stop_sent_at = now
            self._send(slot, channel.Cmd.STOP)

    def _check_backoff(self, slot: Slot, now: float) -> None:
        if self.host_state is not HostState.RUNNING:
            return
        if slot.restart_at is not None and now < slot.restart_at:
            return
        if slot.waiting_for_manager or self.manager.down:
            if not self._manager_known_up():
                slot.waiting_for_manager = True
                return
        if slot.waiting_for_manager:
            self._start(slot, now, "the manager answers again", after_outage=True)
        else:
            self._start(slot, now, "restart after backoff")

    def _manager_known_up(self) -> bool:
        m = self.manager
        return not m.down and not m.probing and m.next_probe_at is None

    # --- starting and stopping engines ---------------------------------------------
    def _spec(self, slot: Slot, after_outage: bool) -> channel.SpawnSpec:
        return channel.SpawnSpec(
            config_path=self.config_path, gpu_index=slot.gpu.index, device_index=0,
            env={"CUDA_VISIBLE_DEVICES": slot.gpu.uuid}, manager_url=self.manager.url,
            engine_id=slot.engine_id, log_level=self.log_level, after_outage=after_outage)

    def _start(self, slot: Slot, now: float, reason: str, after_outage: bool = False) -> None:
        """Spawn the slot's engine; after_outage asks it to spread its first request."""
        first = slot.started_at is None and slot.restarts == 0 and slot.last_exit_code is None
        slot.clear_process()
        slot.restart_at = None
        slot.waiting_for_manager = False
        parent, child = self._ctx.Pipe(duplex=True)
        spec = self._spec(slot, after_outage)
        proc = self._ctx.Process(target=child_main, args=(self.target, child, spec),
                                 name=f"bcorch-engine-gpu{slot.gpu.index}")
        try:
            with _environment(spec.env):
                proc.start()
        except OSError as exc:
            parent.close()
            child.close()
            slot.log.error("cannot start the engine process: %s", exc)
            self._crashed(slot, now, f"spawn failed: {exc}")
            return
        child.close()
        slot.process, slot.conn, slot.pid, slot.started_at = proc, parent, proc.pid, now
        if not first:
            slot.restarts += 1
        transition(slot, SlotState.STARTING, f"{reason}; pid {proc.pid}", now)

    def _children(self, pid: int | None) -> list[psutil.Process]:
        if pid is None:
            return []
        try:
            return psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            return []

    def _kill_tree(self, slot: Slot, now: float, reason: str) -> None:
        """TERM the engine and all its descendants now, KILL them after KILL_GRACE_S."""
        slot.log.warning("stopping the engine's process tree: %s", reason)
        procs: list[psutil.Process] = []
        if slot.pid is not None:
            try:
                procs.append(psutil.Process(slot.pid))
            except psutil.Error:
                pass
        procs.extend(self._children(slot.pid))
        procs.extend(p for p in slot.known_tree if p not in procs)
        for proc in procs:
            _signal(proc, signal.SIGTERM)
            _signal(proc, signal.SIGCONT)
        slot.kill_list = procs
        slot.kill_at = now + KILL_GRACE_S

    def _collect_orphans(self, slot: Slot, now: float) -> None:
        """Descendants of an engine that died (a basecaller of a killed engine) go too."""
        alive = []
        for proc in {p.pid: p for p in slot.known_tree + slot.kill_list}.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                continue
        if alive:
            slot.log.warning("engine left %d process(es) behind (%s); stopping them",
                             len(alive), ", ".join(str(p.pid) for p in alive))
            for proc in alive:
                _signal(proc, signal.SIGTERM)
                _signal(proc, signal.SIGCONT)
            self._reaper.append((alive, now + KILL_GRACE_S))

    def _reap(self, now: float) -> None:
        remaining = []
        for procs, kill_at in self._reaper:
            alive = [p for p in procs if _running(p)]
            if not alive:
                continue
            if now >= kill_at:
                for proc in alive:
                    _signal(proc, signal.SIGKILL)
                kill_at = now + KILL_GRACE_S
            remaining.append((alive, kill_at))
        self._reaper = remaining

    # --- an engine exited ----------------------------------------------------------
    def _on_exit(self, slot: Slot, code: int, now: float) -> None:
        desc = describe_exit(code)
        reason = slot.exiting_reason
        hung, after = slot.hung, slot.after_exit
        slot.last_exit, slot.last_exit_code = desc, code
        self._collect_orphans(slot, now)
        slot.process.join(timeout=0)
        if slot.conn is not None:
            slot.conn.close()
        slot.clear_process()
        detail = f"{desc}{': ' + reason if reason else ''}"
        if self.host_state is not HostState.RUNNING:
            transition(slot, SlotState.STOPPED, f"engine {detail}; bcorch {self.host_state.value.lower()}", now)
        elif after is AfterExit.RESTART and not hung:
            self._start(slot, now, f"graceful restart (previous engine {desc})")
        elif after is AfterExit.FAIL:
            transition(slot, SlotState.FAILED, f"GPU unhealthy: {slot.gpu_failure}", now)
        elif after is AfterExit.STOP:
            slot.parked = True
            transition(slot, SlotState.STOPPED, f"drained by an operator ({desc})", now)
        elif hung:
            self._crashed(slot, now, f"hung (no heartbeat for hang_timeout_s), {desc}")
        elif code == EXIT_OK:
            transition(slot, SlotState.STOPPED, "engine finished: nothing left (exit 0)", now)
        elif code == EXIT_CONFIG:
            slot.failed_by_config = True
            transition(slot, SlotState.FAILED, f"configuration error ({detail}); "
                       f"fix it and run `bcorch resume --gpu {slot.gpu.index}`", now)
        elif code == EXIT_PROTOCOL:
            self.manager.suspect(now, reason or "an engine exited 75")
            slot.restart_at = now + self.policy.first_delay_s
            slot.waiting_for_manager = True
            transition(slot, SlotState.BACKOFF, f"manager problem ({detail}); "
                       f"waiting for the manager", now)
        else:
            self._crashed(slot, now, detail)

    def _crashed(self, slot: Slot, now: float, detail: str) -> None:
        delay = slot.record_crash(now, self.policy)
        if delay is None:
            transition(slot, SlotState.FAILED,
                       f"{len(slot.crash_times)} crashes within {self.policy.window_s:g} s "
                       f"(last: {detail}); run `bcorch resume --gpu {slot.gpu.index}`", now)
            return
        slot.restart_at = now + delay
        if self.manager.down and self.orch.on_manager_failure == "wait":
            slot.waiting_for_manager = True
            transition(slot, SlotState.BACKOFF, f"crashed ({detail}); waiting for the manager", now)
        else:
            transition(slot, SlotState.BACKOFF, f"crashed ({detail}); restart in {delay:.1f} s", now)

    # --- draining --------------------------------------------------------------------
    def _drain_slot(self, slot: Slot, now: float, after: AfterExit, reason: str) -> None:
        if slot.state in (SlotState.STARTING, SlotState.RUNNING):
            self._send(slot, channel.Cmd.DRAIN)
            slot.after_exit = after
            slot.drain_deadline = now + self.orch.drain_timeout_s
            transition(slot, SlotState.DRAINING, reason, now)
        elif slot.state is SlotState.DRAINING:
            slot.after_exit = after
            slot.reason = reason

    def _begin_host_drain(self, now: float, reason: str, exit_code: int) -> None:
        if self.host_state is not HostState.RUNNING:
            return
        log.warning("bcorch drains: %s", reason)
        self.host_state, self.host_reason, self.exit_code = HostState.DRAINING, reason, exit_code
        self._rolling.clear()
        self._rolling_current = None
        for slot in self.slots:
            if slot.state.has_process:
                self._drain_slot(slot, now, AfterExit.STOP, f"bcorch drains: {reason}")
            elif slot.state is SlotState.BACKOFF:
                transition(slot, SlotState.STOPPED, f"bcorch drains: {reason}", now)

    def _stop_now(self, now: float, reason: str) -> None:
        log.warning("bcorch stops now: %s", reason)
        if self.host_state is HostState.RUNNING:
            self.host_reason = reason
        self.host_state = HostState.STOPPING
        for slot in self.slots:
            if slot.state.has_process:
                self._send_stop(slot, now)
            elif slot.state is SlotState.BACKOFF:
                transition(slot, SlotState.STOPPED, f"bcorch stops: {reason}", now)

    def _on_signal_event(self, signum: int, now: float) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            self._reload_and_roll(now)
        elif self.host_state is HostState.RUNNING:
            self._begin_host_drain(now, f"{name} received", EXIT_OK)
        else:
            self._stop_now(now, f"second signal ({name})")

    # --- manager and GPU health --------------------------------------------------------
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

    def _check_health(self, now: float) -> None:
        if self.monitor is None or now < self._next_health:
            return
        self._next_health = now + HEALTH_INTERVAL_S
        samples = self.monitor.sample()
        for slot in self.slots:
            health = samples.get(slot.gpu.uuid)
            if health is None:
                continue
            first = slot.health is None
            slot.health = health
            if first:
                slot.ecc_baseline = health.ecc_uncorrected
                slot.xid_baseline = health.xid_events
            problem = ""
            if health.lost:
                problem = "NVML reports the GPU lost"
            elif (health.ecc_uncorrected is not None and slot.ecc_baseline is not None
                  and health.ecc_uncorrected > slot.ecc_baseline):
                problem = (f"uncorrectable ECC errors rose from {slot.ecc_baseline} "
                           f"to {health.ecc_uncorrected}")
            if problem and not slot.gpu_failure:
                slot.gpu_failure = problem
                self._fail_gpu(slot, now)

    def _fail_gpu(self, slot: Slot, now: float) -> None:
        slot.log.error("GPU unhealthy: %s; draining it", slot.gpu_failure)
        if slot.state.has_process:
            self._drain_slot(slot, now, AfterExit.FAIL, f"GPU unhealthy: {slot.gpu_failure}")
        elif slot.state in (SlotState.BACKOFF, SlotState.STOPPED):
            transition(slot, SlotState.FAILED, f"GPU unhealthy: {slot.gpu_failure}", now)

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
            self.policy = RestartPolicy.from_config(new.orchestrator)
            if self._manager_url_flag is None:
                self.manager.url = new.manager.url
            log.info("SIGHUP: configuration %s reloaded", self.config_path)
        self._rolling = collections.deque(s for s in self.slots
                                          if s.state in (SlotState.STARTING, SlotState.RUNNING))
        self._rolling_current = None
        log.info("SIGHUP: restarting %d engine(s) one by one", len(self._rolling))
        self._roll_next(now)

    def _roll_next(self, now: float) -> None:
        while self._rolling:
            slot = self._rolling.popleft()
            if slot.state in (SlotState.STARTING, SlotState.RUNNING):
                self._drain_slot(slot, now, AfterExit.RESTART, "graceful restart (SIGHUP)")
                self._rolling_current = slot
                return
        self._rolling_current = None

    def _check_rolling(self, now: float) -> None:
        slot = self._rolling_current
        if slot is not None and slot.state not in (SlotState.DRAINING, SlotState.STARTING):
            self._roll_next(now)

    # --- the control pipe ---------------------------------------------------------------
    def _on_control(self, request: dict, now: float) -> dict:
        cmd = request["cmd"]
        if cmd == "status":
            return {"ok": True, **self.snapshot(now)}
        if cmd == "stop":
            self._begin_host_drain(now, "stop requested on the control pipe", EXIT_OK)
            return {"ok": True, "state": self.host_state.value}
        gpu = request.get("gpu")
        if gpu is None:
            targets = list(self.slots)
        else:
            targets = [s for s in self.slots if s.gpu.index == gpu]
            if not targets:
                return {"ok": False, "error": f"no GPU {gpu} here (GPUs: "
                        f"{', '.join(str(s.gpu.index) for s in self.slots)})"}
        if cmd != "drain" and self.host_state is not HostState.RUNNING:
            return {"ok": False, "error": f"bcorch is {self.host_state.value.lower()}; "
                                          f"cannot {cmd}"}
        action = {"drain": self._operator_drain, "resume": self._operator_resume,
                  "restart": self._operator_restart}[cmd]
        for slot in targets:
            action(slot, now)
        return {"ok": True, "slots": [{"gpu": s.gpu.index, "state": s.state.value,
                                       "reason": s.reason} for s in targets]}

    def _operator_drain(self, slot: Slot, now: float) -> None:
        if slot.state.has_process and slot.state is not SlotState.DRAINING:
            slot.parked = True
            self._drain_slot(slot, now, AfterExit.STOP, "drain requested by an operator")
        elif slot.state is SlotState.BACKOFF:
            slot.parked = True
            transition(slot, SlotState.STOPPED, "drained by an operator", now)

    def _operator_resume(self, slot: Slot, now: float) -> None:
        slot.parked = False
        if slot.state is SlotState.DRAINING:
            slot.gpu_failure = ""
            if slot.stop_sent_at is not None:
                slot.after_exit = AfterExit.RESTART   # too late to cancel: start anew after
                return
            self._send(slot, channel.Cmd.RESUME)
            slot.after_exit = AfterExit.DECIDE
            slot.drain_deadline = None
            transition(slot, SlotState.RUNNING if slot.ready_at is not None else SlotState.STARTING,
                       "resumed by an operator", now)
        elif slot.state in (SlotState.FAILED, SlotState.STOPPED, SlotState.BACKOFF):
            slot.clear_failures()
            self._start(slot, now, "resumed by an operator")

    def _operator_restart(self, slot: Slot, now: float) -> None:
        slot.parked = False
        if slot.state in (SlotState.STARTING, SlotState.RUNNING, SlotState.DRAINING):
            self._drain_slot(slot, now, AfterExit.RESTART, "restart requested by an operator")
        else:
            slot.clear_failures()
            self._start(slot, now, "restart requested by an operator")

    def snapshot(self, now: float | None = None) -> dict:
        now = self.clock() if now is None else now
        return {"host": self.hostname, "pid": os.getpid(), "state": self.host_state.value,
                "reason": self.host_reason, "uptime_s": round(now - self.started_at, 1),
                "config": self.config_path, "on_manager_failure": self.orch.on_manager_failure,
                "manager": self.manager.snapshot(now),
                "slots": [s.snapshot(now) for s in self.slots]}

    # --- the end ---------------------------------------------------------------------
    def _finished(self) -> int | None:
        if any(s.state.has_process or s.process is not None for s in self.slots) or self._reaper:
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
        if failed and all(s.failed_by_config for s in failed):
            self.host_reason = "every engine failed with a configuration error"
            return EXIT_CONFIG
        return None

    def _shutdown(self) -> None:
        """Last resort on the way out: nothing this bcorch started may outlive it."""
        live = [s for s in self.slots if s.process is not None]
        now = self.clock()
        for slot in live:
            if slot.process.exitcode is None:
                self._kill_tree(slot, now, "bcorch is exiting")
        deadline = time.monotonic() + KILL_GRACE_S + 1
        for slot in live:
            slot.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if slot.process.exitcode is None:
                for proc in slot.kill_list:
                    _signal(proc, signal.SIGKILL)
                slot.process.join(timeout=5)
            self._collect_orphans(slot, now)
            if slot.conn is not None:
                slot.conn.close()
        for procs, _ in self._reaper:
            for proc in procs:
                _signal(proc, signal.SIGKILL)
        self._reaper = []
        if self.control is not None:
            self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.monitor is not None:
            self.monitor.close()
        self._restore_signals()
        self._wake_r.close()
        self._wake_w.close()


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """os.environ with `values` while a child is spawned, so its exec'd environment has them
    (CUDA reads CUDA_VISIBLE_DEVICES from there; only the loop thread spawns)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
