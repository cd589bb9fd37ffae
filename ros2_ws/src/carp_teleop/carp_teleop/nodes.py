"""The teleoperation and recording nodes: thin rclpy shells over the cores ``carp-record`` runs.

- ``spacemouse_node``: the SpaceMouse (``carp_teleop.inputs.SpaceMouseInput`` over pyspacemouse)
  published as ``/spacemouse/joy`` (sensor_msgs/Joy: six axes in [-1, 1], x y z roll pitch yaw in
  the device's z-up frame, and the buttons held) at ``rate_hz``. ``backend:=fake_hid`` plays a
  script of deflections and button presses into a fake HID device read by the same pyspacemouse
  parser (a dry run, and the tests); the script starts when the first subscriber is there.
- ``teleop_node``: ``carp_teleop.teleop.TeleopCore`` at the control rate. It reads the newest Joy
  (older than ``max_input_age``: hands off) and the measured ``/ur5e/tcp_pose`` and
  ``/gripper/joint_states``, integrates the operator's twist onto its target and sends the target
  to the driver node as ``/ur5e/pose_cmd``, where every limit a policy's chunk meets is checked. On
  a refusal (``/ur5e/refusals``) the target restarts from the measured pose, so it never runs away
  from an arm that holds. Button events (record, discard, gripper, quit) go out on
  ``/teleop/event`` (std_msgs/String).
- ``recorder_node``: ``carp_teleop.recorder.Recorder`` at the recording rate over topics. The
  streams (cameras, TCP pose, gripper, the twin's scene state with ``env_state:=true``) fill the
  same ring buffers the aligner reads in ``carp-record``; the action of each frame is the newest
  ``/ur5e/pose_cmd``. Episodes start and end on the record button (``/teleop/event``) or the
  services ``/recorder/start``, ``/recorder/save`` and ``/recorder/discard`` (std_srvs/Trigger).
  ``reset_service:=/sim/reset`` lays out the twin's next scene after each episode.

The dataset is the one ``carp-record`` writes (LeRobot v3.0, crash-safe per episode), so
``carp-dataset validate`` and ``carp-train`` take it as it is.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
from geometry_msgs.msg import PoseStamped
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState, Joy
from std_msgs.msg import String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import MultiDOFJointTrajectory

from carp_policy.actions import StreamBuffer, matrix_to_rot6d
from carp_policy.messages import (
    Periodic,
    image_from_msg,
    joy_from_msg,
    joy_to_msg,
    pose_from_msg,
    spin_node,
    state_vector,
    target_from_msg,
    target_to_msg,
    time_from_msg,
)
from carp_teleop.arm import pose_from_state
from carp_teleop.inputs import InputState

# Each step of a fake_hid script: [seconds, [x, y, z, roll, pitch, yaw], [buttons held]]. The built-in
# one waits 5 s for the streams, clicks record (start), pushes +y for 2 s, and clicks record (save).
_IDLE = [0, 0, 0, 0, 0, 0]
EXAMPLE_SCRIPT = [[5.0, _IDLE, [0, 0]], [0.3, _IDLE, [0, 1]], [0.3, _IDLE, [0, 0]],
                  [2.0, [0, 0.5, 0, 0, 0, 0], [0, 0]], [0.5, _IDLE, [0, 0]], [0.3, _IDLE, [0, 1]],
                  [1.0, _IDLE, [0, 0]]]  # fmt: skip


def _declare(node: Node, defaults: dict) -> callable:
    for k, v in defaults.items():
        node.declare_parameter(k, v, ParameterDescriptor(dynamic_typing=True))
    return lambda k: node.get_parameter(k).value


def _now(node: Node) -> float:
    return node.get_clock().now().nanoseconds * 1e-9


def _guarded(node: Node, fn):
    """A subscription callback that drops a malformed message (or one going back in time) with a
    throttled warning instead of raising into the executor."""

    def cb(msg) -> None:
        try:
            fn(msg)
        except ValueError as e:
            node.get_logger().warning(f"input dropped: {e}", throttle_duration_sec=1.0)

    return cb


def load_script(path: str = "") -> list[tuple[float, np.ndarray, tuple[int, ...]]]:
    """A fake_hid script: a JSON file holding a list of ``[seconds, [6 axes], [buttons]]`` ("" = the
    built-in ``EXAMPLE_SCRIPT``); each step is held for its seconds, the last one after it."""
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"spacemouse script not found: {path}")
        raw = json.loads(Path(path).read_text())
    else:
        raw = EXAMPLE_SCRIPT
    steps = []
    for i, step in enumerate(raw):
        if len(step) != 3 or len(step[1]) != 6:
            raise ValueError(f"script step {i}: expected [seconds, [6 axes], [buttons]], got {step}")
        axes = np.clip(np.asarray(step[1], float), -1, 1)
        steps.append((float(step[0]), axes, tuple(int(b) for b in step[2])))
    if not steps:
        raise ValueError("the script has no steps")
    return steps


class TopicArm:
    """The arm as the teleop core and the recorder see it (``carp_teleop.arm.TeleopArm``), over the
    driver node's topics: the measured state in stream buffers, targets out on ``/ur5e/pose_cmd``."""

    name = "ur5e"
    serial = ""

    def __init__(self, publish=None, gripper_default: float = 0.085) -> None:
        self.tcp_buffer = StreamBuffer("tcp_pose", 256)
        self.gripper_buffer = StreamBuffer("gripper", 256)
        self._publish = publish
        self._gripper_default = gripper_default

    def on_pose(self, msg) -> None:
        pose, t = pose_from_msg(msg)
        self.tcp_buffer.push(t, np.r_[pose[:3, 3], matrix_to_rot6d(pose[:3, :3])])

    def on_gripper(self, msg) -> None:
        if not msg.position:
            raise ValueError("gripper joint state without a position")
        self.gripper_buffer.push(time_from_msg(msg.header.stamp), np.array([float(msg.position[0])]))

    def ready(self) -> bool:
        return self.tcp_buffer.latest() is not None

    def tcp_pose(self) -> np.ndarray:
        s = self.tcp_buffer.latest()
        if s is None:
            raise RuntimeError("no /ur5e/tcp_pose received yet")
        return pose_from_state(s.value)

    def gripper_opening(self) -> float:
        s = self.gripper_buffer.latest()
        return float(s.value[0]) if s is not None else self._gripper_default  # an arm without gripper

    def command(self, pose: np.ndarray, gripper: float, t: float) -> str | None:
        """Send the target; the driver node checks it and reports a refusal on /ur5e/refusals."""
        self._publish(target_to_msg(state_vector(pose, gripper), t))
        return None


