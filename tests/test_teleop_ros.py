"""Recording through the ROS 2 nodes of ``teleop_record``, as processes over DDS on localhost.

1. ``spacemouse_node`` (backend fake_hid): a script's deflections and buttons, through pyspacemouse's
   own HID parser, come out on ``/spacemouse/joy``.
2. The twin's driver node, ``teleop_node`` and ``recorder_node``, started from the launch's own node
   set: the test is the SpaceMouse (Joy messages). An episode started by ``/recorder/start``, the
   arm moved along +y by the operator's deflection, saved by the record button; a refused pose
   command restarts the teleop target from the measured pose; a second episode discarded by
   service; the dataset validates and holds the one episode, with the motion in it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytestmark = pytest.mark.slow


def _episodes(data) -> int:
    info = data / "meta" / "info.json"
    return int(json.loads(info.read_text()).get("total_episodes", 0)) if info.exists() else 0


def _start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class _Observer:
    """An rclpy node of the test's own, in its own context."""

    def __init__(self, name: str) -> None:
        from rclpy.executors import SingleThreadedExecutor

        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx)
        self.node = rclpy.create_node(name, context=self.ctx)
        self.ex = SingleThreadedExecutor(context=self.ctx)
        self.ex.add_node(self.node)

    def spin(self, seconds: float, until=None, every=None) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if every is not None:
                every()
            self.ex.spin_once(timeout_sec=0.02)
            if until is not None and until():
                return True
        return until is None

    def call(self, client, timeout: float = 10.0):
        from std_srvs.srv import Trigger

        if not client.wait_for_service(timeout_sec=timeout):
            return None
        future = client.call_async(Trigger.Request())
        self.spin(timeout, until=future.done)
        return future.result()

    def close(self) -> None:
        self.node.destroy_node()
        rclpy.shutdown(context=self.ctx)


