"""One place that turns "a policy" on disk into an object behind the ``Policy`` protocol.

Accepted specs, checked in this order:
- an exported model directory (``manifest.json``: the onnxruntime engine, CARP or DP-C);
- a ``carp-train`` run directory (``config.yaml``: the torch policy of its family);
- a released model name, looked up under the repository's ``models/`` (e.g. ``cup``).

The model's ``ensemble`` setting (its config.yaml, or the config in its manifest) wraps the policy in a
:class:`ShiftEnsemble`; ``load_policy(..., ensemble=EnsembleConfig())`` overrides it (off).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from carp_policy.actions import ROT6D, ActionChunk, Observation, matrix_to_rot6d, rot6d_to_matrix
from carp_policy.config import EncoderConfig, EnsembleConfig, TrainConfig, _build, check_data_options

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


class ShiftEnsemble:
    """Wraps a policy: averages its chunks over copies of the scene shifted in x, y (EnsembleConfig).

    Each copy moves the TCP and every scene position (object, target) by one grid offset, and its
    chunk is moved back; positions and the gripper are averaged, rotations averaged and
    re-orthonormalised. Written here because it composes any ``Policy`` (CARP, DP-C, torch or ONNX)
    with the normalizer's knowledge of which state dims are positions.
    """

    def __init__(self, policy: Any, config: EnsembleConfig) -> None:
        if policy.cameras:
            raise ValueError("a shift ensemble needs a state policy: images do not move with the shift")
        nz = policy.normalizer
        if nz.frame != "absolute":
            raise ValueError("a shift ensemble needs frame: absolute (relative positions do not move)")
        self.policy, self.config = policy, config
        self.obs_horizon: int = policy.obs_horizon
        self.cameras: tuple[str, ...] = tuple(policy.cameras)
        self.offsets = np.asarray(config.offsets(), dtype=np.float64)  # (K, 2) metres

    def reset(self) -> None:
        self.policy.reset()

    def predict(self, observation: Observation) -> ActionChunk:
        """Observation -> the mean of the K shifted-back chunks (K = grid**2 inferences: one batched
        pass of an engine exported at batch >= K, else K calls)."""
        t0 = time.perf_counter()
        obs = observation.with_horizon()
        state = np.asarray(obs.state, dtype=np.float64)  # (O, S)
        env = None if obs.env_state is None else np.asarray(obs.env_state, dtype=np.float64)  # (O, E)
        S = state.shape[1]
        full = state if env is None else np.concatenate([state, env], axis=1)  # (O, S + E)
        shifted = []
        for d in self.offsets:
            x = self.policy.normalizer.shift_xy(full, d)
            e = None if env is None else x[:, S:]
            shifted.append(
                Observation(state=x[:, :S], images=obs.images, timestamp=obs.timestamp, env_state=e)
            )
        if getattr(self.policy, "batch", 1) >= len(shifted):  # an engine exported for it: one pass
            chunks = [c.actions.copy() for c in self.policy.predict_batch(shifted)]
        else:
            chunks = [self.policy.predict(o).actions.copy() for o in shifted]
        for a, d in zip(chunks, self.offsets):
            a[:, :2] -= d  # action dims 0, 1 are the TCP's x, y
        stack = np.stack(chunks)  # (K, H, D)
        out = stack.mean(axis=0)
        out[:, ROT6D] = matrix_to_rot6d(rot6d_to_matrix(out[:, ROT6D]))
        return ActionChunk(out, timestamp=observation.timestamp, latency_s=time.perf_counter() - t0)


def ensemble_config(cfg: dict[str, Any], override: EnsembleConfig | None = None) -> EnsembleConfig:
    """The shift ensemble for a model whose config (as a dict) is ``cfg``: its ``ensemble`` section
    (off if it has none), or ``override``, checked against what the model was trained with
    (``config.check_data_options``)."""
    ens = EnsembleConfig(**(cfg.get("ensemble") or {})) if override is None else override
    train = _build(TrainConfig, cfg.get("train") or {}, "train")
    encoder = _build(EncoderConfig, cfg.get("encoder") or {}, "encoder")
    check_data_options(cfg.get("frame", "absolute"), train, encoder, ens)
    return ens


def load_policy(spec: str | Path, device: str = "cpu", ensemble: EnsembleConfig | None = None) -> Any:
    """Load a policy from an exported model dir, a training run dir, or a released model name.

    ensemble: the shift ensemble to run it with; None takes the model's own setting."""
    path = Path(spec)
    if not path.exists() and (MODELS_DIR / str(spec)).exists():
        path = MODELS_DIR / str(spec)
    if (path / "manifest.json").exists():
        from carp_policy.engine import OnnxPolicy

        policy = OnnxPolicy(path, device=device)
    elif (path / "config.yaml").exists():
        policy = load_torch_policy(path, device=device)
    else:
        raise FileNotFoundError(
            f"no policy at {spec!r}: expected an exported model dir (manifest.json), a carp-train run dir "
            f"(config.yaml), or a released model name under {MODELS_DIR}"
        )
    # the config the model was loaded with: the manifest's for an engine, the dataclass for torch
    cfg = policy.manifest["config"] if hasattr(policy, "manifest") else policy.config.to_dict()
    ensemble = ensemble_config(cfg, ensemble)
    return ShiftEnsemble(policy, ensemble) if ensemble.grid > 1 else policy
