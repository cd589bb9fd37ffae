"""Node sets, the launch files under the real launch library, and carp-launch supervising processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from carp_bringup import nodeset
from carp_bringup.launcher import node_command

SHIPPED = ("cup_task", "bowl_task", "teleop_record")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_node_sets_load_and_pick_their_nodes(name):
    ns = nodeset.load(name)
    assert all(a.description for a in ns.arguments)
    sim = [n.name for n in ns.active_nodes(ns.resolve({"use_sim": "true"}))]
    robot = [n.name for n in ns.active_nodes(ns.resolve({"use_sim": "false"}))]
    assert "ur5e_driver" in sim and "ur5e_driver" in robot
    assert "wrist_camera" in robot and "wrist_camera" not in sim  # the twin renders the cameras
    driver = next(n for n in ns.active_nodes(ns.resolve({"use_sim": "true"})) if n.name == "ur5e_driver")
    assert ns.parameters(driver, ns.resolve({"use_sim": "true", "seed": "7"}))["seed"] == "7"


def test_node_set_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("arguments: {}\nnodes:\n  - {name: a, package: p, executable: e, paramters: {}}\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['paramters'\]"):
        nodeset.load(bad)
    bad.write_text("nodes:\n  - {name: a, package: p, executable: e, parameters: {x: '${nope}'}}\n")
    with pytest.raises(ValueError, match=r"undeclared argument\(s\) \['nope'\]"):
        nodeset.load(bad)
    with pytest.raises(FileNotFoundError, match="no node set 'nothing'"):
        nodeset.load("nothing")
    with pytest.raises(ValueError, match="unknown launch argument 'robotip'"):
        nodeset.load("cup_task").resolve({"robotip": "1.2.3.4"})


def test_node_command_carries_name_and_parameters():
    ns = nodeset.load("cup_task")
    values = ns.resolve({"use_sim": "true", "model": "bowl"})
    policy = next(n for n in ns.active_nodes(values) if n.name == "policy_node")
    cmd = node_command(ns, policy, values)
    assert cmd[0] == sys.executable and "carp_policy.policy_node" in cmd[2]
    assert cmd[cmd.index("--ros-args") + 1 :][:2] == ["-r", "__node:=policy_node"]
    assert "model:=bowl" in cmd and "execute_steps:=8" in cmd


def test_launch_files_build_under_the_real_launch_library():
    pytest.importorskip("launch_ros", reason="no ROS 2 launch system here (../shared/ros2-launch)")
    import importlib.util

    from launch.actions import DeclareLaunchArgument
    from launch_ros.actions import Node

    launch_dir = Path(nodeset.__file__).resolve().parents[1] / "launch"
    for name in SHIPPED:
        spec = importlib.util.spec_from_file_location(name, launch_dir / f"{name}.launch.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        ld = mod.generate_launch_description()
        declared = {e.name for e in ld.entities if isinstance(e, DeclareLaunchArgument)}
        assert {"use_sim"} <= declared
        assert len([e for e in ld.entities if isinstance(e, Node)]) == len(nodeset.load(name).nodes)


def test_carp_launch_stops_every_node_when_one_fails(tmp_path, ros_env):
    """A node that dies (here: a model that does not exist) brings the set down with its exit code."""
    ns = tmp_path / "two.yaml"
    ns.write_text(
        "arguments:\n  model: {default: cup, description: the model}\n"
        "nodes:\n"
        "  - {name: good, package: carp_policy, executable: policy_node, parameters: {model: cup}}\n"
        "  - {name: bad, package: carp_policy, executable: policy_node, parameters: {model: '${model}'}}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "carp_bringup.launcher", str(ns), "model:=/no/such/model"],
        env=ros_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert "[bad] policy_node: error: no policy at '/no/such/model'" in out.stdout, out.stdout
    assert "bad exited with code 2; stopping the rest" in out.stdout


def test_carp_launch_exits_cleanly_on_ctrl_c(tmp_path, ros_env):
    """Ctrl-C (SIGINT) stops every node and carp-launch exits 0."""
    import signal
    import time

    ns = tmp_path / "one.yaml"
    ns.write_text("nodes:\n  - {name: policy_node, package: carp_policy, executable: policy_node}\n")
    proc = subprocess.Popen([sys.executable, "-m", "carp_bringup.launcher", str(ns)], env=ros_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines, deadline = [], time.monotonic() + 120.0
    try:
        for line in proc.stdout:  # until the node reports it is up (loading takes seconds on a busy CPU)
            lines.append(line)
            if "a decision every 0.80 s" in line or time.monotonic() > deadline:
                break
        assert any("[policy_node]" in x and "a decision every 0.80 s" in x for x in lines), "".join(lines)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "did not stop" not in rest


def test_ros2_launch_cli_finds_the_launch_files_and_their_arguments(ros_env):
    """The real `ros2 launch` (where ../shared/ros2-launch installed it) resolves the package's share
    directory from the venv's ament layout and lists every declared argument."""
    ros2 = Path(sys.executable).parent / "ros2"
    if not ros2.exists():
        pytest.skip("no ros2 CLI in this venv (../shared/ros2-launch not present)")
    env = dict(ros_env)
    env["AMENT_PREFIX_PATH"] = str(Path(sys.executable).parents[1])
    for name in SHIPPED:
        out = subprocess.run([str(ros2), "launch", "carp_bringup", f"{name}.launch.py", "--show-args"],
                             env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        for a in nodeset.load(name).arguments:
            assert f"'{a.name}':" in out.stdout and a.description in out.stdout
