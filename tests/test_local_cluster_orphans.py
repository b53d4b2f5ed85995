"""`bcorch demo` killed with SIGKILL runs no clean-up: the bcmanager and bcorch it started
(LocalCluster, each in its own session) must die with it rather than serve on for ever."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil
import pytest

from support import ManagedProcess, kill_tree, wait_gone, wait_until

BCORCH = str(Path(sys.executable).parent / "bcorch")


def _names(procs: list[psutil.Process]) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline()[:4])}")
        except psutil.Error:
            out.append(f"{p.pid} (gone)")
    return "; ".join(out)


@pytest.mark.slow
def test_a_sigkilled_demo_leaves_no_process_behind(tmp_path):
    demo = ManagedProcess([BCORCH, "demo", "--files", "40", "--gpus", "2", "--keep",
                           "--workdir", str(tmp_path / "demo")], tmp_path / "demo.log",
                          env={"TMPDIR": str(tmp_path)})
    seen: list[psutil.Process] = []
    try:
        demo.start()
        parent = psutil.Process(demo.pid)

        def cluster_running() -> list[psutil.Process] | None:
            """The demo's children (manager, bcorch) once bcorch has engines of its own."""
            assert demo.running(), demo.log()
            children = parent.children()
            kids = [c for c in children if c.children(recursive=True)]
            return children if len(children) >= 2 and kids else None

        wait_until(cluster_running, 120, what=f"the demo's manager and bcorch\n{demo.log()}")
        seen = parent.children(recursive=True)
        assert any("bcorch.manager" in " ".join(p.cmdline()) for p in seen), _names(seen)
        os.kill(demo.pid, signal.SIGKILL)
        assert demo.wait(10) == -signal.SIGKILL
        left = wait_gone(seen, 60)
        assert not left, f"still running 60 s after the demo was killed: {_names(left)}"
    finally:
        demo.close()
        for proc in seen:   # psutil objects: a reused pid is never taken for ours
            try:
                if proc.is_running():
                    kill_tree(proc.pid)
            except psutil.Error:
                pass
