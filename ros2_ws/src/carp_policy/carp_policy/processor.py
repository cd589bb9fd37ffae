"""The one encode-observation / decode-chunk pair (as LeRobot's pre- and post-processors).

Every path that feeds a network or reads one goes through here: the torch policies and the ONNX
engine (``ChunkPolicy``, policies/policy.py), and training (``Normalizer`` on tensor batches, via
``normalize_state`` / ``normalize_actions``):

    Observation --validate, frame, normalise--> (state (B, O, S+E) float32, images uint8, state_now)
    network --> (B, H, D) normalised actions
    --un-normalise, frame back, rot6d onto SO(3), refuse non-finite--> (H, D) physical chunk

The arithmetic is fixed (float32 after the frame change, float64 for the way back) so that the torch
and ONNX paths see bit-identical inputs. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from carp_policy.actions import ACTION_NAMES, ROT6D, Observation, matrix_to_rot6d, rot6d_to_matrix
from carp_policy.actions import validate_observation as _validate
from carp_policy.normalization import Normalizer


@dataclass
class EncodedObservations:
    """Observations ready for a network: one row per observation."""

    state: np.ndarray  # (B, O, S + E) float32: the policy's frame, normalised
    images: dict[str, np.ndarray]  # camera -> (B, O, H, W, 3) uint8
    state_now: np.ndarray  # (B, S + E) float64 physical state at the decision time (relative frames)
    # (B, 10) float32: the current TCP pose and gripper as a normalised action in the policy's frame
    # (where a chain decoded back from its keyframe must arrive: Chain-of-Action's stop rule)
    action_now: np.ndarray | None = None
    task: np.ndarray | None = None  # (B,) int64: a multi-task model's task index (encoder.tasks order)


class PolicyProcessor:
    """Observation checks and normalisation for one model (its normalizer and observation layout)."""

    def __init__(
        self,
        normalizer: Normalizer,
        obs_horizon: int,
        state_dim: int,
        env_state_dim: int = 0,
        cameras: tuple[str, ...] = (),
        image_size: tuple[int, int] | list[int] | None = None,
        name: str = "policy",
        tasks: tuple[str, ...] = (),
    ) -> None:
        self.normalizer = normalizer
        self.tasks = tuple(tasks)  # a multi-task model's tasks; () for a single-task one
        self.task_index: int | None = None  # the selected task's row (select_task)
        self.obs_horizon, self.state_dim, self.env_state_dim = obs_horizon, state_dim, env_state_dim
        self.cameras = tuple(cameras)
        self.image_size = tuple(image_size) if image_size is not None and self.cameras else None
        self.name = name

    def select_task(self, task: str) -> None:
        """A multi-task model: condition every chunk on ``task`` (ValueError for a task it was not
        trained on)."""
        if task not in self.tasks:
            raise ValueError(f"{self.name} is trained for the tasks {list(self.tasks)}, not {task!r}")
        self.task_index = self.tasks.index(task)

    def encode(self, observations: list[Observation], task_index: int | None = None) -> EncodedObservations:
        """Validate each observation (ValueError naming what is wrong) and normalise it.

        task_index: a multi-task model's task row for this call (default: the selected task's)."""
        task = None
        if self.tasks:
            task_index = self.task_index if task_index is None else task_index
            if task_index is None:
                raise ValueError(
                    f"{self.name} is a multi-task model ({', '.join(self.tasks)}): select the task it "
                    "runs (--task, the node's task parameter, or select_task)"
                )
            task = np.full(len(observations), task_index, dtype=np.int64)
        rows = [
            _validate(o, self.obs_horizon, self.state_dim, self.cameras, self.image_size, self.env_state_dim)
            for o in observations
        ]
        state = np.stack([r[0] for r in rows])  # (B, O, S + E) float64
        images = {c: np.stack([r[1][c] for r in rows]) for c in self.cameras}
        now = state[:, -1]
        here = self.normalizer.normalize_action(now[:, None, : len(ACTION_NAMES)], now)[:, 0]
        return EncodedObservations(self.normalizer.normalize_state(state), images, now, here, task)

    def decode(self, actions: np.ndarray, state_now: np.ndarray) -> np.ndarray:
        """(H, D) normalised network output -> (H, D) physical actions, rot6d re-orthonormalised.

        A non-finite output is refused (ValueError naming step and dimension): it never reaches a robot."""
        if not np.all(np.isfinite(actions)):
            t, d = np.argwhere(~np.isfinite(actions))[0]
            raise ValueError(
                f"{self.name}: policy output is not finite (NaN/inf) at step {t}, dim {ACTION_NAMES[d]}: "
                "chunk refused"
            )
        out = self.normalizer.unnormalize_action(actions)
        out = self.normalizer.actions_from_frame(out, state_now)
        # the network's rot6d is only approximately orthonormal: project it back onto SO(3)
        out[:, ROT6D] = matrix_to_rot6d(rot6d_to_matrix(out[:, ROT6D]))
        return out
