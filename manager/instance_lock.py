"""One manager per OUTPUT_DIR: a lease file on the shared filesystem (issue 11, hole 6).

Two managers on the same state would both hand out the same files. flock and POSIX
locks are unreliable on NFS (and a lock held by a dead NFS client lingers), so the
holder instead keeps a small JSON file, OUTPUT_DIR/.bcmanager.lock, naming itself (host,
pid, process start, a random instance id, start stamp) and rewrites it every
`manager.lock_refresh_s` (write and fsync a new file, move the old one aside, link the new
one in: readers never see half a file, and a take-over is never overwritten).

A manager that finds the file:
- held by a live process on this host: refuses (exit 78), --take-over or not;
- held by a process of this host that is gone (kill -9, a crash): takes it at once;
- held by another host (or another container of this machine) and refreshed within
  STALE_AFTER_REFRESHES of the holder's own refresh periods: refuses, naming the holder;
- held by another container of this machine (same kernel boot id) and stale: takes it
  (nothing can have cut that holder off: it is dead or frozen);
- held by another host and stale: refuses unless started with --take-over (the holder
  may only be cut off, so a person decides), then takes it.

The age of the lock is measured in file-server time: the mtime of a probe file written
now minus the lock's mtime, both stamped by the same server, so clocks that differ
between hosts do not matter. Taking a lock is exclusive: a stale file is first renamed
aside (only one renamer gets it) and the new one is created with link(2), which fails
when the name exists, on local filesystems and NFS alike.

The holder checks at every refresh that the file still names it; if another manager took
over, or the file could not be refreshed for the whole stale window (someone may have
taken it meanwhile), `on_lost` is called and the manager stops.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import psutil

from bcorch.config import ConfigError

from .state_file import open_regular_for_reading

log = logging.getLogger("bcmanager.lock")

LOCK_NAME = ".bcmanager.lock"
STALE_AFTER_REFRESHES = 6
_ATTEMPTS = 5


class LockHeld(ConfigError):
    """Another manager holds the lock; str() is one line naming it and what to do (exit 78)."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_started: float      # the process's start time (guards against a reused pid)
    instance: str           # random: tells two holders apart even with equal host and pid
    started: float          # wall clock when this manager took the lock
    refreshed: float        # wall clock of the last refresh (for people; age uses mtimes)
    refresh_s: float
    pid_namespace: str = ""  # containers may share a host name but not their pids
    boot_id: str = ""        # the running kernel: equal for every container of one machine

    @property
    def stale_after_s(self) -> float:
        return STALE_AFTER_REFRESHES * self.refresh_s

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"host {self.host} pid {self.pid} (since {since})"

    @classmethod
    def parse(cls, text: str) -> "Holder | None":
        try:
            data = json.loads(text)
            return cls(host=str(data["host"]), pid=int(data["pid"]),
                       pid_started=float(data["pid_started"]), instance=str(data["instance"]),
                       started=float(data["started"]), refreshed=float(data["refreshed"]),
                       refresh_s=float(data["refresh_s"]),
                       pid_namespace=str(data.get("pid_namespace", "")),
                       boot_id=str(data.get("boot_id", "")))
        except (ValueError, KeyError, TypeError):
            return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _process_started(pid: int) -> float | None:
    """The start time of a running process; None when it is gone (or a zombie)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


class InstanceLock:
    """The lease on one directory; acquire() once, start_refreshing(), release() at exit."""

    def __init__(self, directory: str | os.PathLike[str], refresh_s: float):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.refresh_s = refresh_s
        now = time.time()
        self.me = Holder(host=socket.gethostname(), pid=os.getpid(),
                         pid_started=_process_started(os.getpid()) or now,
                         instance=secrets.token_hex(8), started=now, refreshed=now,
                         refresh_s=refresh_s, pid_namespace=_pid_namespace(),
                         boot_id=_boot_id())
        self.lost: str = ""
        self._released = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking it ----------------------------------------------------------------------

    def acquire(self, take_over: bool = False) -> None:
        """Take the lock or raise LockHeld (one line: the holder and what to do)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._acquire(take_over)
        except OSError as exc:
            raise ConfigError(f"manager.output_dir: cannot write the lock {self.path}: "
                              f"{exc.strerror or exc}") from None
        atexit.register(self.release)  # also on an early return or an exception at start-up

    def _acquire(self, take_over: bool) -> None:
        for _ in range(_ATTEMPTS):
            probe = self._write_temp(self.me)
            try:
                if self._create_exclusive(probe):
                    log.info("lock %s taken: %s", self.path, self.me.describe())
                    return
                current, text = self._read()
                if current is not None and current.instance == self.me.instance:
                    return
                age = probe.stat().st_mtime - self._mtime()
            except FileNotFoundError:
                continue  # the holder released it between our steps: try again
            finally:
                probe.unlink(missing_ok=True)
            why = self._why_takeable(current, age, take_over)
            if self._move_aside(text):
                log.warning("lock %s: taking it over from %s (%s)", self.path,
                            current.describe() if current else "an unreadable lock file", why)
        raise LockHeld(f"{self.path}: could not take the lock after {_ATTEMPTS} attempts "
                       "(another manager is starting at the same time?)")

    def _why_takeable(self, holder: Holder | None, age: float, take_over: bool) -> str:
        """Why the existing lock may be taken; raises LockHeld when it may not."""
        if holder is None:
            if age < STALE_AFTER_REFRESHES * self.refresh_s:
                raise LockHeld(f"{self.path}: unreadable lock file written {age:.0f} s ago "
                               "(another manager starting?); try again, or remove it once no "
                               "bcmanager serves this OUTPUT_DIR")
            return "unreadable and old"
        same_machine = (holder.boot_id == self.me.boot_id if holder.boot_id and self.me.boot_id
                        else holder.host == self.me.host)
        if same_machine and holder.pid_namespace == self.me.pid_namespace:
            started = _process_started(holder.pid)
            alive = started is not None and abs(started - holder.pid_started) < 1.0
            if alive:
                raise LockHeld(f"OUTPUT_DIR {self.directory} is served by another bcmanager: "
                               f"{holder.describe()} on this host; stop it first "
                               f"(kill -TERM {holder.pid})")
            return f"its process {holder.pid} on this host is gone"
        fresh = age < holder.stale_after_s
        if fresh:
            raise LockHeld(f"OUTPUT_DIR {self.directory} is served by another bcmanager: "
                           f"{holder.describe()}, lock refreshed {max(age, 0):.0f} s ago; stop "
                           f"it first (--take-over only once its lock is stale: not refreshed "
                           f"for {holder.stale_after_s:.0f} s)")
        if same_machine:  # another container of this machine: no network can cut it off
            return f"stale: not refreshed for {age:.0f} s by a process of this machine"
        if not take_over:
            raise LockHeld(f"OUTPUT_DIR {self.directory} was served by {holder.describe()}, "
                           f"whose lock is stale (not refreshed for {age:.0f} s); if that "
                           f"manager is gone, start with --take-over")
        return f"stale: not refreshed for {age:.0f} s, --take-over"

    def _create_exclusive(self, source: Path) -> bool:
        try:
            os.link(source, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: O_EXCL create instead
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as fh:
                fh.write(source.read_text())
                fh.flush()
                os.fsync(fh.fileno())
            return True

    def _move_aside(self, judged: str) -> bool:
        """Remove the lock we judged takeable, and only that one (compare and delete)."""
        aside = self.path.with_name(f"{LOCK_NAME}.old-{self.me.instance}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        with open_regular_for_reading(aside) as fh:
            taken = fh.read().decode(errors="replace")
        if taken == judged:
            aside.unlink(missing_ok=True)
            return True
        # Someone took it between our read and the rename: put theirs back.
        try:
            os.link(aside, self.path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False

    # -- holding it ---------------------------------------------------------------------

    def start_refreshing(self, on_lost: Callable[[str], None]) -> None:
        """Refresh every refresh_s in a thread; on_lost(reason) once the lock is not ours."""
        self._thread = threading.Thread(target=self._refresh_loop, args=(on_lost,),
                                        name="instance-lock", daemon=True)
        self._thread.start()

    def _refresh_loop(self, on_lost: Callable[[str], None]) -> None:
        last_ok = time.monotonic()
        stale_s = STALE_AFTER_REFRESHES * self.refresh_s
        while not self._stop.wait(self.refresh_s):
            try:
                reason = self.refresh()
            except OSError as exc:
                if time.monotonic() - last_ok < stale_s:
                    log.warning("lock %s: refresh failed (%s); retrying", self.path, exc)
                    continue
                reason = (f"could not refresh the lock {self.path} for {stale_s:.0f} s "
                          f"({exc}): another manager may have taken over")
            if reason:
                self.lost = reason
                log.error("%s: stopping", reason)
                on_lost(reason)
                return
            last_ok = time.monotonic()

    def refresh(self) -> str:
        """Rewrite the lock; a reason string when it is no longer ours, else ""."""
        current, _ = self._read()
        if current is None or current.instance != self.me.instance:
            return self._held_by(current, "nobody (the lock file is gone)")
        tmp = self._write_temp(Holder(**{**asdict(self.me), "refreshed": time.time()}))
        try:
            return self._swap_if_ours(tmp)
        finally:
            tmp.unlink(missing_ok=True)

    def _swap_if_ours(self, fresh: Path) -> str:
        """Put `fresh` in place of the lock only while the lock is ours (compare and swap).

        A plain rename over the path would overwrite a manager that took the lock after
        refresh() read it, and both would serve. Moving the lock aside is the compare (one
        renamer gets it); link(2) puts ours back only where nobody created one meanwhile.
        """
        aside = self.path.with_name(f"{LOCK_NAME}.refresh-{self.me.instance}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return self._held_by(None, "nobody (the lock file is gone)")
        with open_regular_for_reading(aside) as fh:
            current = Holder.parse(fh.read().decode(errors="replace"))
        ours = current is not None and current.instance == self.me.instance
        if not ours:
            try:
                os.link(aside, self.path)  # theirs goes back, unless a newer one is there
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)
        if ours:
            if self._create_exclusive(fresh):
                return ""
            current, _ = self._read()
        return self._held_by(current, "an unreadable lock file")

    def _held_by(self, holder: Holder | None, otherwise: str) -> str:
        """Why the lock is lost: who holds it now (`otherwise` when no holder can be named)."""
        return f"the lock {self.path} is now held by {holder.describe() if holder else otherwise}"

    def release(self) -> None:
        """Stop refreshing and remove the lock if it is still ours (idempotent)."""
        if self._released:
            return
        self._released = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            current, _ = self._read()
            if current is not None and current.instance == self.me.instance:
                self.path.unlink()
                log.info("lock %s released", self.path)
        except OSError as exc:
            log.warning("lock %s: could not release it: %s", self.path, exc)

    # -- files --------------------------------------------------------------------------

    def _write_temp(self, holder: Holder) -> Path:
        tmp = self.path.with_name(f"{LOCK_NAME}.tmp-{holder.instance}-{secrets.token_hex(4)}")
        with open(tmp, "w") as fh:
            json.dump(asdict(holder), fh)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def _read(self) -> tuple[Holder | None, str]:
        """(holder, raw text); raises FileNotFoundError when there is no lock."""
        with open_regular_for_reading(self.path) as fh:  # a FIFO put there must not block us
            text = fh.read().decode(errors="replace")
        return Holder.parse(text), text

    def _mtime(self) -> float:
        return self.path.stat().st_mtime
