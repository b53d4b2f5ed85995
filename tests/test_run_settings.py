"""A run's settings: config defaults, then matching [[facility.rules]], then its bcorch.toml."""
from __future__ import annotations

from pathlib import Path

import pytest

from bcorch import config
from bcorch.manager.run_discovery import discover_runs
from bcorch.manager.run_settings import RunSettings, RunSettingsError, settings_for

NAME = "20240105_1432_1A_PAQ12345_a1b2c3d4"


def facility(**section):
    return config.from_mapping({"facility": section}).facility


def make_run(root: Path, group="cancer_liver", sample="s7", name=NAME, run_toml=None):
    run = root / group / sample / name
    (run / "pod5").mkdir(parents=True)
    if run_toml is not None:
        (run / "bcorch.toml").write_text(run_toml)
    [found] = [r for r in discover_runs(root, set()) if r.path == run]
    return found


def test_defaults_come_from_the_config(tmp_path):
    run = make_run(tmp_path)
    assert settings_for(run, facility()) == RunSettings("hac", "", "fastq", 1.0)
    got = settings_for(run, facility(model="sup", kit="SQK-NBD114-24", emit="bam", priority=3))
    assert got.to_dict() == {"model": "sup", "kit": "SQK-NBD114-24", "emit": "bam",
                             "priority": 3.0}
    assert isinstance(got.priority, float)


def test_matching_rules_apply_in_order_and_others_do_not(tmp_path):
    rules = [
        {"protocol_group": "cancer_*", "model": "sup,5mCG_5hmCG", "priority": 2},
        {"sample": "s7", "flow_cell": "PAQ*", "kit": "SQK-NBD114-24"},
        {"protocol_group": "cancer_*", "sample": "s7", "priority": 5},   # later rule wins
        {"protocol_group": "rna_*", "emit": "bam", "model": "rna004_130bps_sup"},
        {"flow_cell": "FAV*", "emit": "bam"},                              # flow cell differs
    ]
    run = make_run(tmp_path)
    assert settings_for(run, facility(rules=rules)) == RunSettings(
        "sup,5mCG_5hmCG", "SQK-NBD114-24", "fastq", 5.0)
    other = make_run(tmp_path, group="rna_study", sample="s1")
    assert settings_for(other, facility(rules=rules)) == RunSettings(
        "rna004_130bps_sup", "", "bam", 1.0)


def test_globs_are_case_sensitive_and_must_all_match(tmp_path):
    rules = [{"protocol_group": "Cancer_*", "model": "sup"},
             {"protocol_group": "cancer_*", "sample": "s8", "model": "fast"},
             {"flow_cell": "PAQ1234?", "kit": "SQK-RBK114-24"}]
    run = make_run(tmp_path)
    assert settings_for(run, facility(rules=rules)) == RunSettings("hac", "SQK-RBK114-24",
                                                                   "fastq", 1.0)


def test_a_rule_on_flow_cell_does_not_match_an_unparsed_name(tmp_path):
    run = make_run(tmp_path, name="my_run")
    assert run.flow_cell == ""
    assert settings_for(run, facility(rules=[{"flow_cell": "*", "model": "sup"}])).model == "hac"


def test_run_file_overrides_rules_and_defaults(tmp_path):
    run = make_run(tmp_path, run_toml='[run]\nmodel = "sup@v5.0.0"\nkit = ""\npriority = 0.5\n')
    rules = [{"protocol_group": "cancer_*", "model": "hac", "kit": "SQK-NBD114-24",
              "emit": "bam"}]
    assert settings_for(run, facility(rules=rules)) == RunSettings("sup@v5.0.0", "", "bam", 0.5)


def test_an_empty_run_file_changes_nothing(tmp_path):
    run = make_run(tmp_path, run_toml="# operators' notes only\n")
    assert settings_for(run, facility()) == RunSettings("hac", "", "fastq", 1.0)