# ----------------------------------------------------------------------------- spacemouse_node
class SpaceMouseNode(Node):
    """The SpaceMouse on ``/spacemouse/joy`` (module docstring)."""

    def __init__(self) -> None:
        super().__init__("spacemouse_node")
        get = _declare(
            self, {"backend": "pyspacemouse", "rate_hz": 50.0, "script": json.dumps(EXAMPLE_SCRIPT)}
        )
        from carp_teleop.inputs import SpaceMouseInput

        backend = str(get("backend"))
        self._player = None
        if backend == "pyspacemouse":
            self.source = SpaceMouseInput()  # RuntimeError naming the udev rule if none opens
        elif backend == "fake_hid":
            from carp_teleop.hid_fake import fake_spacemouse

            dev, hid, spec = fake_spacemouse()
            self.source = SpaceMouseInput(dev)
            self._player = _ScriptPlayer(load_script(str(get("script"))), hid, spec)
        else:
            raise ValueError(f"spacemouse_node: backend must be pyspacemouse or fake_hid, got {backend!r}")
        self.pub = self.create_publisher(Joy, "/spacemouse/joy", 10)
        self._loop = Periodic(1.0 / float(get("rate_hz")), self._tick, "spacemouse", self._error).start()
        self.get_logger().info(f"spacemouse: {backend} at {float(get('rate_hz')):.0f} Hz on /spacemouse/joy")

    def _tick(self) -> None:
        # a script plays from the moment someone listens (the teleop node), not from the node's start
        if self._player is not None and (self._player.t0 is not None or self.pub.get_subscription_count()):
            self._player.play(time.monotonic())
        s = self.source.read()
        self.pub.publish(joy_to_msg(s.axes, s.buttons, _now(self)))

    def _error(self, e: Exception) -> None:
        if self.context.ok():
            self.get_logger().error(f"spacemouse: {e}", throttle_duration_sec=1.0)

    def destroy_node(self) -> None:
        self._loop.stop()
        self.source.close()
        super().destroy_node()


