"""SpaceMouse input through pyspacemouse's own decoding (a fake HID device underneath), the teleop
core's deadzone, scaling, frames, buttons and gripper, the limits refusing targets, and the twin
driven by it."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from carp_hardware.safety import SafetyLimits, SafetyMonitor
from carp_policy.actions import StreamBuffer
from carp_teleop.arm import TwinArm
from carp_teleop.hid_fake import encode, fake_spacemouse
from carp_teleop.inputs import KeyboardInput, ScriptedInput, SpaceMouseInput
from carp_teleop.teleop import TeleopConfig, TeleopCore, apply_deadzone


class RecordingArm:
    """Accepts every target inside the driver's workspace limits; remembers what it was sent."""

    name, serial = "test", "T1"

    def __init__(self, pose=None) -> None:
        self.pose = np.eye(4) if pose is None else pose
        self.pose[:3, 3] = [-0.5, 0.0, 0.3]
        self.safety = SafetyMonitor(SafetyLimits())
        self.sent: list[tuple[np.ndarray, float]] = []
        self.tcp_buffer, self.gripper_buffer = StreamBuffer("tcp_pose"), StreamBuffer("gripper")

    def tcp_pose(self):
        return self.pose.copy()

    def gripper_opening(self):
        return 0.085

    def command(self, pose, gripper, t):
        why = self.safety.workspace(pose[None, :3, 3], "target")
        if why is None:
            self.sent.append((pose.copy(), gripper))
        return None if why is None else str(why)


@pytest.mark.parametrize("model", ["SpaceMouseCompact", "SpaceMouseWireless"])
def test_hid_reports_decode_back_through_pyspacemouse(model: str) -> None:
    dev, hid, spec = fake_spacemouse(model)
    src = SpaceMouseInput(dev)
    try:
        want = np.array([0.5, -0.25, 1.0, 0.0, 0.3, -0.7])
        hid.push(encode(spec, want, [1, 0]))
        end = time.monotonic() + 2
        while time.monotonic() < end and not (
            np.allclose(src.read().axes, want, atol=3e-3) and src.read().buttons[:2] == (1, 0)
        ):
            time.sleep(0.01)
        s = src.read()
        np.testing.assert_allclose(s.axes, want, atol=3e-3)  # 1/350 quantisation of the HID axes
        assert s.buttons[:2] == (1, 0)
        hid.plugged = False  # unplugged: the readings go stale and read as hands off
        time.sleep(0.7)
        assert not np.any(src.read().axes) and src.error
    finally:
        src.close()


def test_deadzone_is_continuous_and_saturates() -> None:
    a = apply_deadzone(np.array([0.05, -0.05, 0.08, 0.54, -1.0, 2.0]), 0.08)
    np.testing.assert_allclose(a, [0, 0, 0, 0.5, -1.0, 1.0], atol=1e-9)


def _core(steps, **cfg) -> tuple[TeleopCore, RecordingArm]:
    arm = RecordingArm()
    return TeleopCore(arm, ScriptedInput(steps), TeleopConfig(**cfg)), arm


def test_base_frame_translation_integrates_at_the_configured_speed() -> None:
    core, arm = _core([([1, 0, 0, 0, 0, 0], ())] * 10, max_speed=0.2, device_yaw_deg=90)
    for k in range(10):
        r = core.tick(0.1 * k)
        assert r.refusal is None and r.moving
    # full deflection for 1 s at 0.2 m/s; device +x turned by 90 deg is base +y
    np.testing.assert_allclose(core.pose[:3, 3], [-0.5, 0.2, 0.3], atol=1e-9)
    np.testing.assert_allclose(arm.sent[-1][0][:3, 3], core.pose[:3, 3])


def test_tool_frame_rotation_and_translation_only_mode() -> None:
    steps = [([0, 0, 1, 0, 0, 1], ())] * 5
    core, _ = _core(steps, frame="tool", max_speed=0.1, max_angular_speed=1.0)
    start = core.pose.copy()
    start_R = Rotation.from_matrix(start[:3, :3])
    core.pose[:3, :3] = Rotation.from_euler("x", 180, degrees=True).as_matrix()  # tool z points down
    for k in range(5):
        core.tick(0.1 * k)
    assert core.pose[2, 3] == pytest.approx(0.3 - 0.05)  # +z in the tool frame is down in the base
    yaw = Rotation.from_matrix(core.pose[:3, :3]).as_euler("xyz")[2]
    assert abs(abs(yaw) - 0.5) < 1e-6  # 1 rad/s for 0.5 s about the tool z
    core2, _ = _core([([0, 0, 0, 1, 1, 1], ())] * 3, translation_only=True)
    for k in range(3):
        core2.tick(0.1 * k)
    assert Rotation.from_matrix(core2.pose[:3, :3]).approx_equal(start_R)


