"""BCEngine: one engine process per GPU (DESIGN.md §5).

Loop: request a batch -> keep-alive thread starts -> runner starts -> poll (heartbeat
to the parent each second, watch BCManager_PB and parent commands) -> result ->
completion -> next. The main thread never blocks in one long call: it waits in
select() on the basecaller's pidfd, the parent pipe and a self-pipe (signals,
lease loss), at most until the next heartbeat is due.

Facility mode (issue 13): a batch may name its run's directories, relative to the
shared roots (engine.input_dir / run_input_dir / job_input_dir, the same for outputs),
and its run's model, kit and output format, which replace the engine's configured ones
for that batch. A batch without them (a single-run manager, the original manager) is
run exactly as before.

What the engine means to do next (work, drain, stop) and why is one `Intent`
(workers/intent.py), changed only in `BCEngine._intend`; the pipe to the
orchestrator is a `ParentPipe` (workers/parent_pipe.py).

Exit codes: 0 drained / stopped / nothing left; 75 manager unreachable or lease
lost; 78 configuration error.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import random
import select
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import channel
from .channel import Cmd, EngineState, Msg, SpawnSpec
from .intent import Cause, Goal, Intent
from .client import LONG_POLL_S, ManagerClient, ManagerRefused, ManagerUnreachable
from .keepalive import BCKeepAlive, LeaseLost, ReportOutcome
from .legacy_config import load_any
from bcorch.protocol import (EXIT_CONFIG, EXIT_OK, EXIT_PROTOCOL, Batch, JobState,
                             ProtocolError, is_valid_id)
from bcorch import logs
from bcorch.config import Config, ConfigError
from bcorch.ids import engine_id_for
from .output_check import OutputChecker, ReadsWritten
from .parent_pipe import ParentPipe
from .runners import Placement, RunHandle, RunResult, make_runner
from .runners.base import BatchSettingsError

AFTER_OUTAGE_ENV = "BCORCH_AFTER_OUTAGE"
AFTER_OUTAGE_CAP_S = 30.0
ABANDON_REQUEST_S = 2.0      # a stop waits this long at most for an /assignwork in flight
PARENT_GONE_GRACE_S = 2.0    # the orchestrator died: TERM -> KILL of the basecaller at most this
BATCH_TIMINGS_KEPT = 1000    # the newest batches' timings (a 72-hour run has tens of thousands)

TRANSITIONS: dict[EngineState, frozenset[EngineState]] = {
    EngineState.STARTING: frozenset({EngineState.REQUESTING, EngineState.WAITING,
                                     EngineState.STOPPING}),
    EngineState.REQUESTING: frozenset({EngineState.WORKING, EngineState.WAITING,
                                       EngineState.MANAGER_DOWN, EngineState.STOPPING}),
    EngineState.WORKING: frozenset({EngineState.REPORTING, EngineState.STOPPING}),
    EngineState.REPORTING: frozenset({EngineState.REQUESTING, EngineState.WAITING,
                                      EngineState.STOPPING}),
    EngineState.WAITING: frozenset({EngineState.REQUESTING, EngineState.STOPPING}),
    EngineState.MANAGER_DOWN: frozenset({EngineState.REQUESTING, EngineState.STOPPING}),
    EngineState.STOPPING: frozenset(),
}


@dataclasses.dataclass
class BatchTiming:
    """When one batch passed each step (time.monotonic()); what the engine itself costs."""

    requested: float
    received: float
    keepalive_started: float = 0.0
    runner_started: float = 0.0
    basecaller_ended: float = 0.0
    reported: float = 0.0
    runner_startup_s: float = 0.0   # the basecaller's own start-up (model loading), if known
    idle_s: float = 0.0             # waiting for work before this batch (empty answers and after)
    completing: float = 0.0         # its /completed report sent (reported - completing: the call)

    @property
    def overhead_s(self) -> float:
        """Asking, lease and runner start, plus the report: the batch time that is not
        basecalling."""
        return ((self.runner_started - self.requested)
                + (self.reported - self.basecaller_ended))


class _EngineLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[{self.extra['engine_id']} gpu{self.extra['gpu']}] {msg}", kwargs


class _Waker:
    """A self-pipe: signal handlers and other threads wake the main loop's select()."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)

    def wake(self) -> None:
        if self.w < 0:  # closed: never write into a descriptor number reused since
            return
        try:
            os.write(self.w, b"x")
        except (BlockingIOError, OSError):
            pass

    def drain(self) -> None:
        try:
            while os.read(self.r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        fds, self.r, self.w = (self.r, self.w), -1, -1
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


_INTENT_LOG = {
    Cause.START: "{reason}",
    Cause.DRAIN_COMMAND: "drain requested: finishing the current batch",
    Cause.RESUME_COMMAND: "resume: drain cancelled",
    Cause.STOP_COMMAND: "{reason}",
    Cause.SIGNAL: "signal received: finishing the current batch, then exiting "
                  "(send it again to stop now)",
    Cause.SIGNAL_AGAIN: "{reason}: stopping now",
    Cause.PARENT_GONE: "{reason}",
    Cause.NOTHING_LEFT: "{reason}",
}


class BCEngine:
    """Asks the manager for batches and basecalls them on one GPU."""

    def __init__(self, config_path: str | os.PathLike[str] | None, node_index: int, *,
                 conn: Any = None, conf: Config | None = None, manager_url: str | None = None,
                 engine_id: str | None = None, device_index: int | None = None,
                 after_outage: bool | None = None):
        self.conf = conf if conf is not None else load_any(config_path, node_index)
        if manager_url:
            self.conf.override("manager", url=manager_url)
        if engine_id and not is_valid_id(engine_id):
            raise ConfigError(f"--engine-id: expected [A-Za-z0-9._-]{{1,64}}, got {engine_id!r}")
        self.node_index = node_index
        self.device_index = node_index if device_index is None else device_index
        self.engine_id = engine_id or engine_id_for(node_index, self.conf.engine.engine_id)
        self.log = _EngineLog(logging.getLogger("workers.engine"),
                              {"engine_id": self.engine_id, "gpu": node_index})
        e = self.conf.engine
        self.optimal_request_size = e.optimal_request_size
        self.polling_interval = e.polling_interval
        self.INPUTDIR = self._configured_dir("input_dir")
        self.OUTPUTDIR = self._configured_dir("output_dir")
        self.bc_model = e.model
        self.PROCESSING_STATE = EngineState.STARTING
        self.api_url = self.conf.manager.url
        self.work_until_none_left = e.work_until_none_left
        if not self.api_url.startswith(("http://", "https://")):
            raise ConfigError(f"manager.url: expected http://HOST:PORT, got {self.api_url!r}")
        self.runner = make_runner(self.conf, self.log,
                                  Placement(self.engine_id, node_index, self.device_index))
        self.output_check = OutputChecker(self.conf.runner.min_read_fraction, self.log)
        self._cancel = threading.Event()
        self.client = ManagerClient.from_config(self.conf, self.api_url, cancel=self._cancel,
                                                logger=self.log)
        self.parent = ParentPipe(conn, self.log)
        self._after_outage = (os.environ.get(AFTER_OUTAGE_ENV, "") not in ("", "0")
                              if after_outage is None else after_outage)
        self._waker = _Waker()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="request")
        self.intent = Intent()
        self._signals = 0          # written only by the signal handler
        self._signals_seen = 0
        self._last_signal = ""
        self._next_heartbeat = 0.0
        self._batch: Batch | None = None
        self._batch_started = 0.0
        self._handle: RunHandle | None = None
        self._keepalive: BCKeepAlive | None = None
        self.batches_done = 0
        self.files_done = 0
        self.files_failed = 0
        self.last_error = ""
        self.batch_timings: list[BatchTiming] = []   # the newest BATCH_TIMINGS_KEPT
        self._idle_s = 0.0         # waiting for work since the last batch was received

    @property
    def bc_script(self) -> str:
        """The seed's name for the script runner's script (runner.bc_script; "" unless
        runner.kind is "script")."""
        return self.conf.runner.bc_script

    @property
    def shutdown(self) -> bool:
        """The seed's flag: True once this engine means to end its loop (drain or stop)."""
        return not self.intent.working

    def _configured_dir(self, key: str) -> Path | None:
        value = getattr(self.conf.engine, key) or getattr(self.conf.manager, key)
        return Path(value) if value else None

    def _shared_dir(self, key: str, from_manager: str) -> Path:
        """This host's path of INPUT_DIR or OUTPUT_DIR for a batch.

        engine.<key> (this host's mount) first, then the directory the manager's answer
        names, then manager.<key>. A path that does not exist here is a configuration
        error, so outputs are never written into a directory the manager does not see.
        """
        own, configured = getattr(self.conf.engine, key), getattr(self.conf.manager, key)
        value = own or from_manager or configured
        what = "INPUT_DIR" if key == "input_dir" else "OUTPUT_DIR"
        if not value:
            raise ConfigError(f"engine.{key}: required (the manager's answer does not say "
                              f"where its {what} is; set engine.{key} or manager.{key})")
        path = Path(value)
        if not path.is_dir():
            source = (f"engine.{key}" if own else "the manager's answer" if from_manager
                      else f"manager.{key}")
            raise ConfigError(f"engine.{key}: {value!r} (from {source}) does not exist on this "
                              f"host; set engine.{key} to this host's mount of the manager's {what}")
        return path

    # -- state machine ------------------------------------------------------------------

    def _set_state(self, new: EngineState) -> None:
        old = self.PROCESSING_STATE
        if new is old:
            return
        if new not in TRANSITIONS[old]:
            raise RuntimeError(f"engine state {old.value} -> {new.value} is not allowed")
        self.PROCESSING_STATE = new
        self.log.debug("state %s -> %s", old.value, new.value)

    def _intend(self, goal: Goal, cause: Cause, reason: str = "") -> None:
        """The one place where the intent changes."""
        new = self.intent.change(goal, cause, reason)
        if new is None:
            return
        self.intent = new
        self.log.info("%s", _INTENT_LOG[new.cause].format(reason=new.reason))
        if new.stopping:
            self._cancel.set()
            self._waker.wake()

    def _reported_state(self) -> EngineState:
        """The state the heartbeat shows: a batch being worked on under a drain is DRAINING."""
        if self.PROCESSING_STATE is EngineState.WORKING and self.intent.goal is Goal.DRAIN:
            return EngineState.DRAINING
        return self.PROCESSING_STATE

    # -- the loop -----------------------------------------------------------------------

    def begin_working(self) -> int:
        """Run until drained, stopped, nothing left or the manager is lost; the exit code."""
        self._install_signal_handlers()
        self.parent.send(Msg.READY, engine_id=self.engine_id, gpu=self.node_index, pid=os.getpid())
        self.log.info("engine started: manager %s, runner %s, input %s, output %s",
                      self.api_url, self.conf.runner.kind,
                      self.INPUTDIR or "as the manager says", self.OUTPUTDIR or "as the manager says")
        reason = ""
        try:
            code, reason = self._loop()
        except ConfigError as exc:
            code, reason = EXIT_CONFIG, str(exc)
            self.log.error("configuration error: %s", exc)
        finally:
            self._cleanup()
        if self.PROCESSING_STATE is not EngineState.STOPPING:
            self._set_state(EngineState.STOPPING)
        self.log.info("engine exits with %d (%s)", code, reason)
        self.parent.send(Msg.EXITING, code=code, reason=reason)
        return code

    def _loop(self) -> tuple[int, str]:
        if self._after_outage:
            delay = random.uniform(0, max(1.0, min(AFTER_OUTAGE_CAP_S, self.polling_interval * 60)))
            self.log.info("started after a manager outage: first request in %.1fs", delay)
            self._set_state(EngineState.WAITING)
            self._pause(delay)
        while True:
            self._service()
            if not self.intent.working:
                return EXIT_OK, self.intent.exit_reason
            self._set_state(EngineState.REQUESTING)
            start = time.monotonic()
            try:
                batch = self._request_a_batch(self.api_url, self.engine_id,
                                              self.optimal_request_size)
            except ManagerUnreachable as exc:
                if self.intent.stopping:  # the retries were cut short by the stop itself
                    return EXIT_OK, self.intent.reason
                return self._manager_problem(f"manager unreachable: {exc}")
            except ManagerRefused as exc:
                if exc.status == 401:
                    raise ConfigError(f"manager.token: the manager refused our token ({exc})")
                if exc.refuses_configuration:  # e.g. simulate runner, manager.allow_simulated
                    raise ConfigError(str(exc))
                return self._manager_problem(f"the manager refused our request: {exc}")
            except ProtocolError as exc:
                return self._manager_problem(f"bad answer from the manager: {exc}")
            end = time.monotonic()
            if batch is None:  # a stop arrived while asking
                continue
            if batch.empty:
                if self.work_until_none_left and batch.input_closed is not False:
                    self._intend(Goal.DRAIN, Cause.NOTHING_LEFT)
                    self._set_state(EngineState.STOPPING)
                    return EXIT_OK, self.intent.exit_reason
                self._set_state(EngineState.WAITING)
                self._sleep_before_next_batch(start, end, had_work=False)
                continue
            outcome = self._run_batch(batch, start)
            if outcome is not None:
                return outcome
            self._sleep_before_next_batch(start, time.monotonic(), had_work=True)

    def _request_a_batch(self, api_url: str, engine_id: str,
                         optimal_request_size: int) -> Batch | None:
        """Ask for a batch without blocking the loop; None when a stop came meanwhile.

        api_url is the seed's parameter: it must be this engine's manager (self.api_url),
        whose client keeps its connection between requests.
        """
        client = self.client
        if api_url.rstrip("/") != client.url:
            raise ValueError(f"_request_a_batch: {api_url!r} is not this engine's manager "
                             f"{client.url!r}")
        future = self._executor.submit(client.assign_work, engine_id, optimal_request_size,
                                       None, LONG_POLL_S)
        future.add_done_callback(lambda _f: self._waker.wake())
        stop_seen: float | None = None
        while not future.done():
            if self.intent.stopping:
                stop_seen = stop_seen or time.monotonic()
                if time.monotonic() - stop_seen > ABANDON_REQUEST_S:
                    # Do not outwait a hung manager: a batch it may still assign expires there.
                    self.log.warning("stopping: no answer to /assignwork, not waiting for it")
                    return None
            self._wait(0.2 if stop_seen else 1.0)
        batch = future.result()
        if self.intent.stopping and not batch.empty:
            self.log.info("stop requested while asking: returning job %s as STOPPED", batch.jobid)
            try:
                client.completed(batch.jobid, JobState.STOPPED, reason=self.intent.reason,
                                 retries=1, timeout=(1.0, 2.0))
            except (ManagerUnreachable, ProtocolError) as exc:
                self.log.warning("could not return job %s: %s", batch.jobid, exc)
            return None
        if not batch.empty:
            self.log.info("got job %s: %d file(s), lease %gs%s", batch.jobid,
                          batch.batch_size, batch.report_back_interval, _run_note(batch))
        return batch

    def _run_batch(self, batch: Batch, requested_at: float) -> tuple[int, str] | None:
        """One batch from lease to report; an (exit code, reason) to end the loop, else None."""
        timing = BatchTiming(requested=requested_at, received=time.monotonic(), idle_s=self._idle_s)
        self._idle_s = 0.0
        self._batch, self._batch_started = batch, time.monotonic()
        self._keepalive = BCKeepAlive.started_instance(
            batch, JobState.PROCESSING, self.conf, client=self.client,
            on_lease_lost=self._on_lease_lost, logger=self.log)
        timing.keepalive_started = time.monotonic()
        self.parent.send(Msg.JOB_START, job_id=batch.jobid, batch_size=batch.batch_size)
        self._set_state(EngineState.WORKING)
        try:
            self.INPUTDIR = self._shared_dir("input_dir", batch.input_root)
            self.OUTPUTDIR = self._shared_dir("output_dir", batch.output_root)
            input_dir, output_dir = self._job_dirs(batch)
            if not input_dir.is_dir():
                raise ConfigError(f"engine.input_dir: the job's input dir {str(input_dir)!r} does "
                                  f"not exist here (is engine.input_dir this host's mount of the "
                                  f"manager's INPUT_DIR?)")
            result = self._basecalling_work(input_dir, output_dir, self._model_for(batch),
                                            timing, kit=batch.kit, emit=batch.emit)
            checked = self.output_check.checked(result, input_dir, output_dir, batch.batch)
        except LeaseLost as exc:
            return self._end_batch_lost(str(exc))
        except BatchSettingsError as exc:
            # The run's settings cannot be honoured here: its files fail (and are retried or
            # quarantined with this reason); this engine goes on with other runs' batches.
            reason = f"run {batch.run_id or '?'}: {str(exc).splitlines()[0]}"
            return self._report(RunResult(JobState.FAILED, reason=reason), timing)
        except (ConfigError, OSError) as exc:
            # Not the files' fault: give them back without counting an attempt, do not restart.
            reason = str(exc).splitlines()[0]
            self._report(RunResult(JobState.STOPPED, reason=reason), timing)
            return EXIT_CONFIG, reason if isinstance(exc, ConfigError) else \
                f"runner.kind {self.conf.runner.kind}: cannot start the basecaller: {reason}"
        return self._report(checked.result, timing, checked.reads)

    def _model_for(self, batch: Batch) -> str:
        """The model the basecaller runs the batch with: its run's, else engine.model."""
        return batch.model or self.bc_model

    def _job_dirs(self, batch: Batch) -> tuple[Path, Path]:
        """The batch's input and output dirs on this host: under its run's directories
        (relative to the shared roots) when the batch names them."""
        assert self.INPUTDIR is not None and self.OUTPUTDIR is not None
        input_root = self.INPUTDIR / batch.run_input_dir if batch.run_input_dir else self.INPUTDIR
        output_root = (self.OUTPUTDIR / batch.run_output_dir if batch.run_output_dir
                       else self.OUTPUTDIR)
        return input_root / batch.job_input_dir, output_root / batch.job_output_dir

    def _basecalling_work(self, input_dir: Path, output_dir: Path, model: str,
                          timing: BatchTiming | None = None, *, kit: str = "",
                          emit: str = "") -> RunResult:
        """Run the basecaller on one batch, polling it; raises LeaseLost (and
        BatchSettingsError for a setting of the batch the runner cannot honour)."""
        assert self._batch is not None and self._keepalive is not None
        timing = timing or BatchTiming(requested=time.monotonic(), received=time.monotonic())
        self._handle = handle = self.runner.start(input_dir, output_dir, model, self._batch.batch,
                                                  kit=kit, emit=emit)
        timing.runner_started = time.monotonic()
        self.log.info("job %s: basecaller pid %d started (log %s)", self._batch.jobid,
                      handle.pid, handle.log_path)
        if self._keepalive.BCManager_PB:  # lost before the handle existed
            handle.terminate()
        self.output_check.warm_up()
        fds = [handle.fileno()] if handle.fileno() is not None else []
        tick = 1.0 if fds else 0.05
        stop_deadline: float | None = None
        while True:
            result = handle.poll()
            if result is not None:
                break
            if self._keepalive.BCManager_PB:
                handle.stop(self._grace())
                self._keepalive.shutdown_if_broken_keepalive()
            if self.intent.stopping:
                if stop_deadline is None:
                    self._set_state(EngineState.STOPPING)
                    self.log.info("stopping basecaller pid %d (%s)", handle.pid, self.intent.reason)
                    handle.terminate()
                    stop_deadline = time.monotonic() + self._grace()
                elif time.monotonic() >= stop_deadline:
                    result = handle.stop(0.0, self.intent.reason)
                    break
            self._wait(tick if stop_deadline is None else min(tick, 0.1), fds)
        timing.basecaller_ended = time.monotonic()
        timing.runner_startup_s = getattr(handle, "startup_s", None) or 0.0
        self._keepalive.shutdown_if_broken_keepalive()
        if self._stopped_by_our_side(result):
            result = RunResult(JobState.STOPPED, result.returncode, reason=(
                f"basecaller {result.reason or 'stopped'} while this engine was being stopped"))
        if result.state is JobState.STOPPED and self.intent.stopping:
            result.reason = self.intent.reason
        return result

    def _stopped_by_our_side(self, result: RunResult) -> bool:
        """A basecaller TERMed or KILLed while this engine got a signal or lost its parent.

        The supervisor stops a hung engine's whole process tree: the basecaller dies of
        that signal too. It is not the files' fault, so no attempt may be counted.
        """
        killed = result.returncode in (-signal.SIGTERM, -signal.SIGKILL)
        return (result.state is JobState.FAILED and killed
                and (self._signals > 0 or bool(self.parent.gone)))

    def _report(self, result: RunResult, timing: BatchTiming,
                reads: ReadsWritten | None = None) -> tuple[int, str] | None:
        """Send the final report; reads: what a DONE batch wrote (output check), if known."""
        assert self._batch is not None and self._keepalive is not None
        batch, keepalive = self._batch, self._keepalive
        if self.PROCESSING_STATE is not EngineState.STOPPING:
            self._set_state(EngineState.REPORTING)
        if result.state is JobState.FAILED:
            self.log.warning("job %s FAILED: %s", batch.jobid, result.reason)
        elif result.failed_files:
            self.log.warning("job %s: %d file(s) failed: %s", batch.jobid,
                             len(result.failed_files),
                             "; ".join(f"{k}: {v}" for k, v in list(result.failed_files.items())[:3]))
        deadline = time.monotonic() + self._grace() if self.parent.gone else None
        if result.state is JobState.DONE:
            keepalive.pace = self._pace(batch, timing)
            keepalive.reads = reads.fields() if reads is not None else {}
        timing.completing = time.monotonic()
        keepalive.finish(result.state, result.failed_files, result.reason, deadline)
        while keepalive.is_alive():
            keepalive.join(timeout=max(0.0, min(0.2, self._next_heartbeat - time.monotonic())))
            self._service()
        timing.reported = time.monotonic()
        self._handle = None
        if keepalive.outcome is ReportOutcome.REFUSED:  # e.g. manager.allow_simulated
            raise ConfigError(keepalive.lost_reason)
        if keepalive.outcome is not ReportOutcome.OK:
            return self._end_batch_lost(keepalive.lost_reason)
        self._record(batch, result, timing)
        self.parent.send(Msg.JOB_END, job_id=batch.jobid, state=result.state.value,
                         files_failed=len(result.failed_files))
        self._batch = self._keepalive = None
        if self.intent.stopping:
            return EXIT_OK, self.intent.reason
        if result.state is JobState.STOPPED:
            return EXIT_OK, "stopped"
        if not self.intent.working:
            return EXIT_OK, self.intent.exit_reason
        return None

    def _pace(self, batch: Batch, timing: BatchTiming) -> dict[str, float]:
        """This batch's rate (bytes of its files per second of basecalling) and start-up
        (its time that was not basecalling: lease, runner start, the runner's own start-up,
        and the previous batch's report), for the manager's batch sizing; {} if unknown."""
        if not (timing.runner_started and timing.basecaller_ended) or self.INPUTDIR is None:
            return {}
        input_dir, _ = self._job_dirs(batch)
        work = 0
        for name in batch.batch:
            try:
                work += os.stat(input_dir / name).st_size
            except OSError:
                return {}
        ran = timing.basecaller_ended - timing.runner_started
        basecalling = max(ran - timing.runner_startup_s, 1e-3)
        startup = self._between_basecalls_s(batch, timing) + timing.runner_startup_s
        return {"rate": work / basecalling, "startup_s": max(0.0, startup)}

    def _between_basecalls_s(self, batch: Batch, timing: BatchTiming) -> float:
        """What this batch cost the GPU outside basecalling, waiting for work left out.

        From the end of the previous basecall to the start of this one: that batch's output
        check and report, any busy pause, the request, the lease and the runner's start.
        Waiting for work that did not exist yet is not a cost of the batch: empty answers
        (and the pauses after them) are left out, and so is the part of the answering
        request that the manager may have held (a long poll). A manager holds only while
        the input is open, so with `input_closed` the whole round trip counts; otherwise at
        most as long as the previous /completed took (a round trip to the same manager
        that is never held). Before any previous batch, this batch's own output check
        stands in for the finish.
        """
        request = timing.received - timing.requested
        previous = self.batch_timings[-1] if self.batch_timings else None
        if batch.input_closed is True:
            held = 0.0
        elif previous is not None and previous.completing:
            held = max(0.0, request - (previous.reported - previous.completing))
        else:
            held = request
        if previous is not None:
            return timing.runner_started - previous.basecaller_ended - timing.idle_s - held
        return (timing.runner_started - timing.requested - held
                + time.monotonic() - timing.basecaller_ended)

    def _record(self, batch: Batch, result: RunResult, timing: BatchTiming) -> None:
        failed = len(result.failed_files) if result.state is not JobState.FAILED else batch.batch_size
        if result.state is not JobState.STOPPED:
            self.batches_done += 1
            self.files_done += batch.batch_size - failed
            self.files_failed += failed
        if result.state is JobState.FAILED:
            self.last_error = f"job {batch.jobid}: {result.reason}"
        if timing.runner_started and timing.basecaller_ended:
            self.batch_timings.append(timing)
            del self.batch_timings[:-BATCH_TIMINGS_KEPT]
            self.log.debug("job %s: engine overhead %.1f ms", batch.jobid, timing.overhead_s * 1000)
        self.log.info("job %s %s (%d file(s), %d failed) in %.2fs", batch.jobid,
                      result.state.value, batch.batch_size, failed,
                      time.monotonic() - self._batch_started)

    def _end_batch_lost(self, reason: str) -> tuple[int, str]:
        assert self._batch is not None
        if self._handle is not None:
            self._handle.stop(self._grace(), reason)
        if self._keepalive is not None:
            self._keepalive.join(timeout=self.conf.engine.read_timeout_s + 5)
        self.last_error = f"job {self._batch.jobid}: lease lost: {reason}"
        self.parent.send(Msg.JOB_END, job_id=self._batch.jobid, state="LEASE_LOST",
                         files_failed=0, reason=reason)
        self._batch = self._keepalive = self._handle = None
        return self._manager_problem(f"lease lost: {reason}")

    def _manager_problem(self, reason: str) -> tuple[int, str]:
        self.last_error = reason
        self.log.error("%s", reason)
        if EngineState.MANAGER_DOWN in TRANSITIONS[self.PROCESSING_STATE]:
            self._set_state(EngineState.MANAGER_DOWN)
        self.parent.send(Msg.MANAGER_PROBLEM, reason=reason)
        return EXIT_PROTOCOL, reason

    def _sleep_before_next_batch(self, start: float, end: float, had_work: bool = True) -> None:
        """busy_pause_s after work; polling_interval (minutes, +-10% jitter) after an empty answer.

        The pause counts from `end` (the answer); stop and drain cut it short.
        """
        if had_work:
            pause = self.conf.engine.busy_pause_s
        elif end - start >= LONG_POLL_S / 2:
            pause = 0.0  # the manager held our long poll: it did the waiting
        else:
            pause = self.polling_interval * 60.0 * random.uniform(0.9, 1.1)
        self._pause(pause - (time.monotonic() - end))
        if not had_work:
            self._idle_s += time.monotonic() - start

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + max(0.0, seconds)
        while self.intent.working:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wait(min(left, 1.0))

    # -- waiting, commands, heartbeats ----------------------------------------------------

    def _wait(self, timeout: float, fds: list[int] | None = None) -> None:
        """Sleep until something happens (fd readable, wake-up) or timeout; then service."""
        timeout = max(0.0, min(timeout, self._next_heartbeat - time.monotonic()))
        rlist = [self._waker.r, *(fds or [])]
        parent_fd = self.parent.fileno()
        if parent_fd is not None:
            rlist.append(parent_fd)
        try:
            ready, _, _ = select.select(rlist, [], [], timeout)
        except (OSError, ValueError):
            ready = []
        if self._waker.r in ready:
            self._waker.drain()
        self._service()

    def _service(self) -> None:
        """Act on what was recorded meanwhile: signals, parent commands, a parent gone; beat."""
        self._take_signals()
        for cmd in self.parent.receive():
            self._on_command(cmd)
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + channel.HEARTBEAT_INTERVAL_S
            self._heartbeat()
        if self.parent.gone:
            self._intend(Goal.STOP, Cause.PARENT_GONE, f"{self.parent.gone}: stopping")

    def _take_signals(self) -> None:
        while self._signals_seen < self._signals:
            self._signals_seen += 1
            if self._signals_seen == 1:
                self._intend(Goal.DRAIN, Cause.SIGNAL)
            else:
                self._intend(Goal.STOP, Cause.SIGNAL_AGAIN,
                             f"signal {self._last_signal} received twice")

    def _on_command(self, cmd: Cmd) -> None:
        if cmd is Cmd.DRAIN:
            self._intend(Goal.DRAIN, Cause.DRAIN_COMMAND)
        elif cmd is Cmd.RESUME:
            self._intend(Goal.WORK, Cause.RESUME_COMMAND)
        elif cmd is Cmd.STOP:
            self._intend(Goal.STOP, Cause.STOP_COMMAND)

    def _on_lease_lost(self, reason: str) -> None:
        """Called by the keep-alive thread: stop the basecaller the moment the lease is lost."""
        handle = self._handle
        if handle is not None:
            handle.terminate()
        self._waker.wake()

    def _heartbeat(self) -> None:
        if not self.parent.connected:
            return
        batch, handle = self._batch, self._handle
        self.parent.send_heartbeat(channel.heartbeat(
            engine_id=self.engine_id, state=self._reported_state(),
            job_id=batch.jobid if batch else None,
            batch_size=batch.batch_size if batch else 0,
            batch_elapsed_s=round(time.monotonic() - self._batch_started, 3) if batch else 0.0,
            basecaller_pid=handle.pid if handle is not None and handle.result is None else None,
            batches_done=self.batches_done, files_done=self.files_done,
            files_failed=self.files_failed, last_error=self.last_error,
            run_id=(batch.run_id or None) if batch else None,
            model=(self._model_for(batch) or None) if batch else None))

    def _grace(self) -> float:
        grace = self.conf.runner.stop_grace_s
        return min(grace, PARENT_GONE_GRACE_S) if self.parent.gone else grace

    # -- signals and cleanup -------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_signal)
        if self.parent.conn is None:
            signal.signal(signal.SIGINT, self._on_signal)
        else:  # Ctrl-C reaches the whole process group: the orchestrator decides for us
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Only record and wake; the loop decides (_take_signals).
        self._last_signal = signal.Signals(signum).name
        self._signals += 1
        self._waker.wake()

    def _cleanup(self) -> None:
        if self._handle is not None and self._handle.result is None:
            self._handle.stop(self._grace())
        self._cancel.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.runner.close()
        self.client.close()
        self._waker.close()


