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