def test_spacemouse_node_publishes_the_devices_readings_as_joy(tmp_path, ros_env, stop):
    from sensor_msgs.msg import Joy

    from carp_bringup import nodeset
    from carp_bringup.launcher import node_command

    script = tmp_path / "script.json"
    script.write_text(
        json.dumps([[3.0, [0.5, 0, -0.25, 0, 0, 0.75], [1, 0]], [60.0, [0, 0, 0, 0, 0, 0], [0, 0]]])
    )
    env = {**ros_env, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    ns = nodeset.load("teleop_record")
    values = ns.resolve({"spacemouse": "fake_hid", "spacemouse_script": str(script), "operator": "t"})
    node = next(n for n in ns.active_nodes(values) if n.name == "spacemouse_node")
    proc = _start(node_command(ns, node, values), env)
    obs = _Observer("joy_observer")
    joys: list[tuple[np.ndarray, tuple[int, ...]]] = []
    obs.node.create_subscription(
        Joy, "/spacemouse/joy", lambda m: joys.append((np.array(m.axes), tuple(m.buttons))), 50
    )
    try:
        got = obs.spin(60.0, until=lambda: any(a.any() for a, _ in joys) and not joys[-1][0].any())
    finally:
        out = stop(proc)
        obs.close()
    assert got and proc.returncode == 0, out[-3000:]
    first = [(a, b) for a, b in joys if a.any()]
    assert first, f"no deflection seen in {len(joys)} messages"
    # pyspacemouse's parser turns the fake's 16-bit reports back into the scripted deflection
    np.testing.assert_allclose(first[0][0], [0.5, 0, -0.25, 0, 0, 0.75], atol=5e-3)
    assert first[0][1][:2] == (1, 0)
    assert not joys[-1][0].any() and joys[-1][1][:2] == (0, 0)


def test_teleop_and_recorder_nodes_record_an_episode_from_the_spacemouse(tmp_path, ros_env, stop):
    from geometry_msgs.msg import PoseStamped
    from sensor_msgs.msg import Joy
    from std_msgs.msg import String
    from std_srvs.srv import Trigger
    from trajectory_msgs.msg import MultiDOFJointTrajectory

    from carp_bringup import nodeset
    from carp_bringup.launcher import node_command
    from carp_policy.dataset import EpisodeDataset
    from carp_policy.dataset.validate import validate_dataset
    from carp_policy.messages import joy_to_msg, target_from_msg, target_to_msg

    data = tmp_path / "data"
    config = (
        tmp_path / "recorder.yaml"
    )  # a loaded CI machine delivers frames late: the carp-record test's bounds
    config.write_text("max_frame_age: 0.4\nmax_skew: 0.4\n")
    env = {**ros_env, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    ns = nodeset.load("teleop_record")
    values = ns.resolve({"use_sim": "true", "out": str(data), "operator": "tester", "seed": "3",
                         "sim_camera_fps": "15.0", "config": str(config)})  # fmt: skip
    nodes = {n.name: n for n in ns.active_nodes(values)}
    assert set(nodes) == {"ur5e_driver", "spacemouse_node", "teleop_node", "recorder_node"}
    procs = {
        k: _start(node_command(ns, nodes[k], values), env)
        for k in ("ur5e_driver", "teleop_node", "recorder_node")
    }
    obs = _Observer("teleop_test")
    tcp, cmds, refusals = [], [], []
    obs.node.create_subscription(PoseStamped, "/ur5e/tcp_pose", lambda m: tcp.append(m.pose.position.y), 50)
    obs.node.create_subscription(
        MultiDOFJointTrajectory, "/ur5e/pose_cmd", lambda m: cmds.append(target_from_msg(m)[0]), 50
    )
    obs.node.create_subscription(String, "/ur5e/refusals", lambda m: refusals.append(m.data), 10)
    joy = obs.node.create_publisher(Joy, "/spacemouse/joy", 10)
    bad_cmd = obs.node.create_publisher(MultiDOFJointTrajectory, "/ur5e/pose_cmd", 10)
    start, save, discard = (
        obs.node.create_client(Trigger, f"/recorder/{s}") for s in ("start", "save", "discard")
    )
    now = lambda: obs.node.get_clock().now().nanoseconds * 1e-9  # noqa: E731

    def device(axes, buttons=(0, 0)):
        return lambda: joy.publish(joy_to_msg(np.asarray(axes, float), buttons, now()))

    logs: dict[str, str] = {}
    try:
        # 1. the recorder starts once every stream is live (the twin needs a few seconds)
        res, deadline = None, time.monotonic() + 120.0
        while time.monotonic() < deadline and not (res is not None and res.success):
            obs.spin(0.5, every=device(np.zeros(6)))
            res = obs.call(start)
            assert all(p.poll() is None for p in procs.values()), "a node died"
        assert res is not None and res.success, f"/recorder/start never succeeded: {res and res.message}"
        # the test's own subscriptions may match after the recorder's: wait for both streams here
        assert obs.spin(10.0, until=lambda: tcp and cmds, every=device(np.zeros(6))), (
            f"the test saw {len(tcp)} TCP poses and {len(cmds)} pose commands"
        )
        # 2. the operator pushes +y for 2 s, lets go, and clicks the record button: saved
        y0 = tcp[-1]
        obs.spin(2.0, every=device([0, 0.6, 0, 0, 0, 0]))
        obs.spin(0.5, every=device(np.zeros(6)))
        moved = tcp[-1] - y0
        obs.spin(0.4, every=device(np.zeros(6), (0, 1)))
        obs.spin(0.6, every=device(np.zeros(6)))
        saved = obs.spin(15.0, until=lambda: _episodes(data) == 1, every=device(np.zeros(6)))
        assert saved, "the record button did not save the episode"
        assert moved > 0.05, f"the arm moved {moved * 1e3:.0f} mm along y for the operator's 2 s push"
        # 3. a pose command outside the workspace is refused, and the teleop continues from the arm
        far = np.r_[cmds[-1][:2], -0.5, cmds[-1][3:]]
        n_cmd = len(cmds)
        bad_cmd.publish(target_to_msg(far, now()))
        assert obs.spin(5.0, until=lambda: refusals, every=device(np.zeros(6))), (
            "no refusal on /ur5e/refusals"
        )
        assert "pose command refused" in refusals[0]
        obs.spin(1.0, every=device(np.zeros(6)))
        assert len(cmds) > n_cmd + 3 and abs(cmds[-1][2] + 0.5) > 0.3  # still commanding, not from z = -0.5
        # 4. a second episode, discarded by service; saving without one is refused with a reason
        assert obs.call(start).success
        obs.spin(1.0, every=device(np.zeros(6)))
        assert obs.call(discard).success
        r = obs.call(save)
        assert not r.success and r.message == "not recording"
    except AssertionError as e:
        logs = {k: stop(p)[-2500:] for k, p in procs.items()}
        raise AssertionError(f"{e}\n" + "\n".join(f"--- {k}:\n{v}" for k, v in logs.items())) from None
    finally:
        logs = logs or {k: stop(p) for k, p in procs.items()}
        obs.close()
    assert all(p.returncode == 0 for p in procs.values()), {k: v[-2000:] for k, v in logs.items()}
    report = validate_dataset(data)
    assert report.ok, report
    ds = EpisodeDataset(data)
    assert len(ds) == 1
    ep, meta = ds.episode(0), ds.metadata(0)
    assert meta["operator"] == "tester" and meta["input"] == "ros" and meta["sim"] is True
    assert meta["seed"] == 3 and "twin_success" in meta
    assert len(ep.state) >= 20  # 10 Hz for the > 3 s between start and the save
    assert np.ptp(ep.state[:, 1]) > 0.05 and np.ptp(ep.action[:, 1]) > 0.05  # y moved, in state and action
    assert set(ep.images) == {"wrist", "scene"} and ep.images["scene"].shape[1:] == (120, 160, 3)
