"""Open the manager's files on the shared filesystem without ever blocking on them.

The journal, the instance lock and the run records are plain files the manager opens by
name in folders other people can write to. A FIFO put in place of one would block open()
(or the first read) for ever, a directory or a socket would fail with an errno that says
little. open_regular opens with O_NONBLOCK and checks the opened descriptor (not the
name, so nothing can be swapped in between): anything but a regular file raises
NotRegularFile, an OSError whose strerror says what the path is.
"""
from __future__ import annotations

import errno
import fcntl
import io
import os
import stat

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}

# What open(2) answers, even with O_NONBLOCK, for a FIFO without a reader, a socket, a device.
_NOT_A_FILE_ERRNOS = {errno.ENXIO, errno.EISDIR, errno.ENODEV, errno.EOPNOTSUPP,
                      errno.ENOTSUP}


class NotRegularFile(OSError):
    """path is something other than a regular file; strerror names what it is."""

    def __init__(self, path: str | os.PathLike[str], kind: str):
        super().__init__(errno.EINVAL, f"it is {kind}, not a regular file; move it aside",
                         os.fspath(path))
        self.kind = kind

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def kind_of(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), f"a special file (mode {stat.S_IFMT(mode):o})")


def open_regular(path: str | os.PathLike[str], flags: int, mode: int = 0o644) -> int:
    """os.open(path, flags) that never blocks and refuses anything but a regular file.

    The descriptor returned is blocking again (O_NONBLOCK means nothing for regular files
    but is cleared all the same). Raises NotRegularFile, or the OSError of open(2).
    """
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in _NOT_A_FILE_ERRNOS:
            try:
                found = os.stat(path).st_mode
            except OSError:
                raise exc from None
            if not stat.S_ISREG(found):
                raise NotRegularFile(path, kind_of(found)) from None
        raise
    try:
        found = os.fstat(fd).st_mode
        if not stat.S_ISREG(found):
            raise NotRegularFile(path, kind_of(found))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular_for_reading(path: str | os.PathLike[str]) -> io.BufferedReader:
    """open(path, "rb") for a regular file only (see open_regular)."""
    return os.fdopen(open_regular(path, os.O_RDONLY), "rb")


def check_regular(path: str | os.PathLike[str]) -> None:
    """Raise NotRegularFile when path exists and is not a regular file; never blocks."""
    try:
        os.close(open_regular(path, os.O_RDONLY))
    except FileNotFoundError:
        pass
