"""``ur5e_driver_node``: the rclpy shell around the driver core (``carp_hardware.driver.ArmDriver``).

Subscribes ``/policy/action_chunk`` (trajectory_msgs/MultiDOFJointTrajectory; docs/design.md),
``/ur5e/pose_cmd`` (a one-point trajectory in the chunk's layout: the teleop node's TCP + gripper
target, reached one control period after it arrives) and ``/ur5e/twist_cmd``
(geometry_msgs/TwistStamped). Publishes ``/ur5e/joint_states``, ``/ur5e/tcp_pose`` (PoseStamped,
base frame), ``/gripper/joint_states`` (position[0] = opening, m), ``/ur5e/refusals``
(std_msgs/String: why a command was refused, as it happens; the teleop node restarts its target
from the measured pose on one) and ``/diagnostics`` (the driver's state, refusals, stops and faults
by reason, observation age, inference time, chunk lead, tracking error). Services
(std_srvs/Trigger): ``/ur5e/enable``, ``/ur5e/stop``, ``/ur5e/home``, ``/ur5e/acknowledge``.

``backend:=rtde`` drives the UR5e through ur_rtde and the Robotiq 2F-85 through its URCap socket.
``backend:=sim`` drives the MuJoCo twin paced to the wall clock, and, since the twin's cameras and
scene live in the same MuJoCo world, also publishes ``/cameras/{wrist,scene}/image_raw`` and
``/sim/env_state``, plus ``/sim/episode`` (std_msgs/String, JSON: seed, time, success, reason) and a
``/sim/reset`` service that starts the next episode. The driver core, its limits and its watchdog
are the same code for both.

``backend:=fake_rtde`` is the robot's path (the servo process, ur_rtde's calls) over the scripted
fake controller of ``carp_hardware.fake_rtde``, without a gripper: a dry run without a robot.

The servo loop runs at ``servo_hz`` in a process of its own on the robot (``driver_process``: the
node's and the policy's Python work do not hold its GIL; if the process dies the node exits with
code 2) and in a thread with the twin (which shares its MuJoCo world with the cameras). The state
is published from a thread at ``state_hz``; the executor's one thread takes commands, services
and diagnostics. Every stamp is on the host's wall clock (the ROS clock): the policy's chunks are
scheduled against it.
"""

from __future__ import annotations

import functools
import json
import sys
import threading

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import TwistStamped
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import MultiDOFJointTrajectory

from carp_hardware.driver import EpochClock
from carp_hardware.kinematics import JOINT_NAMES
from carp_policy.messages import (
    Periodic,
    chunk_from_msg,
    pose_to_msg,
    spin_node,
    target_from_msg,
    time_to_msg,
)