def test_the_run_file_is_read_on_every_call(tmp_path):
    run = make_run(tmp_path)
    assert settings_for(run, facility()).emit == "fastq"
    (run.path / "bcorch.toml").write_text('[run]\nemit = "bam"\n')
    assert settings_for(run, facility()).emit == "bam"


@pytest.mark.parametrize("text, message", [
    ('[run]\nmodel = "sup; rm -rf /"\n', "run.model: expected a dorado model complex"),
    ('[run]\nmodel = ""\n', "run.model: expected a dorado model complex"),
    ('[run]\nmodel = 5\n', "run.model: expected a string"),
    ('[run]\nkit = "-x"\n', "run.kit: expected a kit name"),
    ('[run]\nemit = "sam"\n', "run.emit: expected one of 'fastq', 'bam'"),
    ('[run]\npriority = 0\n', "run.priority: expected a number above 0"),
    ('[run]\npriority = nan\n', "run.priority: expected a number above 0"),
    ('[run]\npriority = "high"\n', "run.priority: expected a number above 0"),
    ('[run]\npriority = true\n', "run.priority: expected a number above 0"),
    ('[run]\nmodle = "sup"\n', "run.modle: unknown key (expected model, kit, emit, priority)"),
    ('model = "sup"\n', "unknown key 'model' (settings go in a [run] table"),
    ('[runs]\nmodel = "sup"\n', "unknown table 'runs' (settings go in a [run] table"),
    ('run = 3\n', "run: expected a [run] table"),
    ('[run\nmodel = "sup"\n', "not valid TOML"),
])
def test_a_bad_run_file_names_the_file_and_the_key(tmp_path, text, message):
    run = make_run(tmp_path, run_toml=text)
    with pytest.raises(RunSettingsError) as err:
        settings_for(run, facility())
    where = str(run.path / "bcorch.toml")
    assert str(err.value).startswith(f"{where}: "), str(err.value)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unreadable_or_odd_run_files_are_one_line_errors(tmp_path):
    run = make_run(tmp_path)
    (run.path / "bcorch.toml").mkdir()
    with pytest.raises(RunSettingsError, match=r"bcorch.toml: is a directory"):
        settings_for(run, facility())
    (run.path / "bcorch.toml").rmdir()
    (run.path / "bcorch.toml").write_bytes(b"[run]\nmodel = \"\xff\"\n")
    with pytest.raises(RunSettingsError, match=r"bcorch.toml: not UTF-8"):
        settings_for(run, facility())
    (run.path / "bcorch.toml").write_text("# " + "x" * 70_000 + "\n")
    with pytest.raises(RunSettingsError, match=r"bcorch.toml: larger than 65536 bytes"):
        settings_for(run, facility())


def test_bad_rule_values_name_the_rule(tmp_path):
    run = make_run(tmp_path)
    good = config.FacilityRule(protocol_group="x*", model="sup")
    bad = config.FacilityRule(sample="s7", priority=-1.0)   # built in code, not loaded
    cfg = config.FacilityConfig(rules=[good, bad])
    with pytest.raises(RunSettingsError, match=r"^facility.rules\[2\].priority: expected a "
                                               r"number above 0, got -1.0$"):
        settings_for(run, cfg)
    with pytest.raises(RunSettingsError, match=r"^facility.model: expected a dorado model"):
        settings_for(run, config.FacilityConfig(model="a b"))


def test_a_non_matching_bad_rule_is_not_this_runs_problem(tmp_path):
    run = make_run(tmp_path)
    cfg = config.FacilityConfig(rules=[config.FacilityRule(sample="other", model="a b")])
    assert settings_for(run, cfg).model == "hac"


def test_settings_round_trip_through_a_dict():
    settings = RunSettings("sup,5mCG_5hmCG", "SQK-NBD114-24", "bam", 2.0)
    assert RunSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(RunSettingsError, match=r"^settings: missing emit$"):
        RunSettings.from_dict({"model": "sup", "kit": "", "priority": 1})
    with pytest.raises(RunSettingsError, match=r"^settings.priority: expected a number"):
        RunSettings.from_dict({"model": "sup", "kit": "", "emit": "bam", "priority": -1})
