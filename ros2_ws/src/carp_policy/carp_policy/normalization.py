"""Per-dimension normalization of states and actions, as the CARP paper does it.

xyz and gripper are min-max scaled to [-1, 1]; rotation6d is already in [-1, 1] and is left as is.
So are the unit-vector components of the environment state (names ending in ``_up_x|y|z``, e.g. the
object's up axis). Min-max scaling them is a trap: an upright object's up_x spans ~1e-3 in the data,
so a 2-degree tilt in closed loop became ~70 normalised units, far outside the training data, and
the residual tilt of each demonstration could tell the episodes apart. The stats travel with the
checkpoint as ``normalization.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from carp_policy.actions import ROT6D

# A dimension that never moves in the data (e.g. a gripper that stays open) would divide by ~0;
# a floor of 1 mm keeps its normalised value bounded without distorting real ranges.
MIN_RANGE = 1e-3
UNIT_SUFFIXES = ("_up_x", "_up_y", "_up_z")  # state names of unit-vector components: passed through


def passthrough_dims(state_names: list[str]) -> list[int]:
    """Indices of the state left unnormalised: rot6d, and unit-vector components by name."""
    unit = [i for i, n in enumerate(state_names) if n.endswith(UNIT_SUFFIXES)]
    return sorted(set(range(ROT6D.start, ROT6D.stop)) | set(unit))


@dataclass
class Normalizer:
    """Min-max normalization for the state and action vectors (rot6d passes through)."""

    state_min: np.ndarray
    state_max: np.ndarray
    action_min: np.ndarray
    action_max: np.ndarray
    state_names: list[str] = field(default_factory=list)  # of the policy's state vector, if known

    @classmethod
    def from_stats(cls, stats: dict[str, dict[str, Any]]) -> Normalizer:
        """From dataset stats ``{"observation.state"|"action": {"min", "max", ...}}`` (and optional
        ``"state_names"``)."""
        for key in ("observation.state", "action"):
            if key not in stats or "min" not in stats[key] or "max" not in stats[key]:
                raise ValueError(f"dataset stats lack '{key}' min/max")
        f = lambda k, s: np.asarray(stats[k][s], dtype=np.float64).reshape(-1)  # noqa: E731
        return cls(
            f("observation.state", "min"),
            f("observation.state", "max"),
            f("action", "min"),
            f("action", "max"),
            list(stats.get("state_names", [])),
        )

    @staticmethod
    def _scale_offset(
        lo: np.ndarray, hi: np.ndarray, passthrough: list[int] | slice = ROT6D
    ) -> tuple[np.ndarray, np.ndarray]:
        """x_n = (x - offset) / scale; identity on the ``passthrough`` dims (rot6d for actions)."""
        scale = np.maximum(hi - lo, MIN_RANGE) / 2.0
        offset = (hi + lo) / 2.0
        scale[passthrough], offset[passthrough] = 1.0, 0.0
        return scale, offset

    def _state_scale_offset(self) -> tuple[np.ndarray, np.ndarray]:
        return self._scale_offset(self.state_min, self.state_max, passthrough_dims(self.state_names))

    def normalize_state(self, x: np.ndarray) -> np.ndarray:
        """(..., S) physical state -> normalised."""
        s, o = self._state_scale_offset()
        return ((x - o) / s).astype(np.float32)

    def normalize_action(self, x: np.ndarray) -> np.ndarray:
        """(..., 10) physical action -> normalised."""
        s, o = self._scale_offset(self.action_min, self.action_max)
        return ((x - o) / s).astype(np.float32)

    def unnormalize_action(self, x: np.ndarray) -> np.ndarray:
        """(..., 10) normalised action -> physical units (float64)."""
        s, o = self._scale_offset(self.action_min, self.action_max)
        return np.asarray(x, dtype=np.float64) * s + o

    def torch_params(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(scale, offset) as float32 arrays for 'state' or 'action', for batched torch use."""
        s, o = (
            self._state_scale_offset()
            if which == "state"
            else self._scale_offset(self.action_min, self.action_max)
        )
        return s.astype(np.float32), o.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "observation.state": {"min": self.state_min.tolist(), "max": self.state_max.tolist()},
            "action": {"min": self.action_min.tolist(), "max": self.action_max.tolist()},
            "scheme": "xyz and gripper min-max to [-1, 1]; rot6d and *_up_x|y|z state unchanged",
            "state_names": list(self.state_names),
        }

    def save(self, path: str | Path) -> None:
        """Write ``normalization.json``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Normalizer:
        """Read ``normalization.json``."""
        return cls.from_stats(json.loads(Path(path).read_text()))