class _ScriptPlayer:
    """Pushes a script's HID reports into the fake device as its steps come due."""

    def __init__(self, steps, hid, spec) -> None:
        self.steps, self.hid, self.spec = steps, hid, spec
        self.t0: float | None = None
        self.i = -1

    def play(self, now: float) -> None:
        from carp_teleop.hid_fake import encode

        if self.t0 is None:
            self.t0 = now
        t, i = self.t0, 0
        while i < len(self.steps) - 1 and now >= t + self.steps[i][0]:
            t += self.steps[i][0]
            i += 1
        if i != self.i:
            _, axes, buttons = self.steps[i]
            self.hid.push(encode(self.spec, axes, buttons))
            self.i = i


# ----------------------------------------------------------------------------- teleop_node
class _JoyInput:
    """The newest Joy as the teleop core's input (``carp_teleop.inputs.TeleopInput``)."""

    def __init__(self, max_age: float, clock) -> None:
        self.max_age, self.clock = max_age, clock
        self._last: tuple[np.ndarray, tuple[int, ...], float] | None = None

    def on_joy(self, msg) -> None:
        self._last = joy_from_msg(msg)

    def read(self) -> InputState:
        now = self.clock()
        last = self._last
        if last is None or now - last[2] > self.max_age:  # the device node stopped: hands off
            return InputState(time.monotonic())
        return InputState(time.monotonic(), last[0].copy(), last[1])

    def close(self) -> None:
        pass


class TeleopNode(Node):
    """The teleop core between ``/spacemouse/joy`` and the driver node (module docstring)."""

    def __init__(self) -> None:
        super().__init__("teleop_node")
        get = _declare(self, {"config": "default", "max_input_age": 0.5})
        from carp_teleop.teleop import TeleopConfig, TeleopCore

        cfg = _recorder_config(str(get("config"))).teleop
        self.pub_cmd = self.create_publisher(MultiDOFJointTrajectory, "/ur5e/pose_cmd", 10)
        self.pub_event = self.create_publisher(String, "/teleop/event", 10)
        self.arm = TopicArm(self.pub_cmd.publish, cfg.gripper_open)
        self.joy = _JoyInput(float(get("max_input_age")), lambda: _now(self))
        self.create_subscription(Joy, "/spacemouse/joy", _guarded(self, self.joy.on_joy), 10)
        self.create_subscription(PoseStamped, "/ur5e/tcp_pose", _guarded(self, self.arm.on_pose), 5)
        self.create_subscription(JointState, "/gripper/joint_states", _guarded(self, self.arm.on_gripper), 5)
        self.create_subscription(String, "/ur5e/refusals", self._on_refusal, 10)
        self.config: TeleopConfig = cfg
        self._make_core = lambda: TeleopCore(self.arm, self.joy, cfg)
        self.core: TeleopCore | None = None
        self._reseed = threading.Event()
        self._loop = Periodic(1.0 / cfg.rate_hz, self._tick, "teleop", self._error).start()
        self.get_logger().info(f"teleop: {cfg.rate_hz:.0f} Hz, {cfg.frame} frame, max {cfg.max_speed} m/s")

    def _on_refusal(self, msg) -> None:
        if msg.data.startswith("pose command"):
            self._reseed.set()  # the arm holds where it is: continue from there, not from the target

    def _tick(self) -> None:
        if not self.arm.ready():
            self.get_logger().info("waiting for /ur5e/tcp_pose", throttle_duration_sec=5.0)
            return
        if self.core is None:
            self.core = self._make_core()  # starts at the measured pose
        if self._reseed.is_set():
            self._reseed.clear()
            self.core.reseed()
        res = self.core.tick(_now(self))
        for ev in res.events:
            self.pub_event.publish(String(data=ev))

    def _error(self, e: Exception) -> None:
        if self.context.ok():
            self.get_logger().error(f"teleop: {type(e).__name__}: {e}", throttle_duration_sec=1.0)

    def destroy_node(self) -> None:
        self._loop.stop()
        super().destroy_node()