def _run_note(batch: Batch) -> str:
    """What a facility batch adds to its log line ("" for a single-run batch)."""
    parts = [f"{key} {getattr(batch, key)}" for key in ("run_id", "model", "kit", "emit")
             if getattr(batch, key)]
    return f" ({', '.join(parts)})" if parts else ""


def _configure_logging(level: str) -> None:
    logs.configure(level)


def run_engine_process(conn: Any, spec: SpawnSpec) -> None:
    """Entry point of an engine child started by the orchestrator (spawn context)."""
    os.environ.update(spec.env)
    _configure_logging(spec.log_level)
    code = run_engine(conn, spec)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        conn.close()
    except (OSError, AttributeError):
        pass
    os._exit(code)


def run_engine(conn: Any, spec: SpawnSpec) -> int:
    """Build and run an engine from the supervisor's spec; the exit code."""
    try:
        engine = BCEngine(spec.config_path, spec.gpu_index, conn=conn,
                          manager_url=spec.manager_url, engine_id=spec.engine_id,
                          device_index=spec.device_index, after_outage=spec.after_outage)
    except ConfigError as exc:
        logging.getLogger("workers.engine").error("[gpu%s] configuration error: %s",
                                                   spec.gpu_index, exc)
        channel.send(conn, channel.message(Msg.EXITING, code=EXIT_CONFIG, reason=str(exc)))
        return EXIT_CONFIG
    return engine.begin_working()
