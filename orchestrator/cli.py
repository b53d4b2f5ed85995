"""The `bcorch` command line."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "engine":
        from workers.engine_cli import main as engine_main
        return engine_main(argv[1:])
    print("bcorch: only `bcorch engine` exists so far", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
