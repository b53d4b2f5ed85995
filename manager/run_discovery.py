"""Find sequencing run directories under a facility's watch root (MinKNOW layout).

`{root}/{protocol_group}/{sample}/{start}_{device}_{flow_cell}_{short_run_id}/` holding
`pod5/` (older runs: `pod5_pass/` and/or `pod5_fail/`). Discovery looks at exactly three
levels of directories and checks a candidate for its pod5 folders with one stat each; it never
lists a pod5 folder (the run's own scanner does that), and runs already known are not even
stat'ed, so a scan of a root with 48 runs costs a few dozen directory listings.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bcorch.protocol import is_valid_id

log = logging.getLogger(__name__)

POD5_DIRS = ("pod5", "pod5_pass", "pod5_fail")
RUN_ID_MAX = 64
# start is the date and time MinKNOW began (YYYYMMDD_HHMM); the device position may itself hold
# an underscore, the flow cell id and the short run id never do.
_RUN_NAME_RE = re.compile(r"(\d{8}_\d{4})_(.+)_([^_]+)_([^_]+)")
_NOT_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_WARNED_MAX = 1000
_warned: set[str] = set()


@dataclass(frozen=True)
class RunDir:
    run_id: str
    path: Path
    rel: str
    protocol_group: str
    sample: str
    name: str
    start: str
    device: str
    flow_cell: str
    short_run_id: str


def parse_run_name(name: str) -> tuple[str, str, str, str]:
    """(start, device, flow_cell, short_run_id) of a MinKNOW run directory name, else four ""."""
    match = _RUN_NAME_RE.fullmatch(name)
    if not match:
        return "", "", "", ""
    start, device, flow_cell, short_run_id = match.groups()
    return start, device, flow_cell, short_run_id


def propose_run_id(name: str) -> str:
    """The run directory's name if it is a valid short id, else a sanitised, shortened one.

    The Facility makes it unique (adding "-2", "-3", ...) and records it, so it is stable.
    It never starts with "-", so that `bcmanager run pause ID` does not read it as an option.
    """
    if is_valid_id(name) and not name.startswith("-"):
        return name
    cleaned = _NOT_ID_CHARS.sub("_", name).strip("._-") or "run"
    return cleaned[:RUN_ID_MAX].rstrip(".") or "run"


def run_dir(root: Path | str, rel: str, run_id: str = "") -> RunDir:
    """The RunDir of root/rel (rel: group/sample/name); run_id proposed from its name if none."""
    group, sample, name = (rel.split("/") + ["", "", ""])[:3]
    return RunDir(run_id or propose_run_id(name), Path(root) / rel, rel, group, sample, name,
                  *parse_run_name(name))


def _warn_once(path: Path, exc: OSError) -> None:
    key = str(path)
    if key in _warned:
        log.debug("run discovery: cannot read %s: %s", path, exc)
        return
    if len(_warned) >= _WARNED_MAX:
        _warned.clear()
    _warned.add(key)
    log.warning("run discovery: skipping %s (cannot read it: %s)",
                path, exc.strerror or exc.__class__.__name__)


def _subdirs(path: Path) -> list[os.DirEntry]:
    """The visible sub-directories of path; [] (logged once) when it cannot be read."""
    try:
        with os.scandir(path) as entries:
            found = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_dir():
                        found.append(entry)
                except OSError:
                    continue
            return found
    except FileNotFoundError:
        return []
    except OSError as exc:
        _warn_once(path, exc)
        return []


def _holds_pod5_dir(run_path: str) -> bool:
    return any(os.path.isdir(os.path.join(run_path, name)) for name in POD5_DIRS)


def linked_pod5_problem(run_path: Path | str) -> str:
    """Why the run cannot be served when one of its pod5 folders is a symbolic link, else "".

    A run's scanner does not follow links (one could reach another run's files, which
    would then be basecalled twice), so such a run would be served with none of its files.
    """
    for name in POD5_DIRS:
        path = os.path.join(run_path, name)
        if os.path.islink(path):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return (f"its {name} folder is a symbolic link (to {target[:200]}); links inside "
                    f"a run are not followed (one could reach another run's files): put the "
                    f"POD5 files in the run directory, then `run resume`")
    return ""


def discover_runs(root: Path, known_rels: set[str]) -> list[RunDir]:
    """Run directories three levels below root that hold a pod5 folder and are not known.

    Sorted by rel; a missing root gives []; unreadable directories are skipped (logged once).
    """
    root = Path(root).absolute()
    found: list[RunDir] = []
    for group in _subdirs(root):
        for sample in _subdirs(Path(group.path)):
            for run in _subdirs(Path(sample.path)):
                rel = f"{group.name}/{sample.name}/{run.name}"
                if rel in known_rels or not _holds_pod5_dir(run.path):
                    continue
                found.append(run_dir(root, rel))
    found.sort(key=lambda r: r.rel)
    return found
