"""The twin's backends behind the driver's seams: ``SimArm`` (``carp_hardware.interfaces.Arm``),
``SimGripper`` (``Gripper``) and ``SimClock`` (the driver's ``Clock``).

They live in ``carp_sim`` rather than ``carp_hardware`` because they need MuJoCo and the cell; the
driver core above them (``carp_hardware.driver``: scheduling, interpolation, IK, safety, watchdog)
is the one the robot runs. A servo tick here is ``dt`` of physics: the joint targets are a
staircase at the servo rate, as on the real arm.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import mujoco
import numpy as np

from carp_hardware.interfaces import ArmState, GripperState, ensure_joint_path
from carp_hardware.kinematics import IKError, ik_nearest
from carp_sim.cell import ARM_KP, ARM_KV, GRIPPER_STROKE

if TYPE_CHECKING:
    from carp_sim.env import SimCell


class SimClock:
    """The twin's simulated time: it moves only when the backend runs physics."""

    def __init__(self, cell: SimCell) -> None:
        self.cell = cell

    def now(self) -> float:
        return float(self.cell.data.time)


class SimArm:
    """The twin's UR5e joints as an ``Arm``.

    ``realtime=True`` paces every servo tick to the wall clock (the twin for live use: a servo loop
    sees the same timing as on the robot); the default runs as fast as the CPU allows (evaluation).
    """

    name = "sim"

    def __init__(self, cell: SimCell, realtime: bool = False) -> None:
        self.cell = cell
        self.realtime = realtime
        # Position servo: kp (ctrl - q) - kv qdot. Adding (kv/kp) * qdot_target to the target turns
        # it into kp (q_t - q) + kv (qdot_t - qdot), so tracking does not lag a moving target.
        self._ff = np.array(ARM_KV) / np.array(ARM_KP)
        self.q_last = np.zeros(6)  # the last joint target sent
        self._wall_next: float | None = None

    # -- connection (nothing to open in the twin)
    def connect(self) -> None:
        pass

    def close(self) -> None:
        pass

    def state(self) -> ArmState:
        d = self.cell.data
        return ArmState(t=float(d.time), q=d.qpos[:6].copy(), tcp=self.cell.tcp_pose())

    def _steps(self, dt: float) -> int:
        n = round(dt / self.cell.config.physics_dt)
        if n < 1 or abs(n * self.cell.config.physics_dt - dt) > 1e-9:
            raise ValueError(f"servo period {dt} s is not a whole multiple of physics_dt")
        return n

    def _pace(self, dt: float) -> None:
        if not self.realtime:
            return
        now = time.perf_counter()
        self._wall_next = now if self._wall_next is None or now - self._wall_next > 0.1 else self._wall_next
        self._wall_next += dt
        if self._wall_next > now:
            time.sleep(self._wall_next - now)

    def servo(self, q: np.ndarray, dt: float, poses: np.ndarray | None = None) -> bool:
        """Each row of ``q`` (N, 6) is the joint target reached at the end of one ``dt`` of physics."""
        q = ensure_joint_path(q)
        n, m, d = self._steps(dt), self.cell.model, self.cell.data
        for qi in q:
            d.ctrl[:6] = qi + self._ff * ((qi - self.q_last) / dt)
            mujoco.mj_step(m, d, nstep=n)
            self.q_last = qi
            self._pace(dt)
        return True

    def idle(self, n: int, dt: float) -> None:
        """``n`` servo periods holding the last target (zero target velocity)."""
        if n <= 0:
            return
        self.cell.data.ctrl[:6] = self.q_last
        if self.realtime:
            for _ in range(n):
                mujoco.mj_step(self.cell.model, self.cell.data, nstep=self._steps(dt))
                self._pace(dt)
        else:
            mujoco.mj_step(self.cell.model, self.cell.data, nstep=n * self._steps(dt))

    def settle(self, q: np.ndarray, physics_steps: int) -> None:
        """Hold ``q`` for some physics steps (reset: objects come to rest)."""
        self.q_last = np.asarray(q, dtype=np.float64).copy()
        self.cell.data.ctrl[:6] = self.q_last
        if physics_steps > 0:
            mujoco.mj_step(self.cell.model, self.cell.data, nstep=physics_steps)

    def servo_stop(self) -> bool:
        """The twin's joints hold the last target (the arm tracks it closely; nothing decelerates)."""
        return True

    def move_joints(self, q: np.ndarray, speed: float, acceleration: float) -> bool:
        """Linear joint-space move with the leading joint at ``speed`` rad/s (blocking, like moveJ)."""
        q = np.asarray(q, dtype=np.float64)
        dt = 1.0 / self.cell.config.servo_hz
        q0 = self.cell.data.qpos[:6].copy()
        dist = float(np.abs(q - q0).max())
        n = max(1, int(np.ceil(dist / (speed * dt))))
        s = np.arange(1, n + 1)[:, None] / n
        self.q_last = q0
        ok = self.servo(q0 + s * (q - q0), dt)
        self.idle(round(0.3 / dt), dt)  # moveJ returns when the arm is at rest
        return ok

    def inverse_kinematics(self, pose: np.ndarray, q_near: np.ndarray) -> np.ndarray | None:
        try:
            return ik_nearest(pose, q_near)
        except IKError:
            return None

    def check_pose(self, pose: np.ndarray) -> str | None:
        return None  # no controller-side limits in the twin beyond the project's own checks

    def kick_watchdog(self) -> None:
        pass

    def recover(self) -> str:
        return "nothing to recover in the twin"


class SimGripper:
    """The twin's 2F-85-like gripper: each finger a position servo with a force limit."""

    name = "sim_gripper"
    stroke = GRIPPER_STROKE

    def __init__(self, cell: SimCell) -> None:
        self.cell = cell
        self.target = GRIPPER_STROKE

    def connect(self) -> None:
        pass

    def close(self) -> None:
        pass

    def command(self, opening: float, speed: float | None = None, force: float | None = None) -> bool:
        """Set the fingers' target (non-blocking); the opening saturates at 0 and the stroke, as the
        real gripper's end stops do."""
        self.target = float(np.clip(opening, 0.0, GRIPPER_STROKE))
        self.cell.data.ctrl[6:8] = self.target / 2
        return True

    def state(self) -> GripperState:
        c = self.cell
        return GripperState(t=c.time, opening=c.gripper_opening, target=self.target,
                            object_detected=c.in_contact_with_gripper())  # fmt: skip
