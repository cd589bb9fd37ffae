"""Observations, action chunks and rotation conversions shared by every part of the stack.

This module is the contract between the policy, the driver, the recorder and the twin. It imports
no torch and no rclpy, so a driver or a recorder can use it on a machine without either.

Conventions (docs/design.md):
- units SI (m, rad, s), poses in the robot base frame;
- an action / state vector is ``[x, y, z, r6d_0..r6d_5, gripper]`` (10 numbers): TCP position,
  rotation6d (the first two *columns* of the rotation matrix, column-major:
  ``[R00, R10, R20, R01, R11, R21]``, Zhou et al. 2019), gripper opening in metres;
- rotation vectors at the UR boundary, quaternions ``(x, y, z, w)`` in ROS messages.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from scipy.spatial.transform import Rotation

ACTION_DIM = 10
STATE_DIM = 10
CHUNK_HORIZON = 16
CONTROL_RATE_HZ = 10.0
ACTION_NAMES = ["x", "y", "z", "r6d_0", "r6d_1", "r6d_2", "r6d_3", "r6d_4", "r6d_5", "gripper"]
STATE_NAMES = list(ACTION_NAMES)
POS = slice(0, 3)
ROT6D = slice(3, 9)
GRIPPER = 9


# ----------------------------------------------------------------------------- rotations
def matrix_to_rot6d(mat: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation matrices -> (..., 6) rotation6d (first two columns, column-major)."""
    mat = np.asarray(mat, dtype=np.float64)
    return np.concatenate([mat[..., :, 0], mat[..., :, 1]], axis=-1)


def rot6d_to_matrix(r6d: np.ndarray) -> np.ndarray:
    """(..., 6) rotation6d -> (..., 3, 3) rotation matrices by Gram-Schmidt (tolerates non-unit input)."""
    r6d = np.asarray(r6d, dtype=np.float64)
    a1, a2 = r6d[..., 0:3], r6d[..., 3:6]
    n1 = np.linalg.norm(a1, axis=-1, keepdims=True)
    if np.any(n1 < 1e-8):
        raise ValueError("degenerate rotation6d: first column has zero length")
    b1 = a1 / n1
    b2 = a2 - np.sum(b1 * a2, axis=-1, keepdims=True) * b1
    n2 = np.linalg.norm(b2, axis=-1, keepdims=True)
    if np.any(n2 < 1e-8):
        raise ValueError("degenerate rotation6d: columns are parallel")
    b2 = b2 / n2
    b3 = np.cross(b1, b2)
    return np.stack([b1, b2, b3], axis=-1)


def rot6d_to_rotvec(r6d: np.ndarray) -> np.ndarray:
    """(..., 6) rotation6d -> (..., 3) rotation vector (axis * angle, rad), the UR convention."""
    r6d = np.asarray(r6d)
    mats = rot6d_to_matrix(r6d.reshape(-1, 6))
    return Rotation.from_matrix(mats).as_rotvec().reshape(*r6d.shape[:-1], 3)


def rotvec_to_rot6d(rotvec: np.ndarray) -> np.ndarray:
    """(..., 3) rotation vector -> (..., 6) rotation6d."""
    rotvec = np.asarray(rotvec, dtype=np.float64)
    mats = Rotation.from_rotvec(rotvec.reshape(-1, 3)).as_matrix()
    return matrix_to_rot6d(mats).reshape(*rotvec.shape[:-1], 6)


def rot6d_to_quat(r6d: np.ndarray) -> np.ndarray:
    """(..., 6) rotation6d -> (..., 4) quaternion (x, y, z, w), the ROS convention."""
    r6d = np.asarray(r6d)
    mats = rot6d_to_matrix(r6d.reshape(-1, 6))
    return Rotation.from_matrix(mats).as_quat().reshape(*r6d.shape[:-1], 4)


def quat_to_rot6d(quat: np.ndarray) -> np.ndarray:
    """(..., 4) quaternion (x, y, z, w) -> (..., 6) rotation6d."""
    quat = np.asarray(quat, dtype=np.float64)
    mats = Rotation.from_quat(quat.reshape(-1, 4)).as_matrix()
    return matrix_to_rot6d(mats).reshape(*quat.shape[:-1], 6)


def pose_to_vector(position: np.ndarray, rotation: np.ndarray, gripper: float) -> np.ndarray:
    """Position (3,), rotation matrix (3, 3), gripper opening -> the 10-number state/action vector."""
    return np.concatenate([np.asarray(position, np.float64), matrix_to_rot6d(rotation), [gripper]])


