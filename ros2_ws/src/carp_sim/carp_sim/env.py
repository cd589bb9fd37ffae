"""SimCell: the twin behind the same seam as the real cell (target TCP pose + gripper opening in,
measured TCP pose + gripper opening + camera images out).

The arm is commanded through the same driver core as the robot (``carp_hardware.driver.ArmDriver``
over the twin's backends in ``carp_sim.backends``, on the twin's simulated clock): it interpolates
the TCP pose at ``servo_hz`` (linear position, slerp rotation), checks every target against the
safety limits, solves the analytic IK nearest to the last joint target and streams the joints to
stiff position servos with a velocity feed-forward. ``submit_chunk(chunk)`` + ``run_until(t)`` is
the policy's path (``carp-eval``); ``step(action)`` commands one target reached one control period
later (0.1 s at 10 Hz) and runs that period (the scripted experts, data collection).
The gripper fingers are position-controlled with a force limit, so a grasp is held by friction.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import mujoco
import numpy as np
import yaml

from carp_hardware.driver import ArmDriver, ChunkResult, DriverConfig
from carp_hardware.kinematics import HOME_Q, ik_nearest, pose_matrix
from carp_hardware.safety import SafetyLimits
from carp_policy.actions import ACTION_DIM, ACTION_NAMES, ActionChunk, Observation, pose_to_vector
from carp_sim.backends import SimArm, SimClock, SimGripper
from carp_sim.cell import GRIPPER_STROKE, build_model
from carp_sim.tasks import (
    EpisodeLayout,
    SceneSnapshot,
    TaskConfig,
    TaskOutcome,
    check,
    sample_layout,
    unrecoverable,
)

CAMERAS = ("wrist", "scene")
# Privileged scene state in every observation (LeRobot's observation.environment_state): the task
# object's base position, its up axis (tilt; the objects are round, so yaw carries nothing) and the
# centre of the place target (the green area or the pot).
ENV_STATE_NAMES = ["object_x", "object_y", "object_z", "object_up_x", "object_up_y", "object_up_z",
                   "target_x", "target_y"]  # fmt: skip
__all__ = ["CAMERAS", "ENV_STATE_NAMES", "SimCell", "SimConfig", "TaskOutcome"]


@dataclass
class SimConfig:
    """Settings of the twin (independent of the task)."""

    image_size: tuple[int, int] = (120, 160)  # (H, W) of each camera image
    cameras: tuple[str, ...] = CAMERAS  # which cameras observe() renders
    control_hz: float = 10.0  # step() advances 1 / control_hz seconds
    physics_dt: float = 0.002  # MuJoCo time step, s
    servo_hz: float = 100.0  # IK / joint-target rate inside a control step (real driver: 125-500 Hz)
    render: bool = True  # False: observations carry no images (fast expert runs)
    max_joint_speed: float = 3.0  # rad/s per joint; the driver refuses faster joint targets
    settle_s: float = 0.3  # physics run after reset so objects rest on the table

    def __post_init__(self) -> None:
        self.image_size = tuple(int(x) for x in self.image_size)
        self.cameras = tuple(self.cameras)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        if len(self.image_size) != 2 or min(self.image_size) < 8 or max(self.image_size) > 480:
            raise ValueError(f"SimConfig.image_size must be (H, W) within 8..480, got {self.image_size}")
        unknown = [c for c in self.cameras if c not in CAMERAS]
        if unknown:
            raise ValueError(f"SimConfig.cameras: unknown camera(s) {unknown}; the cell has {list(CAMERAS)}")
        for name in ("control_hz", "physics_dt", "servo_hz", "max_joint_speed"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"SimConfig.{name} must be a positive number, got {getattr(self, name)}")
        per_step = 1.0 / (self.control_hz * self.physics_dt)
        per_servo = 1.0 / (self.servo_hz * self.physics_dt)
        if abs(per_step - round(per_step)) > 1e-6 or abs(per_servo - round(per_servo)) > 1e-6:
            raise ValueError(
                f"SimConfig: control period 1/{self.control_hz} s and servo period 1/{self.servo_hz} s "
                f"must be whole multiples of physics_dt={self.physics_dt}"
            )
        if self.servo_hz < self.control_hz:
            raise ValueError("SimConfig.servo_hz must be >= control_hz")

    @classmethod
    def load(cls, path: str | Path) -> SimConfig:
        """From a YAML file with any subset of the fields."""
        raw = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown SimConfig keys {sorted(unknown)}")
        return cls(**raw)

    def to_dict(self) -> dict:
        return asdict(self)


class SimCell:
    """The MuJoCo UR5e cell running one task (see module doc for the control seam)."""

    def __init__(
        self,
        task: str | TaskConfig = "cup",
        config: SimConfig | None = None,
        limits: SafetyLimits | None = None,
        clock=None,
        driver_config: DriverConfig | None = None,
    ) -> None:
        """``limits``: the driver's safety limits (default: the robot's YAML, with the joint speed
        limit of ``config``). ``clock``: the driver's time base (default: the simulated clock, as
        fast as the CPU allows; the live twin of ``ur5e_driver_node`` passes the wall clock and
        paces the servo loop itself). ``driver_config``: the driver's settings (default: the
        config's servo rate with the closed-form IK)."""
        self.task = task if isinstance(task, TaskConfig) else TaskConfig.load(task)
        self.task.validate()
        self.config = config or SimConfig()
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before a context
        self.model = build_model(self.task.layout, self.config.physics_dt)
        self.data = mujoco.MjData(self.model)
        m = self.model
        self._tcp = m.site("tcp").id
        self._fingers = np.array([m.joint("finger_left").qposadr[0], m.joint("finger_right").qposadr[0]])
        self._obj_body = m.body(self.task.name).id
        self._obj_qpos = m.joint(self.task.name).qposadr[0]
        self._target_body = m.body("target" if self.task.name == "cup" else "pot").id
        # Geom lookup tables for contact queries (gripper = palm, fingers, pads).
        gripper_bodies = {m.body(n).id for n in ("flange", "finger_left", "finger_right")}
        self._is_gripper = np.isin(m.geom_bodyid, list(gripper_bodies))
        self._is_object = m.geom_bodyid == self._obj_body
        # The driver core of the robot over the twin's backends, on the simulated clock.
        self.arm, self.gripper = SimArm(self), SimGripper(self)
        limits = limits or replace(SafetyLimits.load(), max_joint_speed=self.config.max_joint_speed)
        self.driver = ArmDriver(
            self.arm,
            self.gripper,
            limits,
            driver_config
            or DriverConfig(servo_hz=self.config.servo_hz, ik="local", check_controller_poses=False),
            clock or SimClock(self),
        )
        self._renderer: mujoco.Renderer | None = None
        self._video_renderers: dict[tuple[int, int], mujoco.Renderer] = {}
        self.layout: EpisodeLayout | None = None
        self.seed: int | None = None
        self.ik_failures = 0  # targets the driver refused (unreachable, outside the limits)
        self.done = False
        self._success_since: float | None = None
        self._failure: str | None = None
        self._start_z = 0.0  # the object's height after the reset settled, for the lift check
        self._lifted = 0.0

    # ------------------------------------------------------------------ episode
    def reset(self, seed: int) -> Observation:
        """Start an episode whose layout (objects, target, arm start) is fully determined by ``seed``."""
        self.seed = int(seed)
        rng = np.random.default_rng(self.seed)
        self.layout = sample_layout(self.task, rng)
        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        m.body_pos[self._target_body][:2] = self.layout.target_xy
        yaw = self.layout.object_yaw
        d.qpos[self._obj_qpos : self._obj_qpos + 7] = [
            *self.layout.object_xy,
            0.0005,
            np.cos(yaw / 2),
            0.0,
            0.0,
            np.sin(yaw / 2),
        ]
        q0 = ik_nearest(self.layout.start_tcp, HOME_Q)
        d.qpos[:6] = q0
        d.ctrl[:6] = q0
        d.qpos[self._fingers] = GRIPPER_STROKE / 2
        self.gripper.command(GRIPPER_STROKE)
        mujoco.mj_forward(m, d)
        self.arm.settle(q0, round(self.config.settle_s / self.config.physics_dt))
        d.time = 0.0
        self.driver.stop("reset")
        self.driver.enable()  # streams from the measured pose
        self.ik_failures = 0
        self.done = False
        self._success_since = None
        self._failure = None
        self._start_z = float(self.object_pose()[0][2])
        self._lifted = 0.0
        return self.observe()

    def step(self, action: np.ndarray) -> Observation:
        """Command the next TCP target + gripper opening (10,), reached one control period later,
        and run that period through the driver. A target the driver refuses (out of reach, outside
        the limits) is not streamed: the arm holds there and ``ik_failures`` counts it."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"SimCell.step needs an action of shape ({ACTION_DIM},), got {action.shape}")
        if not np.all(np.isfinite(action)):
            bad = [ACTION_NAMES[i] for i in np.flatnonzero(~np.isfinite(action))]
            raise ValueError(f"SimCell.step: non-finite action in {bad}")
        if self.layout is None:
            raise RuntimeError("SimCell.step called before reset(seed)")
        period = 1.0 / self.config.control_hz
        if not self.driver.command_pose(action, t=self.time + period).accepted:
            self.ik_failures += 1
        self.driver.run_for(period)
        self._update_status()
        return self.observe()

    def submit_chunk(self, chunk: ActionChunk) -> ChunkResult:
        """Hand a policy's chunk to the driver (scheduled at its absolute step times)."""
        if self.layout is None:
            raise RuntimeError("SimCell.submit_chunk called before reset(seed)")
        return self.driver.submit_chunk(chunk)

    def run_until(self, t: float) -> Observation:
        """Run the driver (servo ticks + physics) until sim time ``t``, then observe."""
        self.driver.run_until(t)
        self._update_status()
        return self.observe()

    def hold(self, seconds: float) -> None:
        """Advance by ``seconds`` (whole servo ticks) with the driver running, e.g. while a policy
        computes: the arm follows what it was given and holds at its end."""
        if seconds < 0 or not np.isfinite(seconds):
            raise ValueError(f"SimCell.hold needs a finite duration >= 0, got {seconds}")
        if seconds > 0:
            self.driver.run_for(seconds)
            self._update_status()

    def update_status(self) -> None:
        """Run the success and failure checks on the current state (``step``, ``run_until`` and
        ``hold`` do it themselves; a caller that ticks ``driver`` directly calls this)."""
        self._update_status()

    def _update_status(self) -> None:
        snap = self.snapshot()
        self._lifted = snap.lifted_m
        self._failure = unrecoverable(self.task, snap)
        if self._failure:
            self.done = True
            return
        if check(self.task, snap).success:
            if self._success_since is None:
                self._success_since = self.time
            self.done = self.time - self._success_since >= self.task.success_hold_s - 1e-9
        else:
            self._success_since = None

    # ------------------------------------------------------------------ scene editing (tests, debugging)
    def set_object_pose(self, position: np.ndarray, quat_wxyz: np.ndarray = (1.0, 0.0, 0.0, 0.0)) -> None:
        """Teleport the task object (zero velocity); the success checks see it at once."""
        a = self._obj_qpos
        self.data.qpos[a : a + 7] = [*position, *quat_wxyz]
        self.data.qvel[self.model.joint(self.task.name).dofadr[0] :][:6] = 0.0
        mujoco.mj_forward(self.model, self.data)

    def teleport_arm(self, tcp_pose: np.ndarray, gripper: float | None = None) -> None:
        """Put the arm (and its targets) at a TCP pose (4, 4) and optionally the gripper opening."""
        q = ik_nearest(tcp_pose, self.data.qpos[:6])
        self.data.qpos[:6] = q
        self.data.qvel[:6] = 0.0
        self.arm.settle(q, 0)
        if gripper is not None:
            self.gripper.command(gripper)
            self.data.qpos[self._fingers] = self.gripper.target / 2
        mujoco.mj_forward(self.model, self.data)
        self.driver.resync()  # the world moved under the driver: restart from the measured pose

    # ------------------------------------------------------------------ observation
    def observe(self) -> Observation:
        """Measured TCP pose + gripper opening (10,), camera images (H, W, 3) uint8, sim time, and the
        privileged scene state (8,) (see ``ENV_STATE_NAMES``)."""
        state = pose_to_vector(self.data.site_xpos[self._tcp], self.tcp_pose()[:3, :3], self.gripper_opening)
        d = self.data
        up = d.xmat[self._obj_body].reshape(3, 3)[:, 2]
        env_state = np.concatenate([d.xpos[self._obj_body], up, d.xpos[self._target_body][:2]])
        images = {}
        if self.config.render:
            if self._renderer is None:
                self._renderer = mujoco.Renderer(self.model, *self.config.image_size)
            for cam in self.config.cameras:
                self._renderer.update_scene(self.data, camera=cam)
                images[cam] = self._renderer.render().copy()
        return Observation(state=state, images=images, timestamp=self.time, env_state=env_state)

    def render_video_frame(self, height: int = 240, width: int = 320) -> np.ndarray:
        """A larger scene-camera view (H, W, 3) uint8 for rollout videos."""
        key = (int(height), int(width))
        if key not in self._video_renderers:
            self._video_renderers[key] = mujoco.Renderer(self.model, *key)
        r = self._video_renderers[key]
        r.update_scene(self.data, camera="scene")
        return r.render().copy()

    def outcome(self) -> TaskOutcome:
        """Success check now: ``reason`` is "ok" or what is wrong (e.g. "cup tipped"). A success
        counts only once it has held for the task's ``success_hold_s``, at the timeout too."""
        if self._failure:
            return TaskOutcome(False, self._failure)
        result = check(self.task, self.snapshot())
        hold = self.task.success_hold_s
        if result.success and (self._success_since is None or self.time - self._success_since < hold - 1e-9):
            result = TaskOutcome(False, f"success not held for {hold:g} s")
        if not result.success and self.time >= self.max_duration_s and self.layout is not None:
            return TaskOutcome(False, f"timeout ({result.reason})")
        return result

    # ------------------------------------------------------------------ privileged state
    @property
    def time(self) -> float:
        return float(self.data.time)

    @property
    def max_duration_s(self) -> float:
        return float(self.task.max_duration_s)

    @property
    def gripper_opening(self) -> float:
        """Measured opening between the pads, m."""
        return float(np.sum(self.data.qpos[self._fingers]))

    @property
    def joint_positions(self) -> np.ndarray:
        return self.data.qpos[:6].copy()

    def tcp_pose(self) -> np.ndarray:
        """Measured TCP pose (4, 4) in the base frame."""
        return pose_matrix(self.data.site_xpos[self._tcp], self.data.site_xmat[self._tcp].reshape(3, 3))

    def object_pose(self, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Position (3,) of the object's base and rotation (3, 3) (privileged, for experts/checks)."""
        body = self._obj_body if name is None else self.model.body(name).id
        return self.data.xpos[body].copy(), self.data.xmat[body].reshape(3, 3).copy()

    def snapshot(self) -> SceneSnapshot:
        """What the task's success checks read, measured now."""
        pos, rot = self.object_pose()
        return SceneSnapshot(
            object_pos=pos,
            object_rot=rot,
            tcp_pos=self.data.site_xpos[self._tcp].copy(),
            target_xy=np.asarray(self.layout.target_xy, dtype=np.float64),
            gripper_contact=self.in_contact_with_gripper(),
            lifted_m=max(self._lifted, float(pos[2]) - self._start_z),
        )

    def in_contact_with_gripper(self, name: str | None = None) -> bool:
        """True if any gripper geom touches the task object."""
        d = self.data
        if d.ncon == 0:
            return False
        g = d.contact.geom[: d.ncon]
        return bool(
            np.any(
                (self._is_gripper[g[:, 0]] & self._is_object[g[:, 1]])
                | (self._is_gripper[g[:, 1]] & self._is_object[g[:, 0]])
            )
        )

    def close(self) -> None:
        """Free the renderers (GL contexts)."""
        for r in [self._renderer, *self._video_renderers.values()]:
            if r is not None:
                r.close()
        self._renderer = None
        self._video_renderers.clear()

    def __enter__(self) -> SimCell:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
