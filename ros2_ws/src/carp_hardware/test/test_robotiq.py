"""The Robotiq 2F-85 client against a URCap-like server on loopback (real sockets, 127.0.0.1)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from carp_hardware import fake_rtde
from carp_hardware.driver import ArmDriver, DriverConfig, DriverState
from carp_hardware.fake_robotiq import FakeURCapServer
from carp_hardware.fake_rtde import FakeUR
from carp_hardware.robotiq import Robotiq2F85, RobotiqConfig, RobotiqError
from carp_hardware.ur_rtde_arm import RtdeArm, RtdeConfig
from carp_policy.actions import ActionChunk, matrix_to_rot6d


@pytest.fixture
def server():
    with FakeURCapServer() as s:
        yield s


@pytest.fixture
def gripper(server):
    g = Robotiq2F85(RobotiqConfig(host="127.0.0.1", port=server.port, timeout_s=0.2, poll_hz=50,
                                  reconnect_s=0.05))  # fmt: skip
    g.connect()
    yield g
    g.close()


def wait_for(pred, timeout: float = 2.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_activation_sequence_and_move_to_a_calibrated_opening(server, gripper):
    assert server.received[:6] == ["GET STA", "SET ACT 0", "SET ATR 0", "GET STA", "GET OBJ", "GET FLT"]
    assert "SET ACT 1" in server.received and gripper.state().activated
    assert gripper.calibrate() == (3, 228)  # the end stops, not 0 and 255
    regs = gripper.move_blocking(0.04, speed=1.0, force=0.3)
    assert regs["OBJ"] == 3  # at the position, no object
    assert abs(gripper.to_opening(regs["PRE"]) - 0.04) < 0.085 / 225
    assert "SET POS 122 SPE 255 FOR 76 GTO 1" in server.received


def test_motion_ending_on_an_object_is_reported(server, gripper):
    gripper.calibrate()
    gripper.move_blocking(0.085)
    server.object_at = 150
    regs = gripper.move_blocking(0.0)
    assert regs["OBJ"] == 2 and regs["PRE"] == 150  # stopped while closing
    assert wait_for(lambda: gripper.state().object_detected)
    server.object_at = None


def test_a_gripper_fault_is_raised_and_reported(server, gripper):
    server.regs["FLT"] = 14
    with pytest.raises(RobotiqError, match="overcurrent"):
        gripper.move_blocking(0.0)
    assert wait_for(lambda: gripper.state().fault == "fault_14")
    assert gripper.command(0.02) is False  # the driver turns this into a fault


@pytest.mark.parametrize("fragment,coalesce", [(True, True), (True, False), (False, True)])
def test_fragmented_and_coalesced_replies(server, gripper, fragment, coalesce):
    server.fragment, server.coalesce = fragment, coalesce
    for _ in range(3):
        regs = gripper.get("STA", "OBJ", "FLT", "PRE")  # four replies per packet, cut every 3 bytes
        assert regs["STA"] == 3 and regs["FLT"] == 0
    gripper.set(spe=128)
    assert server.regs["SPE"] == 128


def test_dropped_connection_is_reported_then_reopened(server, gripper):
    server.drop_next = True
    assert wait_for(lambda: not gripper.state().connected)
    assert gripper.command(0.01) is False
    assert wait_for(lambda: gripper.state().connected) and server.connections == 2


def test_a_stalled_server_times_out_and_command_never_blocks(server, gripper):
    server.stall_s = 1.0  # 5x the read timeout
    time.sleep(0.05)
    t0 = time.perf_counter()
    gripper.command(0.03)
    assert time.perf_counter() - t0 < 0.005
    assert wait_for(lambda: not gripper.state().connected)
    assert wait_for(lambda: gripper.state().connected, timeout=3.0)
    assert gripper.errors >= 1


def test_fault_gripper_socket_dropped_mid_command(server, gripper):
    FakeUR.create("fake-ur5e")
    ur = FakeUR.get("fake-ur5e")
    arm = RtdeArm(RtdeConfig(host="fake-ur5e"), factories=fake_rtde.FACTORIES)
    arm.connect()
    drv = ArmDriver(
        arm, gripper, config=DriverConfig(ik="local"), clock=type("C", (), {"now": lambda s: ur.t})()
    )
    drv.enable()
    tcp = drv.status().tcp_cmd
    acts = np.zeros((16, 10))
    acts[:, :3] = tcp[:3, 3] + np.arange(1, 17)[:, None] * [-0.002, 0, 0]
    acts[:, 3:9] = matrix_to_rot6d(tcp[:3, :3])
    acts[:, 9] = 0.0  # close the gripper
    assert drv.submit_chunk(ActionChunk(acts, timestamp=ur.t)).accepted
    drv.run_for(0.05)
    assert wait_for(lambda: any(x.startswith("SET POS") for x in server.received))
    server.drop_next = True
    assert wait_for(lambda: not gripper.state().connected)
    n = len(ur.calls)
    drv.run_for(0.05)
    assert drv.state is DriverState.FAULT and drv.reason.startswith("gripper_connection_lost")
    names = ur.names()[n:]
    assert "servoStop" in names and "servoJ" not in names
