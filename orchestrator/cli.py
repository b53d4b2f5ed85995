"""The `bcorch` command line.

    bcorch [--config F] [--gpus SPEC] [--manager-url U] [--socket S] [--keep-serving]
           [--log-level L]
    bcorch engine --gpu N [--config F] [--manager-url U]      (one engine, no supervisor)
    bcorch status [--json] | drain [--gpu N] | resume [--gpu N] | restart --gpu N | stop
    bcorch socket                                             (the control socket's path)
    bcorch gpus [--json] [--gpus SPEC]
    bcorch demo [--files N] [--gpus N] [--runs N] [--keep]   (orchestrator/demo.py)
    bcorch status --watch [S]                                 (redraw every S seconds)
    bcorch --version

Bad flags or configuration: one line on stderr and exit 78. Control commands that
cannot reach bcorch, or that bcorch refuses, print one line and exit 1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

from bcorch import logs
from bcorch.protocol import EXIT_CONFIG
from bcorch.config import Config, ConfigError, load, url_problem

from .commands import COMMANDS, GpuArg, usage_line

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MAX_WAIT_S = 86400.0     # --timeout and --watch: a day at most
DEMO_MAX_FILES = 10_000
COMMANDS_HELP = "\n".join([
    "commands (each has its own --help):",
    "  bcorch [flags]                  supervise one engine per GPU (this page)",
    "  bcorch engine --gpu N           run one engine in the foreground, no supervisor",
    *(f"  {usage_line(c):<31} {c.help}" for c in COMMANDS.values()),
    "  bcorch socket                   print the control socket's path (for socat, nc -U)",
    "  bcorch gpus [--json]            the GPUs NVML sees, with their health",
    "  bcorch demo [--files N] [--gpus N] [--runs N] [--keep]",
    "                                  the whole job on this machine, no GPU needed",
    "",
    "exit codes: 0 done, drained or the run complete; 75 manager unreachable (never reached,",
    "or policy drain); 78 configuration error; 1 a control command failed."])


class UsageError(ConfigError):
    """A bad command-line flag (exit 78, like every configuration error)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def main(argv: list[str] | None = None, *, target: Callable[[Any, dict], Any] | None = None) -> int:
    """Entry point; `target` replaces the engine process function (tests, benchmarks)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv, target)
    except BrokenPipeError:
        _quiet_stdout()
        return 0


def _quiet_stdout() -> None:
    """The reader of our output went away (`bcorch status --json | head`): not an error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _dispatch(argv: list[str], target: Callable[[Any, dict], Any] | None) -> int:
    if argv and argv[0] == "engine":
        from bcorch.workers.engine_cli import main as engine_main
        return engine_main(argv[1:])
    try:
        if argv and argv[0] == "gpus":
            return cmd_gpus(argv[1:])
        if argv and argv[0] == "demo":
            return cmd_demo(argv[1:])
        if argv and argv[0] in COMMANDS:
            return cmd_control(argv[0], argv[1:])
        if argv and argv[0] == "socket":
            return cmd_socket(argv[1:])
        return cmd_run(argv, target)
    except ConfigError as exc:
        text = str(exc)
        print(text if text.startswith("bcorch") else f"bcorch: {text}", file=sys.stderr)
        return EXIT_CONFIG


def _load(path: str | None) -> Config:
    return load(path) if path is not None else load(None)


def _check_url(url: str | None) -> None:
    problem = url_problem(url) if url is not None else ""
    if problem:
        raise UsageError(f"--manager-url: manager.url {problem}")


def _seconds(prog: str, flag: str, value: float | None, low: float) -> None:
    """A wait given on the command line: finite, from `low` to MAX_WAIT_S (None: not given)."""
    if value is not None and not (math.isfinite(value) and low <= value <= MAX_WAIT_S):
        raise UsageError(f"{prog}: {flag} must be from {low:g} to {MAX_WAIT_S:g} seconds, "
                         f"got {value}")


