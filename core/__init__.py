"""bcorch's neutral core, installed as the package `bcorch`.

What every process needs and nothing else: the wire protocol (`bcorch.protocol`), the
typed configuration (`bcorch.config`), terminal output (`bcorch.terminal`) and the
version. The three parts live in the repository's top-level folders and are installed as
`bcorch.manager`, `bcorch.workers` (the engine side) and `bcorch.orchestrator` (see
pyproject.toml's package-dir). This package imports none of them and only the standard
library.
"""
from __future__ import annotations


def version() -> str:
    """The installed bcorch distribution's version ("unknown" when run from a bare tree)."""
    from importlib.metadata import PackageNotFoundError, version as dist_version
    try:
        return dist_version("bcorch")
    except PackageNotFoundError:
        return "unknown"
