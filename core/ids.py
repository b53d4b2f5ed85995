"""Engine ids: the one rule both `bcorch` and `bcorch engine` use.

An engine id is `<prefix>-gpu<index>`, where the prefix is `engine.engine_id` when it is
set and this host's short name otherwise. The prefix is cut so that the whole id fits
the protocol's 64 characters: the `-gpu<index>` suffix is never lost, so two GPUs of one
host never share an id.
"""
from __future__ import annotations

import re
import socket

MAX_ID = 64


def short_hostname() -> str:
    """This host's name up to the first dot, with characters ids may not hold replaced."""
    name = socket.gethostname().split(".")[0] or "host"
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def engine_id_for(gpu_index: int, prefix: str = "", hostname: str | None = None) -> str:
    suffix = f"-gpu{gpu_index}"
    base = prefix or hostname or short_hostname()
    return base[: MAX_ID - len(suffix)] + suffix