def rotation_error_deg(r6d_a: np.ndarray, r6d_b: np.ndarray) -> np.ndarray:
    """Geodesic angle in degrees between two batches of rotation6d, shape (...)."""
    r6d_a, r6d_b = np.broadcast_arrays(np.asarray(r6d_a, np.float64), np.asarray(r6d_b, np.float64))
    ra, rb = rot6d_to_matrix(r6d_a.reshape(-1, 6)), rot6d_to_matrix(r6d_b.reshape(-1, 6))
    rel = np.einsum("nji,njk->nik", ra, rb)
    # scipy's magnitude is accurate near zero, unlike arccos((trace - 1) / 2)
    return np.degrees(Rotation.from_matrix(rel).magnitude()).reshape(r6d_a.shape[:-1])


# ----------------------------------------------------------------------------- data types
@dataclass
class Observation:
    """What a policy sees at one decision time.

    state:  (O, STATE_DIM) float, oldest first, the last row is "now" (a (STATE_DIM,) array is O=1).
    images: camera name -> (O, H, W, 3) uint8 RGB, oldest first (an (H, W, 3) array is O=1).
    timestamp: the decision time the observation describes, seconds on the host clock (sim time in
        the twin, the robot PC's clock on a cell); a chunk computed from it is scheduled from it.
    env_state: (O, E) float or None: the scene's state (object and target poses) where something
        measures it. The twin always does (privileged, LeRobot's ``observation.environment_state``);
        a real cell has none unless a perception module provides it.
    stamps: stream name -> (O,) capture times of the samples used for each row (``ObservationAligner``
        fills it: ``state`` parts and each camera have their own); empty where nobody measured them.
    """

    state: np.ndarray
    images: dict[str, np.ndarray] = field(default_factory=dict)
    timestamp: float = 0.0
    env_state: np.ndarray | None = None
    stamps: dict[str, np.ndarray] = field(default_factory=dict)

    def with_horizon(self) -> Observation:
        """Return a copy with explicit leading time axes on state and images."""
        state = np.asarray(self.state)
        if state.ndim == 1:
            state = state[None]
        images = {}
        for k, v in self.images.items():
            v = np.asarray(v)
            images[k] = v[None] if v.ndim == 3 else v
        env = None if self.env_state is None else np.asarray(self.env_state)
        if env is not None and env.ndim == 1:
            env = env[None]
        return Observation(
            state=state, images=images, timestamp=self.timestamp, env_state=env, stamps=dict(self.stamps)
        )


@dataclass
class ActionChunk:
    """A chunk of future actions computed from one observation.

    actions: (H, ACTION_DIM) float64 in physical units; step i is meant for time
             ``timestamp + (i + 1) * dt`` (step 0 is the first target after the observation).
    timestamp: time of the observation the chunk was computed from.
    dt: seconds between steps (1 / control rate).
    latency_s: measured inference time (observation in -> chunk out), for reporting.
    """

    actions: np.ndarray
    timestamp: float = 0.0
    dt: float = 1.0 / CONTROL_RATE_HZ
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        self.actions = np.asarray(self.actions, dtype=np.float64)
        if self.actions.ndim != 2 or self.actions.shape[1] != ACTION_DIM:
            raise ValueError(f"ActionChunk.actions must be (H, {ACTION_DIM}), got {self.actions.shape}")
        if not np.all(np.isfinite(self.actions)):
            bad = np.argwhere(~np.isfinite(self.actions))[0]
            raise ValueError(
                f"ActionChunk has a non-finite value at step {bad[0]}, dim {ACTION_NAMES[bad[1]]}"
            )

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def positions(self) -> np.ndarray:
        """(H, 3) TCP positions, m."""
        return self.actions[:, POS]

    @property
    def rotvecs(self) -> np.ndarray:
        """(H, 3) TCP orientations as rotation vectors (UR convention)."""
        return rot6d_to_rotvec(self.actions[:, ROT6D])

    @property
    def quaternions(self) -> np.ndarray:
        """(H, 4) TCP orientations as quaternions (x, y, z, w) (ROS convention)."""
        return rot6d_to_quat(self.actions[:, ROT6D])

    @property
    def matrices(self) -> np.ndarray:
        """(H, 3, 3) TCP orientations as rotation matrices."""
        return rot6d_to_matrix(self.actions[:, ROT6D])

    @property
    def gripper(self) -> np.ndarray:
        """(H,) gripper openings, m."""
        return self.actions[:, GRIPPER]

    def step_times(self) -> np.ndarray:
        """(H,) absolute times the steps are meant for."""
        return self.timestamp + self.dt * np.arange(1, len(self.actions) + 1)

    def ur_poses(self) -> np.ndarray:
        """(H, 6) poses as UR expects them: [x, y, z, rx, ry, rz]."""
        return np.concatenate([self.positions, self.rotvecs], axis=1)


