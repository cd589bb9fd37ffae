"""Per-dimension normalization of states and actions, as the CARP paper does it.

xyz and gripper are min-max scaled to [-1, 1]; rotation6d is already in [-1, 1] and is left as is.
So are the unit-vector components of the environment state (names ending in ``_up_x|y|z``, e.g. the
object's up axis). Min-max scaling them is a trap: an upright object's up_x spans ~1e-3 in the data,
so a 2-degree tilt in closed loop became ~70 normalised units, far outside the training data, and
the residual tilt of each demonstration could tell the episodes apart. The stats travel with the
checkpoint as ``normalization.json``.

The normalizer also owns the *frame* the networks see. ``absolute``: positions in the robot base
frame, as recorded. ``relative``: the chunk's positions are offsets from the TCP position at the
decision time, and the environment state's positions (``object_x``, ``target_y``, ...) are offsets
from the TCP position of the same step. A relative chunk is a function of where things are *from
the gripper*, which every frame of every demonstration samples densely, whereas an absolute one has
to be read off one demonstrated layout per episode. Rotations and the gripper stay absolute.
Measured in the twin (docs/results.md), the relative frame halved the open-loop error
but failed in closed loop: offsets anchor the arm to nothing once the state leaves the
demonstrated ones. The shipped configs stay absolute and use translation augmentation instead.

``relative_xy``: x and y as in ``relative``, z absolute (chunk and scene). The table is flat and
fixed, so where the object lies is a horizontal offset that a wrist camera sees from every frame,
while the grasp and place heights are the same absolute numbers in every demonstration. Visual CARP
in the fully relative frame descended by the demonstrated depth from wherever the arm was, through
the table (docs/results.md, "Visual CARP: the frame and more demonstrations").
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
# the frames, each with the TCP axes its positions are measured from (the others stay absolute)
FRAME_AXES: dict[str, tuple[int, ...]] = {"absolute": (), "relative": (0, 1, 2), "relative_xy": (0, 1)}
FRAMES = tuple(FRAME_AXES)
_AXES = {"_x": 0, "_y": 1, "_z": 2}


def passthrough_dims(state_names: list[str]) -> list[int]:
    """Indices of the state left unnormalised: rot6d, and unit-vector components by name."""
    unit = [i for i, n in enumerate(state_names) if n.endswith(UNIT_SUFFIXES)]
    return sorted(set(range(ROT6D.start, ROT6D.stop)) | set(unit))


def env_position_dims(state_names: list[str]) -> tuple[list[int], list[int]]:
    """(indices, TCP axes) of the environment-state positions: names ``<thing>_x|y|z`` after the robot
    state (``object_x`` -> axis 0), unit-vector components excluded."""
    dims, axes = [], []
    for i, n in enumerate(state_names):
        if i >= ROT6D.stop + 1 and not n.endswith(UNIT_SUFFIXES) and n[-2:] in _AXES:
            dims.append(i)
            axes.append(_AXES[n[-2:]])
    return dims, axes


def _is_tensor(x: Any) -> bool:
    """A torch tensor, told without importing torch (the engine runs without it)."""
    return type(x).__module__.startswith("torch")


def _copy(x: Any) -> Any:
    """A copy of a NumPy array or a torch tensor (the frame changes run on both)."""
    return x.clone() if hasattr(x, "clone") else np.array(x, copy=True)


@dataclass
class Normalizer:
    """Min-max normalization for the state and action vectors (rot6d passes through)."""

    state_min: np.ndarray
    state_max: np.ndarray
    action_min: np.ndarray
    action_max: np.ndarray
    state_names: list[str] = field(default_factory=list)  # of the policy's state vector, if known
    frame: str = "absolute"  # "absolute" | "relative" | "relative_xy" (positions from the TCP: module doc)

    def __post_init__(self) -> None:
        self._cache: dict[tuple[str, str], tuple[Any, Any]] = {}  # float32 (scale, offset) per device
        # positions of the scene in the state and the TCP axis of each (see env_position_dims): the
        # frame change runs on every inference and training batch, so they are found once
        self.env_dims, self.env_axes = env_position_dims(self.state_names)
        # what a shift of the whole scene in x, y moves (training augmentation, test-time ensemble):
        # the TCP's x, y and the scene's x, y positions, with the shift component each takes
        xy = [(d, a) for d, a in zip(self.env_dims, self.env_axes) if a < 2]
        self.shift_dims, self.shift_axes = [0, 1, *(d for d, _ in xy)], [0, 1, *(a for _, a in xy)]
        if self.frame not in FRAMES:
            raise ValueError(f"frame must be one of {FRAMES}, got {self.frame!r}")
        # the TCP axes measured from the TCP, and the scene positions that move with them
        self.rel_axes = list(FRAME_AXES[self.frame])
        rel = [(d, a) for d, a in zip(self.env_dims, self.env_axes) if a in self.rel_axes]
        self.rel_env_dims, self.rel_env_axes = [d for d, _ in rel], [a for _, a in rel]
        if self.rel_axes and self.state_names and self.state_names[:3] != ["x", "y", "z"]:
            raise ValueError(
                f"a relative frame needs the TCP position first in the state, got {self.state_names[:3]}"
            )

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
            stats.get("frame", "absolute"),
        )

    @classmethod
    def fit(
        cls,
        episodes: list[tuple[np.ndarray, np.ndarray]],
        horizon: int,
        state_names: list[str],
        frame: str = "absolute",
        shift: float = 0.0,
    ) -> Normalizer:
        """Min / max of the state rows and the action windows as the policy sees them in its frame.

        episodes: (state (T, S), action (T, 10)) per episode, the training episodes only (the
        validation episodes are data the model must not have seen, its ranges included); the windows
        are those of training (the chunk of frame t is rows t..t+H-1, the last row repeated past the
        end, relative to state t). In the absolute frame these are the per-row min / max of the
        recorded vectors. ``shift``: the translation augmentation's half range (m): the ranges cover
        every window moved by any offset in [-shift, shift]^2 (the frame change is linear in the
        offset, so its four corners bound it), so augmented batches stay inside [-1, 1].
        """
        empty = np.zeros(0)
        probe = cls(empty, empty, empty, empty, list(state_names), frame)  # only its frame change is used
        corners = [np.zeros(2)]
        if shift > 0:
            corners += [np.array([sx, sy]) * shift for sx in (-1, 1) for sy in (-1, 1)]
        states, actions = [], []
        for state, action in episodes:
            n = len(state)
            state, action = np.asarray(state, np.float64), np.asarray(action, np.float64)
            idx = np.minimum(np.arange(n)[:, None] + np.arange(horizon), n - 1)  # (T, H)
            for d in corners:
                st, act = probe.shift_xy(state, np.broadcast_to(d, (n, 2))), action[idx].copy()
                act[..., :2] += d
                states.append(probe.state_to_frame(st))
                chunk = probe.actions_to_frame(act, st)  # (T, H, 10)
                actions.append(chunk.reshape(-1, chunk.shape[-1]))
        s, a = np.concatenate(states), np.concatenate(actions)
        return cls(s.min(0), s.max(0), a.min(0), a.max(0), list(state_names), frame)

    def shift_xy(self, state: Any, d: Any) -> Any:
        """(..., S) physical state (NumPy or torch) with the whole scene moved by ``d`` (..., 2) metres
        in x, y: the TCP's and every scene position's x, y (a copy). The translation augmentation and
        the test-time shift ensemble both move the scene through here; the chunk's x, y move by d."""
        y = _copy(state)
        y[..., self.shift_dims] += d[..., self.shift_axes]
        return y

    # ------------------------------------------------------------------ frame
    def state_to_frame(self, x: Any) -> Any:
        """(..., S) physical state (NumPy or torch) -> the policy's frame (a copy where it changes)."""
        if not self.rel_axes:
            return x
        y = _copy(x)
        y[..., self.rel_env_dims] = x[..., self.rel_env_dims] - x[..., self.rel_env_axes]
        return y

    def actions_to_frame(self, actions: Any, state_now: Any) -> Any:
        """(..., H, 10) physical actions -> the policy's frame; state_now (..., S): the decision time."""
        if not self.rel_axes:
            return actions
        y = _copy(actions)
        ax = self.rel_axes
        y[..., ax] = actions[..., ax] - state_now[..., None, ax]
        return y

    def actions_from_frame(self, actions: Any, state_now: Any) -> Any:
        """Inverse of ``actions_to_frame``: (..., H, 10) in the policy's frame -> physical (base frame)."""
        if not self.rel_axes:
            return actions
        y = _copy(actions)
        ax = self.rel_axes
        y[..., ax] = actions[..., ax] + state_now[..., None, ax]
        return y

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

    def _params(self, which: str, like: Any) -> tuple[Any, Any]:
        """(scale, offset) of 'state' or 'action' as float32, NumPy or torch on ``like``'s device."""
        key = (which, str(like.device) if _is_tensor(like) else "numpy")
        if key not in self._cache:
            s, o = (
                self._state_scale_offset()
                if which == "state"
                else self._scale_offset(self.action_min, self.action_max)
            )
            s, o = s.astype(np.float32), o.astype(np.float32)
            if _is_tensor(like):
                import torch

                s, o = torch.as_tensor(s, device=like.device), torch.as_tensor(o, device=like.device)
            self._cache[key] = (s, o)
        return self._cache[key]

    # The arithmetic below is the one every path shares (torch and ONNX inference, training): the
    # frame change at the input's precision, then float32, so both runtimes see identical inputs.
    def normalize_state(self, x: Any) -> Any:
        """(..., S) physical state (NumPy or torch) -> the policy's frame, normalised, float32."""
        s, o = self._params("state", x)
        y = self.state_to_frame(x)
        y = y.float() if _is_tensor(y) else np.asarray(y).astype(np.float32)
        return (y - o) / s

    def normalize_action(self, x: Any, state_now: Any = None) -> Any:
        """(..., H, 10) actions (NumPy or torch) -> normalised float32. With ``state_now`` (..., S) the
        actions are physical and first changed to the policy's frame; without, already in it."""
        if state_now is not None:
            x = self.actions_to_frame(x, state_now)
        s, o = self._params("action", x)
        y = x.float() if _is_tensor(x) else np.asarray(x).astype(np.float32)
        return (y - o) / s

    def unnormalize_action(self, x: Any) -> Any:
        """(..., 10) normalised action -> physical units in the policy's frame (NumPy: float64; torch:
        float32 on its device); a relative chunk still needs ``actions_from_frame`` to mean a pose."""
        if _is_tensor(x):
            s, o = self._params("action", x)
            return x * s + o
        s, o = self._scale_offset(self.action_min, self.action_max)
        return np.asarray(x, dtype=np.float64) * s + o

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "observation.state": {"min": self.state_min.tolist(), "max": self.state_max.tolist()},
            "action": {"min": self.action_min.tolist(), "max": self.action_max.tolist()},
            "scheme": "xyz and gripper min-max to [-1, 1]; rot6d and *_up_x|y|z state unchanged",
            "state_names": list(self.state_names),
            "frame": self.frame,
        }

    def save(self, path: str | Path) -> None:
        """Write ``normalization.json``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Normalizer:
        """Read ``normalization.json``."""
        return cls.from_stats(json.loads(Path(path).read_text()))
