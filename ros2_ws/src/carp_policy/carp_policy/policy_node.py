"""``policy_node``: the rclpy shell around ``carp_policy.runner.PolicyRunner``.

Subscribes (DESIGN topics): ``/cameras/<cam>/image_raw`` (sensor_msgs/Image, rgb8; only the cameras
the model reads), ``/ur5e/tcp_pose`` (geometry_msgs/PoseStamped), ``/gripper/joint_states``
(sensor_msgs/JointState, position[0] = opening in m) and, for twin-only state models,
``/sim/env_state`` (sensor_msgs/JointState named by ``carp_sim.env.ENV_STATE_NAMES``). Every message's
header stamp is its capture time. Publishes ``/policy/action_chunk``
(trajectory_msgs/MultiDOFJointTrajectory, stamped with the observation time), ``/policy/path``
(nav_msgs/Path of the chunk's TCP positions, for RViz) and ``/diagnostics``.

Parameters: ``model`` (an exported model directory or a released model name), ``device``
(auto | cpu | cuda), ``execute_steps`` (a decision every execute_steps * dt; 0: the model's own
setting), ``max_age`` / ``max_skew`` (s, the aligner's refusal limits), ``ort_spin`` (onnxruntime's
pool threads busy-wait between chunks; off by default: on the robot PC the node shares the CPU with
the servo process and the cameras, ``engine.OnnxPolicy``), ``task`` (a multi-task model: the task
it runs, which selects its task embedding; empty for a single-task model). The control period, the
observation layout and the cameras come from the model's contract (its manifest).
Decisions run in a thread of their own (``messages.Periodic``), so the executor keeps filling the
buffers from the subscriptions while the model computes.
"""

from __future__ import annotations

import sys

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import Path
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from trajectory_msgs.msg import MultiDOFJointTrajectory

from carp_policy import load_policy
from carp_policy.actions import AlignerConfig, matrix_to_rot6d
from carp_policy.cli import resolve_device
from carp_policy.messages import (
    Periodic,
    chunk_to_msg,
    image_from_msg,
    pose_from_msg,
    spin_node,
    time_from_msg,
    time_to_msg,
)
from carp_policy.runner import PolicyRunner


