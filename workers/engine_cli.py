"""`bcorch engine --gpu N [--config F] [--manager-url U]`: one engine, no orchestrator.

Ctrl-C / SIGTERM: finish the current batch, report it and exit 0; a second one stops
the basecaller, reports STOPPED and exits.
"""
from __future__ import annotations

import argparse
import sys

from bcorch import logs
from bcorch.protocol import EXIT_CONFIG
from bcorch.config import ConfigError


class _Parser(argparse.ArgumentParser):
    """A bad flag is one line and exit 78, like every configuration error (not usage + exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bcorch engine",
                                     description="Run one basecalling engine on one GPU.")
    parser.add_argument("--gpu", type=int, required=True, metavar="N",
                        help="GPU index (CUDA_VISIBLE_DEVICES is left as it is)")
    parser.add_argument("--config", default=None, metavar="F",
                        help="config.toml, or the original pipeline's JSON file")
    parser.add_argument("--manager-url", default=None, metavar="U",
                        help="manager URL (overrides manager.url)")
    parser.add_argument("--engine-id", default=None, metavar="ID",
                        help="engine id (overrides engine.engine_id)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except ConfigError as exc:
        print(f"bcorch engine: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.gpu < 0:
        print(f"bcorch engine: --gpu: expected a GPU index >= 0, got {args.gpu}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(args.log_level)
    from .engine import BCEngine

    try:
        engine = BCEngine(args.config, args.gpu, manager_url=args.manager_url,
                          engine_id=args.engine_id)
    except ConfigError as exc:
        print(f"bcorch engine: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return engine.begin_working()


if __name__ == "__main__":
    sys.exit(main())
