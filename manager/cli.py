"""`bcmanager`: serve, `bcmanager status [--watch]`, `bcmanager close-input`, `bcmanager runs`,
`bcmanager run pause|resume|cancel|close RUN`, `--version`."""
from __future__ import annotations

import argparse
import bcorch
import contextlib
import http.client
import json
import logging
import math
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from bcorch.protocol import EXIT_CONFIG, EXIT_PROTOCOL
from bcorch import config as config_mod, logs
from bcorch.config import Config, ConfigError
from bcorch.terminal import watch

from .read_counts import ReadTotals, describe as describe_reads

COMMANDS = ("status", "close-input", "runs", "run")
RUN_ACTIONS = ("pause", "resume", "cancel", "close")
MAX_WATCH_S = 86400.0


class _Parser(argparse.ArgumentParser):
    """A bad flag is one line and exit 78, like every configuration error (not usage + exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


class _NotAManager(Exception):
    """The URL answered, but not as a bcmanager does (another service, a proxy's page)."""


def _serve_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bcmanager",
        description="Serve batches of POD5 files to basecalling engines (HTTP, SQLite).",
        epilog="commands (each has its own --help):\n"
               "  bcmanager status [--json] [--watch [S]]   progress, throughput, engines\n"
               "  bcmanager close-input                     the run has written every file\n"
               "                                            (facility: no new runs)\n"
               "  bcmanager runs [--json]                   a facility's runs\n"
               "  bcmanager run pause|resume|cancel|close RUN\n\n"
               "exit codes: 0 stopped cleanly, 1 cannot serve (port, files), "
               "75 manager unreachable (status, close-input), 78 configuration error "
               "(also: a refused token; OUTPUT_DIR served by another manager)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"bcmanager {bcorch.version()}")
    p.add_argument("--config", help="config.toml (defaults when not given)")
    p.add_argument("--input-dir", help="INPUT_DIR scanned for *.pod5 (manager.input_dir)")
    p.add_argument("--watch-root", help="serve a facility: every MinKNOW run directory found "
                                        "under this root is a run of its own "
                                        "(manager.watch_root; not with --input-dir)")
    p.add_argument("--output-dir", help="OUTPUT_DIR for pass/, fail/ and job logs (manager.output_dir)")
    p.add_argument("--db", help="SQLite file on this host's local disk (default: in "
                                 "$STATE_DIRECTORY, $XDG_STATE_HOME/bcorch or "
                                 "~/.local/state/bcorch, named after OUTPUT_DIR)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 40765; 0: any free port, "
                                            "see --port-file)")
    p.add_argument("--port-file", metavar="PATH",
                   help="once listening, write the port it listens on (a number and a "
                        "newline) to PATH, atomically: how a caller of --port 0 learns it")
    p.add_argument("--token", help="bearer token (or env BCORCH_TOKEN)")
    p.add_argument("--input-closed", action="store_true", default=None,
                   help="the run has finished writing: no file will be added")
    p.add_argument("--take-over", action="store_true",
                   help="take OUTPUT_DIR over from a manager on another host whose lock is "
                        "stale (not refreshed for 6 x manager.lock_refresh_s); never from a "
                        "live one")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


CLIENT_HELP = {"status": "Show progress, throughput, time left and engines of a manager.",
               "close-input": "Tell the manager the run has written every file: when all are "
                              "done, engines are told nothing is left. In facility mode: take "
                              "no new runs (each run still closes on its own).",
               "runs": "List a facility's runs: state, model, progress, time left.",
               "run": "Pause, resume, cancel or close one run of a facility."}


def _client_parser(command: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"bcmanager {command}", description=CLIENT_HELP[command])
    p.add_argument("--config", help="config.toml (for manager.url and the token)")
    p.add_argument("--url", help="the manager's URL (default manager.url)")
    p.add_argument("--token", help="bearer token (or env BCORCH_TOKEN)")
    if command == "run":
        p.add_argument("action", choices=RUN_ACTIONS,
                       help="pause: no new batches (running ones finish); resume; cancel: no "
                            "new batches ever, unfinished files left as they are; close: no "
                            "new files")
        p.add_argument("run", help="the run id (see bcmanager runs)")
    if command == "runs":
        p.add_argument("--json", action="store_true", help="print the raw /runs answer")
    if command == "status":
        p.add_argument("--json", action="store_true", help="print the raw /status answer")
        p.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="S",
                       help="redraw every S seconds (default 2) until Ctrl-C; plain "
                            "repeated blocks when the output is not a terminal")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except SystemExit as exc:  # _request ends a command with its code; --help, --version
        return exc.code if isinstance(exc.code, int) else 1
    except BrokenPipeError:  # `bcmanager status --json | head`: the reader went away
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