def cmd_run(argv: list[str], target: Callable[[Any, dict], Any] | None) -> int:
    from .control import socket_path
    from .gpus import GpuMonitor, select_gpus
    from .supervisor import Supervisor
    from bcorch import version

    p = _Parser(prog="bcorch", description="Supervise one basecalling engine per GPU: one engine process\n"
                "per selected GPU, restarted when it crashes or hangs; SIGTERM drains.",
                epilog=COMMANDS_HELP,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"bcorch {version()}")
    p.add_argument("--config", help="config.toml (default: built-in defaults)")
    p.add_argument("--gpus", help="all | 0,2 | GPU-<uuid>,... | virtual:N")
    p.add_argument("--manager-url", help="the manager's URL (overrides manager.url)")
    p.add_argument("--socket", help="control socket path (overrides orchestrator.control_socket)")
    p.add_argument("--keep-serving", action="store_true",
                   help="keep serving after the run is complete (orchestrator.exit_when_done = false)")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    args = p.parse_args(argv)
    _check_url(args.manager_url)
    config = _load(args.config)
    config.override("orchestrator", gpus=args.gpus, control_socket=args.socket,
                    exit_when_done=False if args.keep_serving else None)
    config.override("manager", url=args.manager_url)
    _check_url(config.manager.url)
    gpus = select_gpus(config.orchestrator.gpus,
                       "--gpus" if args.gpus is not None else "orchestrator.gpus")
    logs.configure(args.log_level,
                   "%(asctime)s %(levelname)s bcorch[%(process)d] %(name)s: %(message)s")
    monitor = GpuMonitor(gpus) if any(not g.virtual for g in gpus) else None
    supervisor = Supervisor(
        config, gpus,
        config_path=str(Path(args.config).resolve()) if args.config else None,
        manager_url=args.manager_url, socket_path=socket_path(config.orchestrator.control_socket),
        target=target, monitor=monitor, log_level=args.log_level)
    return supervisor.run()


def cmd_control(cmd: str, argv: list[str]) -> int:
    command = COMMANDS[cmd]
    p = _Parser(prog=f"bcorch {cmd}", description=command.help)
    p.add_argument("--socket", help="control socket path")
    p.add_argument("--config", help="config.toml (for orchestrator.control_socket)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    if command.gpu is not GpuArg.NONE:
        required = command.gpu is GpuArg.REQUIRED
        p.add_argument("--gpu", type=int, required=required,
                       help="host GPU index" + ("" if required else " (default: every GPU)"))
    if cmd == "status":
        p.add_argument("--json", action="store_true", help="print the raw reply")
        p.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="S",
                       help="redraw every S seconds (default 2) until Ctrl-C; plain "
                            "repeated tables when the output is not a terminal")
    args = p.parse_args(argv)
    _seconds(f"bcorch {cmd}", "--watch", getattr(args, "watch", None), 0.1)
    _seconds(f"bcorch {cmd}", "--timeout", args.timeout, 0.01)
    if getattr(args, "gpu", None) is not None and args.gpu < 0:
        raise UsageError(f"bcorch {cmd}: --gpu must be a GPU index (0 or more), got {args.gpu}")
    path = _client_socket(args.socket, args.config)
    message: dict[str, Any] = {"cmd": cmd}
    if getattr(args, "gpu", None) is not None:
        message["gpu"] = args.gpu
    if getattr(args, "watch", None) is not None:
        return _watch_status(path, args)
    reply = _ask(cmd, path, message, args.timeout)
    if reply is None:
        return 1
    try:
        text = _render_reply(cmd, reply, args)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        print(f"bcorch {cmd}: the answer from {path} is not bcorch's "
              f"({type(exc).__name__}: {exc})"[:400], file=sys.stderr)
        return 1
    print(text)
    return 0


def _render_reply(cmd: str, reply: dict, args: argparse.Namespace) -> str:
    """What a control command prints; KeyError/TypeError when the reply is not bcorch's."""
    from .status_view import render_status

    if cmd == "status":
        if not isinstance(reply["slots"], list):
            raise TypeError("slots is not a list")
        return json.dumps(reply, indent=2) if args.json else render_status(reply)
    if "slots" in reply:
        return "\n".join(f"gpu{slot['gpu']}: {slot['state']} ({slot['reason']})"
                         for slot in reply["slots"])
    return f"bcorch: {reply['state']}"


