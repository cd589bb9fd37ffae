"""The robot side of ``carp-record``: the UR5e through the driver core behind ``TeleopArm``.

``DriverArm`` adapts ``carp_hardware.driver.ArmDriver``: teleop targets go to ``command_pose``
(the same safety limits a policy's chunks meet; a refusal stops the arm and is reported), the
servo loop runs in its own thread (``ArmDriver.tick``, paced by the backend's
``initPeriod()/waitPeriod()``), and the measured TCP pose and gripper opening are published into
``StreamBuffer``s at ``state_hz`` on the host clock, like a camera's frames.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from carp_policy.actions import StreamBuffer, matrix_to_rot6d


class DriverArm:
    """A ``TeleopArm`` over an ``ArmDriver`` (the cell; tests run it over the fake ur_rtde)."""

    name = "ur5e"

    def __init__(self, driver, serial: str = "", state_hz: float = 125.0, clock=time.monotonic) -> None:
        """A target is reached ``driver.config.pose_lead_s`` after it is sent (one control period,
        as the twin's step does)."""
        self.driver, self.serial = driver, serial
        self.state_hz, self.clock = state_hz, clock
        self.tcp_buffer = StreamBuffer("tcp_pose", 256)
        self.gripper_buffer = StreamBuffer("gripper", 256)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, servo: bool = True) -> None:
        """Start publishing the state and (``servo``) the servo loop."""
        self._stop.clear()
        loops = [self._publish_loop] + ([self._servo_loop] if servo else [])
        self._threads = [threading.Thread(target=f, daemon=True, name=f.__name__) for f in loops]
        for th in self._threads:
            th.start()

    def stop(self) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(timeout=2.0)
        self.driver.stop("recorder stopped")

    def _servo_loop(self) -> None:
        while not self._stop.is_set():
            self.driver.tick()  # one servo period; the backend's waitPeriod paces the loop

    def _publish_loop(self) -> None:
        while not self._stop.wait(1.0 / self.state_hz):
            self.publish()

    def publish(self) -> None:
        s = self.driver.arm.state()
        t = self.clock()
        g = self.driver.gripper.state().opening if self.driver.gripper is not None else float("nan")
        self.tcp_buffer.push(t, np.concatenate([s.tcp[:3, 3], matrix_to_rot6d(s.tcp[:3, :3])]))
        self.gripper_buffer.push(t, np.array([g]))

    def tcp_pose(self) -> np.ndarray:
        return np.array(self.driver.arm.state().tcp, dtype=np.float64)

    def gripper_opening(self) -> float:
        return float(self.driver.gripper.state().opening) if self.driver.gripper is not None else 0.0

    def command(self, pose: np.ndarray, gripper: float, t: float) -> str | None:
        # timed by the driver under its lock (now + pose_lead_s): a time read here, before waiting
        # for a servo tick to finish, could be almost "now" by then and the step would be refused
        # as too fast (seen: 9.7 mm in 0.15 ms)
        r = self.driver.command_pose(pose, gripper)
        return None if r.accepted else str(r.refusal)

