"""The running service: the HTTP server serving the app, a reaper thread, a scanner thread.

The HTTP server (manager.http_server) is uvicorn on one event loop: connections,
request headers and bodies are handled there under deadlines, and only the WSGI app
runs in a small thread pool, so idle or slow connections cannot take the workers
(docs/benchmarks.md compares it with cheroot and waitress). Held long polls
(`/assignwork?wait_s=`) wait in the event loop too; the manager wakes them through
`Manager.on_work_may_be_ready`, and the scan wakes them when it adds files.

SIGTERM/SIGINT only set an event; the main thread sees it within a fraction of a
second, stops accepting, lets the requests in progress finish and exits 0.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from bcorch.config import ManagerConfig

from .app import MAX_BODY, App
from .http_server import HTTPServer, raise_open_files_limit
from .metrics import MetricsMiddleware
from .run_part import RunPart, RunPlace
from .statedir import default_db_path
from .watcher import InputWatcher

log = logging.getLogger("bcmanager")


def db_path(cfg: ManagerConfig) -> str:
    """manager.db, else a file named after OUTPUT_DIR in this host's state directory."""
    return cfg.db or str(default_db_path(cfg.output_dir))


class Service:
    """Everything a serving manager owns, started and stopped together.

    Single-run mode (manager.input_dir) serves one RunPart; facility mode
    (manager.watch_root, `facility` given) serves a Facility of one RunPart per run.
    """

    def __init__(self, cfg: ManagerConfig, token: str = "", facility: Any = None):
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.facility = None
        self.part: RunPart | None = None
        if facility is not None:
            from .facility import Facility  # facility mode only
            self.facility = Facility(cfg, facility, stop=self.stop_event.is_set)
            backend: Any = self.facility
            root, skip = self.facility.root, ()
        else:
            self.part = RunPart(cfg, RunPlace(cfg.input_dir, cfg.output_dir, db_path(cfg),
                                              db_chosen=bool(cfg.db)),
                                on_final_summary=self._final_summary,
                                input_closed=cfg.input_closed)
            self.store, self.layout = self.part.store, self.part.layout
            self.manager, self.scanner = self.part.manager, self.part.scanner
            backend, root, skip = self.manager, cfg.input_dir, self.part.skip
        self.watcher = InputWatcher(root, stop=self.stop_event, skip=skip)
        if self.facility is not None:
            self.facility.attach_watcher(self.watcher)
        self.app = App(backend, token)
        self._threads: list[threading.Thread] = []
        wsgi = MetricsMiddleware(self.app, self.app.metrics, self.app.routes)
        # Binds now, so a busy port is an error of the constructor.
        try:
            self.server = HTTPServer(cfg.host, cfg.port, wsgi, threads=cfg.threads,
                                     max_body=MAX_BODY, request_timeout_s=cfg.request_timeout_s)
        except BaseException:
            self._close_backend()
            raise
        self.port = self.server.port
        backend.on_work_may_be_ready(self.server.notify_work)
        self._http: threading.Thread | None = None

    def _final_summary(self, path: str) -> None:
        self.manager.close_input(f"MinKNOW wrote {path}; manager.close_on_final_summary")

    def reap_tick_s(self) -> float:
        """A lease expires within one tick of its deadline."""
        return min(1.0, self.cfg.report_back_interval / 10)

    def _every(self, period: float, what: str, work, wait=None) -> None:
        while not self.stop_event.is_set():
            try:
                work()
            except Exception:
                log.exception("%s failed (will retry)", what)
            (wait or self.stop_event.wait)(period)

    def _scan(self) -> None:
        self.watcher.start()  # before the first scan, so nothing falls between the two
        if self.facility is not None:
            self.facility.scan_tick()
        else:
            assert self.part is not None
            self.part.scan(self.stop_event.is_set)

    def _reap(self) -> None:
        if self.facility is not None:
            self.facility.reap()
        else:
            self.manager.reap()

    def serve(self) -> int:
        raise_open_files_limit()
        if self.facility is not None:
            log.info("serving a facility on http://%s:%d (watch root %s, %d runs known, "
                     "facility db %s, lease %.0f s, token %s)", self.cfg.host, self.port,
                     self.facility.root, self.facility.run_count(), self.facility.db_path,
                     self.cfg.report_back_interval, "required" if self.app.auth.required else "off")
        else:
            log.info("serving on http://%s:%d (input %s, output %s, db %s, lease %.0f s, token %s)",
                     self.cfg.host, self.port, self.cfg.input_dir, self.cfg.output_dir,
                     self.store.path, self.cfg.report_back_interval,
                     "required" if self.app.auth.required else "off")
        self._start_restored_leases()
        self._threads = [
            threading.Thread(target=self._every, name="reaper", daemon=True,
                             args=(self.reap_tick_s(), "lease reaper", self._reap)),
            threading.Thread(target=self._every, name="scanner", daemon=True,
                             args=(self.cfg.scan_interval_s, "input scan", self._scan,
                                   self.watcher.wait)),
        ]
        for t in self._threads:
            t.start()
        # Handlers first: once the HTTP thread answers, a client may signal us at once.
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        http = self._http = threading.Thread(target=self._serve_http, name="http", daemon=True)
        http.start()
        try:
            while not self.stop_event.wait(0.2) and http.is_alive():
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.shutdown()
        return 0

    def _start_restored_leases(self) -> None:
        """Before the reaper and the HTTP thread: the start-up is not taken from the leases
        of the jobs live at the restart (Manager.leases_start_now)."""
        parts = self.facility.parts() if self.facility is not None else [("", self.part)]
        for _, part in parts:
            if part is not None:
                part.manager.leases_start_now()

    def _serve_http(self) -> None:
        try:
            self.server.serve()
        except Exception:
            log.exception("the HTTP server stopped")
        finally:
            self.stop_event.set()

    def _on_signal(self, signum: int, frame) -> None:
        self.stop_event.set()

    def _close_backend(self) -> None:
        if self.facility is not None:
            self.facility.close()
        elif self.part is not None:
            self.part.close()

    def shutdown(self) -> None:
        self.stop_event.set()
        log.info("stopping: no new requests, finishing those in progress")
        self.server.stop()
        deadline = time.monotonic() + 30
        if self._http is not None:  # requests in progress still use the store
            self._http.join(timeout=max(0.1, deadline - time.monotonic()))
        self.server.close()
        for t in self._threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        self.watcher.close()
        self._close_backend()
        log.info("stopped")

