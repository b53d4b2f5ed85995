"""Human-readable tables for `bcorch status` and `bcorch gpus`."""
from __future__ import annotations

from typing import Any, Iterable

from bcorch.protocol import short_job_id

GIB = 1024 ** 3
RUN_COLUMN_MAX = 40    # a run id or a model longer than this shows its tail (its last chars)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def memory(used: int | None, total: int | None) -> str:
    if total is None:
        return "-"
    if used is None:
        return f"{total / GIB:.0f} GiB"
    return f"{used / GIB:.1f}/{total / GIB:.0f} GiB"


def tail(value: str | None, width: int = RUN_COLUMN_MAX) -> str:
    """The value, or "..." and its last characters where it is longer than `width`: a
    MinKNOW run id ends in its flow cell and short id, a model name in its speed and version.
    ASCII, so that any terminal or log encoding prints it."""
    if not value:
        return "-"
    return value if len(value) <= width else "..." + value[-(width - 3):]


def table(headers: list[str], rows: Iterable[list[Any]]) -> str:
    rows = [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def render_status(status: dict) -> str:
    manager = status.get("manager", {})
    if manager.get("reached") is False:
        mgr = f"manager {manager.get('url')}: not reached yet"
    elif manager.get("reachable", True):
        mgr = (f"manager {manager.get('url')}: reachable"
               f"{', run complete' if manager.get('run_complete') else ''}")
    else:
        mgr = (f"manager {manager.get('url')}: DOWN for {duration(manager.get('down_for_s'))}"
               f" (next probe in {duration(manager.get('next_probe_in_s'))}; "
               f"{manager.get('last_error') or 'no answer'})")
    head = (f"bcorch on {status.get('host')} (pid {status.get('pid')}): {status.get('state')}"
            f"{' - ' + status['reason'] if status.get('reason') else ''}, "
            f"up {duration(status.get('uptime_s'))}; {mgr}")
    rows = []
    notes = []
    for s in status.get("slots", []):
        health = s.get("health") or {}
        util = health.get("utilization_pct")
        state = s["state"] + (f"({s['engine_state']})" if s.get("engine_state")
                              and s["state"] in ("RUNNING", "DRAINING") else "")
        rows.append([
            s["gpu"], state, short_job_id(s["job_id"]) if s.get("job_id") else "-",
            s.get("batch_size") if s.get("job_id") else "-",
            duration(s.get("batch_elapsed_s")) if s.get("job_id") else "-",
            s.get("files_done"), s.get("restarts"), s.get("last_exit"),
            "virtual" if s.get("virtual") else memory(health.get("memory_used"),
                                                       health.get("memory_total")),
            "-" if util is None else f"{util}%",
            "-" if health.get("temperature_c") is None else f"{health['temperature_c']}C",
        ])
        if s["state"] not in ("RUNNING",) or s.get("gpu_failure"):
            back = (f"; `bcorch resume --gpu {s['gpu']}` brings it back"
                    if s["state"] == "STOPPED" and status.get("state") == "RUNNING" else "")
            notes.append(f"gpu{s['gpu']} {s['state']}: {s.get('reason')}{back}")
    out = [head, table(["GPU", "STATE", "JOB", "FILES", "IN BATCH", "DONE", "RESTARTS",
                        "LAST EXIT", "MEMORY", "UTIL", "TEMP"], rows)]
    runs = render_runs(status.get("slots", []))
    if runs:
        out += ["", runs]
    if notes:
        out.append("\n".join(notes))
    return "\n".join(out)


def render_runs(slots: list[dict]) -> str:
    """Which facility run and model each GPU basecalls; "" when no slot works on a run.

    A table of its own under the slots' table, so that both stay within 100 columns with
    MinKNOW run ids and full model names. A single-run manager's batches name no run, and
    its engines all run engine.model: nothing to add there.
    """
    if not any(s.get("run_id") for s in slots):
        return ""
    return table(["GPU", "RUN", "MODEL"],
                 [[s["gpu"], tail(s.get("run_id")), tail(s.get("model"))] for s in slots])


def render_gpus(gpus: list[dict], health: dict[str, dict]) -> str:
    rows = []
    for g in gpus:
        h = health.get(g["uuid"], {})
        ecc = h.get("ecc_uncorrected")
        rows.append([g["index"], g["uuid"], g["name"],
                     memory(h.get("memory_used"), h.get("memory_total") or g.get("memory_total")),
                     "-" if h.get("utilization_pct") is None else f"{h['utilization_pct']}%",
                     "-" if h.get("temperature_c") is None else f"{h['temperature_c']}C",
                     "-" if ecc is None else ecc,
                     "LOST" if h.get("lost") else "ok"])
    return table(["INDEX", "UUID", "NAME", "MEMORY", "UTIL", "TEMP", "ECC-UNCORR", "HEALTH"], rows)