# ----------------------------------------------------------------------------- recorder_node
class _TopicTeleop:
    """What the recorder asks of the teleop core, answered from topics: the newest commanded target
    (the frame's action; the measured pose until the first command) and the button events since the
    last tick. Recording over ROS has no policy (DAgger runs in ``carp-record --policy``)."""

    def __init__(self, arm: TopicArm) -> None:
        self.arm = arm
        self.events: deque[str] = deque()
        self.target: np.ndarray | None = None

    def on_target(self, msg) -> None:
        self.target, _ = target_from_msg(msg)

    def on_event(self, msg) -> None:
        self.events.append(msg.data)

    def reseed(self) -> None:
        self.target = None  # a new scene: the arm is elsewhere

    def tick(self, t: float):
        from carp_teleop.teleop import TickResult

        target = self.target
        if target is None:
            s = self.arm.tcp_buffer.latest()
            target = np.r_[s.value, self.arm.gripper_opening()] if s is not None else np.zeros(10)
        events = []
        while self.events:
            events.append(self.events.popleft())
        return TickResult(t=t, target=np.asarray(target, float).copy(), events=events)


class _TopicCamera:
    """A camera stream filled from its image topic (the recorder reads only ``buffer``)."""

    def __init__(self, name: str) -> None:
        self.buffer = StreamBuffer(name, 32)

    def on_image(self, msg) -> None:
        img, t = image_from_msg(msg)
        self.buffer.push(t, img)


def _recorder_config(path: str):
    from carp_policy.yaml_config import load_yaml
    from carp_teleop.recorder import RecorderConfig

    cfg = RecorderConfig() if path in ("", "default") else load_yaml(RecorderConfig, path)
    cfg.teleop.rate_hz = cfg.fps
    cfg.teleop.validate()
    return cfg


