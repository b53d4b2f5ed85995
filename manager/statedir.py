"""Where the manager keeps its database by default: the manager host's local state directory.

SQLite in WAL mode needs shared memory on one host and working POSIX locks, which NFS
and Lustre do not give: the database must not live on the shared filesystem. The
default is, in this order, systemd's $STATE_DIRECTORY (StateDirectory=bcorch),
$XDG_STATE_HOME/bcorch, ~/.local/state/bcorch. The file name is keyed by the absolute
output directory, so one host can run managers for several runs side by side and a
restart finds its own database again. What must survive the host is in the journal
beside the outputs (manager.journal).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def state_dir(env: dict[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    systemd = env.get("STATE_DIRECTORY", "")
    if systemd:
        return Path(systemd.split(":")[0])  # systemd lists several when several are asked for
    xdg = env.get("XDG_STATE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "bcorch"
    return Path.home() / ".local" / "state" / "bcorch"


def default_db_path(output_dir: str | os.PathLike[str], env: dict[str, str] | None = None) -> Path:
    return keyed_db_path("bcmanager", output_dir, env)


def keyed_db_path(prefix: str, directory: str | os.PathLike[str],
                  env: dict[str, str] | None = None) -> Path:
    """<prefix>-<directory's name>-<hash of its absolute path>.sqlite in the state directory."""
    absolute = os.path.abspath(os.fspath(directory))
    key = hashlib.sha256(absolute.encode()).hexdigest()[:16]
    tail = os.path.basename(absolute.rstrip(os.sep)) or "root"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in tail)[:40]
    return state_dir(env) / f"{prefix}-{safe}-{key}.sqlite"
