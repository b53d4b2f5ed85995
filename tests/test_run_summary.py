"""bcorch_summary.json is written whole, replaces an older one, and leaves no temp files."""
from __future__ import annotations

import json
import math
import os

import pytest

from bcorch.manager.run_summary import SUMMARY_NAME, write_summary

SUMMARY = {"run_id": "r1", "files": {"done": 3, "quarantined": 1}, "reads": 4000,
           "gpu_s": 12.5, "first_batch": "2024-01-05T14:32:00Z", "last_batch": None}


def test_summary_is_written_as_json_in_the_output_dir(tmp_path):
    out = tmp_path / "run" / "basecalls"          # made if missing
    path = write_summary(out, SUMMARY)
    assert path == out / SUMMARY_NAME
    assert json.loads(path.read_text()) == SUMMARY
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in out.iterdir()) == [SUMMARY_NAME]


def test_a_new_summary_replaces_the_old_one_whole(tmp_path):
    write_summary(tmp_path, SUMMARY)
    write_summary(tmp_path, {**SUMMARY, "reads": 5000})
    assert json.loads((tmp_path / SUMMARY_NAME).read_text())["reads"] == 5000
    assert [p.name for p in tmp_path.iterdir()] == [SUMMARY_NAME]


def test_a_summary_json_cannot_hold_leaves_the_old_one(tmp_path):
    write_summary(tmp_path, SUMMARY)
    with pytest.raises(ValueError):
        write_summary(tmp_path, {"gpu_s": math.nan})
    assert json.loads((tmp_path / SUMMARY_NAME).read_text()) == SUMMARY
    assert [p.name for p in tmp_path.iterdir()] == [SUMMARY_NAME]


def test_a_failed_rename_leaves_the_old_summary_and_no_temp_file(tmp_path, monkeypatch):
    write_summary(tmp_path, SUMMARY)

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        write_summary(tmp_path, {**SUMMARY, "reads": 1})
    assert json.loads((tmp_path / SUMMARY_NAME).read_text()) == SUMMARY
    assert [p.name for p in tmp_path.iterdir()] == [SUMMARY_NAME]


def test_the_file_is_fsynced_before_it_is_renamed(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or
                        real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or
                        real_replace(a, b))
    write_summary(tmp_path, SUMMARY)
    assert events == ["fsync", "replace", "fsync"]      # file, rename, then the folder