class RecorderNode(Node):
    """The recorder over topics, with start / save / discard services (module docstring)."""

    def __init__(self) -> None:
        super().__init__("recorder_node")
        get = _declare(self, {"out": "", "task": "cup", "operator": "", "config": "default",
                              "env_state": False, "reset_service": "", "calibration_id": ""})  # fmt: skip
        from carp_sim.cli import TASK_TEXT
        from carp_teleop.record import make_writer
        from carp_teleop.recorder import Recorder

        out, task, operator = str(get("out")), str(get("task")), str(get("operator"))
        if not out:
            raise ValueError("recorder_node: set out:=DATASET_DIR")
        if not operator:
            raise ValueError("recorder_node: set operator:=NAME (stored with every episode)")
        if task not in TASK_TEXT:
            raise ValueError(f"recorder_node: task must be one of {sorted(TASK_TEXT)}, got {task!r}")
        cfg = _recorder_config(str(get("config")))
        if get("calibration_id"):
            cfg.calibration_id = str(get("calibration_id"))
        Path(out).mkdir(parents=True, exist_ok=True)
        self.arm = TopicArm()
        self.teleop = _TopicTeleop(self.arm)
        self.cams = {c: _TopicCamera(c) for c in cfg.cameras}
        env_buffer = None
        env_names = None
        if bool(get("env_state")):
            from carp_sim.env import ENV_STATE_NAMES

            env_buffer, env_names = StreamBuffer("env_state", 256), ENV_STATE_NAMES
            on_env = lambda m: env_buffer.push(time_from_msg(m.header.stamp), np.asarray(m.position))  # noqa: E731
            self.create_subscription(JointState, "/sim/env_state", _guarded(self, on_env), 5)
        self.writer = make_writer(Path(out), cfg, env_names)
        self._twin_episode: dict = {}
        meta = {
            "task": task,
            "operator": operator,
            "calibration_id": cfg.calibration_id,
            "sim": env_buffer is not None,
            "input": "ros",
        }
        self._reset = None
        if get("reset_service"):
            self._reset = self.create_client(Trigger, str(get("reset_service")))
            self.create_subscription(String, "/sim/episode", self._on_twin_episode, 10)
        self.lock = threading.Lock()  # the recorder: its tick (a thread) and the services (executor)
        twin = self._reset is not None
        self.rec = Recorder(
            cfg, self.arm, self.cams, self.teleop, self.writer, TASK_TEXT[task], Path(out), meta,
            env_buffer=env_buffer,
            scene_reset=self._next_scene if twin else None,
            episode_facts=self._episode_facts if twin else None,
            cue=lambda m: self.get_logger().info(m.replace("\a", "")),
        )  # fmt: skip
        self.create_subscription(PoseStamped, "/ur5e/tcp_pose", _guarded(self, self.arm.on_pose), 5)
        self.create_subscription(JointState, "/gripper/joint_states", _guarded(self, self.arm.on_gripper), 5)
        self.create_subscription(
            MultiDOFJointTrajectory, "/ur5e/pose_cmd", _guarded(self, self.teleop.on_target), 10
        )
        self.create_subscription(String, "/teleop/event", self.teleop.on_event, 10)
        for c, cam in self.cams.items():
            self.create_subscription(Image, f"/cameras/{c}/image_raw", _guarded(self, cam.on_image),
                                     qos_profile_sensor_data)  # fmt: skip
        for name, fn in (
            ("start", self._srv_start),
            ("save", self._srv_save),
            ("discard", self._srv_discard),
        ):
            self.create_service(Trigger, f"/recorder/{name}", fn)
        self._loop = Periodic(1.0 / cfg.fps, self._tick, "recorder", self._error).start()
        self.get_logger().info(f"recorder: {task} at {cfg.fps:.0f} Hz into {out} ({self.writer.num_episodes} "
                               "episodes there); record button or /recorder/start to begin")  # fmt: skip

    def _tick(self) -> None:
        with self.lock:
            self.rec.tick(_now(self))
        if self.rec.quit:
            self.get_logger().info("quit requested by the operator")
            self.rec.quit = False

    def _error(self, e: Exception) -> None:
        if self.context.ok():
            self.get_logger().error(f"recorder: {type(e).__name__}: {e}", throttle_duration_sec=1.0)

    # the twin's scene after each episode; asynchronous: the executor that would deliver the answer
    # must never wait on the recorder's lock
    def _next_scene(self) -> dict:
        future = self._reset.call_async(Trigger.Request())
        future.add_done_callback(lambda f: self.get_logger().info(f"next scene: {f.result().message}"))
        return {}

    def _on_twin_episode(self, msg) -> None:
        self._twin_episode = json.loads(msg.data)

    def _episode_facts(self) -> dict:
        e = self._twin_episode
        return {"seed": e.get("seed"), "twin_success": e.get("success"), "twin_reason": e.get("reason")}

    def _srv_start(self, _req, res):
        from carp_policy.actions import StaleObservationError

        with self.lock:
            if self.rec.sink.active:
                res.success, res.message = False, f"already recording ({self.rec.sink.frames} frames)"
                return res
            now = _now(self)
            try:
                self.rec.aligner.build(now)
            except StaleObservationError as e:
                res.success, res.message = False, f"cannot start: {e}"
                return res
            res.success = self.rec.start_episode(now)
            res.message = (
                f"recording episode {self.writer.num_episodes}" if res.success else "not enough disk space"
            )
        return res

    def _srv_save(self, _req, res):
        with self.lock:
            if not self.rec.sink.active:
                res.success, res.message = False, "not recording"
                return res
            n = self.rec.sink.frames
            self.rec.save_episode("saved by /recorder/save")
            res.success = bool(n)
            res.message = f"saved episode {self.rec.saved[-1]} ({n} frames)" if n else "no frames: discarded"
        return res

    def _srv_discard(self, _req, res):
        with self.lock:
            if not self.rec.sink.active:
                res.success, res.message = False, "not recording"
                return res
            self.rec.discard_episode("discarded by /recorder/discard")
            res.success, res.message = True, "discarded"
        return res

    def destroy_node(self) -> None:
        self._loop.stop()
        with self.lock:
            if self.rec.sink.active:
                self.rec.sink.discard()
                self.get_logger().info("stopped with an episode in progress: it was discarded")
            self.writer.close()
        super().destroy_node()


def spacemouse_main(argv: list[str] | None = None) -> int:
    """``spacemouse_node``: until Ctrl-C; no SpaceMouse is one line on stderr, exit 2."""
    return spin_node(SpaceMouseNode, "spacemouse_node", argv=argv)


def teleop_main(argv: list[str] | None = None) -> int:
    """``teleop_node``: until Ctrl-C."""
    return spin_node(TeleopNode, "teleop_node", argv=argv)


def recorder_main(argv: list[str] | None = None) -> int:
    """``recorder_node``: until Ctrl-C (an episode in progress is discarded; saved ones are safe)."""
    return spin_node(RecorderNode, "recorder_node", argv=argv)
