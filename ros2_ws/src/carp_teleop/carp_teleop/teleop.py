"""The teleop core: operator input -> a target TCP pose at the control rate, sent through the arm's
safety limits.

Each ``tick(t)`` reads the input, applies the deadzone and per-axis scaling, maps the twist into
the base or the tool frame, integrates it onto the last *accepted* target (not the measured pose,
so a lagging arm does not make the operator's motion wander) and sends the target. The gripper
toggles between open and closed on a button and moves at a finite speed, as the real 2F-85 does.
Buttons and keys become events (start/save, discard, gripper, translation-only, quit) for the
recorder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

from carp_policy.actions import pose_to_vector
from carp_teleop.arm import TeleopArm
from carp_teleop.inputs import TeleopInput

EVENTS = ("record", "discard", "gripper", "translation_only", "quit")


@dataclass
class TeleopConfig:
    """How SpaceMouse deflection becomes TCP motion (the ``teleop:`` section of the recorder YAML)."""

    rate_hz: float = 10.0  # control rate: one target per tick (the policy's rate)
    deadzone: float = 0.08  # |axis| below this reads as 0; above it, rescaled to stay continuous
    max_speed: float = 0.15  # m/s at full deflection
    max_angular_speed: float = 0.8  # rad/s at full deflection
    axis_scale: tuple[float, ...] = (
        1.0,
        1.0,
        1.0,
        1.0,
        1.0,
        1.0,
    )  # per axis (x y z roll pitch yaw); -1 flips
    # Device frame -> base frame: the device's z is the base's z; this yaw (deg) turns its x/y onto
    # the base's (e.g. 180 when the operator faces the robot across the table)
    device_yaw_deg: float = 0.0
    frame: str = "base"  # base: push forward = base +x; tool: motions in the TCP frame
    translation_only: bool = False  # start with rotations ignored (a button/key toggles it)
    gripper_open: float = 0.085  # m
    gripper_closed: float = 0.0  # m (commanded; the fingers stop on the object)
    gripper_speed: float = 0.15  # m/s of the commanded opening (full stroke in ~0.6 s)
    # what each SpaceMouse button does, by index (a two-button Compact: gripper, record)
    buttons: tuple[str, ...] = ("gripper", "record")
    long_press_s: float = 1.0  # holding the record button this long discards the episode

    def validate(self) -> None:
        if len(self.axis_scale) != 6:
            raise ValueError(f"teleop.axis_scale needs 6 numbers, got {list(self.axis_scale)}")
        if self.frame not in ("base", "tool"):
            raise ValueError(f"teleop.frame must be base or tool, got {self.frame!r}")
        if not 0 <= self.deadzone < 1:
            raise ValueError(f"teleop.deadzone must be in [0, 1), got {self.deadzone}")
        bad = [b for b in self.buttons if b not in EVENTS]
        if bad:
            raise ValueError(f"teleop.buttons: unknown action(s) {bad}; known {list(EVENTS)}")


def apply_deadzone(axes: np.ndarray, deadzone: float) -> np.ndarray:
    """Zero inside the deadzone, then linear from 0 at its edge to +-1 at full deflection."""
    a = np.clip(np.asarray(axes, np.float64), -1.0, 1.0)
    mag = np.maximum(np.abs(a) - deadzone, 0.0) / (1.0 - deadzone)
    return np.sign(a) * mag


@dataclass
class TickResult:
    """What one teleop tick did."""

    t: float
    target: np.ndarray  # (10,) the commanded action [x, y, z, rot6d, gripper] (the last accepted)
    events: list[str] = field(default_factory=list)
    refusal: str | None = None  # the limits refused this tick's target (the arm held)
    moving: bool = False  # the operator deflected the device beyond the deadzone


class TeleopCore:
    """Integrates the operator's twist into a target pose and sends it to the arm."""

    def __init__(self, arm: TeleopArm, source: TeleopInput, config: TeleopConfig | None = None) -> None:
        self.arm, self.source = arm, source
        self.config = config or TeleopConfig()
        self.config.validate()
        self.translation_only = self.config.translation_only
        self._held: tuple[int, ...] = ()
        self._press_t: dict[int, float] = {}
        self._long_fired: set[int] = set()
        self.reseed()

    def reseed(self) -> None:
        """Start the target at the measured pose and gripper (at start and after a reset)."""
        self.pose = np.array(self.arm.tcp_pose(), dtype=np.float64)
        self.gripper = float(self.arm.gripper_opening())
        self.gripper_goal = (
            self.config.gripper_open
            if self.gripper > 0.5 * self.config.gripper_open
            else self.config.gripper_closed
        )

    def twist(self, axes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Device axes (6,) -> (linear m/s (3,), angular rad/s (3,)) in the chosen frame."""
        c = self.config
        a = apply_deadzone(axes, c.deadzone) * np.asarray(c.axis_scale, np.float64)
        yaw = Rotation.from_euler("z", c.device_yaw_deg, degrees=True).as_matrix()
        v = yaw @ a[:3] * c.max_speed
        w = yaw @ a[3:] * c.max_angular_speed
        if self.translation_only:
            w = np.zeros(3)
        return v, w

    def _events(self, t: float, buttons: tuple[int, ...], keys: tuple[str, ...]) -> list[str]:
        c, events = self.config, list(keys)
        for i, name in enumerate(c.buttons):
            now = i < len(buttons) and bool(buttons[i])
            was = i < len(self._held) and bool(self._held[i])
            if now and not was:
                self._press_t[i] = t
                if name != "record":  # record acts on release: a long press means discard
                    events.append(name)
            if (
                name == "record"
                and now
                and i not in self._long_fired
                and t - self._press_t.get(i, t) >= c.long_press_s
            ):
                events.append("discard")
                self._long_fired.add(i)
            if name == "record" and was and not now:
                if i not in self._long_fired:
                    events.append("record")
                self._long_fired.discard(i)
        self._held = tuple(buttons)
        return events

    def tick(self, t: float) -> TickResult:
        """One control period: read, integrate, send. ``t`` is the time the target is meant for."""
        c = self.config
        dt = 1.0 / c.rate_hz
        s = self.source.read()
        events = self._events(t, s.buttons, s.keys)
        for e in events:
            if e == "gripper":
                self.gripper_goal = (
                    c.gripper_closed if self.gripper_goal > c.gripper_closed else c.gripper_open
                )
            elif e == "translation_only":
                self.translation_only = not self.translation_only
        v, w = self.twist(s.axes)
        pose = self.pose.copy()
        step = Rotation.from_rotvec(w * dt).as_matrix()
        if c.frame == "base":
            pose[:3, 3] += v * dt
            pose[:3, :3] = step @ pose[:3, :3]
        else:
            pose[:3, 3] += pose[:3, :3] @ v * dt
            pose[:3, :3] = pose[:3, :3] @ step
        g_step = c.gripper_speed * dt
        gripper = float(self.gripper + np.clip(self.gripper_goal - self.gripper, -g_step, g_step))
        refusal = self.arm.command(pose, gripper, t)
        if refusal is None:
            self.pose, self.gripper = pose, gripper
        return TickResult(
            t=t,
            target=pose_to_vector(self.pose[:3, 3], self.pose[:3, :3], self.gripper),
            events=events,
            refusal=refusal,
            moving=bool(np.any(v) or np.any(w)),
        )