def validate_observation(
    obs: Observation,
    obs_horizon: int,
    state_dim: int,
    cameras: tuple[str, ...] | list[str],
    image_size: tuple[int, int] | list[int] | None = None,
    env_state_dim: int = 0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Check an observation against what a policy was built for; every policy and engine calls this.

    Returns the policy's state as (O, S + E) float64 (the environment state appended when the
    policy uses one, ``env_state_dim`` = E > 0) and the images of ``cameras`` as (O, H, W, 3) uint8.
    A wrong shape, a missing camera or environment state, a wrong image size or dtype, or a NaN
    raises ValueError naming it.
    """
    obs = obs.with_horizon()
    O, S = obs_horizon, state_dim
    state = np.asarray(obs.state, dtype=np.float64)
    if state.shape != (O, S):
        raise ValueError(
            f"observation.state must have shape ({O}, {S}) (obs_horizon, state_dim), got {state.shape}"
        )
    if not np.all(np.isfinite(state)):
        t, d = np.argwhere(~np.isfinite(state))[0]
        raise ValueError(f"observation.state is not finite (NaN/inf) at step {t}, dim {STATE_NAMES[d]}")
    if env_state_dim:
        if obs.env_state is None:
            raise ValueError(
                f"this policy needs observation.env_state ({env_state_dim} numbers: object poses, as "
                "the twin measures them); the observation has none"
            )
        env = np.asarray(obs.env_state, dtype=np.float64)
        if env.shape != (O, env_state_dim):
            raise ValueError(
                f"observation.env_state must have shape ({O}, {env_state_dim}) (obs_horizon, "
                f"env_state_dim), got {env.shape}"
            )
        if not np.all(np.isfinite(env)):
            t, d = np.argwhere(~np.isfinite(env))[0]
            raise ValueError(f"observation.env_state is not finite (NaN/inf) at step {t}, dim {d}")
        state = np.concatenate([state, env], axis=1)
    images = {}
    for cam in cameras:
        if cam not in obs.images:
            raise ValueError(f"observation is missing camera '{cam}' (got {sorted(obs.images)})")
        img = np.asarray(obs.images[cam])
        H, W = image_size if image_size is not None else img.shape[1:3]
        if img.shape != (O, H, W, 3):
            raise ValueError(f"camera '{cam}' image must have shape ({O}, {H}, {W}, 3), got {img.shape}")
        if img.dtype != np.uint8:
            raise ValueError(f"camera '{cam}' image must be uint8 RGB, got {img.dtype}")
        images[cam] = np.ascontiguousarray(img)
    return state, images


@runtime_checkable
class Policy(Protocol):
    """What every policy family (CARP, CoA, DP-C, the scripted expert) and engine exposes."""

    obs_horizon: int
    obs_stride: int  # control periods between the observation rows (1: consecutive)
    cameras: tuple[str, ...]

    def reset(self) -> None:
        """Forget any internal state (call at the start of an episode)."""

    def predict(self, observation: Observation) -> ActionChunk:
        """Observation (O steps of state and images) -> a chunk of H actions in physical units."""
        ...


# ----------------------------------------------------------------------------- time
class StaleObservationError(ValueError):
    """An observation that must not reach a policy: a stream too old, missing, or streams too far apart.

    ``reason`` is a short machine-readable cause (``stale``, ``missing``, ``skew``) for counters."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Sample:
    """One timestamped reading of a stream: a camera frame, the robot state, the gripper opening."""

    t: float  # capture time, s, on the host clock (the device's own clock mapped onto it)
    value: np.ndarray