def _client_socket(flag: str | None, config_path: str | None) -> Path:
    from .control import find_socket
    return find_socket(flag or _load(config_path).orchestrator.control_socket)


def cmd_socket(argv: list[str]) -> int:
    p = _Parser(prog="bcorch socket", description="Print the path of the control socket that "
                "bcorch status would use, for socat and nc -U.")
    p.add_argument("--socket", help="control socket path")
    p.add_argument("--config", help="config.toml (for orchestrator.control_socket)")
    args = p.parse_args(argv)
    print(_client_socket(args.socket, args.config))
    return 0


def _ask(cmd: str, path: Path, message: dict, timeout: float) -> dict | None:
    """The reply, or None after printing one line on stderr."""
    from .control import ControlError, request

    try:
        reply = request(path, message, timeout=timeout)
    except ControlError as exc:
        print(f"bcorch {cmd}: {exc}", file=sys.stderr)
        return None
    if not reply.get("ok"):
        print(f"bcorch {cmd}: {reply.get('error', 'refused')}", file=sys.stderr)
        return None
    return reply


def _watch_status(path: Path, args: argparse.Namespace) -> int:
    from bcorch.terminal import watch

    from .status_view import render_status

    def render() -> str | None:
        reply = _ask("status", path, {"cmd": "status"}, args.timeout)
        if reply is None:
            return None
        return json.dumps(reply) if args.json else render_status(reply)

    return watch(render, args.watch, stamped=not args.json)


def cmd_demo(argv: list[str]) -> int:
    from . import demo

    p = _Parser(prog="bcorch demo", description="The whole job on this machine, no GPU needed.")
    demo.add_arguments(p)
    args = p.parse_args(argv)
    _check_demo(args)
    return demo.run(args)


def _check_demo(args: argparse.Namespace) -> None:
    """The demo's flags, before it writes anything (its own checks cover --files/--gpus < 1)."""
    from .gpus import MAX_VIRTUAL_GPUS

    if args.files > DEMO_MAX_FILES:
        raise UsageError(f"bcorch demo: --files must be at most {DEMO_MAX_FILES}, got {args.files}")
    if args.gpus > MAX_VIRTUAL_GPUS:
        raise UsageError(f"bcorch demo: --gpus must be at most {MAX_VIRTUAL_GPUS} (virtual GPUs), "
                         f"got {args.gpus}")
    if args.runs is not None and args.runs > max(1, args.files):
        raise UsageError(f"bcorch demo: --runs must be at most --files ({args.files}): each run "
                         f"gets at least one file, got {args.runs}")
    if args.workdir:
        workdir = Path(args.workdir)
        if workdir.is_dir() and any(workdir.iterdir()):
            raise UsageError(f"bcorch demo: --workdir: {str(workdir)!r} is not empty; give a new "
                             f"or empty directory (the demo removes its workspace when done, "
                             f"unless --keep)")
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"bcorch demo: --workdir: cannot create {str(workdir)!r} "
                             f"({exc.strerror or type(exc).__name__})") from None


def cmd_gpus(argv: list[str]) -> int:
    from .gpus import GpuMonitor, select_gpus
    from .status_view import render_gpus

    p = _Parser(prog="bcorch gpus", description="List the GPUs bcorch would use.")
    p.add_argument("--gpus", default="all", help="selection to show (default: all)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    gpus = select_gpus(args.gpus)
    health: dict[str, dict] = {}
    monitor = GpuMonitor(gpus)
    monitor.open()
    try:
        health = {uuid: h.to_dict() for uuid, h in monitor.sample().items()}
    finally:
        monitor.close()
    listed = [g.to_dict() for g in gpus]
    if args.json:
        print(json.dumps({"gpus": [{**g, "health": health.get(g["uuid"])} for g in listed]},
                         indent=2))
    else:
        print(render_gpus(listed, health))
    return 0


if __name__ == "__main__":
    sys.exit(main())