def test_buttons_gripper_toggle_ramps_and_record_press_long_press() -> None:
    idle = ([0] * 6, (0, 0))
    steps = [([0] * 6, (1, 0)), idle, *[idle] * 6, ([0] * 6, (0, 1)), idle]  # gripper click, record click
    steps += [([0] * 6, (0, 1))] * 12 + [idle]  # a long press on record
    core, _ = _core(steps, gripper_speed=0.15, long_press_s=1.0)
    events, grips = [], []
    for k in range(len(steps)):
        r = core.tick(0.1 * k)
        events += [(k, e) for e in r.events]
        grips.append(core.gripper)
    assert events[0] == (0, "gripper")
    assert (9, "record") in events  # on release
    assert [e for _, e in events].count("record") == 1 and any(e == "discard" for _, e in events)
    # the commanded opening closes at 0.15 m/s: 0.015 m per tick, 0.085 -> 0 in 6 ticks
    np.testing.assert_allclose(grips[:7], [0.07, 0.055, 0.04, 0.025, 0.01, 0.0, 0.0], atol=1e-9)


def test_the_drivers_limits_refuse_a_target_leaving_the_workspace_and_the_twin_holds() -> None:
    from carp_sim.env import SimCell, SimConfig

    env = SimCell("cup", SimConfig(render=False))
    arm = TwinArm(env)
    arm.reset(0)
    core = TeleopCore(arm, ScriptedInput([([0, 0, -1, 0, 0, 0], ())] * 60), TeleopConfig(max_speed=0.2))
    refused = None
    for k in range(60):
        r = core.tick(0.1 * (k + 1))
        if r.refusal:
            refused = r
            break
    assert refused is not None and "workspace" in refused.refusal, refused
    z_min = SafetyLimits.load().workspace_min[2]
    assert core.pose[2, 3] >= z_min  # the target stays at the last accepted one
    assert arm.tcp_pose()[2, 3] >= z_min - 0.005  # the twin held above the limit
    env.close()


def test_keyboard_keys_become_axes_and_commands() -> None:
    kb = KeyboardInput(level=0.6, hold_s=0.2, listen=False)
    try:
        kb.feed("w")
        kb.feed(" ")
        s = kb.read()
        assert s.axes[0] == pytest.approx(0.6) and s.keys == ("record",)
        time.sleep(0.25)
        assert not np.any(kb.read().axes)
    finally:
        kb.close()


def test_teleop_drives_the_twin_through_its_limits() -> None:
    from carp_sim.env import SimCell, SimConfig

    env = SimCell("cup", SimConfig(render=False))
    arm = TwinArm(env)
    arm.reset(0)
    z0 = arm.tcp_pose()[2, 3]
    core = TeleopCore(arm, ScriptedInput([([0, 0, 1, 0, 0, 0], ())] * 5), TeleopConfig(max_speed=0.1))
    for k in range(5):
        assert core.tick(0.1 * (k + 1)).refusal is None
    env.hold(0.3)
    assert arm.tcp_pose()[2, 3] - z0 == pytest.approx(0.05, abs=0.004)  # 5 ticks at 0.1 m/s
    assert arm.tcp_buffer.latest().value.shape == (9,) and arm.gripper_buffer.latest().value.shape == (1,)
    env.close()


def test_teleop_drives_the_ur5e_driver_over_the_fake_ur_rtde() -> None:
    from carp_hardware import fake_rtde
    from carp_hardware.driver import ArmDriver, DriverConfig
    from carp_hardware.fake_rtde import FakeUR
    from carp_hardware.ur_rtde_arm import RtdeArm, RtdeConfig
    from carp_teleop.cell import DriverArm

    ur = FakeUR.create("fake-ur5e-teleop", np.array([0.0, -1.75, 1.85, -1.67, -1.5708, 0.0]))
    backend = RtdeArm(RtdeConfig(host="fake-ur5e-teleop"), factories=fake_rtde.FACTORIES)
    backend.connect()

    class Clock:
        def now(self) -> float:
            return ur.t

    drv = ArmDriver(backend, None, SafetyLimits(), DriverConfig(ik="local", blend_s=0.0), Clock())
    drv.enable()
    arm = DriverArm(drv, serial="UR-TEST", clock=lambda: ur.t)
    z0 = arm.tcp_pose()[2, 3]
    core = TeleopCore(arm, ScriptedInput([([0, 0, 1, 0, 0, 0], ())] * 5), TeleopConfig(max_speed=0.1))
    for _ in range(5):
        assert core.tick(ur.t).refusal is None
        drv.run_for(0.1)  # the servo loop (a thread on the cell)
    drv.run_for(0.3)
    arm.publish()
    assert arm.tcp_pose()[2, 3] - z0 == pytest.approx(0.05, abs=0.005)
    assert arm.tcp_buffer.latest().value.shape == (9,)
    # a target outside the driver's workspace is refused, with its reason
    far = arm.tcp_pose()
    far[2, 3] = -0.2
    assert "workspace" in arm.command(far, 0.0, ur.t)