class DriverNode(Node):
    """The arm and gripper behind ROS topics and services (module docstring)."""

    def __init__(self) -> None:
        super().__init__("ur5e_driver")
        defaults = {"backend": "rtde", "robot_ip": "192.168.1.102", "limits": "default", "config": "default",
                    "execute_steps": 8, "servo_hz": 0.0, "state_hz": 100.0, "enable": False,
                    "gripper_port": 63352, "task": "cup", "seed": 10000, "camera_fps": 30.0}  # fmt: skip
        for k, v in defaults.items():
            self.declare_parameter(k, v, ParameterDescriptor(dynamic_typing=True))
        get = lambda k: self.get_parameter(k).value  # noqa: E731
        from carp_hardware.driver import DriverConfig
        from carp_hardware.safety import SafetyLimits
        from carp_policy.yaml_config import from_dict, load_yaml, to_dict

        backend = str(get("backend"))
        conf = str(get("config") or "default")
        cfg = DriverConfig() if conf == "default" else load_yaml(DriverConfig, conf)
        overrides = {"execute_steps": int(get("execute_steps"))}
        if float(get("servo_hz")) > 0:
            overrides["servo_hz"] = float(get("servo_hz"))
        elif backend == "sim":
            overrides["servo_hz"] = 100.0  # the twin at wall-clock pace: 100 Hz keeps up on 2 cores
        lim = str(get("limits") or "default")
        limits = None if lim == "default" else SafetyLimits.load(lim)  # None: the shipped YAML
        self.lock = threading.RLock()  # the MuJoCo world (physics and renders) in the twin
        self.cell = None
        self.cameras: list = []
        self.clock = EpochClock()
        if backend == "sim":
            from carp_sim.env import SimCell, SimConfig

            # the twin's own driver config (closed-form IK, no controller to ask) at this rate
            cfg = from_dict(DriverConfig, {**to_dict(cfg), **overrides, "ik": "local",
                                           "check_controller_poses": False})  # fmt: skip
            sim = SimConfig(render=False, servo_hz=cfg.servo_hz)
            self.cell = SimCell(str(get("task")), sim, limits=limits, clock=self.clock, driver_config=cfg)
            self.seed = int(get("seed"))
            self.cell.reset(self.seed)
            self.driver, self.arm, self.gripper = self.cell.driver, self.cell.arm, self.cell.gripper
        elif backend in ("rtde", "fake_rtde"):
            # the servo loop in a process of its own (driver_process: why); the node calls it
            from carp_hardware.driver_process import DriverProcess, rtde_driver
            from carp_hardware.fake_rtde import fake_driver

            cfg = from_dict(DriverConfig, {**to_dict(cfg), **overrides})
            if backend == "rtde":
                lim_path = None if lim == "default" else lim  # checked above: a bad file fails here
                build = functools.partial(rtde_driver, str(get("robot_ip")), to_dict(cfg), lim_path,
                                          int(get("gripper_port")), self.clock)  # fmt: skip
            else:  # the robot's path over the scripted fake controller, without a gripper
                build = functools.partial(fake_driver, "fake-ur5e", cfg.servo_hz, True, None, to_dict(cfg),
                                          clock=self.clock)  # fmt: skip
            cpu = cfg.servo_cpu if cfg.servo_cpu >= 0 else None
            self.driver = DriverProcess(build, rt_priority=cfg.servo_rt_priority, cpu=cpu)
            if self.driver.realtime["error"]:
                why = self.driver.realtime["error"]
                self.get_logger().warning(f"servo process under the normal scheduler: {why}")
        else:
            raise ValueError(f"ur5e_driver_node: backend must be rtde, sim or fake_rtde, got {backend!r}")
        self.backend = backend
        self._setup_topics(float(get("state_hz")))
        if backend == "sim":
            self._setup_twin(float(get("camera_fps")))
        if backend != "sim" and bool(get("enable")):
            self.driver.enable()  # on the robot the arm moves only once enabled (service or parameter)
        self._running = True
        self._servo_thread = threading.Thread(target=self._servo_loop, name="servo", daemon=True)
        if self.cell is not None:  # the twin's loop here; the robot's runs in its own process
            self._servo_thread.start()
        self._state_loop.start()
        self.get_logger().info(
            f"driver: backend {backend}, servo {cfg.servo_hz:.0f} Hz, execute {cfg.execute_steps} steps, "
            f"state {self.driver.diagnostics()['state']}"
        )

    # ------------------------------------------------------------------ servo loop (own thread)
    def _servo_loop(self) -> None:
        from carp_hardware.driver import paced_servo_loop

        every = max(1, round(0.1 / self.driver.dt))  # success / failure at the control rate

        def after_tick(k: int) -> None:
            if k % every == 0:
                self.cell.update_status()

        paced_servo_loop(self.driver, lambda: self._running, self.lock, after_tick)

    # ------------------------------------------------------------------ topics and services
    def _setup_topics(self, state_hz: float) -> None:
        self.pub_joints = self.create_publisher(JointState, "/ur5e/joint_states", 10)
        from geometry_msgs.msg import PoseStamped

        self.pub_tcp = self.create_publisher(PoseStamped, "/ur5e/tcp_pose", 10)
        self.pub_grip = self.create_publisher(JointState, "/gripper/joint_states", 10)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.pub_refusal = self.create_publisher(String, "/ur5e/refusals", 10)
        self.create_subscription(MultiDOFJointTrajectory, "/policy/action_chunk", self._on_chunk, 10)
        self.create_subscription(MultiDOFJointTrajectory, "/ur5e/pose_cmd", self._on_pose_cmd, 10)
        self.create_subscription(TwistStamped, "/ur5e/twist_cmd", self._on_twist, 10)
        for name, fn in (("enable", self._srv_enable), ("stop", self._srv_stop), ("home", self._srv_home),
                         ("acknowledge", self._srv_ack)):  # fmt: skip
            self.create_service(Trigger, f"/ur5e/{name}", fn)
        self.create_timer(1.0, self._publish_diagnostics)
        # the state from one thread of its own: in capture order (the policy's buffers refuse time
        # going backwards) and at its rate while a service (home: seconds) holds the executor
        self._state_loop = Periodic(1.0 / state_hz, self._publish_state, "state", self._state_error)

    def _setup_twin(self, camera_fps: float) -> None:
        from carp_hardware.camera_node import CameraPublisher
        from carp_hardware.cameras import SimCamera
        from carp_sim.env import CAMERAS

        for cam in CAMERAS if camera_fps > 0 else ():  # 0: no renders (a state model reads none)
            c = SimCamera(cam, self.cell.model, self.cell.data, self.lock, size=self.cell.config.image_size,
                          fps=camera_fps, clock=self.clock.now)  # fmt: skip
            c.start()
            self.cameras.append(c)
            CameraPublisher(self, c, camera_fps)
        self.pub_env = self.create_publisher(JointState, "/sim/env_state", 10)
        self.pub_episode = self.create_publisher(String, "/sim/episode", 10)
        self.create_service(Trigger, "/sim/reset", self._srv_reset)
        self.create_timer(0.1, self._publish_episode)

    def _on_chunk(self, msg) -> None:
        try:
            chunk = chunk_from_msg(msg)
        except ValueError as e:  # malformed: never reaches the arm
            self.get_logger().warning(f"chunk refused: {e}", throttle_duration_sec=1.0)
            return
        self._report("chunk", self.driver.submit_chunk(chunk))

    def _on_pose_cmd(self, msg) -> None:
        try:
            target, _sent = target_from_msg(msg)
        except ValueError as e:
            self._refused("pose command", f"malformed: {e}")
            return
        # timed by the driver (now + pose_lead_s): the sender's clock and DDS's delay do not enter
        self._report("pose command", self.driver.command_pose(target))

    def _on_twist(self, msg) -> None:
        t, a = msg.twist.linear, msg.twist.angular
        self._report("twist", self.driver.command_twist(np.array([t.x, t.y, t.z, a.x, a.y, a.z])))

    def _report(self, what: str, result) -> None:
        if not result.accepted and result.refusal is not None:
            self._refused(what, result.refusal.message)

    def _refused(self, what: str, why: str) -> None:
        self.pub_refusal.publish(String(data=f"{what} refused: {why}"))
        self.get_logger().warning(f"{what} refused: {why}", throttle_duration_sec=1.0)

    def _trigger(self, fn, response, done: str):
        try:
            out = fn()
            response.success, response.message = True, str(out or done)
        except Exception as e:  # a refused command is the answer, not a crash of the node
            response.success, response.message = False, str(e)
        return response

    def _srv_enable(self, _req, res):
        return self._trigger(self.driver.enable, res, "enabled")

    def _srv_stop(self, _req, res):
        return self._trigger(lambda: self.driver.stop("operator stop (service)"), res, "stopped")

    def _srv_home(self, _req, res):
        return self._trigger(self.driver.home, res, "homed")

    def _srv_ack(self, _req, res):
        return self._trigger(self.driver.acknowledge, res, "acknowledged")

    def _srv_reset(self, _req, res):
        def reset() -> str:
            with self.lock:
                self.seed += 1
                self.cell.reset(self.seed)  # stops the driver and re-enables it from the new pose
            return f"episode seed {self.seed}"

        return self._trigger(reset, res, "reset")

    def _publish_state(self) -> None:
        if self.cell is None:  # the robot: measured between two ticks of the servo process
            st, g = self.driver.measured()
            t, scene = self.clock.now(), None
        else:
            with self.lock:  # one instant: the arm, the gripper and the scene
                st, g = self.arm.state(), self.gripper.state()
                t = self.clock.now()
                scene = self.cell.observe().env_state
        stamp = time_to_msg(t)
        if scene is not None:  # at the state's rate and stamp: no skew between them
            from carp_sim.env import ENV_STATE_NAMES

            es = JointState(name=list(ENV_STATE_NAMES), position=[float(x) for x in scene])
            es.header.stamp = stamp
            self.pub_env.publish(es)
        js = JointState(name=list(JOINT_NAMES), position=[float(x) for x in st.q])
        js.header.stamp = stamp
        self.pub_joints.publish(js)
        self.pub_tcp.publish(pose_to_msg(st.tcp, t))
        if g is not None:  # an arm without a gripper (fake_rtde) publishes none
            gs = JointState(name=["gripper"], position=[float(g.opening)])
            gs.header.stamp = stamp
            self.pub_grip.publish(gs)

    def _state_error(self, e: Exception) -> None:
        if self.context.ok():  # after shutdown a publish fails by design: not worth a line
            self.get_logger().error(f"state not published: {e}", throttle_duration_sec=1.0)

    def _publish_episode(self) -> None:
        with self.lock:
            out = self.cell.outcome()
        info = {"seed": self.seed, "sim_time": self.cell.time, "done": bool(self.cell.done),
                "success": bool(out.success), "reason": out.reason}  # fmt: skip
        self.pub_episode.publish(String(data=json.dumps(info)))

    def _publish_diagnostics(self) -> None:
        d = self.driver.diagnostics()
        st = DiagnosticStatus(name="ur5e_driver", hardware_id=self.backend)
        st.level = DiagnosticStatus.OK if d["state"] in ("running", "idle") else DiagnosticStatus.WARN
        if d["state"] == "fault":
            st.level = DiagnosticStatus.ERROR
        st.message = f"{d['state']}" + (f": {d['reason']}" if d.get("reason") else "")
        if self.cell is None:  # the servo process's scheduling (SCHED_FIFO priority, core, or why not)
            d["servo_realtime"] = self.driver.realtime
        st.values = [KeyValue(key=k, value=json.dumps(v, default=float)) for k, v in d.items()]
        arr = DiagnosticArray(status=[st])
        arr.header.stamp = time_to_msg(self.clock.now())
        self.pub_diag.publish(arr)

    def destroy_node(self) -> None:
        self._running = False
        self._state_loop.stop()
        if self._servo_thread.is_alive():
            self._servo_thread.join(timeout=2.0)
        try:
            if self.cell is None:
                self.driver.close()  # stops the arm, closes ur_rtde and the gripper, ends the process
            else:
                self.driver.stop("driver node shutting down")
        except Exception as e:  # the arm is stopped by the controller-side watchdog regardless
            self.get_logger().error(f"stop on shutdown failed: {e}")
        for c in self.cameras:
            c.stop()
        if self.cell is not None:
            self.cell.close()
        super().destroy_node()


def main(argv: list[str] | None = None) -> int:
    """Run the node until Ctrl-C; a bad backend, limit file or connection is one line on stderr, exit 2."""
    return spin_node(DriverNode, "ur5e_driver_node", argv=argv)

if __name__ == "__main__":
    sys.exit(main())
