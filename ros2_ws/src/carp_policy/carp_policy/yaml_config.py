"""The one strict loader for configuration dataclasses (policies, the twin, the driver, devices).

A config is a (nested) ``@dataclass`` whose fields carry their defaults; a YAML file lists only what
differs from them. Unknown keys are an error naming the key and its section: a typo must never fall
back silently to a default. Lists become tuples where the default is a tuple, nested dataclasses are
built recursively, and ``to_dict`` writes the resolved config back as plain YAML types.

Written here rather than taken from a library (draccus, omegaconf, dacite): the rules above are
twenty lines, and the robot PC should not need another dependency to read a YAML file.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations (``from __future__ import annotations`` leaves strings)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: treat the field as untyped
        return {}


def from_dict(cls: type[T], d: dict[str, Any] | None, section: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict; unknown keys raise ValueError naming them."""
    d = d or {}
    if not isinstance(d, dict):
        where = f"'{section}'" if section else cls.__name__
        raise ValueError(f"config section {where} must be a mapping, got {type(d).__name__}: {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(d) - set(fields)
    if unknown:
        where = f"section '{section}'" if section else cls.__name__
        raise ValueError(f"unknown config key(s) in {where}: {sorted(unknown)} (known: {sorted(fields)})")
    types = _field_types(cls)
    defaults = {
        f.name: (f.default if f.default is not dataclasses.MISSING else None)
        for f in fields.values()
        if f.default is not dataclasses.MISSING
    }
    out: dict[str, Any] = {}
    for k, v in d.items():
        sub = types.get(k)
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            out[k] = from_dict(sub, v, f"{section}.{k}" if section else k)
            continue
        if isinstance(v, list) and (isinstance(defaults.get(k), tuple) or typing.get_origin(sub) is tuple):
            v = tuple(v)
        out[k] = v
    return cls(**out)


def load_yaml(cls: type[T], path: str | Path) -> T:
    """A YAML file -> dataclass ``cls`` (strict keys); errors name the file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {e}") from e
    try:
        return from_dict(cls, raw or {})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{p}: {e}") from e


def plain(v: Any) -> Any:
    """Dataclasses, tuples and dicts -> plain dicts and lists (YAML / JSON types)."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, tuple | list):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    return v


def to_dict(obj: Any) -> dict[str, Any]:
    """A config dataclass -> nested plain dict."""
    return plain(obj)


def save_yaml(obj: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML (field order kept)."""
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def set_override(d: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` override (value parsed as YAML) to a nested dict in place."""
    if "=" not in assignment:
        raise ValueError(f"--set expects section.key=value, got {assignment!r}")
    key, value = assignment.split("=", 1)
    node = d
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: '{p}' is not a section")
    node[parts[-1]] = yaml.safe_load(value)
