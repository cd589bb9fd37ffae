"""Policy families, one package each, and the registry that names them.

A family is a package ``carp_policy/policies/<name>/`` with

- ``configuration_<name>.py``: its config, a ``PolicyConfig`` subclass (policies/base.py), every
  field documented with its default (no torch: the engine reads it);
- ``modeling_<name>.py``: the network's model (``Model``: ``loss``, ``generate``, ``stages``, the
  training hooks ``carp-train`` calls) and its torch policy (``Policy``: a ``ChunkPolicy`` with
  ``from_run``); the networks themselves in their own files;
- ``export_<name>.py``: ``export_graphs`` (the ONNX graphs of a trained policy), ``default_batch``,
  ``check_batch``, ``parity_pair``, ``parity_sampler`` (and ``try_fp16`` where the family can);
- ``onnx_<name>.py``: ``OnnxRunner``, how ``carp_policy.engine`` chains those graphs (numpy +
  onnxruntime only: the robot PC needs no torch);
- ``__init__.py``: ``FAMILY``, a ``PolicyFamily`` naming the above.

Shared by every family: ``base.py`` (the base config and its common sections), ``policy.py`` (the
policy object, ``ChunkPolicy``), ``ensemble.py`` (the test-time shift ensemble); the observation
encoders (``carp_policy/encoders.py``) and the processor (``carp_policy/processor.py``).

``carp-train``, ``carp-export``, ``load_policy`` and ``carp-eval`` ask ``get_family(name)``; none
tests for a family. A new family is one new package and one line below.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from carp_policy.policies.base import PolicyConfig, PolicyFamily

__all__ = [
    "PolicyConfig",
    "PolicyFamily",
    "config_from_dict",
    "families",
    "get_family",
    "load_config",
    "register",
]


_FAMILIES: dict[str, PolicyFamily] = {}


def register(family: PolicyFamily) -> PolicyFamily:
    """Add a family to the registry (a name is registered once)."""
    if family.name in _FAMILIES and _FAMILIES[family.name] != family:
        raise ValueError(f"policy family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> PolicyFamily:
    """The family registered as ``name``; ValueError naming the known ones otherwise."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown policy family {name!r} (known: {', '.join(sorted(_FAMILIES))})")
    return _FAMILIES[name]


def families() -> list[str]:
    """Registered family names."""
    return sorted(_FAMILIES)


def config_from_dict(d: dict[str, Any]) -> PolicyConfig:
    """A config dict (a YAML file, a run's config.yaml, a manifest's config) -> its family's config
    dataclass; ``family`` absent means CARP (configs written before the key existed)."""
    return get_family((d or {}).get("family") or "carp").config_class.from_dict(d)


def load_config(path: Any, overrides: list[str] | tuple[str, ...] = ()) -> PolicyConfig:
    """A YAML path or shipped name (configs/*.yaml), with ``--set section.key=value`` overrides
    (``yaml_config.set_override``), as its family's config dataclass; errors name the file."""
    import yaml

    from carp_policy.policies.base import config_path
    from carp_policy.yaml_config import set_override

    p = config_path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {e}") from e
    for item in overrides:
        set_override(raw, item)  # unknown keys are refused by the strict loader below
    try:
        return config_from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{p}: {e}") from e


# ----------------------------------------------------------------------------- the families
# One line per family: its package under carp_policy/policies/ names its parts in ``FAMILY``.
register(import_module("carp_policy.policies.carp").FAMILY)
register(import_module("carp_policy.policies.diffusion").FAMILY)
register(import_module("carp_policy.policies.coa").FAMILY)
