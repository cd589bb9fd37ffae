"""policy_node as a real process: state messages over DDS in, a stamped chunk out, stale input refused."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")


def test_policy_node_publishes_stamped_chunks_and_refuses_stale_state(ros_env, stop):
    from geometry_msgs.msg import PoseStamped
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import JointState
    from trajectory_msgs.msg import MultiDOFJointTrajectory

    from carp_policy.messages import chunk_from_msg, pose_to_msg, time_to_msg
    from carp_sim.env import ENV_STATE_NAMES

    cmd = [sys.executable, "-m", "carp_policy.policy_node", "--ros-args", "-p", "model:=cup",
           "-p", "execute_steps:=1", "-p", "device:=cpu"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=ros_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("cell_stub", context=ctx)
    try:
        chunks = []
        node.create_subscription(
            MultiDOFJointTrajectory, "/policy/action_chunk", lambda m: chunks.append(chunk_from_msg(m)), 10
        )
        pub_pose = node.create_publisher(PoseStamped, "/ur5e/tcp_pose", 10)
        pub_grip = node.create_publisher(JointState, "/gripper/joint_states", 10)
        pub_env = node.create_publisher(JointState, "/sim/env_state", 10)
        ex = SingleThreadedExecutor(context=ctx)
        ex.add_node(node)
        pose = np.eye(4)
        pose[:3, :3] = np.diag([1.0, -1.0, -1.0])
        pose[:3, 3] = [-0.45, 0.1, 0.3]

        def publish_state(t: float) -> None:
            pub_pose.publish(pose_to_msg(pose, t))
            g = JointState(name=["gripper"], position=[0.085])
            g.header.stamp = time_to_msg(t)
            pub_grip.publish(g)
            e = JointState(name=list(ENV_STATE_NAMES), position=[-0.5, 0.1, 0.0, 0.0, 0.0, 1.0, -0.5, -0.2])
            e.header.stamp = time_to_msg(t)
            pub_env.publish(e)

        deadline = time.monotonic() + 60.0  # the node loads the model and discovers peers first
        while not chunks and time.monotonic() < deadline and proc.poll() is None:
            publish_state(time.time())
            ex.spin_once(timeout_sec=0.02)
        died = proc.stdout.read() if proc.poll() is not None else ""
        assert chunks, f"no chunk within 60 s; node output:\n{died}"
        c = chunks[-1]
        assert c.actions.shape == (16, 10) and c.dt == pytest.approx(0.1)
        assert abs(c.timestamp - time.time()) < 5.0  # stamped with the observation's (wall-clock) time
        # state stops arriving: within a few decisions every new observation is stale and refused
        n = len(chunks)
        t_end = time.monotonic() + 1.5
        while time.monotonic() < t_end:
            ex.spin_once(timeout_sec=0.05)
        late = len(chunks)
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:
            ex.spin_once(timeout_sec=0.05)
        assert len(chunks) == late, "chunks kept coming from stale state"
        assert late - n <= 3
    finally:
        out = stop(proc, timeout=15)
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    assert proc.returncode == 0, out
    assert "no chunk: stale stream" in out, out
