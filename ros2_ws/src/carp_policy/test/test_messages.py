"""Contract <-> ROS 2 message conversions, and a chunk over real DDS between two rclpy nodes."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from carp_policy.actions import ActionChunk, matrix_to_rot6d, rotation_error_deg
from carp_policy.messages import (
    chunk_from_msg,
    chunk_to_msg,
    image_from_msg,
    image_to_msg,
    pose_from_msg,
    pose_to_msg,
    time_from_msg,
    time_ns_from_msg,
    time_to_msg,
)

EPOCH_NS = 1_800_000_000_123_456_789  # a wall-clock time with nanoseconds that a float32 would lose


def _chunk(t: float = 1.8e9 + 0.25, H: int = 16) -> ActionChunk:
    rng = np.random.default_rng(0)
    from scipy.spatial.transform import Rotation

    rots = Rotation.from_rotvec(rng.normal(size=(H, 3)) * 0.5).as_matrix()
    pos, grip = rng.uniform(-0.6, 0.6, (H, 3)), rng.uniform(0, 0.085, (H, 1))
    a = np.concatenate([pos, matrix_to_rot6d(rots), grip], 1)
    return ActionChunk(a, timestamp=t, dt=0.1)


def test_chunk_round_trips_through_multidof_trajectory():
    c = _chunk()
    msg = chunk_to_msg(c)
    assert list(msg.joint_names) == ["tcp", "gripper"] and len(msg.points) == 16
    assert msg.points[3].time_from_start.sec == 0 and msg.points[3].time_from_start.nanosec == 400_000_000
    assert msg.points[0].transforms[1].translation.x == pytest.approx(c.gripper[0])
    back = chunk_from_msg(msg)
    np.testing.assert_allclose(back.positions, c.positions, atol=1e-12)
    np.testing.assert_allclose(back.gripper, c.gripper, atol=1e-12)
    assert rotation_error_deg(back.actions[:, 3:9], c.actions[:, 3:9]).max() < 1e-6
    assert back.dt == pytest.approx(0.1, abs=1e-9)
    assert back.timestamp == pytest.approx(c.timestamp, abs=1e-6)  # float64 seconds at epoch scale


def test_times_keep_nanoseconds():
    msg = time_to_msg(EPOCH_NS, ns=True)
    assert time_ns_from_msg(msg) == EPOCH_NS
    assert abs(time_from_msg(msg) - EPOCH_NS * 1e-9) < 1e-6
    with pytest.raises(ValueError, match="negative"):
        time_to_msg(-1.0)


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda m: setattr(m, "joint_names", ["tcp"]), "joint_names"),
        (lambda m: setattr(m, "points", []), "no points"),
        (lambda m: setattr(m.points[2], "transforms", m.points[2].transforms[:1]), "2 .tcp, gripper."),
        (lambda m: setattr(m.points[1].transforms[0].rotation, "w", 3.0), "unit quaternion"),
        (lambda m: setattr(m.points[5].time_from_start, "nanosec", 1), "step times"),
        (lambda m: setattr(m.points[0].transforms[0].translation, "x", float("nan")), "non-finite"),
    ],
)
def test_malformed_chunks_are_refused_with_the_reason(corrupt, match):
    msg = chunk_to_msg(_chunk())
    corrupt(msg)
    with pytest.raises(ValueError, match=match):
        chunk_from_msg(msg)


def test_pose_and_image_round_trip_and_refusals():
    from scipy.spatial.transform import Rotation

    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_rotvec([0.1, -2.0, 0.3]).as_matrix()
    pose[:3, 3] = [-0.4, 0.1, 0.3]
    back, t = pose_from_msg(pose_to_msg(pose, 12.5))
    np.testing.assert_allclose(back, pose, atol=1e-12)
    assert t == 12.5
    bad = pose_to_msg(pose, 0.0)
    bad.pose.position.x = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        pose_from_msg(bad)
    img = np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    out, t = image_from_msg(image_to_msg(img, 3.25, "wrist"))
    assert np.array_equal(out, img) and t == 3.25
    msg = image_to_msg(img, 0.0, "wrist")
    msg.encoding = "bgr8"
    assert np.array_equal(image_from_msg(msg)[0], img[..., ::-1])
    msg.encoding = "mono16"
    with pytest.raises(ValueError, match="encoding"):
        image_from_msg(msg)
    with pytest.raises(ValueError, match="uint8"):
        image_to_msg(img.astype(np.float32), 0.0, "wrist")


def test_teleop_target_and_spacemouse_joy_round_trip_and_refusals():
    from carp_policy.messages import joy_from_msg, joy_to_msg, target_from_msg, target_to_msg

    a = np.r_[0.4, -0.1, 0.3, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.042]
    back, t = target_from_msg(target_to_msg(a, 1796.25))
    np.testing.assert_allclose(back, a, atol=1e-9)
    assert t == 1796.25
    two = target_to_msg(a, 1.0)
    two.points.append(two.points[0])
    with pytest.raises(ValueError, match="exactly one point"):
        target_from_msg(two)
    axes, buttons, t = joy_from_msg(joy_to_msg(np.array([0.5, 0, -1, 0, 0.25, 0]), (1, 0), 12.5))
    np.testing.assert_allclose(axes, [0.5, 0, -1, 0, 0.25, 0], atol=1e-7)  # Joy axes are float32
    assert buttons == (1, 0) and t == 12.5
    with pytest.raises(ValueError, match="6 finite axes"):
        joy_to_msg(np.array([np.nan, 0, 0, 0, 0, 0]), (), 0.0)
    bad = joy_to_msg(np.zeros(6), (), 0.0)
    bad.axes = [0.0] * 3
    with pytest.raises(ValueError, match="6 finite axes"):
        joy_from_msg(bad)


def test_a_chunk_crosses_real_dds_between_two_nodes():
    """rclpy over Fast DDS on localhost: what the policy node publishes is what the driver reads."""
    os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 100)  # no cross-talk between test runs
    rclpy = pytest.importorskip("rclpy")
    from rclpy.executors import SingleThreadedExecutor
    from trajectory_msgs.msg import MultiDOFJointTrajectory

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        pub_node = rclpy.create_node("chunk_pub", context=ctx)
        sub_node = rclpy.create_node("chunk_sub", context=ctx)
        got: list[ActionChunk] = []
        sub_node.create_subscription(
            MultiDOFJointTrajectory, "/policy/action_chunk", lambda m: got.append(chunk_from_msg(m)), 10
        )
        pub = pub_node.create_publisher(MultiDOFJointTrajectory, "/policy/action_chunk", 10)
        ex = SingleThreadedExecutor(context=ctx)
        ex.add_node(pub_node)
        ex.add_node(sub_node)
        c = _chunk()
        deadline = time.monotonic() + 20.0
        while not got and time.monotonic() < deadline:
            pub.publish(chunk_to_msg(c))
            ex.spin_once(timeout_sec=0.1)
        assert got, "no chunk arrived over DDS within 20 s"
        np.testing.assert_allclose(got[0].actions[:, :3], c.actions[:, :3], atol=1e-12)
        assert got[0].timestamp == pytest.approx(c.timestamp, abs=1e-6)
        ex.shutdown()
        pub_node.destroy_node()
        sub_node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)
