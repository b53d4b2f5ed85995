"""A POD5 file's footer read by the manager (no pod5 library), the journal, the state dir."""
from __future__ import annotations

import random
import uuid

import pod5
import pytest

from bcorch.manager.identity import Kind, examine
from bcorch.manager.journal import Journal, JournalledFile
from bcorch.manager.statedir import default_db_path
from bcorch.manager.states import FileState, JobState, retry_delay
from bcorch.manager.store import Found, Store
from bcorch.orchestrator.pod5_dataset import write_pod5


@pytest.fixture(scope="module")
def pod5_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pod5") / "r.pod5"
    write_pod5(path, 4, 800, random.Random(7))
    return path


def test_identifier_is_the_one_the_pod5_library_reads(tmp_path):
    rng = random.Random(3)
    for i in range(5):
        path = tmp_path / f"r{i}.pod5"
        write_pod5(path, 1 + i * 7, (200, 3000), rng)
        seen = examine(path)
        with pod5.Reader(path) as reader:
            expected = str(reader.file_identifier)
        assert seen.kind is Kind.COMPLETE and seen.identifier == expected
        assert uuid.UUID(seen.identifier)


def test_a_file_cut_anywhere_is_incomplete_not_unknown(tmp_path, pod5_file):
    data = pod5_file.read_bytes()
    cut = tmp_path / "cut.pod5"
    for n in sorted({1, 7, 8, 24, 100, len(data) // 2, len(data) - 40, len(data) - 8,
                     len(data) - 1} | set(range(len(data) - 300, len(data), 17))):
        cut.write_bytes(data[:n])
        assert examine(cut).kind is Kind.INCOMPLETE, n


def test_files_that_cannot_be_checked_fall_back(tmp_path):
    for name, data in [("empty.pod5", b""), ("fake.pod5", b"pod5?"),
                       ("text.pod5", b"this is not a POD5 file\n" * 64)]:
        (tmp_path / name).write_bytes(data)
        assert examine(tmp_path / name).kind is Kind.UNKNOWN, name
    assert examine(tmp_path / "missing.pod5").kind is Kind.UNKNOWN


def test_a_damaged_footer_is_not_complete(tmp_path, pod5_file):
    data = bytearray(pod5_file.read_bytes())
    data[-32] ^= 0xFF  # the footer length
    (tmp_path / "bad.pod5").write_bytes(bytes(data))
    assert examine(tmp_path / "bad.pod5").kind is Kind.INCOMPLETE


def test_journal_survives_a_torn_last_line(tmp_path):
    journal = Journal(tmp_path)
    journal.record_done("j1", "gpu0", [JournalledFile("id-1", "a.pod5", 10)])
    journal.close()
    with open(journal.path, "ab") as fh:
        fh.write(b'{"done": "j2", "engine": "gpu0", "files": [["id-2", "b.p')  # crash mid-write
    journal = Journal(tmp_path)
    journal.record_done("j3", "gpu1", [JournalledFile("path:c.pod5", "c.pod5", 3)])
    journal.record_closed()
    replay = journal.replay()
    assert sorted(replay.jobs) == ["j1", "j3"] and replay.skipped_lines == 1
    assert replay.input_closed and replay.files == 2


def test_rebuild_fills_a_new_store(tmp_path):
    journal = Journal(tmp_path)
    journal.record_done("j1", "gpu0", [JournalledFile("id-1", "a.pod5", 10),
                                       JournalledFile("path:b.pod5", "b.pod5", 5)])
    store = Store(str(tmp_path / "db.sqlite"), max_attempts=3)
    try:
        assert store.is_new()
        assert store.rebuild(journal.replay().jobs, False) == 2
        assert store.snapshot().files["DONE"] == 2 and not store.is_new()
        assert [j.job_id for j in store.unfinished_moves()] == ["j1"]
        assert store.job("j1").state is JobState.DONE
        # the identified file is recognised at a new path; the other keeps its path
        placed = store.add_found([Found("moved/a.pod5", 10, 0.0, "id-1")], lambda p: False)
        assert placed.moved == [("a.pod5", "moved/a.pod5")] and placed.added == 0
    finally:
        store.close()


def test_copy_is_a_duplicate_and_a_changed_quarantined_file_is_pending(tmp_path):
    store = Store(str(tmp_path / "db.sqlite"), max_attempts=3)
    try:
        store.add_found([Found("a.pod5", 10, 1.0, "id-1"),
                         Found("grow.pod5", 4, 1.0, None, FileState.QUARANTINED, "incomplete")],
                        lambda p: True)
        placed = store.add_found([Found("copy/a.pod5", 10, 1.0, "id-1")], lambda p: True)
        assert placed.duplicates == [("copy/a.pod5", "a.pod5")]
        assert store.snapshot().files["DUPLICATE"] == 1
        assert store.quarantined() == {"grow.pod5": (4, 1.0)}
        placed = store.add_found([Found("grow.pod5", 90, 2.0, "id-2")], lambda p: True)
        assert placed.reexamined == ["grow.pod5"]
        files = store.snapshot().files
        assert files["PENDING"] == 2 and files["QUARANTINED"] == 0
    finally:
        store.close()


def test_retry_back_off_grows():
    assert [retry_delay(n) for n in range(5)] == [0, 1, 2, 4, 8]
    assert retry_delay(1) + retry_delay(2) >= 2  # three failures never within two seconds
    assert retry_delay(50) == 60


def test_default_database_is_local_and_keyed_by_the_output_dir(tmp_path):
    env = {"XDG_STATE_HOME": str(tmp_path / "xdg")}
    a = default_db_path("/data/run1/out", env)
    assert a.parent == tmp_path / "xdg" / "bcorch" and a.suffix == ".sqlite"
    assert a != default_db_path("/data/run2/out", env)
    assert a == default_db_path("/data/run1/out/", env)
    systemd = default_db_path("/data/run1/out", {**env, "STATE_DIRECTORY": "/var/lib/bcorch"})
    assert str(systemd.parent) == "/var/lib/bcorch"
    home = default_db_path("/data/run1/out", {})
    assert home.parent.parts[-3:] == (".local", "state", "bcorch")
