"""ur5e_driver_node on the robot's path (the servo process, ur_rtde's calls) over the scripted fake
controller (``backend:=fake_rtde``), as a real process over DDS: the arm waits for /ur5e/enable, a
chunk on /policy/action_chunk moves it, and a node killed with SIGKILL leaves no servo process
behind (it stops the arm when its parent's pipe closes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")


def _servo_processes(pid: int) -> list[int]:
    """The spawned children of ``pid`` (multiprocessing's resource tracker is not one of them)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    kids = [int(x) for x in out.split()]
    return [k for k in kids if b"spawn_main" in open(f"/proc/{k}/cmdline", "rb").read()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its dead parent's reaper) counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_driver_node_streams_chunks_through_its_servo_process(ros_env) -> None:
    env = ros_env
    from geometry_msgs.msg import PoseStamped
    from rclpy.executors import SingleThreadedExecutor
    from std_srvs.srv import Trigger
    from trajectory_msgs.msg import MultiDOFJointTrajectory

    from carp_policy.actions import ActionChunk, matrix_to_rot6d
    from carp_policy.messages import chunk_to_msg, pose_from_msg

    cmd = [sys.executable, "-m", "carp_hardware.driver_node", "--ros-args", "-p", "backend:=fake_rtde",
           "-p", "servo_hz:=125.0"]  # fmt: skip
    node_proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("driver_node_test", context=ctx)
    poses: list[tuple[np.ndarray, float]] = []
    node.create_subscription(PoseStamped, "/ur5e/tcp_pose", lambda m: poses.append(pose_from_msg(m)), 50)
    pub = node.create_publisher(MultiDOFJointTrajectory, "/policy/action_chunk", 10)
    enable = node.create_client(Trigger, "/ur5e/enable")
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)

    def spin(seconds: float, until=lambda: False) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not until() and node_proc.poll() is None:
            ex.spin_once(timeout_sec=0.05)

    try:
        spin(60.0, lambda: len(poses) > 5)
        assert poses, "no TCP pose from the driver node"
        servo = _servo_processes(node_proc.pid)
        assert len(servo) == 1, f"expected one servo process under the node, got {servo}"
        assert enable.wait_for_service(timeout_sec=10.0)
        fut = enable.call_async(Trigger.Request())
        spin(10.0, fut.done)
        assert fut.done() and fut.result().success, fut.result()
        tcp = poses[-1][0]
        acts = np.zeros((16, 10))
        acts[:, :3] = tcp[:3, 3] + np.outer(np.linspace(0.02 / 16, 0.02, 16), [0.0, 1.0, 0.0])
        acts[:, 3:9] = matrix_to_rot6d(tcp[:3, :3])
        acts[:, 9] = 0.085
        pub.publish(chunk_to_msg(ActionChunk(acts, timestamp=time.time())))
        spin(1.5)
        moved = poses[-1][0][1, 3] - tcp[1, 3]
        assert moved == pytest.approx(0.01, abs=0.004), moved  # 8 of 16 steps executed: 1 of 2 cm
        # the node dies without a word: its servo process stops the arm and exits
        node_proc.send_signal(signal.SIGKILL)
        node_proc.wait(10)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and _alive(servo[0]):
            time.sleep(0.05)
        assert not _alive(servo[0]), "the servo process outlived the driver node"
        out = node_proc.stdout.read()
        assert "the driver node is gone: arm stopped" in out, out
    finally:
        if node_proc.poll() is None:
            node_proc.kill()
        node.destroy_node()
        rclpy.shutdown(context=ctx)
