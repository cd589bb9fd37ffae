"""The arm as teleoperation and the recorder see it, and the twin behind that seam.

``TeleopArm`` is the small interface the teleop core drives: the measured state as timestamped
streams (the TCP pose and the gripper opening, each a ``StreamBuffer`` like a camera's) and
``command(pose, gripper, t)``, which the arm's safety limits may refuse. On the cell the driver
(``carp_hardware``'s ArmDriver: ``command_pose`` through its ``SafetyLimits``) fills it; in the twin
``TwinArm`` steps a ``SimCell`` through the same limits a policy's targets meet.

Safety: a target outside the limits is refused, never clipped; the arm holds the last accepted one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from scipy.spatial.transform import Rotation

from carp_policy.actions import StreamBuffer, matrix_to_rot6d, pose_to_vector


@runtime_checkable
class TeleopArm(Protocol):
    name: str
    serial: str  # robot serial number, recorded with every episode ("" if unknown)
    tcp_buffer: StreamBuffer  # (9,) [x, y, z, rot6d] measured TCP pose, base frame
    gripper_buffer: StreamBuffer  # (1,) measured opening, m

    def tcp_pose(self) -> np.ndarray:
        """The newest measured TCP pose (4, 4)."""
        ...

    def gripper_opening(self) -> float: ...

    def command(self, pose: np.ndarray, gripper: float, t: float) -> str | None:
        """Send a target TCP pose (4, 4) + gripper opening for time ``t``; None if accepted, else
        the limits' refusal (a sentence) and the arm holds."""
        ...


@dataclass
class TargetLimits:
    """The checks every commanded target meets (the field names and defaults of the driver's
    ``SafetyLimits``, which replaces this class where the driver is used)."""

    workspace_min: tuple[float, float, float] = (-0.85, -0.50, 0.015)
    workspace_max: tuple[float, float, float] = (-0.15, 0.50, 0.55)
    max_tcp_speed: float = 1.0  # m/s between consecutive targets
    max_tcp_angular_speed: float = 3.0  # rad/s
    gripper_min: float = 0.0
    gripper_max: float = 0.085

    def check(self, prev: np.ndarray | None, pose: np.ndarray, gripper: float, dt: float) -> str | None:
        """None if the target (4, 4) may be sent ``dt`` s after ``prev`` (4, 4), else why not."""
        if not (np.all(np.isfinite(pose)) and np.isfinite(gripper)):
            return "target is not finite"
        p = pose[:3, 3]
        lo, hi = np.asarray(self.workspace_min), np.asarray(self.workspace_max)
        if np.any(p < lo) or np.any(p > hi):
            axis = "xyz"[int(np.argmax((p < lo) | (p > hi)))]
            where = f"({lo.tolist()}..{hi.tolist()})"
            return f"target {np.round(p, 3).tolist()} leaves the workspace in {axis} {where}"
        if not self.gripper_min <= gripper <= self.gripper_max:
            return f"gripper opening {gripper:.3f} m outside {self.gripper_min}..{self.gripper_max}"
        if prev is not None and dt > 0:
            v = np.linalg.norm(p - prev[:3, 3]) / dt
            if v > self.max_tcp_speed:
                return f"target moves at {v:.2f} m/s (limit {self.max_tcp_speed})"
            w = Rotation.from_matrix(prev[:3, :3].T @ pose[:3, :3]).magnitude() / dt
            if w > self.max_tcp_angular_speed:
                return f"target turns at {w:.2f} rad/s (limit {self.max_tcp_angular_speed})"
        return None


class TwinArm:
    """A ``SimCell`` behind ``TeleopArm``: ``command`` steps the twin one control period (the
    servo interpolation of the twin runs inside), then publishes the measured state on the host
    clock. ``lock`` is the world lock the twin's cameras render under."""

    name = "twin"
    serial = "twin"

    def __init__(
        self,
        env,
        limits: TargetLimits | None = None,
        lock: threading.Lock | None = None,
        clock=time.monotonic,
    ) -> None:
        self.env = env
        self.limits = limits or TargetLimits()
        self.lock = lock or threading.Lock()
        self.clock = clock
        self.tcp_buffer = StreamBuffer("tcp_pose", 256)
        self.gripper_buffer = StreamBuffer("gripper", 256)
        self.env_buffer = StreamBuffer("env_state", 256)  # the twin's privileged scene state
        self._last: np.ndarray | None = None
        self._last_t: float | None = None
        self.refusals = 0
        self._pub_lock = threading.Lock()
        self.state_hz = 125.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Publish the measured state at ``state_hz`` from a thread, as the driver's receive loop
        does on the cell (between two control steps the twin's state is constant, and it is
        measured again at every publish)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="twin-state", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(1.0 / self.state_hz):
            self.publish()

    def reset(self, seed: int) -> None:
        with self.lock:
            self.env.reset(seed)
        self._last, self._last_t = None, None
        self.publish()

    def publish(self) -> None:
        """Push the measured state (what ``SimCell.observe`` reports, the collector's definition)."""
        with self._pub_lock:  # the state thread and command() both publish: keep stamps in order
            with self.lock:
                obs = self.env.observe()
                t = self.clock()
            self.tcp_buffer.push(t, obs.state[:9].copy())
            self.gripper_buffer.push(t, obs.state[9:].copy())
            self.env_buffer.push(t, np.asarray(obs.env_state, np.float64).copy())

    def tcp_pose(self) -> np.ndarray:
        with self.lock:
            return self.env.tcp_pose()

    def gripper_opening(self) -> float:
        with self.lock:
            return self.env.gripper_opening

    def command(self, pose: np.ndarray, gripper: float, t: float) -> str | None:
        dt = (t - self._last_t) if self._last_t is not None else 0.0
        why = self.limits.check(self._last, pose, gripper, dt)
        if why is not None:
            self.refusals += 1
            return why
        action = pose_to_vector(pose[:3, 3], pose[:3, :3], gripper)
        with self.lock:
            self.env.step(action)
        self._last, self._last_t = np.array(pose, dtype=np.float64), t
        self.publish()
        return None


def pose_from_state(tcp: np.ndarray) -> np.ndarray:
    """(9,) [x, y, z, rot6d] -> (4, 4)."""
    from carp_policy.actions import rot6d_to_matrix

    T = np.eye(4)
    T[:3, 3] = tcp[:3]
    T[:3, :3] = rot6d_to_matrix(np.asarray(tcp[3:9]))
    return T


__all__ = ["TargetLimits", "TeleopArm", "TwinArm", "matrix_to_rot6d", "pose_from_state"]
