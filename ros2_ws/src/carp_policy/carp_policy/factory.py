"""One place that turns "a policy" on disk into an object behind the ``Policy`` protocol.

Accepted specs, checked in this order:
- an exported model directory (``manifest.json``: the onnxruntime engine, CARP or DP-C);
- a ``carp-train`` run directory (``config.yaml``: the torch policy of its family);
- a released model name, looked up under the repository's ``models/`` (e.g. ``cup``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODELS_DIR = Path(__file__).resolve().parents[4] / "models"


def load_torch_policy(run_dir: str | Path, device: str = "cpu") -> Any:
    """A ``carp-train`` run directory -> CarpPolicy, or DiffusionPolicy when ``family: diffusion``."""
    import yaml

    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} missing: is {run} a carp-train run directory?")
    family = (yaml.safe_load(cfg_path.read_text()) or {}).get("family", "carp")
    if family == "diffusion":
        from carp_policy.diffusion import DiffusionPolicy

        return DiffusionPolicy.from_run(run, device=device)
    if family != "carp":
        raise ValueError(f"{cfg_path}: unknown policy family {family!r} (carp, diffusion)")
    from carp_policy.carp import CarpPolicy

    return CarpPolicy.from_run(run, device=device)


def load_policy(spec: str | Path, device: str = "cpu") -> Any:
    """Load a policy from an exported model dir, a training run dir, or a released model name."""
    path = Path(spec)
    if not path.exists() and (MODELS_DIR / str(spec)).exists():
        path = MODELS_DIR / str(spec)
    if (path / "manifest.json").exists():
        from carp_policy.engine import OnnxPolicy

        return OnnxPolicy(path, device=device)
    if (path / "config.yaml").exists():
        return load_torch_policy(path, device=device)
    raise FileNotFoundError(
        f"no policy at {spec!r}: expected an exported model dir (manifest.json), a carp-train run dir "
        f"(config.yaml), or a released model name under {MODELS_DIR}"
    )
