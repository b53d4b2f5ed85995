"""Write a config.toml from Python values: the one writer for the demo, the benchmarks and the tests.

`write_config(path, manager={...}, engine={...})` writes one `[section]` per keyword. By
default it writes a config for a simulation (what the demo, the benchmarks and the tests run):
`runner.kind = "simulate"` and `manager.allow_simulated = true`, unless the caller gives those
keys itself or passes `simulate=False` (a config for a real basecaller).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

SIMULATION_DEFAULTS: dict[str, dict[str, Any]] = {
    "manager": {"allow_simulated": True},
    "runner": {"kind": "simulate"},
}


def toml_value(value: Any, key: str = "value") -> str:
    """A TOML literal for a bool, number, string, or a list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{key}: {value!r} cannot be written to TOML")
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v, key) for v in value) + "]"
    raise TypeError(f"{key}: cannot write a {type(value).__name__} to TOML")


def to_toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    blocks = []
    for section, values in sections.items():
        lines = [f"[{section}]"]
        lines += [f"{key} = {toml_value(value, f'{section}.{key}')}"
                  for key, value in values.items()]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def with_simulation(sections: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The sections with the simulation defaults filled in where the caller said nothing."""
    merged = {name: dict(values) for name, values in sections.items()}
    for name, defaults in SIMULATION_DEFAULTS.items():
        merged[name] = {**defaults, **merged.get(name, {})}
    return merged


def write_config(path: str | Path, *, simulate: bool = True,
                 **sections: Mapping[str, Any]) -> Path:
    """Write `[section]` tables to path (creating its folder); return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_toml(with_simulation(sections) if simulate else sections))
    return out
