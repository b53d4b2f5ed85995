"""Files that survive a crash: written whole or not at all, and on disk when the call returns.

write_atomically writes a temporary file in the same folder, fsyncs it, renames it over the
old one, then fsyncs the folder, so a reader never sees half a file, even across a crash.
fsync_dir makes a file's creation or rename in a folder durable.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Flush the folder's entries to disk; best effort (some filesystems refuse a folder fd)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(target: Path, text: str, mode: int = 0o644) -> Path:
    """Replace target with text (UTF-8) atomically and durably; return target.

    On any failure the old file is left as it was and no temporary file is left behind.
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(target.parent)
    return target
