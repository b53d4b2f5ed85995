"""Wake the input scanner as soon as INPUT_DIR changes (Linux inotify through ctypes).

The periodic scan stays the safety net; this only shortens the wait between scans.
inotify sees changes made through this host's kernel: on a local disk that is every
change, on NFS, Lustre, GPFS, CIFS or CephFS only the changes made on this host (other
clients' writes are not delivered), so there the timer still finds the files.

Watches are recursive: every directory under the root is watched, and a directory that
appears later is watched as soon as its creation is seen. A new *.pod5, a finished write
(IN_CLOSE_WRITE), a rename into place (IN_MOVED_TO), a changed mtime (IN_ATTRIB, e.g.
rsync finishing a file), a new directory or MinKNOW's final_summary_*.txt wake the
scanner. The manager's own ASSIGNED_*/FAILED_* directories at the top are not watched,
nor are events about them (every batch creates one). A queue overflow wakes the scanner
and re-adds the watches. Any failure (no inotify, too many watches, the root missing)
is logged once and the watcher falls back to the timer alone.

Wake-ups are rate-limited to keep the scanner's duty cycle at most one half: after a
scan that took d seconds, the next early wake comes no sooner than max(min_gap_s, d)
later, so a flood of new files on a million-file input cannot keep a core busy.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import struct
import threading
import time
from pathlib import Path
from typing import Callable

from .layout import OWN_INPUT_PREFIXES

log = logging.getLogger("bcmanager.watcher")

IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

WATCH_MASK = (IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_ATTRIB | IN_DELETE_SELF
              | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW)
_EVENT = struct.Struct("iIII")
_READ_SIZE = 64 * 1024
_STOP_POLL_S = 0.25   # how soon wait() notices the stop event

# Filesystems whose other clients' changes inotify does not deliver (statfs names in /proc/mounts).
REMOTE_FS_TYPES = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "ceph", "fuse.ceph", "glusterfs",
    "fuse.glusterfs", "beegfs", "fuse.sshfs", "9p", "afs", "panfs", "wekafs", "fuse",
})


def wakes_scanner(name: str) -> bool:
    """A file name whose arrival should start a scan (directories always do)."""
    return name.endswith(".pod5") or name.startswith("final_summary")


def filesystem_type(path: str | Path, mounts: str = "/proc/self/mounts") -> str:
    """The type of the filesystem holding path ("" when unknown)."""
    real = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open(mounts, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        return ""
    return kind


class _Inotify:
    """The three libc calls, with errors as OSError."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add.restype = ctypes.c_int
        init1 = libc.inotify_init1
        init1.argtypes = [ctypes.c_int]
        init1.restype = ctypes.c_int
        fd = init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd

    def add_watch(self, path: str, mask: int) -> int:
        wd = self._add(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        return wd

    def read_events(self) -> list[tuple[int, int, str]]:
        """Every queued event as (wd, mask, name); [] when none is queued."""
        events: list[tuple[int, int, str]] = []
        while True:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return events
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                name = os.fsdecode(data[offset:offset + length].rstrip(b"\0"))
                offset += length
                events.append((wd, mask, name))

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class InputWatcher:
    """wait(timeout) returns when the input changed, the stop event is set, or timeout passed.

    Used in place of stop.wait(scan_interval_s) between two scans; returns stop.is_set().
    """

    def __init__(self, root: str | Path, *, stop: threading.Event, skip: tuple[str, ...] = (),
                 wanted: Callable[[str], bool] = wakes_scanner, min_gap_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic):
        self.root = os.path.abspath(root)
        self.stop = stop
        self.skip = frozenset(os.path.abspath(s) for s in skip)
        # Directories whose ASSIGNED_*/FAILED_* are the manager's own (a facility adds each
        # run's directory); changes to them never wake the scanner.
        self.input_roots: frozenset[str] = frozenset({self.root})
        self.wanted = wanted
        self.min_gap_s = min_gap_s
        self._clock = clock
        self._inotify: _Inotify | None = None
        self._paths: dict[int, str] = {}
        self._started = False
        self._failed = False
        self._pending = False
        self._returned_at: float | None = None
        self.wakeups = 0

    @property
    def active(self) -> bool:
        return self._inotify is not None

    def start(self) -> bool:
        """Open inotify and watch the tree (once; later calls do nothing). True when active."""
        if self._started:
            return self.active
        self._started = True
        try:
            self._inotify = _Inotify()
            self._watch_tree(self.root, top=True)
        except (OSError, AttributeError) as exc:
            self._give_up(exc)
            return False
        fs = filesystem_type(self.root)
        if fs in REMOTE_FS_TYPES or fs.startswith("fuse."):
            log.info("inotify watches %d directories of %s, which is on %s: files written by "
                     "other hosts are found by the periodic scan only", len(self._paths),
                     self.root, fs)
        else:
            log.info("inotify watches %d directories of %s (%s): new files are seen at once",
                     len(self._paths), self.root, fs or "filesystem type unknown")
        return True

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._paths.clear()

    def wait(self, timeout: float) -> bool:
        """Block until a relevant change (rate-limited), the stop event, or timeout."""
        now = self._clock()
        deadline = now + timeout
        busy = now - self._returned_at if self._returned_at is not None else 0.0
        earliest = now + max(self.min_gap_s, busy)
        try:
            while not self.stop.is_set():
                now = self._clock()
                if now >= deadline:
                    break
                if self._pending and now >= earliest:
                    break
                if self._inotify is None:
                    self.stop.wait(min(deadline - now, _STOP_POLL_S))
                    continue
                until = deadline if not self._pending else min(deadline, earliest)
                try:
                    ready, _, _ = select.select([self._inotify.fd], [], [],
                                                max(0.0, min(until - now, _STOP_POLL_S)))
                    if ready:
                        self._handle(self._inotify.read_events())
                except (OSError, ValueError) as exc:
                    self._give_up(exc)
        finally:
            if self._pending and not self.stop.is_set():
                self.wakeups += 1
            self._pending = False
            self._returned_at = self._clock()
        return self.stop.is_set()

    # -- internals -----------------------------------------------------------------------

    def _handle(self, events: list[tuple[int, int, str]]) -> None:
        for wd, mask, name in events:
            if mask & IN_Q_OVERFLOW:
                log.warning("inotify queue overflowed: full scan, watches re-added")
                self._pending = True
                self._watch_tree(self.root, top=True)
                continue
            if mask & IN_IGNORED:
                self._paths.pop(wd, None)
                continue
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                if self._paths.get(wd) == self.root:
                    self._give_up(OSError(errno.ENOENT, f"{self.root} was removed or moved"))
                    return
                continue
            parent = self._paths.get(wd)
            if parent is None or not name:
                continue
            if parent in self.input_roots and name.startswith(OWN_INPUT_PREFIXES):
                continue
            if mask & IN_ISDIR:
                if mask & (IN_CREATE | IN_MOVED_TO):
                    path = os.path.join(parent, name)
                    if path not in self.skip:
                        self._watch_tree(path, top=False)
                        self._pending = True
            elif self.wanted(name):
                self._pending = True

    def _watch_tree(self, top_dir: str, *, top: bool) -> None:
        """Watch top_dir and every directory below it (not symlinks, not the skipped ones)."""
        assert self._inotify is not None
        stack = [top_dir]
        while stack:
            directory = stack.pop()
            try:
                wd = self._inotify.add_watch(directory, WATCH_MASK)
            except OSError as exc:
                if directory == top_dir and top:
                    raise
                if exc.errno == errno.ENOSPC:
                    raise OSError(exc.errno, f"{exc.strerror} (too many directories to watch: "
                                  f"raise fs.inotify.max_user_watches)") from None
                continue  # vanished or unreadable: the scan will say so
            self._paths[wd] = directory
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        if directory in self.input_roots and \
                                entry.name.startswith(OWN_INPUT_PREFIXES):
                            continue
                        try:
                            if not entry.is_dir(follow_symlinks=False):
                                continue
                        except OSError:
                            continue
                        if entry.path not in self.skip:
                            stack.append(entry.path)
            except OSError:
                continue

    def _give_up(self, exc: BaseException) -> None:
        if not self._failed:
            self._failed = True
            log.warning("inotify unavailable for %s (%s): scanning every scan_interval_s only",
                        self.root, exc)
        self.close()