class PolicyNode(Node):
    """The policy behind ROS topics (module docstring)."""

    def __init__(self) -> None:
        super().__init__("policy_node")
        p = {
            "model": "cup",
            "device": "auto",
            "execute_steps": 0,
            "max_age": 0.1,
            "max_skew": 0.05,
            "ort_spin": False,
            "task": "",  # a multi-task model: the task it runs (selects its embedding)
        }
        for k, v in p.items():
            self.declare_parameter(k, v, ParameterDescriptor(dynamic_typing=True))
        get = lambda k: self.get_parameter(k).value  # noqa: E731
        policy = load_policy(
            get("model"),
            device=resolve_device(get("device"), "onnxruntime"),
            spin=bool(get("ort_spin")),
            task=str(get("task")) or None,
        )
        self.runner = PolicyRunner(
            policy,
            AlignerConfig(max_age=float(get("max_age")), max_skew=float(get("max_skew"))),
            clock=lambda: self.get_clock().now().nanoseconds * 1e-9,
        )
        dt = self.runner.config.dt  # the model's control period (its contract)
        # state topics come at the driver's rate (100-500 Hz): keep only the newest few, so a node
        # that falls behind drops old samples instead of working through a backlog (its buffers
        # keep the history the aligner needs)
        latest = 5
        self.create_subscription(PoseStamped, "/ur5e/tcp_pose", self._on_pose, latest)
        self.create_subscription(JointState, "/gripper/joint_states", self._on_gripper, latest)
        self.create_subscription(JointState, "/sim/env_state", self._on_env, latest)
        for cam in policy.cameras:
            on_frame = lambda m, c=cam: self._on_image(c, m)  # noqa: E731
            self.create_subscription(Image, f"/cameras/{cam}/image_raw", on_frame, qos_profile_sensor_data)
        self.pub_chunk = self.create_publisher(MultiDOFJointTrajectory, "/policy/action_chunk", 10)
        self.pub_path = self.create_publisher(Path, "/policy/path", 10)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        period = dt * (int(get("execute_steps")) or int(policy.contract["execute_steps"]))
        self.create_timer(1.0, self._diagnostics)
        self._decisions = Periodic(period, self._decide, "decide", self._decide_error).start()
        self.get_logger().info(
            f"policy {get('model')} (cameras {list(policy.cameras) or 'none'}, obs horizon "
            f"{policy.obs_horizon}, {policy.obs_stride * dt:.1f} s apart), a decision every {period:.2f} s"
        )

    def _push(self, fn, *args) -> None:
        try:
            fn(*args)
        except ValueError as e:  # a malformed message or time going backwards: dropped, logged
            self.get_logger().warning(f"input dropped: {e}", throttle_duration_sec=1.0)

    def _on_pose(self, msg) -> None:
        try:
            pose, t = pose_from_msg(msg)
        except ValueError as e:
            self.get_logger().warning(f"tcp pose dropped: {e}", throttle_duration_sec=1.0)
            return
        self._push(self.runner.push_tcp, t, np.r_[pose[:3, 3], matrix_to_rot6d(pose[:3, :3])])

    def _on_gripper(self, msg) -> None:
        if not msg.position:
            self.get_logger().warning("gripper joint state without a position", throttle_duration_sec=1.0)
            return
        self._push(self.runner.push_gripper, time_from_msg(msg.header.stamp), msg.position[0])

    def _on_env(self, msg) -> None:
        self._push(self.runner.push_env_state, time_from_msg(msg.header.stamp), np.asarray(msg.position))

    def _on_image(self, cam: str, msg) -> None:
        try:
            img, t = image_from_msg(msg)
        except ValueError as e:
            self.get_logger().warning(f"{cam} frame dropped: {e}", throttle_duration_sec=1.0)
            return
        self._push(self.runner.push_image, cam, t, img)

    def _decide(self) -> None:
        chunk, why = self.runner.decide()
        if chunk is None:
            self.get_logger().warning(f"no chunk: {why}", throttle_duration_sec=1.0)
            return
        self.pub_chunk.publish(chunk_to_msg(chunk))
        path = Path()
        path.header.stamp, path.header.frame_id = time_to_msg(chunk.timestamp), "base"
        for pos in chunk.positions:
            ps = PoseStamped()
            ps.header = path.header
            ps.pose.position.x, ps.pose.position.y, ps.pose.position.z = (float(v) for v in pos)
            ps.pose.orientation.w = 1.0
            path.poses.append(ps)
        self.pub_path.publish(path)

    def _decide_error(self, e: Exception) -> None:
        if self.context.ok():  # after shutdown a publish fails by design: not worth a line
            self.get_logger().error(f"decision failed: {type(e).__name__}: {e}", throttle_duration_sec=1.0)

    def destroy_node(self) -> None:
        self._decisions.stop()
        super().destroy_node()

    def _diagnostics(self) -> None:
        s = self.runner.stats.summary()
        st = DiagnosticStatus(name="policy_node", hardware_id="policy")
        st.level = DiagnosticStatus.OK if not s["last_refusal"] else DiagnosticStatus.WARN
        st.message = s["last_refusal"] or "ok"
        st.values = [KeyValue(key=k, value=str(v)) for k, v in s.items()]
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [st]
        self.pub_diag.publish(arr)


def main(argv: list[str] | None = None) -> int:
    """Run the node until Ctrl-C; a bad model or parameter is one line on stderr, exit 2."""
    return spin_node(PolicyNode, "policy_node", argv=argv)

if __name__ == "__main__":
    sys.exit(main())
