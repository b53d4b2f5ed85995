"""Run discovery under a facility's watch root (MinKNOW layout), on real directories."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from bcorch.manager import run_discovery
from bcorch.manager.run_discovery import RunDir, discover_runs, parse_run_name, propose_run_id

NAME = "20240105_1432_1A_PAQ12345_a1b2c3d4"


def make_run(root: Path, rel: str, pod5: str = "pod5") -> Path:
    run = root / rel
    (run / pod5).mkdir(parents=True)
    return run


def test_finds_a_minknow_run_and_parses_its_name(tmp_path):
    run = make_run(tmp_path, f"cancer_liver/sample7/{NAME}")
    (run / "pod5" / "x.pod5").write_bytes(b"p")
    [found] = discover_runs(tmp_path, set())
    assert found == RunDir(run_id=NAME, path=run.absolute(), rel=f"cancer_liver/sample7/{NAME}",
                           protocol_group="cancer_liver", sample="sample7", name=NAME,
                           start="20240105_1432", device="1A", flow_cell="PAQ12345",
                           short_run_id="a1b2c3d4")
    assert found.path.is_absolute()


@pytest.mark.parametrize("pod5", ["pod5", "pod5_pass", "pod5_fail"])
def test_every_pod5_folder_name_marks_a_run(tmp_path, pod5):
    make_run(tmp_path, f"g/s/{NAME}", pod5)
    assert [r.rel for r in discover_runs(tmp_path, set())] == [f"g/s/{NAME}"]


def test_only_depth_three_with_a_pod5_folder_counts(tmp_path):
    make_run(tmp_path, "g/s/run_a")
    (tmp_path / "g" / "s" / "not_yet").mkdir()                 # MinKNOW made the run, no pod5/ yet
    (tmp_path / "g" / "s" / "files_only").mkdir()
    (tmp_path / "g" / "s" / "files_only" / "pod5").write_text("a file, not a folder")
    make_run(tmp_path, "g/shallow_run_at_depth_2")            # g/shallow.../pod5 at depth 2
    make_run(tmp_path, "g/s/deep/run_at_depth_4")
    (tmp_path / "g" / "s" / "a_file.txt").write_text("x")
    make_run(tmp_path, "g/.hidden/run_h")
    runs = discover_runs(tmp_path, set())
    assert [r.rel for r in runs] == ["g/s/run_a"]
    (tmp_path / "g" / "s" / "not_yet" / "pod5_pass").mkdir()  # appears on a later scan
    assert [r.rel for r in discover_runs(tmp_path, set())] == ["g/s/not_yet", "g/s/run_a"]


def test_known_runs_are_left_out_and_the_rest_sorted_by_rel(tmp_path):
    rels = ["b/s2/r1", "a/s1/r3", "a/s1/r2", "b/s1/r9", "a/s0/r1"]
    for rel in rels:
        make_run(tmp_path, rel)
    assert [r.rel for r in discover_runs(tmp_path, set())] == sorted(rels)
    assert [r.rel for r in discover_runs(tmp_path, {"a/s1/r3", "b/s1/r9"})] == [
        "a/s0/r1", "a/s1/r2", "b/s2/r1"]
    assert discover_runs(tmp_path, set(rels)) == []


def test_known_runs_are_not_looked_into(tmp_path, monkeypatch):
    for i in range(48):
        make_run(tmp_path, f"group{i % 4}/sample{i % 12}/run{i:02d}")
    everything = {r.rel for r in discover_runs(tmp_path, set())}
    assert len(everything) == 48
    looked = []
    real_isdir = os.path.isdir
    monkeypatch.setattr(run_discovery.os.path, "isdir",
                        lambda p: looked.append(p) or real_isdir(p))
    listed = []
    real_scandir = os.scandir
    monkeypatch.setattr(run_discovery.os, "scandir", lambda p: listed.append(str(p))
                        or real_scandir(p))
    assert discover_runs(tmp_path, everything) == []
    assert looked == []                      # no stat of a known run's pod5 folders
    assert not any(Path(p).name.startswith("pod5") for p in listed)
    assert len(listed) == 1 + 4 + 12         # root, groups, samples: never a run or pod5 folder


def test_a_missing_root_is_no_runs(tmp_path):
    assert discover_runs(tmp_path / "not_there", set()) == []
    (tmp_path / "a_file").write_text("x")
    assert discover_runs(tmp_path / "a_file", set()) == []


def test_an_unreadable_directory_is_skipped_with_one_log_line(tmp_path, caplog, monkeypatch):
    make_run(tmp_path, "open/s/run_ok")
    make_run(tmp_path, "closed/s/run_hidden")
    closed = tmp_path / "closed"
    real_scandir = os.scandir

    def scandir(path):   # chmod 0 does not stop root, who runs these tests in containers
        if Path(path) == closed:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(run_discovery.os, "scandir", scandir)
    with caplog.at_level(logging.DEBUG, logger="bcorch.manager.run_discovery"):
        assert [r.rel for r in discover_runs(tmp_path, set())] == ["open/s/run_ok"]
        assert [r.rel for r in discover_runs(tmp_path, set())] == ["open/s/run_ok"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(closed) in warnings[0].getMessage()
    assert "Permission denied" in warnings[0].getMessage()


@pytest.mark.parametrize("name, parsed", [
    (NAME, ("20240105_1432", "1A", "PAQ12345", "a1b2c3d4")),
    ("20240105_1432_MN12345_FAV99999_0f0f0f0f", ("20240105_1432", "MN12345", "FAV99999",
                                                 "0f0f0f0f")),
    ("20240105_1432_P2S_00123-A_PBA11111_deadbeef", ("20240105_1432", "P2S_00123-A",
                                                     "PBA11111", "deadbeef")),
    ("my_run", ("", "", "", "")),
    ("20240105_1432_1A_PAQ12345", ("", "", "", "")),
    ("", ("", "", "", "")),
])
def test_run_names_parse_or_give_empty_fields(name, parsed):
    assert parse_run_name(name) == parsed


@pytest.mark.parametrize("name, run_id", [
    (NAME, NAME),
    ("run with spaces", "run_with_spaces"),
    ("..", "run"),
    ("ünïcode", "n_code"),
    ("x" * 80, "x" * 64),
])
def test_run_id_is_the_name_or_a_valid_short_form_of_it(name, run_id):
    proposed = propose_run_id(name)
    assert proposed == run_id
    assert run_discovery.is_valid_id(proposed)


def test_an_odd_run_name_gets_a_valid_run_id(tmp_path):
    make_run(tmp_path, "g/s/run #1 (redo)")
    [run] = discover_runs(tmp_path, set())
    assert run.name == "run #1 (redo)" and run.run_id == "run_1_redo"
    assert run.start == run.flow_cell == ""
