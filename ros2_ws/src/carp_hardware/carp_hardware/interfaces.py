"""The two seams under the driver: an arm and a gripper, each a small ``typing.Protocol``.

The driver core (``carp_hardware.driver``) owns time, interpolation, safety and faults; a backend
only moves joints and reports what the hardware says. Implementations:

| seam    | robot                                   | twin                              |
| ------- | --------------------------------------- | --------------------------------- |
| Arm     | ``carp_hardware.ur_rtde_arm.RtdeArm``   | ``carp_sim.backends.SimArm``      |
| Gripper | ``carp_hardware.robotiq.Robotiq2F85``   | ``carp_sim.backends.SimGripper``  |

A backend never raises for a hardware condition it can observe (a protective stop, a dead control
script, a dropped socket): it returns False from the command and reports the condition in its
state, and the driver's fault state machine decides what happens. It raises only for programming
errors (wrong shapes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class ArmState:
    """What the arm reports at one instant (robot base frame, SI units)."""

    t: float  # time of the reading on the driver's clock, s
    q: np.ndarray  # (6,) actual joint positions, rad
    tcp: np.ndarray  # (4, 4) actual TCP pose
    connected: bool = True  # the data connection is up
    program_running: bool = True  # the controller-side control script runs (ur_rtde's script)
    protective_stop: bool = False
    emergency_stop: bool = False
    safety_mode: int = 1  # UR safety mode (1 = normal; see ur_rtde_arm.SAFETY_MODES)

    def fault(self) -> str | None:
        """The hardware condition that forbids motion, as a short cause, or None."""
        if not self.connected:
            return "connection_lost"
        if self.emergency_stop:
            return "emergency_stop"
        if self.protective_stop:
            return "protective_stop"
        if not self.program_running:
            return "script_not_running"
        return None


@runtime_checkable
class Arm(Protocol):
    """A 6-joint arm streamed with joint targets at a fixed servo period.

    ``servo(q, dt)`` streams the rows of ``q`` (N, 6) one per servo period ``dt``; on the robot each
    row is one ``servoJ`` inside ``initPeriod()/waitPeriod()`` (so the call paces the loop, and
    it feeds the controller-side watchdog every period, as ``idle`` does), in the twin each row is
    ``dt`` of physics. Returns False as soon as a command is refused by the
    hardware (the rest is not sent).
    """

    name: str

    def connect(self) -> None:
        """Open the connections (idempotent)."""

    def close(self) -> None:
        """Stop motion and close the connections (idempotent)."""

    def state(self) -> ArmState:
        """The current reading (never blocks for long; a dead link shows as ``connected=False``)."""
        ...

    def servo(self, q: np.ndarray, dt: float, poses: np.ndarray | None = None) -> bool:
        """Stream joint targets (N, 6), one per ``dt`` s; False if the hardware refused a command.
        ``poses`` (N, 4, 4) are the TCP poses they solve (for a backend that streams poses, servoL)."""
        ...

    def idle(self, n: int, dt: float) -> None:
        """Let ``n`` servo periods pass without commanding motion (robot: the loop's
        ``initPeriod()/waitPeriod()`` alone; twin: physics with the joints held)."""

    def servo_stop(self) -> bool:
        """Leave servo mode, decelerating to rest (ur_rtde ``servoStop``)."""
        ...

    def move_joints(self, q: np.ndarray, speed: float, acceleration: float) -> bool:
        """Blocking point-to-point joint move (ur_rtde ``moveJ``), e.g. the home move."""
        ...

    def inverse_kinematics(self, pose: np.ndarray, q_near: np.ndarray) -> np.ndarray | None:
        """The backend's own IK of a TCP pose (4, 4) nearest ``q_near``, or None if it has none.

        The robot answers with the controller's ``getInverseKinematics``; the twin with the
        project's closed form."""
        ...

    def check_pose(self, pose: np.ndarray) -> str | None:
        """The backend's own reachability / safety check of a TCP pose (4, 4): None if fine, else why.

        The robot asks the controller (``isPoseWithinSafetyLimits``,
        ``getInverseKinematicsHasSolution``); the twin has nothing beyond the project's checks."""
        ...

    def kick_watchdog(self) -> None:
        """Tell the controller-side watchdog the PC is alive (ur_rtde ``kickWatchdog``)."""

    def recover(self) -> str:
        """After a fault, make the arm commandable again (unlock a protective stop, re-upload the
        control script, reconnect); returns what it did. Raises RuntimeError if it cannot."""
        ...


@dataclass
class GripperState:
    """What the gripper reports (opening between the fingers, m)."""

    t: float
    opening: float
    target: float
    moving: bool = False
    object_detected: bool = False  # stopped on an object while opening or closing
    activated: bool = True
    connected: bool = True
    fault: str | None = None  # a gripper fault code/cause, None if fine
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Gripper(Protocol):
    """A parallel gripper commanded by opening (m). ``command`` never blocks the servo loop."""

    name: str
    stroke: float  # fully open, m

    def connect(self) -> None:
        """Open the connection and activate (idempotent)."""

    def close(self) -> None:
        """Close the connection (idempotent)."""

    def command(self, opening: float, speed: float | None = None, force: float | None = None) -> bool:
        """Start moving to ``opening`` m (non-blocking); False if the command could not be sent."""
        ...

    def state(self) -> GripperState:
        """The latest reading (cached; never blocks the caller)."""
        ...


def ensure_joint_path(q: np.ndarray) -> np.ndarray:
    """(6,) or (N, 6) joint targets -> finite (N, 6) float64 (raises ValueError otherwise)."""
    q = np.asarray(q, dtype=np.float64)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != 6 or not np.all(np.isfinite(q)):
        raise ValueError(f"joint targets must be finite (N, 6), got shape {q.shape}")
    return q
