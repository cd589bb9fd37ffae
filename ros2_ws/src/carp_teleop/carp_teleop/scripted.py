"""A scripted SpaceMouse operator for the twin: it watches the arm and pushes the SpaceMouse as a
person would, so ``carp-record --sim --input scripted`` records demonstrations with no one at the
desk, through the whole live path (HID reports -> pyspacemouse -> teleop -> limits -> twin ->
cameras -> recorder).

Its intent comes from the twin's scripted expert: the expert's plan, sampled at the control
period, is a path of targets. The operator deflects the device toward the next point of the path
(proportional, saturating at full deflection), advances along it once the arm's target is there,
clicks the gripper button where the plan opens or closes the gripper, and clicks the record button
to start the episode and, when the plan is done, to save it.
"""

from __future__ import annotations

import time

import numpy as np
from scipy.spatial.transform import Rotation

from carp_teleop.hid_fake import FakeHIDDevice, encode
from carp_teleop.teleop import TeleopCore


class ExpertOperator:
    """Drives a fake HID SpaceMouse from the expert's plan (call it once per tick, before the
    teleop reads the device)."""

    def __init__(
        self,
        env,
        lock,
        teleop: TeleopCore,
        hid: FakeHIDDevice,
        spec,
        gain: float = 0.8,
        tol_m: float = 0.006,
        tol_deg: float = 3.0,
        variety: str = "task",
    ) -> None:
        self.env, self.lock, self.teleop, self.hid, self.spec = env, lock, teleop, hid, spec
        self.gain, self.tol_m, self.tol_rad = gain, tol_m, np.radians(tol_deg)
        self.variety = variety
        self.buttons = {name: i for i, name in enumerate(teleop.config.buttons)}
        self.path = np.zeros((0, 10))
        self.i = 0
        self.phase = "idle"
        self._release: set[int] = set()
        self._done_ticks = 0
        self._since_start = 0
        self.is_recording = None  # () -> bool: the recorder's state (a person sees the cue)

    def reset(self, seed: int) -> None:
        """Plan the episode of the twin's current layout (call after the twin's reset)."""
        from carp_sim.expert import make_expert

        with self.lock:
            obs = self.env.observe()
            expert = make_expert(self.env, seed, self.variety)
            expert.predict(obs)  # makes the plan from the layout
            end = expert.plan[-1].t
            dt = 1.0 / self.teleop.config.rate_hz
            self.path = np.stack([expert.sample(t) for t in np.arange(dt, end + dt, dt)])
        self.i = 0
        self.phase = "start"
        self._done_ticks = 0

    def _axes(self) -> np.ndarray:
        c = self.teleop.config
        dt = 1.0 / c.rate_hz
        want = self.path[self.i]
        pose = self.teleop.pose
        v = self.gain * (want[:3] - pose[:3, 3]) / dt  # m/s
        from carp_policy.actions import rot6d_to_matrix

        R_want = rot6d_to_matrix(want[3:9])
        w = self.gain * Rotation.from_matrix(R_want @ pose[:3, :3].T).as_rotvec() / dt  # base frame
        yaw_inv = Rotation.from_euler("z", -c.device_yaw_deg, degrees=True).as_matrix()
        a = np.concatenate([yaw_inv @ v / c.max_speed, yaw_inv @ w / c.max_angular_speed])
        a = a / np.asarray(c.axis_scale, np.float64)
        # saturate the translation and rotation as one vector each (keeps the direction)
        for s in (slice(0, 3), slice(3, 6)):
            n = np.max(np.abs(a[s]))
            if n > 1.0:
                a[s] /= n
        # undo the deadzone the teleop core applies: |raw| = dz + |a| (1 - dz)
        raw = np.where(np.abs(a) > 1e-4, np.sign(a) * (c.deadzone + np.abs(a) * (1 - c.deadzone)), 0.0)
        return raw

    def _close(self, k: int) -> bool:
        want, pose = self.path[k], self.teleop.pose
        from carp_policy.actions import rot6d_to_matrix

        ang = Rotation.from_matrix(rot6d_to_matrix(want[3:9]) @ pose[:3, :3].T).magnitude()
        return bool(np.linalg.norm(want[:3] - pose[:3, 3]) < self.tol_m and ang < self.tol_rad)

    def __call__(self, t: float) -> None:
        buttons = [0] * len(self.spec.button_specs)
        press: set[int] = set()
        axes = np.zeros(6)
        c = self.teleop.config
        if self.phase == "start":
            press.add(self.buttons["record"])
            self.phase = "follow"
            self._since_start = 0
        elif self.phase == "follow" and self.is_recording is not None and not self.is_recording():
            self._since_start += 1
            if self._since_start > 3:  # the recorder did not start (streams not live): press again
                self.phase = "start"
        elif self.phase == "follow" and len(self.path):
            grip_goal = c.gripper_closed if self.path[self.i, 9] < 0.5 * c.gripper_open else c.gripper_open
            settled = abs(self.teleop.gripper - self.teleop.gripper_goal) < 1e-6
            if grip_goal != self.teleop.gripper_goal and not self._release:
                press.add(self.buttons["gripper"])
            elif settled:
                while self.i < len(self.path) - 1 and self._close(self.i):
                    self.i += 1
                    nxt = c.gripper_closed if self.path[self.i, 9] < 0.5 * c.gripper_open else c.gripper_open
                    if nxt != self.teleop.gripper_goal:
                        break  # click the gripper there before going on
                axes = self._axes()
                if self.i == len(self.path) - 1 and self._close(self.i):
                    self._done_ticks += 1
                    if self._done_ticks >= 3:  # rest a moment on the last point, then save
                        press.add(self.buttons["record"])
                        self.phase = "idle"
        for b in self._release:
            buttons[b] = 0
        for b in press:
            buttons[b] = 1
        self._release = press
        self.hid.push(encode(self.spec, axes, buttons))
        # Let the SpaceMouse thread take the report before the teleop reads the device: a person's
        # hand is on the device continuously; the tick must not see last tick's deflection.
        end = time.monotonic() + 0.05
        while self.hid.pending() and time.monotonic() < end:
            time.sleep(0.0005)
        time.sleep(0.006)
