"""Starting an engine process and reading its pipe: the plumbing under the supervisor.

Engines are started with the spawn start method (a fresh interpreter: no inherited locks
or CUDA state), each in its own process group, with a duplex pipe to bcorch.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

from bcorch.workers import channel

Target = Callable[[Any, channel.SpawnSpec], Any]


def child_main(target: Target, conn: Any, spec: channel.SpawnSpec) -> None:
    """Engine process entry: own process group (a terminal's ^C reaches bcorch only)."""
    try:
        os.setpgrp()
    except OSError:
        pass
    target(conn, spec)


def default_target() -> Target:
    from bcorch.workers.engine import run_engine_process
    return run_engine_process


def start(ctx: Any, target: Target, spec: channel.SpawnSpec, name: str) -> tuple[Any, Any]:
    """(process, parent's end of the pipe); OSError when the process cannot be started."""
    parent, child = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=child_main, args=(target, child, spec), name=name)
    try:
        with _environment(spec.env):
            proc.start()
    except OSError:
        parent.close()
        raise
    finally:
        child.close()
    return proc, parent


def messages(conn: Any, limit: int, on_unreadable: Callable[[Exception], None]) -> Iterator[Any]:
    """What the engine has sent so far (at most `limit`); ends with EOFError raised out
    when the pipe is closed."""
    for _ in range(limit):
        try:
            if not conn.poll():
                return
            msg = conn.recv()
        except (EOFError, OSError):
            raise EOFError from None
        except Exception as exc:  # an unpicklable message: the child is broken
            on_unreadable(exc)
            continue
        yield msg


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """os.environ with `values` while a child is spawned, so its exec'd environment has them
    (CUDA reads CUDA_VISIBLE_DEVICES from there; only the loop thread spawns)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
