"""``load_policy``: the one place that turns "a policy" on disk into an object behind ``Policy``.

Accepted specs, checked in this order:
- an exported model directory (``manifest.json``): the onnxruntime engine, any family;
- a ``carp-train`` run directory (``config.yaml``): the torch policy of its family (the registry);
- a released model name (e.g. ``cup``), looked up in ``$CARP_MODELS_DIR`` (``models_dir``), then
  in ``./models``.

The model's ``ensemble`` setting wraps the policy in a ``ShiftEnsemble``;
``load_policy(..., ensemble=EnsembleConfig())`` overrides it (off).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from carp_policy.policies.base import EnsembleConfig

MODELS_ENV = "CARP_MODELS_DIR"


def models_dirs() -> list[Path]:
    """Where released models are looked up by name: ``$CARP_MODELS_DIR`` (os.pathsep-separated),
    then ``models/`` under the current directory (a checkout of the repository)."""
    env = [Path(p) for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p]
    return [*env, Path.cwd() / "models"]


def resolve_model(spec: str | Path) -> Path:
    """A path as given if it exists, else the released model of that name (``models_dirs``)."""
    path = Path(spec)
    if path.exists():
        return path
    for d in models_dirs():
        if (d / str(spec)).exists():
            return d / str(spec)
    return path


def load_torch_policy(run_dir: str | Path, device: str = "cpu") -> Any:
    """A ``carp-train`` run directory -> the torch policy of the family its config.yaml names."""
    import yaml

    from carp_policy.policies import get_family

    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} missing: is {run} a carp-train run directory?")
    family = (yaml.safe_load(cfg_path.read_text()) or {}).get("family") or "carp"
    try:
        fam = get_family(family)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    return fam.policy_class.from_run(run, device=device)


def load_policy(
    spec: str | Path,
    device: str = "cpu",
    ensemble: EnsembleConfig | None = None,
    spin: bool = True,
    task: str | None = None,
) -> Any:
    """Load a policy from an exported model dir, a training run dir, or a released model name.

    device: ``auto`` (CUDA where the runtime that loads it has it), ``cpu``, ``cuda`` or ``cuda:N``.
    ensemble: the shift ensemble to run it with; None takes the model's own setting. spin: False
    for a process beside a servo loop and cameras (``OnnxPolicy``: why). task: the task to run; a
    multi-task model conditions on it, a single-task model refuses another than its own."""
    from carp_policy.cli import resolve_device
    from carp_policy.policies.ensemble import ShiftEnsemble, ensemble_config

    path = resolve_model(spec)
    if (path / "manifest.json").exists():
        from carp_policy.engine import OnnxPolicy

        policy = OnnxPolicy(path, device=resolve_device(device, "onnxruntime").split(":")[0], spin=spin)
    elif (path / "config.yaml").exists():
        policy = load_torch_policy(path, device=resolve_device(device))
    else:
        where = ", ".join(str(d) for d in models_dirs())
        raise FileNotFoundError(
            f"no policy at {spec!r}: expected an exported model dir (manifest.json), a carp-train run dir "
            f"(config.yaml), or a released model name under {where} (set {MODELS_ENV})"
        )
    if task:
        policy.select_task(task)
    ensemble = ensemble_config(policy.config, ensemble)
    return ShiftEnsemble(policy, ensemble) if ensemble.grid > 1 else policy
