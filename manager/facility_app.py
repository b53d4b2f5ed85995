"""The facility's HTTP routes: GET /runs and /runs/pause|resume|cancel|close?run=RUN_ID.

A command takes `run` from the query (GET) or the JSON body (POST). An unknown or
missing run is a 400 naming `run`; a change the run's state does not allow is a 409
with a one-line reason (manager.facility_states).
"""
from __future__ import annotations

from typing import Any, Callable

from .facility import Facility, UnknownRun
from .facility_states import COMMANDS, RunEvent, TransitionRefused
from .service import Answer


def run_routes(facility: Facility, http_error: type) -> dict[str, tuple]:
    def runs(params: Any) -> Answer:
        return Answer(200, {"runs": facility.runs()})

    def command(event: RunEvent) -> Callable[[Any], Answer]:
        def handle(params: Any) -> Answer:
            run = params.one("run", required=False)
            if run is not None and not isinstance(run, str):
                raise http_error(400, f"parameter run must be a string (a run id from GET "
                                      f"/runs), got {type(run).__name__}")
            try:
                view = facility.command(run, event)
            except UnknownRun as exc:
                raise http_error(400, str(exc)) from None
            except TransitionRefused as exc:
                raise http_error(409, str(exc)) from None
            return Answer(200, {"ok": True, "run": view})
        return handle

    routes: dict[str, tuple] = {"/runs": (frozenset({"GET", "HEAD"}), True, runs)}
    for event in COMMANDS:
        routes[f"/runs/{event.value}"] = (frozenset({"GET", "POST"}), True, command(event))
    return routes
