"""The original pipeline's JSON configuration, mapped onto the typed Config.

A site moving from the original BCManager/BCProcessor keeps its file:

    {"Basecalling": {"input_dir", "output_dir", "model", "port", "supervisor_script_path"},
     "ComputingResources": {"index_host", "nodes_ip", "nodes_list", "batch_size_list"}}

Mapping: input_dir/output_dir -> engine (and manager) dirs; model -> engine.model;
index_host + port -> manager.url (port is the manager's port, as in the original);
supervisor_script_path -> runner.bc_script with runner.kind "script";
batch_size_list[node_index] -> engine.optimal_request_size. nodes_ip / nodes_list
describe where the original started engines; they are checked but not needed here.
Other keys are ignored with a warning (the original files carry more).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from bcorch.config import Config, ConfigError, from_mapping

log = logging.getLogger(__name__)

_KNOWN = {
    "Basecalling": {"input_dir", "output_dir", "model", "port", "supervisor_script_path"},
    "ComputingResources": {"index_host", "nodes_ip", "nodes_list", "batch_size_list"},
}


def load_legacy(path: str | Path, node_index: int) -> Config:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file {str(p)!r}") from None
    except IsADirectoryError:
        raise ConfigError(f"--config: {str(p)!r} is a directory") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid JSON ({exc})".splitlines()[0]) from None
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {str(p)!r} "
                          f"({exc.strerror or type(exc).__name__})") from None
    return from_legacy_mapping(data, node_index, str(p))


def from_legacy_mapping(data: Any, node_index: int, source: str = "<json>") -> Config:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    for section in _KNOWN:
        if section not in data:
            raise ConfigError(f"{section}: required section missing from {source}")
        if not isinstance(data[section], Mapping):
            raise ConfigError(f"{section}: expected an object")
    for section, values in data.items():
        extra = set(values) - _KNOWN.get(section, set()) if isinstance(values, Mapping) else set()
        if section not in _KNOWN or extra:
            log.warning("%s: ignoring %s", source,
                        f"section {section}" if section not in _KNOWN else
                        ", ".join(f"{section}.{k}" for k in sorted(extra)))
    bc, res = data["Basecalling"], data["ComputingResources"]
    input_dir = _get(bc, "Basecalling", "input_dir", str)
    output_dir = _get(bc, "Basecalling", "output_dir", str)
    host = _get(res, "ComputingResources", "index_host", str)
    port = _get(bc, "Basecalling", "port", int)
    if not 0 < port < 65536:
        raise ConfigError(f"Basecalling.port: expected a value from 1 to 65535, got {port!r}")
    sizes = _get(res, "ComputingResources", "batch_size_list", list)
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        raise ConfigError(f"ComputingResources.batch_size_list: expected a list of integers, "
                          f"got {sizes!r}"[:300])
    if not 0 <= node_index < len(sizes):
        raise ConfigError(f"ComputingResources.batch_size_list: no entry for GPU index {node_index} "
                          f"(the list has {len(sizes)})")
    for key in ("nodes_ip", "nodes_list"):
        if key in res and not isinstance(res[key], list):
            raise ConfigError(f"ComputingResources.{key}: expected a list, got {res[key]!r}"[:300])
    mapping: dict[str, dict[str, Any]] = {
        "manager": {"url": f"http://{host}:{port}", "port": port,
                    "input_dir": input_dir, "output_dir": output_dir},
        "engine": {"input_dir": input_dir, "output_dir": output_dir,
                   "optimal_request_size": sizes[node_index]},
        "runner": {},
    }
    if "model" in bc:
        mapping["engine"]["model"] = _get(bc, "Basecalling", "model", str)
    if "supervisor_script_path" in bc:
        mapping["runner"] = {"kind": "script",
                             "bc_script": _get(bc, "Basecalling", "supervisor_script_path", str)}
    config = from_mapping(mapping, source)
    return config


def _get(section: Mapping[str, Any], name: str, key: str, kind: type) -> Any:
    if key not in section:
        raise ConfigError(f"{name}.{key}: required")
    value = section[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{name}.{key}: expected {kind.__name__}, got {value!r}"[:300])
    return value


def load_any(path: str | Path | None, node_index: int) -> Config:
    """config.toml (or defaults for None), or the original JSON file, chosen by extension."""
    from bcorch import config as toml_config

    if path is not None and str(path).lower().endswith(".json"):
        return load_legacy(path, node_index)
    return toml_config.load(path)
