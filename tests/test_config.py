import dataclasses
import re
from pathlib import Path

import pytest

from bcorch import config
from bcorch.config import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_example_config_lists_every_key_with_its_default():
    loaded = config.load(REPO / "config.toml")
    for section, defaults in config.defaults_as_dict().items():
        assert dataclasses.asdict(getattr(loaded, section)) == defaults, section


def test_every_key_in_example_config_has_a_comment():
    for line in (REPO / "config.toml").read_text().splitlines():
        if re.match(r"^\w+\s*=", line):
            assert re.search(r"#\s*\S", line), f"no comment: {line}"


@pytest.mark.parametrize("data, message", [
    ({"engine": {"polling_interval": "soon"}}, "engine.polling_interval: expected a number"),
    ({"engine": {"pollinginterval": 1}}, "engine.pollinginterval: unknown key"),
    ({"runner": {"kind": "gpu"}}, "runner.kind: expected one of"),
    ({"manager": {"port": 70000}}, "manager.port: expected a value from 0 to 65535"),
    ({"manager": {"batch_size": True}}, "manager.batch_size: expected an integer"),
    ({"runner": {"extra_args": "--x"}}, "runner.extra_args: expected a list of strings"),
    ({"cluster": {}}, "[cluster]: unknown section"),
    ({"engine": 3}, "[engine]: expected a table"),
    ({"engine": {"engine_id": "../x"}}, "engine.engine_id: expected"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        config.from_mapping(data)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)
    assert err.value.exit_code == 78


def test_load_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[manager\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "missing.toml")


def test_flags_override_with_the_same_checks():
    cfg = config.from_mapping({"manager": {"port": 1234}})
    cfg.override("manager", port=4321, host=None)
    assert cfg.manager.port == 4321 and cfg.manager.host == "127.0.0.1"
    with pytest.raises(ConfigError, match="manager.port"):
        cfg.override("manager", port="x")


def test_required_key_names_itself():
    with pytest.raises(ConfigError, match=r"^manager.input_dir: required \(or --input-dir\)$"):
        config.require(config.load(None), "manager.input_dir", "or --input-dir")


def test_token_from_environment(monkeypatch):
    monkeypatch.setenv("BCORCH_TOKEN", "s3cret")
    assert config.load(None).token == "s3cret"
    assert config.from_mapping({"manager": {"token": "file"}}).token == "file"


def test_every_unknown_key_is_named_in_one_line_with_a_guess():
    data = {"manager": {"prot": 1, "batch_size": 2}, "runner": {"kinds": "dorado"},
            "engine": {"url": "http://h:1"}, "orchestrtor": {}}
    with pytest.raises(ConfigError) as err:
        config.from_mapping(data)
    text = str(err.value)
    assert "\n" not in text and text.startswith("4 unknown keys")
    for part in ("manager.prot: unknown key (did you mean manager.port?)",
                 "runner.kinds: unknown key (did you mean runner.kind?)",
                 "engine.url: unknown key (did you mean manager.url?)",
                 "[orchestrtor]: unknown section (did you mean [orchestrator]?)"):
        assert part in text, text


@pytest.mark.parametrize("url", ["127.0.0.1:40765", "localhost", "ftp://h:1", ""])
def test_manager_url_without_scheme_says_what_it_needs(url):
    with pytest.raises(ConfigError, match=r"^manager.url: needs http:// or https://"):
        config.from_mapping({"manager": {"url": url}})
    cfg = config.load(None)
    with pytest.raises(ConfigError, match=r"^manager.url: needs http:// or https://"):
        cfg.override("manager", url=url)  # --url / --manager-url go through the same check


def test_safe_defaults_for_a_real_gpu_host():
    cfg = config.load(None)
    assert cfg.runner.kind == "dorado"          # never simulated basecalls unless asked
    assert cfg.manager.allow_simulated is False
    assert cfg.runner.min_read_fraction == 1.0  # every read of a file, unless dorado filters


def test_example_config_names_every_key_in_its_section():
    sections: dict[str, set[str]] = {}
    current = ""
    for line in (REPO / "config.toml").read_text().splitlines():
        header = re.match(r"^\[(\w+)\]", line)
        if header:
            current = header.group(1)
        key = re.match(r"^(\w+)\s*=", line)
        if key:
            sections.setdefault(current, set()).add(key.group(1))
    text = (REPO / "config.toml").read_text()
    for section, defaults in config.defaults_as_dict().items():
        for key, value in defaults.items():
            if isinstance(value, list) and key == "rules":
                assert "[[facility.rules]]" in text   # tables, shown as a commented example
            else:
                assert key in sections.get(section, set()), f"{section}.{key} not in config.toml"


def test_example_facility_rule_in_config_toml_loads(tmp_path):
    text = (REPO / "config.toml").read_text()
    example = [line[4:] for line in text.splitlines() if line.startswith("#   ")]
    written = tmp_path / "rules.toml"
    written.write_text("\n".join(example) + "\n")
    rules = config.load(written).facility.rules
    assert len(rules) == 1 and rules[0].protocol_group == "cancer_*"
    assert rules[0].model == "sup,5mCG_5hmCG" and rules[0].priority == 2.0
    assert rules[0].kit is None and rules[0].matches("cancer_liver", "s1", "PAQ1")
    assert not rules[0].matches("rna_x", "s1", "PAQ1")


def test_facility_rules_load_from_toml_in_order(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[facility]\nmodel = "sup"\n'
                    '[[facility.rules]]\nsample = "s*"\nkit = "SQK-NBD114-24"\n'
                    '[[facility.rules]]\nflow_cell = "PAQ*"\nemit = "bam"\npriority = 3\n')
    cfg = config.load(path).facility
    assert cfg.model == "sup" and [r.settings() for r in cfg.rules] == [
        {"kit": "SQK-NBD114-24"}, {"emit": "bam", "priority": 3.0}]
    assert isinstance(cfg.rules[1].priority, float)


@pytest.mark.parametrize("data, message", [
    ({"facility": {"priority": 0}}, "facility.priority: expected a number above 0"),
    ({"facility": {"priority": float("nan")}}, "facility.priority: expected a number above 0"),
    ({"facility": {"priority": "high"}}, "facility.priority: expected a number"),
    ({"facility": {"emit": "sam"}}, "facility.emit: expected one of"),
    ({"facility": {"model": "sup; rm -rf /"}}, "facility.model: expected a dorado model"),
    ({"facility": {"model": ""}}, "facility.model: expected a dorado model"),
    ({"facility": {"model": "--emit-moves"}}, "facility.model: expected a dorado model"),
    ({"facility": {"kit": "SQK NBD"}}, "facility.kit: expected a kit name"),
    ({"facility": {"output": "elsewhere"}}, "facility.output: expected one of"),
    ({"facility": {"output": "mirror"}}, "facility.output_root: required"),
    ({"facility": {"switch_slack_s": -1}}, "facility.switch_slack_s: expected a value"),
    ({"facility": {"rules": {"model": "sup"}}}, "facility.rules: expected [[facility.rules]]"),
    ({"facility": {"rules": [3]}}, "facility.rules[1]: expected a table"),
    ({"facility": {"rules": [{"sample": "a", "model": "sup"}, {"sampel": "b", "model": "x"}]}},
     "facility.rules[2].sampel: unknown key (did you mean facility.rules[2].sample?)"),
    ({"facility": {"rules": [{"model": "sup"}]}}, "facility.rules[1]: needs at least one of"),
    ({"facility": {"rules": [{"sample": "a"}]}}, "facility.rules[1]: sets nothing"),
    ({"facility": {"rules": [{"sample": 5, "model": "sup"}]}},
     "facility.rules[1].sample: expected a string"),
    ({"facility": {"rules": [{"sample": "a", "priority": -2}]}},
     "facility.rules[1].priority: expected a number above 0"),
    ({"facility": {"rules": [{"sample": "a", "emit": "cram"}]}},
     "facility.rules[1].emit: expected one of"),
    ({"facility": {"modle": "sup"}}, "facility.modle: unknown key (did you mean facility.model?)"),
    ({"manager": {"watch_root": 5}}, "manager.watch_root: expected a string"),
])
def test_bad_facility_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        config.from_mapping(data)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)
    assert err.value.exit_code == 78