class StreamBuffer:
    """Ring buffer of the latest samples of one stream, safe to fill from a device thread.

    Capture times must not go backwards (a clock mapping that does is a bug upstream, refused here).
    ``latest(max_age, now)`` and ``at(t)`` answer "what was true at time t" as Diffusion Policy's
    real-world environment does: the latest sample at or before t.
    """

    def __init__(self, name: str, capacity: int = 64) -> None:
        if capacity < 1:
            raise ValueError("StreamBuffer capacity must be >= 1")
        self.name = name
        self._items: deque[Sample] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self.evicted = False  # a sample was pushed out: the earliest one is not the stream's first

    def push(self, t: float, value: np.ndarray) -> None:
        """Add a sample captured at time ``t`` (s)."""
        t = float(t)
        if not np.isfinite(t):
            raise ValueError(f"stream '{self.name}': capture time is not finite ({t})")
        with self._lock:
            if self._items and t < self._items[-1].t:
                raise ValueError(
                    f"stream '{self.name}': capture time went backwards ({t:.6f} s after "
                    f"{self._items[-1].t:.6f} s)"
                )
            if len(self._items) == self._items.maxlen:
                self.evicted = True
            self._items.append(Sample(t, value))

    @property
    def capacity(self) -> int:
        """Most samples the ring keeps."""
        return self._items.maxlen or 0

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.evicted = False

    def __len__(self) -> int:
        return len(self._items)

    def latest(self, max_age: float | None = None, now: float | None = None) -> Sample | None:
        """The newest sample, or None if there is none or it is older than ``max_age`` at ``now``."""
        with self._lock:
            s = self._items[-1] if self._items else None
        if s is None or max_age is None:
            return s
        return s if (now - s.t) <= max_age else None

    def at(self, t: float, tolerance: float = 1e-6) -> Sample | None:
        """The latest sample captured at or before ``t`` (within ``tolerance`` s of float noise);
        None if every sample is newer."""
        with self._lock:
            items = list(self._items)
        for s in reversed(items):
            if s.t <= t + tolerance:
                return s
        return None

    def earliest(self) -> Sample | None:
        with self._lock:
            return self._items[0] if self._items else None


@dataclass
class AlignerConfig:
    """How an observation history is assembled from timestamped streams."""

    horizon: int = 1  # O: observation rows, the newest last
    dt: float = 1.0 / CONTROL_RATE_HZ  # s, the control period the policy was trained at
    stride: int = 1  # control periods between rows (the policy's obs_stride): rows stride * dt apart
    # s: the newest sample of every stream must be at most this old at the decision time; older, the
    # policy pauses and the arm holds (a camera at 30 fps is at most ~33 ms old, the robot state ~2 ms)
    max_age: float = 0.1
    max_skew: float = 0.05  # s: the newest samples of the streams must lie within this of each other


@dataclass
class Alignment:
    """What the aligner measured for one observation (for diagnostics and the recorder)."""

    t: float  # the decision time
    ages: dict[str, float]  # stream -> t - capture time of its newest row's sample, s
    skew: float  # max - min capture time over the streams' newest rows, s


