"""The App serves a Manager (single-run mode) or a Facility through the same calls: the
routes every mode has do not ask which backend they serve (only the /runs routes and the
metrics' `run` label are facility mode's own)."""
from __future__ import annotations

import inspect

from bcorch.manager.app import App
from bcorch.manager.facility import Facility
from bcorch.manager.service import Manager
from manager_helpers import start_manager, wait_counts, write_files

SHARED = ("assign", "keepalive", "complete", "status", "files_in_state", "close_input", "reap",
          "on_work_may_be_ready", "work_may_be_ready")


def test_manager_and_facility_have_the_same_methods():
    for name in SHARED:
        assert inspect.signature(getattr(Manager, name)) == \
            inspect.signature(getattr(Facility, name)), name


def test_the_shared_routes_do_not_branch_on_the_mode():
    for route in (App.files, App.close_input, App.status, App.assignwork, App.completed,
                  App.keepalive):
        assert "facility" not in inspect.getsource(route), route.__name__


def test_single_run_files_and_close_input_answer_as_before(procs, tmp_path):
    m = start_manager(procs, tmp_path)
    write_files(tmp_path / "in", ["a.pod5", "sub/b.pod5"])
    wait_counts(m, PENDING=2)
    code, body = m.get("/files", state="PENDING", limit=1)
    assert code == 200 and body["count"] == 1 and body["files"][0]["path"] in ("a.pod5", "sub/b.pod5")
    code, body = m.get("/files", state="PENDING", run="any")   # one run: `run` is not looked at
    assert code == 200 and {f["path"] for f in body["files"]} == {"a.pod5", "sub/b.pod5"}
    assert m.get("/files", state="NOPE")[0] == 400
    assert m.post("/close-input", {}) == (200, {"ok": True, "input_closed": True})
    assert m.post("/close-input", {}) == (200, {"ok": True, "input_closed": True})
    assert m.status()["input_closed"] is True
