"""The twin's cup task through the ROS 2 nodes, as processes over DDS on localhost.

driver node (the twin as its backend) -> /ur5e/tcp_pose, /gripper/joint_states, /sim/env_state ->
policy node (the released model) -> /policy/action_chunk -> driver node -> the twin's joints.
The success rate through ROS is measured by benchmarks/ros_task.py (20 trials); this test checks
that the loop closes (chunks accepted, the arm reaches the cup) and that a policy node that dies
leaves the arm stopped by the driver's watchdog.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytestmark = pytest.mark.slow


def _node(module: str, env: dict, *params: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", module, "--ros-args", *[x for p in params for x in ("-p", p)]]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_cup_task_through_ros_topics_and_the_watchdog_when_the_policy_dies(ros_env, stop):
    env = ros_env
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseStamped
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import JointState

    sim = ("backend:=sim", "task:=cup", "seed:=10000", "camera_fps:=0.0")
    driver = _node("carp_hardware.driver_node", env, *sim)
    policy = _node("carp_policy.policy_node", env, "model:=cup", "device:=cpu")
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("e2e_observer", context=ctx)
    tcp, env_state, diag = [], [], {}

    def on_diag(m) -> None:
        for st in m.status:
            if st.name == "ur5e_driver":
                diag.update({v.key: json.loads(v.value) for v in st.values})

    def on_tcp(m) -> None:
        p = m.pose.position
        tcp.append((time.monotonic(), np.array([p.x, p.y, p.z])))

    node.create_subscription(PoseStamped, "/ur5e/tcp_pose", on_tcp, 50)
    def on_env(m) -> None:
        env_state.append(np.array(m.position))

    node.create_subscription(JointState, "/sim/env_state", on_env, 10)
    node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    outs: dict[str, str] = {}
    try:
        _closed_loop_then_watchdog(ex, driver, policy, tcp, env_state, diag, outs, stop)
    except AssertionError as e:  # say what the nodes said
        nodes = (("driver", driver), ("policy", policy))
        logs = {name: stop(p)[-3000:] for name, p in nodes if p.poll() is None}
        raise AssertionError(f"{e}\n" + "\n".join(f"--- {k}:\n{v}" for k, v in logs.items())) from None
    finally:
        outs["driver"] = outs.get("driver") or stop(driver)
        if policy.poll() is None:
            outs["policy"] = stop(policy)
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    assert driver.returncode == 0, outs["driver"]


def _closed_loop_then_watchdog(ex, driver, policy, tcp, env_state, diag, outs, stop) -> None:
    """1. the loop closes; 2. a killed policy node leaves the arm stopped by the watchdog."""
    # 1. the loop closes: chunks accepted and the TCP comes within 3 cm (xy) of the cup
    deadline, start, closest = time.monotonic() + 90.0, None, np.inf
    while time.monotonic() < deadline and driver.poll() is None and policy.poll() is None:
        ex.spin_once(timeout_sec=0.05)
        if tcp and env_state:
            d = float(np.linalg.norm(tcp[-1][1][:2] - env_state[-1][:2]))
            start = d if start is None else start
            closest = min(closest, d)
            if closest < 0.03 and diag.get("chunks_accepted", 0) >= 3:
                break
    assert driver.poll() is None and policy.poll() is None, "a node died"
    assert diag.get("chunks_accepted", 0) >= 3, diag
    assert closest < 0.03, f"the TCP came no closer than {closest * 1e3:.0f} mm to the cup (from {start})"
    # 2. the policy node dies: no more chunks, the driver's watchdog stops the arm
    stops_before = diag.get("stops", {}).get("watchdog", 0)
    policy.kill()
    outs["policy"] = stop(policy)
    t_kill, stopped = time.monotonic(), False
    while time.monotonic() < t_kill + 10.0:
        ex.spin_once(timeout_sec=0.05)
        if diag.get("state") == "stopped" and diag.get("stops", {}).get("watchdog", 0) > stops_before:
            stopped = True
            break
    assert stopped, f"the driver did not stop on its watchdog: {diag}"
    n = len(tcp)
    t_end = time.monotonic() + 1.5
    while time.monotonic() < t_end:
        ex.spin_once(timeout_sec=0.05)
    moved = np.linalg.norm(tcp[-1][1] - tcp[n - 1][1])
    assert moved < 2e-3, f"the arm moved {moved * 1e3:.1f} mm after the watchdog stop"
