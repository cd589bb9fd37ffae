"""Safety limits of the cell and the checks every target passes: refuse, never clip.

One YAML file (``carp_hardware/config/ur5e_limits.yaml``, loaded by ``SafetyLimits.load``) holds
every limit; the defaults below are for a UR5e on a table with the base at the origin and the
work area at x < 0 (the twin's cell). Check them against your cell before the first run
(``docs/robot.md``).

Every check returns a :class:`Refusal` (a short machine-readable ``reason`` for counters and a
message an operator can act on) or None. ``SafetyMonitor`` counts refusals by reason for the
diagnostics. The checks are vectorised over a batch of targets: the robot's servo loop calls them
with one tick, the twin with a control period's ticks at once.

Where acceleration is checked: the driver interpolates linearly between chunk steps, so its
per-tick acceleration is zero inside a segment and a spike at each step (a property of the
interpolation, not of the motion). Acceleration is therefore checked on the chunk's steps (the
change of segment velocity between consecutive steps) when a chunk is accepted; speed, joint
steps and the workspace are checked on every tick.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from carp_hardware.kinematics import JOINT_LIMITS
from carp_policy.yaml_config import load_yaml

DEFAULT_LIMITS_YAML = Path(__file__).parent / "config" / "ur5e_limits.yaml"


@dataclass
class SafetyLimits:
    """Every limit the driver enforces (SI units, robot base frame). Defaults: a UR5e on a table."""

    # TCP workspace box, m. x: the table in front of the base (x < 0); z: the fingertips (15 mm past
    # the TCP) stay above the table top (z = 0); the top stays below an arm stretched upwards.
    workspace_min: tuple[float, float, float] = (-0.85, -0.50, 0.015)
    workspace_max: tuple[float, float, float] = (-0.15, 0.50, 0.55)
    max_tcp_speed: float = 1.5  # m/s: the UR5e factory safety default (normal mode); lower it near people
    max_tcp_angular_speed: float = 3.0  # rad/s
    # Between chunk steps (see module doc), m/s^2 and rad/s^2.
    max_tcp_acceleration: float = 25.0
    max_tcp_angular_acceleration: float = 80.0
    max_joint_speed: float = 3.0  # rad/s per joint (UR5e: 180 deg/s); per tick: max_joint_speed * dt
    joint_min: tuple[float, ...] = tuple(JOINT_LIMITS[:, 0])  # rad
    joint_max: tuple[float, ...] = tuple(JOINT_LIMITS[:, 1])
    # A chunk whose first future step lies this far from the commanded TCP is refused (m, rad).
    max_start_distance: float = 0.10
    max_start_angle: float = 0.6
    max_chunk_age: float = 0.5  # s: the chunk's observation older than this on arrival = stale
    watchdog_s: float = 0.1  # s without a valid target -> decelerate and stop
    # m, accepted openings: past 0 or the stroke (0.085) the fingers stop at their end stop (a
    # policy overshoots the ends by a few mm); far outside is a unit error, refused
    gripper_min: float = -0.01
    gripper_max: float = 0.10

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        lo, hi = np.asarray(self.workspace_min, float), np.asarray(self.workspace_max, float)
        if lo.shape != (3,) or hi.shape != (3,) or not np.all(np.isfinite([*lo, *hi])) or np.any(lo >= hi):
            raise ValueError(
                f"SafetyLimits.workspace_min/max must be 3 finite numbers with min < max, "
                f"got {self.workspace_min} / {self.workspace_max}"
            )
        jl, jh = np.asarray(self.joint_min, float), np.asarray(self.joint_max, float)
        if jl.shape != (6,) or jh.shape != (6,) or np.any(jl >= jh):
            raise ValueError("SafetyLimits.joint_min/max must be 6 numbers each with min < max")
        for name in (
            "max_tcp_speed",
            "max_tcp_angular_speed",
            "max_tcp_acceleration",
            "max_tcp_angular_acceleration",
            "max_joint_speed",
            "max_start_distance",
            "max_start_angle",
            "max_chunk_age",
            "watchdog_s",
        ):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and np.isfinite(v) and v > 0):
                raise ValueError(f"SafetyLimits.{name} must be a positive number, got {v!r}")
        if not self.gripper_min < self.gripper_max:
            raise ValueError("SafetyLimits.gripper_min/max must satisfy min < max")

    @classmethod
    def load(cls, path: str | Path = DEFAULT_LIMITS_YAML) -> SafetyLimits:
        """From a YAML file (strict keys; any subset of the fields)."""
        return load_yaml(cls, path)

    @property
    def joint_limits(self) -> np.ndarray:
        """(6, 2) [min, max] per joint, as ``carp_hardware.kinematics`` takes them."""
        return np.stack([np.asarray(self.joint_min, float), np.asarray(self.joint_max, float)], axis=1)


@dataclass(frozen=True)
class Refusal:
    """Why a target, a chunk or a tick was refused."""

    reason: str  # short cause for counters: non_finite, workspace, tcp_speed, ik_jump, stale_chunk, ...
    message: str  # what an operator reads
    t: float = float("nan")  # when (driver clock), s
    index: int = -1  # which step / tick of the batch broke the limit (-1: the whole command)

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


def rotvec_between(ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
    """Rotation vectors (N, 3) of ``ra^T rb`` for rotation matrices (N, 3, 3), in plain numpy
    (scipy's Rotation objects cost tens of microseconds per call; this runs every servo tick)."""
    rel = np.einsum("nji,njk->nik", ra, rb)
    axis = np.stack(
        [rel[:, 2, 1] - rel[:, 1, 2], rel[:, 0, 2] - rel[:, 2, 0], rel[:, 1, 0] - rel[:, 0, 1]], axis=1
    )
    sin2 = np.sqrt((axis**2).sum(axis=1))  # 2 sin(angle)
    cos2 = rel[:, 0, 0] + rel[:, 1, 1] + rel[:, 2, 2] - 1.0  # 2 cos(angle)
    angle = np.arctan2(sin2, cos2)
    out = np.zeros((len(rel), 3))
    ok = sin2 > 1e-12
    if np.any(angle > np.pi - 1e-6):  # near pi the skew part vanishes: let scipy handle it
        return Rotation.from_matrix(rel).as_rotvec()
    out[ok] = axis[ok] * (angle[ok] / sin2[ok])[:, None]
    return out


def angle_between(ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
    """Rotation angles (N,) of ``ra^T rb`` for rotation matrices (N, 3, 3): the norms of
    ``rotvec_between`` without its axes, from the trace (trace(ra^T rb) = sum of ra * rb). Three
    numpy calls instead of a dozen: the servo tick's speed check needs only the angle. arccos
    loses precision near 0 (about 2e-8 rad), far below any limit per tick (~1e-3 rad)."""
    cos = 0.5 * ((ra * rb).sum(axis=(1, 2)) - 1.0)
    return np.arccos(np.clip(cos, -1.0, 1.0))


def rotvec_to_matrix(v: np.ndarray) -> np.ndarray:
    """Rodrigues: rotation vectors (N, 3) -> matrices (N, 3, 3), plain numpy."""
    th = np.sqrt((v**2).sum(axis=1))
    small = th < 1e-12
    k = v / np.where(small, 1.0, th)[:, None]
    kx, ky, kz = k[:, 0], k[:, 1], k[:, 2]
    K = np.zeros((len(v), 3, 3))
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 0], K[:, 1, 2], K[:, 2, 0], K[:, 2, 1] = -kz, ky, kz, -kx, -ky, kx
    s, c = np.sin(th)[:, None, None], (1 - np.cos(th))[:, None, None]
    return np.eye(3) + s * K + c * (K @ K)


class SafetyMonitor:
    """The checks of ``SafetyLimits`` as functions returning a Refusal or None, plus the counters."""

    def __init__(self, limits: SafetyLimits | None = None) -> None:
        self.limits = limits or SafetyLimits()
        self.refusals: Counter[str] = Counter()
        self.last_refusal: Refusal | None = None
        lim = self.limits
        self._ws_lo = np.asarray(lim.workspace_min, float)
        self._ws_hi = np.asarray(lim.workspace_max, float)
        self._j_lo, self._j_hi = lim.joint_limits[:, 0], lim.joint_limits[:, 1]

    def count(self, refusal: Refusal) -> Refusal:
        """Record a refusal (by reason) and return it."""
        self.refusals[refusal.reason] += 1
        self.last_refusal = refusal
        return refusal

    # ------------------------------------------------------------------ checks on targets
    @staticmethod
    def finite(values: np.ndarray, what: str) -> Refusal | None:
        """NaN or inf anywhere."""
        values = np.asarray(values, dtype=np.float64)
        if np.all(np.isfinite(values)):
            return None
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(values))[0])
        return Refusal("non_finite", f"{what} holds a non-finite value (NaN/inf) at index {idx}")

    def workspace(self, positions: np.ndarray, what: str) -> Refusal | None:
        """TCP positions (N, 3) inside the workspace box."""
        out = (positions < self._ws_lo) | (positions > self._ws_hi)
        if not out.any():
            return None
        i = int(np.flatnonzero(out.any(axis=1))[0])
        return Refusal(
            "workspace",
            index=i,
            message=f"{what} {i}: TCP {np.round(positions[i], 4).tolist()} m is outside the "
            f"workspace box {list(self.limits.workspace_min)}..{list(self.limits.workspace_max)}",
        )

    def gripper(self, openings: np.ndarray, what: str) -> Refusal | None:
        """Gripper openings inside [gripper_min, gripper_max]."""
        bad = (openings < self.limits.gripper_min - 1e-9) | (openings > self.limits.gripper_max + 1e-9)
        if not bad.any():
            return None
        i = int(np.flatnonzero(bad)[0])
        return Refusal(
            "gripper_range",
            index=i,
            message=f"{what} {i}: gripper opening {openings[i]:.4f} m outside "
            f"[{self.limits.gripper_min}, {self.limits.gripper_max}]",
        )

    def speeds(
        self,
        times: np.ndarray,
        positions: np.ndarray,
        rotations: np.ndarray,
        what: str,
        accelerations: bool = False,
    ) -> Refusal | None:
        """Linear / angular TCP speed of the segments between consecutive poses (N >= 2), and with
        ``accelerations`` the change of segment velocity between consecutive segments."""
        lim = self.limits
        dt = np.diff(times)
        if np.any(dt <= 0):
            return Refusal("timing", f"{what}: times must increase, got steps {np.round(dt, 4).tolist()} s")
        vel = np.diff(positions, axis=0) / dt[:, None]
        speed = np.sqrt((vel * vel).sum(axis=1))
        if accelerations:  # the change of angular velocity needs its axis
            omega = rotvec_between(rotations[:-1], rotations[1:]) / dt[:, None]  # body frame
            ang = np.sqrt((omega * omega).sum(axis=1))
        else:  # every servo tick: the angle is enough
            ang = angle_between(rotations[:-1], rotations[1:]) / dt
        if speed.max(initial=0.0) > lim.max_tcp_speed:
            i = int(speed.argmax())
            return Refusal(
                "tcp_speed",
                index=i,
                message=f"{what} {i}->{i + 1}: TCP speed {speed[i]:.3f} m/s over the "
                f"limit {lim.max_tcp_speed} m/s ({np.linalg.norm(vel[i]) * dt[i] * 1e3:.1f} mm "
                f"in {dt[i] * 1e3:.0f} ms)",
            )
        if ang.max(initial=0.0) > lim.max_tcp_angular_speed:
            i = int(ang.argmax())
            return Refusal(
                "tcp_angular_speed",
                index=i,
                message=f"{what} {i}->{i + 1}: TCP angular speed {ang[i]:.3f} rad/s "
                f"over the limit {lim.max_tcp_angular_speed} rad/s",
            )
        if accelerations and len(dt) >= 2:
            mid = 0.5 * (dt[1:] + dt[:-1])
            acc = np.linalg.norm(np.diff(vel, axis=0), axis=1) / mid
            aacc = np.linalg.norm(np.diff(omega, axis=0), axis=1) / mid
            if acc.max() > lim.max_tcp_acceleration:
                i = int(acc.argmax())
                return Refusal(
                    "tcp_acceleration",
                    index=i + 1,
                    message=f"{what} {i + 1}: TCP acceleration {acc[i]:.1f} m/s^2 "
                    f"over the limit {lim.max_tcp_acceleration} m/s^2",
                )
            if aacc.max() > lim.max_tcp_angular_acceleration:
                i = int(aacc.argmax())
                return Refusal(
                    "tcp_angular_acceleration",
                    index=i + 1,
                    message=f"{what} {i + 1}: TCP angular acceleration "
                    f"{aacc[i]:.1f} rad/s^2 over the limit {lim.max_tcp_angular_acceleration}",
                )
        return None

    def start_distance(self, current: np.ndarray, first: np.ndarray) -> Refusal | None:
        """The first future step of a chunk (4, 4) near the commanded TCP (4, 4)."""
        lim = self.limits
        d = float(np.linalg.norm(first[:3, 3] - current[:3, 3]))
        a = float(np.linalg.norm(rotvec_between(current[None, :3, :3], first[None, :3, :3])))
        if d > lim.max_start_distance:
            return Refusal(
                "start_distance",
                f"the chunk's first future step is {d * 1e3:.0f} mm from the "
                f"commanded TCP (limit {lim.max_start_distance * 1e3:.0f} mm)",
            )
        if a > lim.max_start_angle:
            return Refusal(
                "start_distance",
                f"the chunk's first future step is turned {np.degrees(a):.0f} deg "
                f"from the commanded TCP (limit {np.degrees(lim.max_start_angle):.0f} deg)",
            )
        return None

    def chunk_age(self, age: float) -> Refusal | None:
        """The observation a chunk was computed from, ``age`` s old on arrival."""
        if age <= self.limits.max_chunk_age:
            return None
        return Refusal(
            "stale_chunk",
            f"chunk computed from an observation {age * 1e3:.0f} ms old "
            f"(limit {self.limits.max_chunk_age * 1e3:.0f} ms)",
        )

    def joint_path(self, q_prev: np.ndarray, q_path: np.ndarray, dt: float) -> Refusal | None:
        """Joint targets (N, 6) after ``q_prev`` (6,): inside the joint limits, and no joint moves
        more than ``max_joint_speed * dt`` in one tick (an IK branch flip shows up here)."""
        bad = (q_path < self._j_lo - 1e-9) | (q_path > self._j_hi + 1e-9)
        if bad.any():
            i, j = (int(x) for x in np.argwhere(bad)[0])
            return Refusal(
                "joint_limits",
                index=i,
                message=f"tick {i}: joint {j + 1} target {q_path[i, j]:.3f} rad outside "
                f"[{self._j_lo[j]:.3f}, {self._j_hi[j]:.3f}]",
            )
        steps = np.abs(np.diff(np.vstack([q_prev[None], q_path]), axis=0))
        max_step = self.limits.max_joint_speed * dt
        if steps.max(initial=0.0) > max_step:
            i, j = (int(x) for x in np.unravel_index(steps.argmax(), steps.shape))
            return Refusal(
                "ik_jump",
                index=i,
                message=f"tick {i}: joint {j + 1} would jump {steps[i, j]:.3f} rad in one "
                f"{dt * 1e3:.0f} ms tick (limit {max_step:.3f} rad = {self.limits.max_joint_speed} "
                f"rad/s; an IK branch flip or a singularity)",
            )
        return None