class ObservationAligner:
    """Builds a policy's observation history at the control period from per-stream buffers.

    Row i of the observation for decision time t uses, from each stream, the latest sample at or
    before ``t - (O - 1 - i) * stride * dt``; before a stream's first sample the earliest one is
    repeated (edge padding, as training pads the start of an episode). A stream whose buffer has
    already let go of the sample a row needs raises (reason ``history``) rather than pad: that
    row would claim a moment the stream no longer holds. The state vector is the
    concatenation of the ``state`` streams in order (e.g. the TCP pose then the gripper opening).
    A stream with no sample, one older than ``max_age`` or streams further apart than ``max_skew``
    raise ``StaleObservationError``: the caller must not run the policy on it.
    """

    def __init__(
        self,
        state: Sequence[StreamBuffer],
        cameras: Mapping[str, StreamBuffer] | None = None,
        env_state: Sequence[StreamBuffer] = (),
        config: AlignerConfig | None = None,
    ) -> None:
        self.config = config or AlignerConfig()
        if self.config.horizon < 1 or self.config.stride < 1:
            raise ValueError("observation horizon and stride must be >= 1")
        if not state:
            raise ValueError("ObservationAligner needs at least one state stream")
        self.state, self.env_state = list(state), list(env_state)
        self.cameras = dict(cameras or {})

    def _streams(self) -> list[StreamBuffer]:
        return [*self.state, *self.cameras.values(), *self.env_state]

    def newest_time(self) -> float | None:
        """The newest capture time over all streams (None if a stream is still empty)."""
        latest = [b.latest() for b in self._streams()]
        return None if any(s is None for s in latest) else max(s.t for s in latest)

    def build(self, t: float | None = None) -> tuple[Observation, Alignment]:
        """The observation for decision time ``t`` (default: the newest capture time of any stream)."""
        cfg = self.config
        if t is None:
            t = self.newest_time()
            if t is None:
                empty = [b.name for b in self._streams() if not len(b)]
                raise StaleObservationError(f"no sample yet from stream(s) {empty}", "missing")
        times = t - cfg.stride * cfg.dt * np.arange(cfg.horizon - 1, -1, -1)  # (O,), oldest first
        rows: dict[str, list[Sample]] = {}
        for buf in self._streams():
            newest = buf.at(times[-1])
            if newest is None:
                raise StaleObservationError(
                    f"stream '{buf.name}' has no sample at or before t={t:.3f} s", "missing"
                )
            first = buf.earliest()
            older = [buf.at(ti) for ti in times[:-1]]
            if buf.evicted and any(s is None for s in older):
                raise StaleObservationError(
                    f"stream '{buf.name}' holds {newest.t - first.t:.2f} s of history ({buf.capacity} "
                    f"samples); the policy looks {times[-1] - times[0]:.2f} s back: give the buffer "
                    "more capacity",
                    "history",
                )
            rows[buf.name] = [s or first for s in older] + [newest]
        ages = {name: float(t - r[-1].t) for name, r in rows.items()}
        old = {n: a for n, a in ages.items() if a > cfg.max_age}
        if old:
            desc = ", ".join(f"'{n}' {a * 1e3:.0f} ms" for n, a in old.items())
            raise StaleObservationError(
                f"stale stream(s) at t={t:.3f} s: {desc} old (limit {cfg.max_age * 1e3:.0f} ms)", "stale"
            )
        newest_t = [r[-1].t for r in rows.values()]
        skew = float(max(newest_t) - min(newest_t))
        if skew > cfg.max_skew:
            raise StaleObservationError(
                f"streams {skew * 1e3:.0f} ms apart at t={t:.3f} s (limit {cfg.max_skew * 1e3:.0f} ms)",
                "skew",
            )

        def stack(bufs: Sequence[StreamBuffer]) -> np.ndarray:
            return np.stack(
                [np.concatenate([np.asarray(rows[b.name][i].value, np.float64).reshape(-1) for b in bufs])
                 for i in range(cfg.horizon)]
            )  # fmt: skip

        obs = Observation(
            state=stack(self.state),
            images={c: np.stack([np.asarray(s.value) for s in rows[b.name]]) for c, b in self.cameras.items()},  # noqa: E501
            timestamp=float(t),
            env_state=stack(self.env_state) if self.env_state else None,
            stamps={name: np.array([s.t for s in r]) for name, r in rows.items()},
        )
        return obs, Alignment(t=float(t), ages=ages, skew=skew)


class ObservationHistory:
    """The observation history of a synchronous source (the twin, a replayed episode), where every
    pushed observation is one sample of every stream taken at the same instant, one control period
    after the last: ``horizon`` rows ``stride`` pushes apart, the newest last, edge-padded at the
    start. On a real cell, where streams arrive on their own clocks, ``ObservationAligner`` builds
    the same rows by time."""

    def __init__(self, horizon: int, stride: int = 1) -> None:
        if horizon < 1 or stride < 1:
            raise ValueError(f"observation horizon and stride must be >= 1, got {horizon} and {stride}")
        self.horizon, self.stride = horizon, stride
        self._items: list[Observation] = []

    def reset(self) -> None:
        self._items.clear()

    def push(self, obs: Observation) -> Observation:
        """Add the newest single-step observation and return the stacked one."""
        self._items.append(obs)
        span = (self.horizon - 1) * self.stride + 1  # pushes the oldest row reaches back over
        del self._items[:-span]
        padded = [self._items[0]] * (span - len(self._items)) + self._items
        items = padded[:: self.stride]  # (O,), oldest first; the last is the newest push
        state = np.stack([np.asarray(o.state).reshape(-1) for o in items])
        images = {k: np.stack([o.images[k] for o in items]) for k in obs.images}
        env = None
        if obs.env_state is not None:
            env = np.stack([np.asarray(o.env_state).reshape(-1) for o in items])
        stamps = {"observation": np.array([o.timestamp for o in items])}
        return Observation(state=state, images=images, timestamp=obs.timestamp, env_state=env, stamps=stamps)