def _main(argv: list[str]) -> int:
    try:
        if argv and argv[0] in COMMANDS:
            args = _client_parser(argv[0]).parse_args(argv[1:])
            cfg = _load(args.config)
            cfg.override("manager", token=args.token, url=args.url)
            command = {"status": _status, "close-input": lambda c, a: _close_input(c),
                       "runs": _runs, "run": _run_command}[argv[0]]
            try:
                return command(cfg, args)
            except (_NotAManager, KeyError, TypeError, AttributeError) as exc:
                return _fail(f"{cfg.manager.url}: the answer is not a bcmanager's "
                             f"({type(exc).__name__}: {exc}) (--url)"[:400], EXIT_PROTOCOL)
        if argv and not argv[0].startswith("-"):
            raise ConfigError(f"unknown command {argv[0]!r} (expected one of "
                              f"{', '.join(COMMANDS)}, or flags to serve; see --help)")
        return _serve(_serve_parser().parse_args(argv))
    except ConfigError as exc:
        text = " ".join(str(exc).split())
        print(text if text.startswith("bcmanager") else f"bcmanager: {text}", file=sys.stderr)
        return EXIT_CONFIG


def _load(path: str | None) -> Config:
    return config_mod.load(path)


def _serve(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    cfg.override("manager", input_dir=args.input_dir, output_dir=args.output_dir, db=args.db,
                 host=args.host, port=args.port, token=args.token,
                 input_closed=args.input_closed, watch_root=args.watch_root)
    _ = cfg.token  # a bad BCORCH_TOKEN is refused before the lock is taken
    if cfg.manager.watch_root:
        return _serve_facility(cfg, args)
    config_mod.require(cfg, "manager.input_dir", "or --input-dir")
    config_mod.require(cfg, "manager.output_dir", "or --output-dir")
    if not os.path.isdir(cfg.manager.input_dir):
        raise ConfigError(f"manager.input_dir: no such directory {cfg.manager.input_dir!r}")
    _not_a_file("manager.output_dir", cfg.manager.output_dir)
    return _run_service(cfg, args, cfg.manager.output_dir)


def _not_a_file(key: str, path: str) -> None:
    """An output directory may be created later, but a file in its place is refused by name."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{key}: {path!r} is a file, not a directory")


def _serve_facility(cfg: Config, args: argparse.Namespace) -> int:
    """--watch-root: one manager for every run under the root (manager.facility)."""
    if args.input_dir:
        raise ConfigError("--input-dir and --watch-root: give one (--input-dir serves one run, "
                          "--watch-root a facility of runs)")
    if args.output_dir:
        raise ConfigError("--output-dir: not used with --watch-root (each run's output is "
                          "set by facility.output and facility.output_root)")
    if cfg.manager.input_dir:
        raise ConfigError(f"manager.input_dir and manager.watch_root: give one (input_dir "
                          f"{cfg.manager.input_dir!r} serves one run, watch_root a facility)")
    if not os.path.isdir(cfg.manager.watch_root):
        raise ConfigError(f"manager.watch_root: no such directory {cfg.manager.watch_root!r}")
    fcfg = cfg.facility
    if fcfg.output == "mirror":
        _not_a_file("facility.output_root", fcfg.output_root)
    return _run_service(cfg, args,
                        fcfg.output_root if fcfg.output == "mirror" else cfg.manager.watch_root,
                        facility=fcfg)


def _run_service(cfg: Config, args: argparse.Namespace, lock_dir: str,
                 facility: Any = None) -> int:
    """Serve under the instance lock of lock_dir (one manager per output folder) until stopped;
    a start-up failure is one line on stderr and an exit code, never a traceback."""
    logs.configure(args.log_level)
    from .instance_lock import InstanceLock
    from .server import Service  # the HTTP server and sqlite only when serving
    from .store import DatabaseUnusable

    lock = InstanceLock(lock_dir, cfg.manager.lock_refresh_s)
    lock.acquire(take_over=args.take_over)  # before the database
    try:
        service = Service(cfg.manager, cfg.token, facility=facility)
    except DatabaseUnusable as exc:
        print(f"bcmanager: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"bcmanager: cannot serve on {cfg.manager.host}:{cfg.manager.port} "
              f"(--host/--port) or open its files: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a start-up failure is one line, never a traceback
        logging.getLogger("bcmanager").debug("start-up failed", exc_info=True)
        print(f"bcmanager: cannot start: {type(exc).__name__}: {exc}".splitlines()[0],
              file=sys.stderr)
        return 1
    if args.port_file:
        try:
            write_port_file(args.port_file, service.port)
        except OSError as exc:
            service.shutdown()
            lock.release()
            print(f"bcmanager: --port-file: cannot write {args.port_file!r}: {exc}",
                  file=sys.stderr)
            return 1
    lock.start_refreshing(on_lost=lambda _reason: service.stop_event.set())
    code = service.serve()
    lock.release()
    return _fail(lock.lost, EXIT_CONFIG) if lock.lost else code


def write_port_file(path: str, port: int) -> None:
    """PATH holds the listening port, or does not exist: written beside it, then renamed.
    The socket is bound and listening when this runs, so a client that reads the port can
    connect at once (its connection waits in the backlog until the server answers)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as fh:
            fh.write(f"{port}\n")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _request(cfg: Config, route: str, method: str = "GET", body: dict | None = None) -> Any:
    """The JSON object the manager answers; anything else ends the command with one line."""
    url = cfg.manager.url.rstrip("/") + route
    data = json.dumps(body or {}).encode() if method == "POST" else None
    token = cfg.token
    try:
        req = urllib.request.Request(url, method=method, data=data)
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        detail = " ".join(err.read().decode(errors="replace")[:200].split())
        if err.code == 401:
            raise SystemExit(_fail(f"{url}: the manager refused the token (manager.token, --token "
                                   f"or BCORCH_TOKEN): HTTP 401", EXIT_CONFIG)) from None
        if err.code in (400, 409) and route.startswith("/runs"):
            raise SystemExit(_fail(_error_of(detail), 1)) from None
        if err.code == 404 and route.startswith("/runs"):
            raise SystemExit(_fail(f"{url}: this manager serves one run, not a facility "
                                   f"(start it with --watch-root)", 1)) from None
        raise SystemExit(_fail(f"{url}: HTTP {err.code} {detail}", EXIT_PROTOCOL)) from None
    except json.JSONDecodeError as exc:
        raise SystemExit(_fail(f"{url}: the answer is not JSON, so not a bcmanager's ({exc}) "
                               f"(--url)", EXIT_PROTOCOL)) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise SystemExit(_fail(f"{url}: manager unreachable ({reason}) (--url)",
                               EXIT_PROTOCOL)) from None
    if not isinstance(answer, dict):
        raise _NotAManager(f"expected a JSON object, got {type(answer).__name__}")
    return answer


def _fail(message: str, code: int) -> int:
    print(f"bcmanager: {message}", file=sys.stderr)
    return code


def _status_answer(cfg: Config) -> dict:
    """GET /status; one without progress is not a bcmanager's, also with --json."""
    answer = _request(cfg, "/status")
    if not isinstance(answer.get("progress"), dict):
        raise _NotAManager("no progress in the answer to /status")
    return answer


def _status(cfg: Config, args: argparse.Namespace) -> int:
    if args.watch is None:
        answer = _status_answer(cfg)
        print(json.dumps(answer, indent=2) if args.json else format_status(answer), flush=True)
        return 0
    if not (math.isfinite(args.watch) and 0.1 <= args.watch <= MAX_WATCH_S):
        raise ConfigError(f"--watch: must be from 0.1 to {MAX_WATCH_S:g} seconds, "
                          f"got {args.watch}")

    def render() -> str:
        answer = _status_answer(cfg)
        return json.dumps(answer) if args.json else format_status(answer)

    return watch(render, args.watch, stamped=not args.json)


def _close_input(cfg: Config) -> int:
    answer = _request(cfg, "/close-input", "POST")
    if answer.get("input_closed") is not True:
        raise _NotAManager("no input_closed in the answer")
    if answer.get("facility"):
        print("facility closed: no new runs; each run still closes by its final summary or "
              "`bcmanager run close`")
    else:
        print("input closed: the manager will tell engines when nothing is left")
    return 0


def _error_of(detail: str) -> str:
    try:
        return str(json.loads(detail)["error"])
    except (ValueError, KeyError, TypeError):
        return detail


def _runs(cfg: Config, args: argparse.Namespace) -> int:
    answer = _request(cfg, "/runs")
    if not isinstance(answer.get("runs"), list):
        raise _NotAManager("no runs in the answer to /runs")
    print(json.dumps(answer, indent=2) if args.json else format_runs(answer["runs"]), flush=True)
    return 0


def _run_command(cfg: Config, args: argparse.Namespace) -> int:
    answer = _request(cfg, f"/runs/{args.action}", "POST", {"run": args.run})
    run = answer["run"]
    print(f"run {run['run_id']}: {run['state']}"
          + (f" ({run['files_not_basecalled']} files not basecalled, left as they are)"
             if run["state"] == "CANCELLED" else ""))
    return 0


def _percent_done(progress: dict) -> float:
    """Files done as a percentage of the run's files (0 before any is found)."""
    total = progress["files_total"]
    return 100.0 * progress["files_done"] / total if total else 0.0


def format_runs(runs: list[dict]) -> str:
    if not runs:
        return "no runs found yet under the watch root"
    header = (f"{'RUN':24} {'STATE':11} {'MODEL':18} {'PRIO':>5} {'DONE':>13} {'READS':>12} "
              f"{'LEFT':>9}  REL")
    lines = [header]
    for r in runs:
        p = r["progress"]
        pct = _percent_done(p)
        lines.append(f"{r['run_id'][:24]:24} {r['state']:11} {str(r['model'] or '-')[:18]:18} "
                     f"{r['priority'] if r['priority'] is not None else '-':>5} "
                     f"{p['files_done']:>5}/{p['files_total']:<5}{pct:3.0f}% "
                     f"{_reads_short(r.get('reads')):>12} "
                     f"{_duration(r['eta_s']) if r['eta_s'] is not None else '-':>9}  {r['rel']}")
        if r.get("reason"):
            lines.append(f"{'':24} {r['reason']}")
    return "\n".join(lines)


def _reads_short(reads: dict | None) -> str:
    """A run's reads in a table cell: "1234", ">=1234" when some batches did not report
    theirs, "?" when none did (or the manager does not count them)."""
    totals = ReadTotals.from_dict(reads)
    if totals is None or not totals.known:
        return "?"
    total = totals.passed + totals.failed
    return f">={total}" if totals.jobs_counted < totals.jobs_done else str(total)


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_status(st: dict) -> str:
    p = st["progress"]
    pct = _percent_done(p)
    t = st["throughput"]
    lines = [
        "files       " + "  ".join(f"{k} {v}" for k, v in st["files"].items()),
        f"progress    {p['files_done']} / {p['files_total']} files ({pct:.1f}%), "
        f"{_size(p['bytes_done'])} / {_size(p['bytes_total'])}",
        f"reads       {describe_reads(st.get('reads'))}",
        f"throughput  {t['files_per_s']:.2f} files/s, {_size(t['bytes_per_s'])}/s "
        f"(last {t['window_s']:.0f} s); time left {_duration(st['eta_s'])}",
        f"input       {'closed' if st['input_closed'] else 'open (more files may come)'}; "
        f"lease {st['report_back_interval']:.0f} s",
    ]
    if "runs" in st:
        fac = st.get("facility", {})
        lines.append(f"facility    {fac.get('root', '')}: {len(st['runs'])} runs, "
                     f"{'closed (no new runs)' if fac.get('closed') else 'taking new runs'}; "
                     f"model switches {fac.get('model_switches_total', 0)}")
        for i, r in enumerate(st["runs"]):
            p = r["progress"]
            pct = _percent_done(p)
            left = f"time left {_duration(r['eta_s'])}" if r["state"] in ("ACTIVE", "CLOSED") \
                else (r["reason"] or r["state"].lower())
            lines.append(f"{'runs' if i == 0 else '':12}{r['run_id']} {r['state']} "
                         f"{r['model'] or '-'}: {p['files_done']} / {p['files_total']} files "
                         f"({pct:.1f}%), reads {_reads_short(r.get('reads'))}; {left}")
    now = time.time()
    engines = st.get("engines", {})
    if not engines:
        lines.append("engines     none seen yet")
    for i, (engine, info) in enumerate(engines.items()):
        lines.append(f"{'engines' if i == 0 else '':12}{engine}: {info['jobs_in_flight']} job(s) "
                     f"in flight, seen {_duration(now - info['last_seen'])} ago")
    return "\n".join(lines)
