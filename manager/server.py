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
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

from bcorch.config import ManagerConfig

from .app import MAX_BODY, App
from .http_server import HTTPServer, raise_open_files_limit
from .layout import Layout
from .metrics import MetricsMiddleware
from .scanner import Scanner
from .service import Manager
from .journal import Journal
from .statedir import default_db_path
from .store import DatabaseUnusable, Store
from .watcher import InputWatcher

log = logging.getLogger("bcmanager")


def db_path(cfg: ManagerConfig) -> str:
    """manager.db, else a file named after OUTPUT_DIR in this host's state directory."""
    return cfg.db or str(default_db_path(cfg.output_dir))


def _open_store(cfg: ManagerConfig) -> Store:
    path = db_path(cfg)
    if not cfg.db:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseUnusable(path, f"cannot create its directory ({exc.strerror or exc}); "
                                         f"set manager.db or --db") from None
    return Store(path, cfg.max_attempts)


class Service:
    """Everything a serving manager owns, started and stopped together."""

    def __init__(self, cfg: ManagerConfig, token: str = ""):
        self.cfg = cfg
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        self.store = _open_store(cfg)
        try:
            self.layout = Layout(cfg.input_dir, cfg.output_dir)
            self.manager = Manager(self.store, self.layout, batch_size=cfg.batch_size,
                                   report_back_interval=cfg.report_back_interval,
                                   input_closed=cfg.input_closed,
                                   allow_simulated=cfg.allow_simulated,
                                   startup_share=cfg.startup_share,
                                   journal=Journal(cfg.output_dir),
                                   incomplete_grace_s=cfg.incomplete_grace_s)
            self.manager.recover()
            skip = (cfg.output_dir,) if _inside(cfg.output_dir, cfg.input_dir) else ()
            self.scanner = Scanner(
                cfg.input_dir, cfg.settle_s, self.manager.add_found, self.store.known_paths(),
                skip=skip, grace_s=cfg.incomplete_grace_s, quarantined=self.store.quarantined,
                input_closed=lambda: self.manager.input_closed,
                on_final_summary=self._final_summary if cfg.close_on_final_summary else None)
            self.manager.waiting_files = lambda: len(self.scanner.waiting)
        except sqlite3.DatabaseError as exc:  # damage found past the first page
            self.store.close()
            raise DatabaseUnusable(self.store.path, exc) from None
        self.stop_event = threading.Event()
        self.watcher = InputWatcher(cfg.input_dir, stop=self.stop_event, skip=skip)
        self.app = App(self.manager, token)
        self._threads: list[threading.Thread] = []
        wsgi = MetricsMiddleware(self.app, self.app.metrics, self.app.routes)
        # Binds now, so a busy port is an error of the constructor.
        self.server = HTTPServer(cfg.host, cfg.port, wsgi, threads=cfg.threads, max_body=MAX_BODY,
                                 request_timeout_s=cfg.request_timeout_s)
        self.port = self.server.port
        self.manager.on_work_may_be_ready(self.server.notify_work)
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
        if self.scanner.scan_once(self.stop_event.is_set):
            self.manager.work_may_be_ready()
        if not self.stop_event.is_set():
            self.manager.input_scanned()

    def serve(self) -> int:
        raise_open_files_limit()
        log.info("serving on http://%s:%d (input %s, output %s, db %s, lease %.0f s, token %s)",
                 self.cfg.host, self.port, self.cfg.input_dir, self.cfg.output_dir,
                 self.store.path, self.cfg.report_back_interval,
                 "required" if self.app._expected else "off")
        self._threads = [
            threading.Thread(target=self._every, name="reaper", daemon=True,
                             args=(self.reap_tick_s(), "lease reaper", self.manager.reap)),
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

    def _serve_http(self) -> None:
        try:
            self.server.serve()
        except Exception:
            log.exception("the HTTP server stopped")
        finally:
            self.stop_event.set()

    def _on_signal(self, signum: int, frame) -> None:
        self.stop_event.set()

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
        self.manager.flush_moved()
        self.store.close()
        log.info("stopped")


def _inside(child: str, parent: str) -> bool:
    child_abs, parent_abs = os.path.abspath(child), os.path.abspath(parent)
    return child_abs != parent_abs and child_abs.startswith(parent_abs.rstrip(os.sep) + os.sep)
