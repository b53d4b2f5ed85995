"""The journal keeps each finished job's read counts (when its engine reported them), so a
database rebuilt from it shows the same reads in /status; journal lines written before
reads were counted, or by a completion of the original engine, still load (reads unknown)."""
from __future__ import annotations

import json
from pathlib import Path

from manager_helpers import assign, basecall, complete, start_manager, wait_counts
from support import ManagerProcess

from bcorch.manager.journal import FILE_NAME, Journal, JournalledFile
from bcorch.manager.read_counts import ReadCount
from bcorch.orchestrator.pod5_dataset import write_dataset


def test_read_counts_survive_a_lost_database(procs, tmp_path):
    """Two batches with counts, one from an original engine (none): delete the database,
    restart: /status's reads are what they were, unknown ones still unknown."""
    write_dataset(tmp_path / "in", 3, reads_per_file=4, samples_per_read=400, seed=3)
    db = tmp_path / "db.sqlite"
    m = start_manager(procs, tmp_path, batch_size=1, extra=["--db", str(db)])
    wait_counts(m, PENDING=3)
    for i, counted in enumerate([True, True, False]):
        batch = assign(m, "gpu0", 1)
        ids = basecall(batch, tmp_path)
        extra = {"reads_pass": len(ids) - i, "reads_fail": i} if counted else {}
        assert complete(m, batch["jobid"], "DONE", **extra) == (200, {"ok": True})
    before = m.status()["reads"]
    assert before == {"pass": 7, "fail": 1, "total": 8, "jobs_counted": 2, "jobs_done": 3}
    m.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)

    again = ManagerProcess(tmp_path, tmp_path / "in", tmp_path / "out", port=m.port,
                           batch_size=1, extra=["--db", str(db)])
    procs.append(again)
    again.start()
    assert "rebuilt from the journal" in again.log()
    st = again.status()
    assert st["files"]["DONE"] == 3, st["files"]
    assert st["reads"] == before


def test_journal_lines_with_and_without_reads_load(tmp_path):
    """An old line (no "reads"), a new one, a malformed count: every job's files load; only
    well-formed counts are kept; a repeated line without reads keeps the known count."""
    old = {"done": "j-old", "engine": "gpu0", "t": 1.0, "files": [["id-1", "a.pod5", 10]]}
    bad = {"done": "j-bad", "engine": "gpu1", "t": 2.0, "files": [["id-2", "b.pod5", 20]],
           "reads": ["7", -1]}
    (tmp_path / FILE_NAME).write_text(json.dumps(old) + "\n" + json.dumps(bad) + "\n")
    journal = Journal(tmp_path)
    journal.record_done("j-new", "gpu0", [JournalledFile("id-3", "c.pod5", 30)],
                        ReadCount(5, 2))
    journal.record_done("j-new", "gpu0", [JournalledFile("id-3", "c.pod5", 30)])
    journal.close()
    replay = Journal(tmp_path).replay()
    assert sorted(replay.jobs) == ["j-bad", "j-new", "j-old"]
    assert replay.skipped_lines == 0
    assert replay.reads == {"j-new": ReadCount(5, 2)}
    last = json.loads((tmp_path / FILE_NAME).read_text().splitlines()[2])
    assert last["reads"] == [5, 2] and last["files"] == [["id-3", "c.pod5", 30]]
