"""The test-time shift ensemble: any policy's chunks averaged over copies of the scene shifted in x, y.

Composes any ``Policy`` (CARP, DP-C, torch or ONNX) with the normalizer's knowledge of which state
dims are positions (``Normalizer.shift_xy``, the same move the training augmentation makes).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from carp_policy.actions import ROT6D, ActionChunk, Observation, matrix_to_rot6d, rot6d_to_matrix
from carp_policy.policies.base import EnsembleConfig, check_data_options


class ShiftEnsemble:
    """Wraps a policy: averages its chunks over copies of the scene shifted in x, y (EnsembleConfig).

    Each copy moves the TCP and every scene position (object, target) by one grid offset, and its
    chunk is moved back; positions and the gripper are averaged, rotations averaged and
    re-orthonormalised. Re-entrant as the policy it wraps (no per-call state here).
    """

    def __init__(self, policy: Any, config: EnsembleConfig) -> None:
        if policy.cameras:
            raise ValueError("a shift ensemble needs a state policy: images do not move with the shift")
        nz = policy.normalizer
        if nz.frame != "absolute":
            raise ValueError("a shift ensemble needs frame: absolute (relative positions do not move)")
        self.policy, self.config = policy, config
        self.obs_horizon: int = policy.obs_horizon
        self.obs_stride: int = policy.obs_stride
        self.cameras: tuple[str, ...] = tuple(policy.cameras)
        self.offsets = np.asarray(config.offsets(), dtype=np.float64)  # (K, 2) metres

    @property
    def normalizer(self) -> Any:
        return self.policy.normalizer

    @property
    def contract(self) -> dict[str, Any]:
        """The wrapped model's contract (task, dt, horizon, cameras, ...)."""
        return self.policy.contract

    def reset(self) -> None:
        self.policy.reset()

    def select_task(self, task: str) -> None:
        """The wrapped model's task (a multi-task model's embedding)."""
        self.policy.select_task(task)

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
            results = self.policy.predict_batch(shifted)
        else:
            results = [self.policy.predict(o) for o in shifted]
        chunks = [c.actions.copy() for c in results]
        for a, d in zip(chunks, self.offsets):
            a[:, :2] -= d  # action dims 0, 1 are the TCP's x, y
        stack = np.stack(chunks)  # (K, H, D)
        out = stack.mean(axis=0)
        out[:, ROT6D] = matrix_to_rot6d(rot6d_to_matrix(out[:, ROT6D]))
        dt = time.perf_counter() - t0
        return ActionChunk(out, timestamp=observation.timestamp, dt=results[0].dt, latency_s=dt)


def ensemble_config(config: Any, override: EnsembleConfig | None = None) -> EnsembleConfig:
    """The shift ensemble for a model with config ``config`` (a ``PolicyConfig``): its ``ensemble``
    section, or ``override``, checked against what the model was trained with."""
    ens = config.ensemble if override is None else override
    check_data_options(config.frame, config.train, config.encoder, ens)
    return ens
