"""The arm as teleoperation and the recorder see it, and the twin behind that seam.

``TeleopArm`` is the small interface the teleop core drives: the measured state as timestamped
streams (the TCP pose and the gripper opening, each a ``StreamBuffer`` like a camera's) and
``command(pose, gripper, t)``, which the arm's safety limits may refuse. Both sides go through the
driver core (``carp_hardware.driver.ArmDriver.command_pose`` and its ``SafetyLimits``, the checks
a policy's chunks meet): on the cell directly, in the twin through ``SimCell.step``, which runs the
same driver over the twin's backends.

Safety: a target outside the limits is refused, never clipped; the arm holds the last accepted one.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable

import numpy as np

from carp_policy.actions import StreamBuffer, pose_to_vector


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


class TwinArm:
    """A ``SimCell`` behind ``TeleopArm``: ``command`` steps the twin one control period through
    its driver (interpolation, safety limits, IK), then publishes the measured state on the host
    clock. ``lock`` is the world lock the twin's cameras render under."""

    name = "twin"
    serial = "twin"

    def __init__(
        self,
        env,
        lock: threading.Lock | None = None,
        clock=time.monotonic,
    ) -> None:
        self.env = env
        self.lock = lock or threading.Lock()
        self.clock = clock
        self.tcp_buffer = StreamBuffer("tcp_pose", 256)
        self.gripper_buffer = StreamBuffer("gripper", 256)
        self.env_buffer = StreamBuffer("env_state", 256)  # the twin's privileged scene state
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
        action = pose_to_vector(pose[:3, 3], pose[:3, :3], gripper)
        with self.lock:
            before = self.env.ik_failures
            self.env.step(action)  # the driver checks the target; refused, the arm holds
            why = self.env.driver.status().reason if self.env.ik_failures > before else None
        self.publish()
        if why is not None:
            self.refusals += 1
            return str(why)
        return None


def pose_from_state(tcp: np.ndarray) -> np.ndarray:
    """(9,) [x, y, z, rot6d] -> (4, 4)."""
    from carp_policy.actions import rot6d_to_matrix

    T = np.eye(4)
    T[:3, 3] = tcp[:3]
    T[:3, :3] = rot6d_to_matrix(np.asarray(tcp[3:9]))
    return T


__all__ = ["TeleopArm", "TwinArm", "pose_from_state"]
