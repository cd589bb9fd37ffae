"""The arm driver core: chunk scheduling, servo-rate interpolation, safety, watchdog and faults.

One code path for the robot and the twin (DESIGN.md: sim replaces the device, never the stack).
Everything above the :class:`~carp_hardware.interfaces.Arm` / ``Gripper`` backends lives here and
imports no rclpy; the ROS node and ``carp-eval`` are thin callers.

Time. A :class:`Clock` says what time it is: ``WallClock`` on the robot, the twin's simulated time
in evaluation (``carp_sim.backends.SimClock``: it advances only when the backend runs physics, as
fast as the CPU allows), or the twin paced to the wall clock for live use. The same scheduler code
runs under all three.

Commands (any thread may call them; the servo loop owns the backend):
- ``submit_chunk(chunk)``: an ``ActionChunk`` whose step i is the target for
  ``chunk.timestamp + (i + 1) * chunk.dt``. The executor strategy turns it into a timed path:
  past steps are dropped (latency compensation), the first ``execute_steps`` are kept, and the
  path starts at the commanded pose at arrival, so a replacing chunk never jumps.
- ``command_pose(pose, gripper, t)`` and ``command_twist(twist)``: teleoperation targets (a target
  TCP pose reached at time ``t``), through the same checks.
- ``enable()``, ``stop()``, ``home()``, ``acknowledge()``.

Servo loop. ``tick()`` runs one servo period (the robot calls it at 500 Hz inside the backend's
``initPeriod()/waitPeriod()``); ``run_until(t)`` / ``run_for(s)`` run many ticks in one pass
(the twin: a control period's poses, checks and IK vectorised, as ``ik_nearest_path`` does). Each
tick commands the path's pose for the end of the tick: ``t_k = now + (k + 1) * dt``.

Faults are one state machine (:class:`DriverState`):

    IDLE --enable--> RUNNING --refusal / watchdog--> STOPPED --valid command--> RUNNING
      ^                 |                                |
      |                 +--hardware fault--> FAULT <-----+
      +------acknowledge (recover: unlock, re-upload, re-seed)----+

A *refusal* (a bad chunk or target, a tick that would break a limit) and the *watchdog* (no valid
target for ``watchdog_s``) stop the arm (``servoStop``) and leave it STOPPED: nothing moves until
the next valid command, which restarts from the measured pose. A *hardware fault* (protective
stop, emergency stop, lost connection, dead control script, a command the controller refused)
latches FAULT: nothing moves until the operator calls ``acknowledge()`` and ``enable()``.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy.spatial.transform import Rotation

from carp_hardware.interfaces import Arm, ArmState, Gripper
from carp_hardware.kinematics import HOME_Q, IKError, ik_nearest, ik_nearest_path, pose_matrix
from carp_hardware.safety import Refusal, SafetyLimits, SafetyMonitor, rotvec_between, rotvec_to_matrix
from carp_policy.actions import ACTION_DIM, ActionChunk, matrix_to_rot6d, rot6d_to_matrix
from carp_policy.yaml_config import load_yaml


# ----------------------------------------------------------------------------- time
class Clock(Protocol):
    """What time it is on the driver's time base, s."""

    def now(self) -> float: ...


class WallClock:
    """The host's monotonic clock (the robot PC); every sample of the cell is stamped on it."""

    def now(self) -> float:
        return time.monotonic()


class EpochClock:
    """The host's wall clock, ``time.time()``: the ROS clock every message stamp is on (the driver
    node's time base, so a chunk stamped by the policy node is scheduled on the same clock)."""

    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to (tests, fakes that simulate time)."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = float(t)

    def now(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


# ----------------------------------------------------------------------------- config
@dataclass
class DriverConfig:
    """Settings of the driver core (``carp_hardware/config/driver.yaml``; strict keys)."""

    servo_hz: float = 500.0  # e-Series 500 Hz; CB3: 125; the twin in evaluation: 100
    execute_steps: int = 8  # of a chunk's steps, execute the first N (past ones dropped), then re-plan
    # A new chunk's path starts at the commanded pose at arrival; its first kept step lies at least
    # this far ahead, so the entry segment (the blend) is never shorter than this.
    blend_s: float = 0.05
    # replace: each chunk replaces the rest of the last; keyframe_ensemble: Chain-of-Action's
    # reverse temporal ensemble (KeyframeEnsembleExecutor) before that
    executor: str = "replace"
    pose_lead_s: float = 0.1  # command_pose without a time: reach the target this far ahead
    ik: str = "controller"  # "controller" (Arm.inverse_kinematics, ur_rtde getInverseKinematics) | "local"
    ik_cross_check_rad: float = 0.0  # > 0: refuse a controller IK differing from the closed form by more
    gripper_period_s: float = 0.05  # at most one gripper command per this many s (rate limit)
    gripper_deadband: float = 0.001  # m: a new gripper command only when the target moved this much
    gripper_speed: float | None = None  # backend units (Robotiq: 0..1 of max); None = backend default
    gripper_force: float | None = None
    home_q: tuple[float, ...] = tuple(float(q) for q in HOME_Q)  # kinematics.HOME_Q
    home_speed: float = 0.5  # rad/s of the leading joint (moveJ)
    home_acceleration: float = 0.8  # rad/s^2
    check_controller_poses: bool = True  # ask Arm.check_pose for every chunk step at acceptance
    # The servo process (driver_process) on the robot: SCHED_FIFO at this priority (1-99; 0 = the
    # normal scheduler), so policy inference and camera threads cannot preempt a tick. Needs
    # CAP_SYS_NICE or an rtprio limit (the docker image grants both); without, a warning and the
    # normal scheduler. ur_rtde's own threads run at their rt_priority.
    servo_rt_priority: int = 80
    servo_cpu: int = -1  # pin the servo process to this core (an isolated one); -1 = any core

    def __post_init__(self) -> None:
        if not (np.isfinite(self.servo_hz) and self.servo_hz > 0):
            raise ValueError(f"DriverConfig.servo_hz must be positive, got {self.servo_hz}")
        if not 1 <= int(self.execute_steps) <= 64:
            raise ValueError(f"DriverConfig.execute_steps must be in 1..64, got {self.execute_steps}")
        if self.executor not in ("replace", "keyframe_ensemble"):
            raise ValueError(
                f"DriverConfig.executor must be 'replace' or 'keyframe_ensemble', got {self.executor!r}"
            )
        if self.ik not in ("controller", "local"):
            raise ValueError(f"DriverConfig.ik must be 'controller' or 'local', got {self.ik!r}")
        if self.blend_s < 0 or self.pose_lead_s <= 0 or self.gripper_period_s < 0:
            raise ValueError("DriverConfig: blend_s >= 0, pose_lead_s > 0, gripper_period_s >= 0")
        if len(self.home_q) != 6:
            raise ValueError("DriverConfig.home_q must hold 6 joint angles")
        if not 0 <= int(self.servo_rt_priority) <= 99 or int(self.servo_cpu) < -1:
            raise ValueError("DriverConfig: servo_rt_priority must be in 0..99 and servo_cpu >= -1")

    @classmethod
    def load(cls, path) -> DriverConfig:
        return load_yaml(cls, path)

    @property
    def dt(self) -> float:
        return 1.0 / self.servo_hz


class DriverState(enum.Enum):
    IDLE = "idle"  # connected, not streaming (after start, stop(), acknowledge(), home())
    RUNNING = "running"  # streaming targets (or holding the last one)
    STOPPED = "stopped"  # a refusal or the watchdog stopped the stream; a valid command resumes
    FAULT = "fault"  # a hardware fault; acknowledge() then enable()


class DriverError(RuntimeError):
    """A command that cannot be carried out in the driver's state (e.g. enable() during a fault)."""


# ----------------------------------------------------------------------------- paths
class Path:
    """Timed waypoints (K >= 1) of TCP pose + gripper, interpolated linearly in position and by
    slerp in rotation (Diffusion Policy's PoseTrajectoryInterpolator); before the first and after
    the last waypoint it holds. Sampling is vectorised over times."""

    def __init__(self, times: np.ndarray, positions: np.ndarray, rotations: np.ndarray, gripper: np.ndarray):
        """``rotations``: (K, 3, 3) matrices."""
        self.times = np.asarray(times, dtype=np.float64)
        self.positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
        self.rotations = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
        self.gripper = np.asarray(gripper, dtype=np.float64).reshape(-1)
        k = len(self.times)
        if not (len(self.positions) == len(self.rotations) == len(self.gripper) == k >= 1):
            raise ValueError("Path: times, positions, rotations and gripper must have one entry per waypoint")
        if k > 1 and np.any(np.diff(self.times) <= 0):
            raise ValueError("Path: waypoint times must increase")
        self._rel = rotvec_between(self.rotations[:-1], self.rotations[1:]) if k > 1 else np.zeros((0, 3))

    @classmethod
    def hold(cls, t: float, pose: np.ndarray, gripper: float) -> Path:
        return cls(np.array([t]), pose[None, :3, 3], pose[None, :3, :3], np.array([gripper]))

    @property
    def end(self) -> float:
        return float(self.times[-1])

    def sample(self, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Poses at times ``ts`` (N,): positions (N, 3), rotation matrices (N, 3, 3), gripper
        targets (N,).

        The gripper target is the opening of the waypoint the segment leads to (a gripper is
        commanded to a target and moves at its own speed, not streamed)."""
        ts = np.asarray(ts, dtype=np.float64)
        k = len(self.times)
        if k == 1:
            n = len(ts)
            return (
                np.repeat(self.positions, n, 0),
                np.repeat(self.rotations, n, 0),
                np.repeat(self.gripper, n),
            )
        i = np.clip(np.searchsorted(self.times, ts, side="right") - 1, 0, k - 2)
        s = np.clip((ts - self.times[i]) / (self.times[i + 1] - self.times[i]), 0.0, 1.0)
        pos = self.positions[i] + s[:, None] * (self.positions[i + 1] - self.positions[i])
        rot = self.rotations[i] @ rotvec_to_matrix(s[:, None] * self._rel[i])
        nxt = np.clip(np.searchsorted(self.times, ts - 1e-12, side="left"), 0, k - 1)
        return pos, rot, self.gripper[nxt]


@dataclass
class Plan:
    """What an executor made of a chunk: the path to follow and what it dropped."""

    path: Path | None  # None: nothing left to execute
    dropped: int  # steps dropped because their time had passed (or lay inside the blend)
    kept: int  # chunk steps on the path
    first_step_time: float = float("nan")


class Executor(Protocol):
    """Turns an arriving chunk into the path the servo loop follows (a strategy: the default
    replaces the future; temporal ensembling (ACT) or Chain-of-Action's reverse temporal ensemble
    are one class each that also look at earlier chunks)."""

    def plan(
        self,
        chunk: ActionChunk,
        now: float,
        pose: np.ndarray,
        gripper: float,
        reach_time: Callable[[np.ndarray], float] | None = None,
    ) -> Plan:
        """``pose``/``gripper``: the commanded state at ``now``; ``reach_time(pose)``: the shortest
        time in which the arm can get from there to a TCP pose (4, 4) within the limits."""
        ...

    def reset(self) -> None:
        """Forget earlier chunks (a new episode, or the arm restarted from its measured pose)."""
        ...


@dataclass
class ReplaceExecutor:
    """Execute the chunk's first ``execute_steps`` steps from now on, replacing whatever was left.

    Steps whose time is not at least ``blend_s`` ahead of ``now`` are dropped, and so are steps the
    arm cannot reach by their time within the limits (``reach_time``: a late plan asks the entry
    segment to cover one step in less than a control period); the path starts at the commanded
    pose at ``now`` (no jump) and reaches the first kept step at its time. Nothing is clipped or
    retimed: a step is either executed at its time or dropped (and counted).
    """

    execute_steps: int = 8
    blend_s: float = 0.05

    def reset(self) -> None:
        pass  # looks at the arriving chunk only

    def plan(self, chunk, now, pose, gripper, reach_time=None) -> Plan:
        times = chunk.step_times()[: self.execute_steps]
        first = int(np.searchsorted(times, now + max(self.blend_s, 1e-9), side="left"))
        if reach_time is not None:
            mats = rot6d_to_matrix(chunk.actions[first : self.execute_steps, 3:9])
            while first < len(times) - 1:  # the last step is kept: its refusal names the problem
                target = pose_matrix(chunk.actions[first, :3], mats[0])
                if now + reach_time(target) <= times[first]:
                    break
                first, mats = first + 1, mats[1:]
        acts = chunk.actions[first : self.execute_steps]
        if len(acts) == 0:
            return Plan(None, dropped=first, kept=0)
        rots = np.concatenate([pose[None, :3, :3], rot6d_to_matrix(acts[:, 3:9])])
        path = Path(
            np.concatenate([[now], times[first:]]),
            np.vstack([pose[:3, 3], acts[:, :3]]),
            rots,
            np.concatenate([[gripper], acts[:, 9]]),
        )
        return Plan(path, dropped=first, kept=len(acts), first_step_time=float(times[first]))


def held_keyframe(actions: np.ndarray, tol: float = 1e-9) -> int | None:
    """Index of a chunk's keyframe when the chunk holds it to the end (Chain-of-Action's chains
    shorter than the chunk): the first step from which every later step repeats the last one.
    None when the last two steps differ: a chain cut at the chunk's length (or one exactly that
    long, which looks the same) has no keyframe the executor can see."""
    same = np.all(np.abs(actions - actions[-1]) <= tol, axis=1)  # (H,)
    if len(actions) < 2 or not same[-2]:
        return None
    k = len(actions) - 1
    while k > 0 and same[k - 1]:
        k -= 1
    return k


@dataclass
class KeyframeEnsembleExecutor(ReplaceExecutor):
    """Chain-of-Action's reverse temporal ensemble (Zhang et al. 2025), then ``ReplaceExecutor``.

    A CoA chunk runs from the current pose to a keyframe (and holds it). Successive chains toward
    the same keyframe are aligned on it: the step j before the newest chain's keyframe is averaged
    with the step j before each earlier chain's, weight ``exp(-decay * age)`` (age 0: the newest),
    so the chains agree where they end rather than at a clock time. The newest chain keeps its own
    timing. A chain whose keyframe lies more than ``match_m`` from the previous one's starts a new
    segment (the history is cleared), and so does a chunk without a visible keyframe
    (``held_keyframe``). Rotations are averaged as rotation6d and re-orthonormalised downstream.
    """

    decay: float = 0.5
    match_m: float = 0.02  # keyframes this close (position) belong to the same segment
    history: int = 4  # chains kept (the newest included)

    def __post_init__(self) -> None:
        self._chains: deque[tuple[np.ndarray, int]] = deque(maxlen=self.history)

    def reset(self) -> None:
        self._chains.clear()

    def plan(self, chunk, now, pose, gripper, reach_time=None) -> Plan:
        k = held_keyframe(chunk.actions)
        if k is None:
            self._chains.clear()
            return super().plan(chunk, now, pose, gripper, reach_time)
        if self._chains:
            prev, kp = self._chains[-1]
            if np.linalg.norm(prev[kp, :3] - chunk.actions[k, :3]) > self.match_m:
                self._chains.clear()
        self._chains.append((chunk.actions.copy(), k))
        acc = np.zeros_like(chunk.actions[: k + 1])  # (k+1, D): steps 0..k of the newest chain
        wsum = np.zeros((k + 1, 1))
        for age, (acts, ka) in enumerate(reversed(self._chains)):
            n = min(k, ka) + 1  # steps j = 0..n-1 before the keyframe exist in both
            w = math.exp(-self.decay * age)
            acc[k + 1 - n :] += w * acts[ka + 1 - n : ka + 1]
            wsum[k + 1 - n :] += w
        ens = chunk.actions.copy()
        ens[: k + 1] = acc / wsum
        ens[k + 1 :] = ens[k]
        merged = ActionChunk(ens, chunk.timestamp, chunk.dt, chunk.latency_s)
        return super().plan(merged, now, pose, gripper, reach_time)


EXECUTORS = {"replace": ReplaceExecutor, "keyframe_ensemble": KeyframeEnsembleExecutor}


def make_executor(config: DriverConfig) -> Executor:
    """The executor ``config.executor`` names, with the config's execute steps and blend."""
    return EXECUTORS[config.executor](config.execute_steps, config.blend_s)


# ----------------------------------------------------------------------------- status
@dataclass
class ChunkResult:
    """The driver's answer to ``submit_chunk`` / ``command_pose``."""

    accepted: bool
    refusal: Refusal | None = None
    dropped: int = 0  # steps dropped as already past (or inside the blend)
    kept: int = 0
    lead_s: float = float("nan")  # first kept step time - arrival: how far ahead the chunk arrived
    end_time: float = float("nan")  # time of the last kept step


@dataclass
class DriverStatus:
    state: DriverState
    t: float
    reason: str | None  # why it is STOPPED / FAULT (None while fine)
    q_cmd: np.ndarray
    tcp_cmd: np.ndarray  # (4, 4) commanded TCP pose
    gripper_cmd: float
    path_end: float  # time of the last valid target, s

    @property
    def moving(self) -> bool:
        return self.state is DriverState.RUNNING and self.t < self.path_end


class _Stats:
    """Rolling numbers for the operator (the last ``n`` values)."""

    def __init__(self, n: int = 256) -> None:
        self.values: deque[float] = deque(maxlen=n)

    def add(self, v: float) -> None:
        if np.isfinite(v):
            self.values.append(float(v))

    def summary(self) -> dict:
        if not self.values:
            return {"last": None, "p50": None, "max": None}
        a = np.fromiter(self.values, float)
        return {"last": a[-1], "p50": float(np.median(a)), "max": float(a.max())}


# ----------------------------------------------------------------------------- the driver
class ArmDriver:
    """Chunk / teleop commands in, servo-rate joint targets out, through the safety checks.

    ``arm``/``gripper`` are the backends (``gripper`` may be None for an arm without one).
    """

    def __init__(
        self,
        arm: Arm,
        gripper: Gripper | None = None,
        limits: SafetyLimits | None = None,
        config: DriverConfig | None = None,
        clock: Clock | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.arm, self.gripper = arm, gripper
        self.config = config or DriverConfig()
        self.safety = SafetyMonitor(limits or SafetyLimits())
        self.limits = self.safety.limits
        self.clock = clock or WallClock()
        self.executor = executor or make_executor(self.config)
        self.dt = self.config.dt
        self._lock = threading.RLock()  # commands from other threads vs. the servo loop
        self.state = DriverState.IDLE
        self.reason: str | None = None
        self.faults: Counter[str] = Counter()
        self.stops: Counter[str] = Counter()
        self.ticks = 0
        self.chunks_accepted = 0
        self._q_cmd = np.zeros(6)
        self._pose_cmd = np.eye(4)
        self._grip_cmd = float(getattr(gripper, "stroke", 0.085))
        self._grip_sent: float | None = None
        self._grip_sent_t = -math.inf
        self._path: Path | None = None
        self._diag = {k: _Stats() for k in ("obs_age_s", "inference_s", "lead_s", "tracking_error_m")}
        self._last_state: ArmState | None = None
        self.last_recovery: str | None = None  # what the last acknowledge() did

    # ------------------------------------------------------------------ state machine
    def enable(self) -> None:
        """Start streaming from the measured pose (IDLE or STOPPED -> RUNNING)."""
        with self._lock:
            if self.state is DriverState.FAULT:
                raise DriverError(f"cannot enable during a fault ({self.reason}); acknowledge() first")
            st = self.arm.state()
            cause = st.fault()
            if cause:
                self._fault(cause, f"cannot enable: {cause.replace('_', ' ')}")
                raise DriverError(self.reason)
            self._seed(st)
            self.state, self.reason = DriverState.RUNNING, None

    def stop(self, reason: str = "operator stop") -> None:
        """Decelerate and stop; stays IDLE until ``enable()`` (FAULT stays FAULT)."""
        with self._lock:
            self._path = None
            self.arm.servo_stop()
            if self.state is not DriverState.FAULT:
                self.state, self.reason = DriverState.IDLE, reason
            self.stops["operator"] += 1

    disable = stop

    def acknowledge(self) -> str:
        """Operator acknowledgement after a fault or a stop: recover the backend (unlock a
        protective stop, re-upload the control script, reconnect), re-seed from the measured pose,
        go IDLE. Returns what recovery did; raises DriverError if the arm is still faulted."""
        with self._lock:
            did = "nothing to recover"
            if self.state is DriverState.FAULT:
                try:
                    did = self.arm.recover()
                except RuntimeError as e:
                    raise DriverError(f"recovery failed: {e}") from e
            st = self.arm.state()
            if st.fault():
                raise DriverError(f"still faulted after recovery: {st.fault()}")
            self._seed(st)
            self.state, self.reason = DriverState.IDLE, None
            self.last_recovery = did
            return did

    def resync(self) -> None:
        """Forget the path and restart from the measured pose (the arm was moved under the driver,
        e.g. the twin teleported it); the state is kept."""
        with self._lock:
            self._seed(self.arm.state())

    def home(self, pose: np.ndarray | None = None) -> None:
        """Blocking joint move (moveJ) at the home speed to ``config.home_q``, or to the joints
        nearest it that put the TCP at ``pose`` (4, 4), e.g. an episode's start pose (the backend's
        IK: the controller's on the robot). A pose outside the workspace, without an IK solution or
        with one outside the joint limits is refused (DriverError: nothing moves). Ends IDLE."""
        target = np.asarray(self.config.home_q, float)
        if pose is not None:
            pose = np.asarray(pose, float)
            if pose.shape != (4, 4) or not np.all(np.isfinite(pose)):
                raise DriverError("home: the start pose must be a finite (4, 4) matrix")
            bad = self.safety.workspace(pose[None, :3, 3], "start pose")
            if bad is not None:
                raise DriverError(f"home: {bad}")
            with self._lock:
                q = self.arm.inverse_kinematics(pose, target)
            lim = self.safety.limits.joint_limits
            if q is None or np.any(q < lim[:, 0]) or np.any(q > lim[:, 1]):
                why = "no IK solution" if q is None else f"joints {np.round(q, 3).tolist()} break the limits"
                raise DriverError(f"home: start pose at {np.round(pose[:3, 3], 3).tolist()} m: {why}")
            target = np.asarray(q, float)
        with self._lock:
            if self.state is DriverState.FAULT:
                raise DriverError(f"cannot home during a fault ({self.reason}); acknowledge() first")
            if self.state is DriverState.RUNNING:
                self.arm.servo_stop()
            self._path = None
            ok = self.arm.move_joints(target, self.config.home_speed, self.config.home_acceleration)
            st = self.arm.state()
            if not ok or st.fault():
                self._fault(
                    st.fault() or "command_refused",
                    f"home move (moveJ) failed: {st.fault() or 'the controller refused the command'}",
                )
                raise DriverError(self.reason)
            self._seed(st)
            self.state, self.reason = DriverState.IDLE, None

    def open_gripper(self) -> None:
        """Open the gripper fully (non-blocking; nothing without a gripper), e.g. between trials."""
        if self.gripper is not None and not self.gripper.command(self.gripper.stroke):
            raise DriverError("the gripper refused the open command")

    def set_executor(self, name: str, execute_steps: int | None = None) -> None:
        """Select the chunk executor (``EXECUTORS``) and how many steps of a chunk it executes (None:
        ``config.execute_steps``); its history starts empty (a new episode)."""
        if name not in EXECUTORS:
            raise ValueError(f"unknown executor {name!r} (one of {sorted(EXECUTORS)})")
        with self._lock:
            steps = self.config.execute_steps if execute_steps is None else int(execute_steps)
            self.executor = EXECUTORS[name](steps, self.config.blend_s)

    def refusal_counts(self) -> dict[str, int]:
        """Refusals since the driver started, by reason (a copy)."""
        return dict(self.safety.refusals)

    # ------------------------------------------------------------------ commands
    def submit_chunk(self, chunk: ActionChunk) -> ChunkResult:
        """Check a chunk whole and, if every step passes, make it the path from now on."""
        with self._lock:
            now = self.clock.now()
            if (r := self._commandable(now)) is not None:
                return ChunkResult(False, r)
            age = now - float(chunk.timestamp)
            self._diag["obs_age_s"].add(age)
            self._diag["inference_s"].add(float(getattr(chunk, "latency_s", float("nan"))))
            acts = np.asarray(chunk.actions, dtype=np.float64)
            if acts.ndim != 2 or acts.shape[1] != ACTION_DIM:
                return self._refuse_cmd(
                    Refusal("shape", f"chunk actions must be (H, {ACTION_DIM}), got {acts.shape}", now)
                )
            r = self.safety.finite(acts, "chunk") or self.safety.finite(
                [chunk.timestamp, chunk.dt], "chunk time"
            )
            if r is None and not chunk.dt > 0:
                r = Refusal("timing", f"chunk dt must be positive, got {chunk.dt}")
            if r is None:
                r = self.safety.chunk_age(age)
            if r is not None:
                return self._refuse_cmd(Refusal(r.reason, r.message, now))
            try:
                plan = self.executor.plan(chunk, now, self._pose_at(now), self._grip_cmd, self._reach_time)
            except ValueError as e:  # a degenerate rotation6d
                return self._refuse_cmd(Refusal("bad_rotation", f"chunk: {e}", now))
            if plan.path is None:
                return self._refuse_cmd(
                    Refusal(
                        "late_chunk",
                        f"every executed step of the chunk is past "
                        f"({plan.dropped} dropped, arrived {age * 1e3:.0f} ms after its "
                        f"observation)",
                        now,
                    ),
                    dropped=plan.dropped,
                )
            return self._accept(plan, now, whole=True)

    def command_pose(
        self, pose: np.ndarray, gripper: float | None = None, t: float | None = None
    ) -> ChunkResult:
        """Teleoperation: reach TCP ``pose`` ((4, 4), or a 10-number action vector) at time ``t``
        (default now + ``pose_lead_s``), interpolating from the commanded pose; same checks as a
        chunk. ``gripper`` None keeps the current gripper target."""
        with self._lock:
            now = self.clock.now()
            if (r := self._commandable(now)) is not None:
                return ChunkResult(False, r)
            pose = np.asarray(pose, dtype=np.float64)
            r = self.safety.finite(pose, "target pose")
            if r is None and gripper is not None:
                r = self.safety.finite([gripper], "gripper target")
            if r is not None:
                return self._refuse_cmd(Refusal(r.reason, r.message, now))
            try:
                if pose.shape == (ACTION_DIM,):
                    gripper = float(pose[9]) if gripper is None else gripper
                    pose = pose_matrix(pose[:3], rot6d_to_matrix(pose[3:9]))
                elif pose.shape != (4, 4):
                    raise ValueError(f"a target pose is (4, 4) or ({ACTION_DIM},), got {pose.shape}")
                rot = np.stack([self._pose_at(now)[:3, :3], rot6d_to_matrix(matrix_to_rot6d(pose[:3, :3]))])
            except ValueError as e:
                return self._refuse_cmd(Refusal("bad_rotation", f"target pose: {e}", now))
            t = now + self.config.pose_lead_s if t is None else float(t)
            if not t > now:
                return self._refuse_cmd(
                    Refusal("late_target", f"target time {t:.3f} s is not after now {now:.3f} s", now)
                )
            grip = self._grip_cmd if gripper is None else float(gripper)
            path = Path(
                np.array([now, t]),
                np.stack([self._pose_at(now)[:3, 3], pose[:3, 3]]),
                rot,
                np.array([self._grip_cmd, grip]),
            )
            return self._accept(Plan(path, 0, 1, t), now, whole=False)

    def command_twist(
        self, twist: np.ndarray, gripper: float | None = None, duration: float | None = None
    ) -> ChunkResult:
        """Teleoperation by velocity: TCP twist (6,) ``[vx, vy, vz, wx, wy, wz]`` in the base frame
        (m/s, rad/s), applied for ``duration`` s (default ``pose_lead_s``) from the commanded pose;
        the target then goes through ``command_pose``. Stop sending and the watchdog stops the arm."""
        twist = np.asarray(twist, dtype=np.float64)
        if twist.shape != (6,):
            raise ValueError(f"a twist is 6 numbers [vx, vy, vz, wx, wy, wz], got shape {twist.shape}")
        d = self.config.pose_lead_s if duration is None else float(duration)
        with self._lock:
            now = self.clock.now()
            cur = self._pose_at(now)
            target = cur.copy()
            target[:3, 3] += twist[:3] * d
            if np.all(np.isfinite(twist[3:])):
                target[:3, :3] = Rotation.from_rotvec(twist[3:] * d).as_matrix() @ cur[:3, :3]
            else:
                target[:3, :3] = np.nan
            return self.command_pose(target, gripper, now + d)

    # ------------------------------------------------------------------ servo loop
    def tick(self) -> None:
        """One servo period (the robot's loop calls this at ``servo_hz``; the backend paces it)."""
        self._advance(1)

    def run_until(self, t_end: float) -> None:
        """Run whole ticks until the clock reaches ``t_end`` (rounded up to the next tick)."""
        n = math.ceil((t_end - self.clock.now()) / self.dt - 1e-6)
        if n > 0:
            self._advance(n)

    def run_for(self, seconds: float) -> None:
        """Run ``seconds`` of ticks (rounded up to whole ticks)."""
        if not (np.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"run_for needs a finite duration >= 0, got {seconds}")
        self.run_until(self.clock.now() + seconds)

    def _advance(self, n: int) -> None:
        with self._lock:
            now = self.clock.now()
            st = self.arm.state()
            self._last_state = st
            cause = st.fault()
            if cause and self.state is not DriverState.FAULT:
                self._fault(cause, f"{cause.replace('_', ' ')} (robot side)")
            if self.gripper is not None and self.state is not DriverState.FAULT:
                gs = self.gripper.state()
                if not gs.connected or gs.fault:
                    cause = gs.fault or "connection_lost"
                    self._fault("gripper_" + cause, f"gripper {cause.replace('_', ' ')}")
            if self.state is not DriverState.RUNNING or self._path is None:
                self.arm.idle(n, self.dt)
                return
            self._diag["tracking_error_m"].add(float(np.linalg.norm(st.tcp[:3, 3] - self._pose_cmd[:3, 3])))
            ts = now + self.dt * np.arange(1, n + 1)
            # Watchdog: targets are valid until the path's last waypoint; then holding is allowed
            # for watchdog_s, after which the stream stops.
            deadline = self._path.end + self.limits.watchdog_s
            m = int(np.searchsorted(ts, deadline, side="right"))
            q_path, refusal = self._targets(ts[:m]) if m else (np.zeros((0, 6)), None)
            k = len(q_path)
            if k:
                self._send_gripper(ts[0])
                if not self.arm.servo(q_path, self.dt, self._pose_cache[:k]):
                    st = self.arm.state()
                    self._fault(
                        st.fault() or "command_refused",
                        f"servo command refused by the controller ({st.fault() or 'returned False'})",
                    )
                    return
                self._q_cmd = q_path[-1]
                self._pose_cmd = self._pose_cache[k - 1]
                self.ticks += k
            if refusal is not None:
                self._stop(
                    self.safety.count(Refusal(refusal.reason, refusal.message, float(ts[k]), refusal.index))
                )
            elif m < n:
                self._stop(
                    Refusal(
                        "watchdog",
                        f"no valid target for {self.limits.watchdog_s * 1e3:.0f} ms "
                        f"(last target at {self._path.end:.3f} s)",
                        float(deadline),
                    ),
                    count=False,
                )
                self.stops["watchdog"] += 1
            if n - k > 0:
                self.arm.idle(n - k, self.dt)

    def _targets(self, ts: np.ndarray) -> tuple[np.ndarray, Refusal | None]:
        """Joint targets for tick times ``ts`` (every check applied); stops at the first tick
        that fails a check and returns its refusal."""
        pos, rot, grip = self._path.sample(ts)
        mats = rot
        poses = np.zeros((len(ts), 4, 4))
        poses[:, :3, :3], poses[:, :3, 3], poses[:, 3, 3] = mats, pos, 1.0
        self._pose_cache = poses
        self._grip_cmd_next = grip
        refusal = self.safety.workspace(pos, "tick") or self.safety.speeds(
            np.concatenate([[ts[0] - self.dt], ts]),
            np.vstack([self._pose_cmd[:3, 3], pos]),
            np.concatenate([self._pose_cmd[None, :3, :3], mats]),
            "tick",
        )
        # a limit broken at tick i: stream the ticks before it, then stop
        n_ok = len(ts) if refusal is None else refusal.index
        if self.config.ik == "local":
            q = ik_nearest_path(poses[:n_ok], self._q_cmd, limits=self.limits.joint_limits)
        else:
            q = self._controller_ik(poses[:n_ok])
        if len(q) < n_ok:
            refusal = self._ik_error or Refusal(
                "ik_no_solution",
                f"tick {len(q)}: TCP {np.round(pos[len(q)], 4).tolist()} has no IK solution "
                "inside the joint limits",
                index=len(q),
            )
        jr = self.safety.joint_path(self._q_cmd, q, self.dt) if len(q) else None
        if jr is not None:
            q, refusal = q[: jr.index], jr
        return q, refusal

    def _controller_ik(self, poses: np.ndarray) -> np.ndarray:
        """The backend's IK pose by pose (the controller's getInverseKinematics), optionally
        cross-checked against the closed form."""
        self._ik_error = None
        out, q_near = [], self._q_cmd
        for p in poses:
            q = self.arm.inverse_kinematics(p, q_near)
            if q is None:
                break
            if self.config.ik_cross_check_rad > 0:
                try:
                    ql = ik_nearest(p, q_near, limits=self.limits.joint_limits)
                except IKError:
                    ql = None
                if ql is None or np.abs(ql - q).max() > self.config.ik_cross_check_rad:
                    self._ik_error = Refusal(
                        "ik_mismatch",
                        f"tick {len(out)}: the controller's IK and the closed "
                        f"form disagree by {np.inf if ql is None else np.abs(ql - q).max():.3f} "
                        "rad",
                        index=len(out),
                    )
                    break
            out.append(q)
            q_near = q
        return np.array(out).reshape(-1, 6)

    _ik_error: Refusal | None = None
    _pose_cache: np.ndarray = np.zeros((0, 4, 4))
    _grip_cmd_next: np.ndarray = np.zeros(0)

    def _send_gripper(self, t: float) -> None:
        """Rate-limited, non-blocking gripper command towards the path's current gripper target."""
        if self.gripper is None or not len(self._grip_cmd_next):
            return
        target = float(self._grip_cmd_next[0])
        self._grip_cmd = target
        if self._grip_sent is not None and abs(target - self._grip_sent) < self.config.gripper_deadband:
            return
        if t - self._grip_sent_t < self.config.gripper_period_s - 1e-9:
            return
        if not self.gripper.command(target, self.config.gripper_speed, self.config.gripper_force):
            gs = self.gripper.state()
            cause = gs.fault or ("connection_lost" if not gs.connected else "refused")
            self._fault("gripper_" + cause, f"gripper command failed ({cause.replace('_', ' ')})")
            return
        self._grip_sent, self._grip_sent_t = target, t

    # ------------------------------------------------------------------ helpers
    def _commandable(self, now: float) -> Refusal | None:
        if self.state is DriverState.FAULT:
            return self.safety.count(
                Refusal("fault", f"driver in fault ({self.reason}); acknowledge() first", now)
            )
        if self.state is DriverState.IDLE:
            return self.safety.count(Refusal("not_enabled", "driver not enabled; call enable()", now))
        if self.state is DriverState.STOPPED:
            # resume from where the arm actually is (it decelerated after the stop)
            st = self.arm.state()
            if st.fault():
                self._fault(st.fault(), f"{st.fault().replace('_', ' ')} (robot side)")
                return self.safety.count(Refusal("fault", self.reason, now))
            self._seed(st)
        return None

    def _accept(self, plan: Plan, now: float, whole: bool) -> ChunkResult:
        """Check every waypoint of a plan, then make it the path (or refuse and stop)."""
        path = plan.path
        wp_pos, wp_rot = path.positions[1:], path.rotations[1:]
        first = pose_matrix(wp_pos[0], wp_rot[0])
        r = (
            self.safety.workspace(wp_pos, "step")
            or self.safety.gripper(path.gripper[1:], "step")
            or (self.safety.start_distance(self._pose_at(now), first) if whole else None)
            or self.safety.speeds(path.times, path.positions, path.rotations, "step", accelerations=whole)
        )
        if r is None:
            r = self._check_reachable(wp_pos, wp_rot)
        if r is not None:
            return self._refuse_cmd(Refusal(r.reason, r.message, now), dropped=plan.dropped)
        self._path = path
        self.state, self.reason = DriverState.RUNNING, None
        self.chunks_accepted += whole
        lead = plan.first_step_time - now
        self._diag["lead_s"].add(lead)
        return ChunkResult(True, None, plan.dropped, plan.kept, lead, path.end)

    def _reach_time(self, target: np.ndarray, margin: float = 0.8) -> float:
        """Shortest time (s) from the commanded state to TCP ``target`` (4, 4) on the driver's
        straight-line path with every speed at ``margin`` of its limit (TCP linear and angular,
        joints by the closed-form IK); inf if it has no IK solution."""
        lim, cur = self.limits, self._pose_cmd
        lin = float(np.linalg.norm(target[:3, 3] - cur[:3, 3])) / lim.max_tcp_speed
        ang = (
            float(np.linalg.norm(rotvec_between(cur[None, :3, :3], target[None, :3, :3])))
            / lim.max_tcp_angular_speed
        )
        try:
            q = ik_nearest(target, self._q_cmd, limits=lim.joint_limits)
        except IKError:
            return math.inf
        joint = float(np.abs(q - self._q_cmd).max()) / lim.max_joint_speed
        return max(lin, ang, joint) / margin

    def _check_reachable(self, pos: np.ndarray, mats: np.ndarray) -> Refusal | None:
        """Every waypoint has a closed-form IK solution inside the joint limits (chained from the
        commanded joints), and where a controller is connected it accepts every pose."""
        poses = np.zeros((len(pos), 4, 4))
        poses[:, :3, :3], poses[:, :3, 3], poses[:, 3, 3] = mats, pos, 1.0
        q = ik_nearest_path(poses, self._q_cmd, limits=self.limits.joint_limits)
        if len(q) < len(poses):
            return Refusal(
                "ik_no_solution",
                f"step {len(q)}: TCP {np.round(pos[len(q)], 4).tolist()} has no "
                "IK solution inside the joint limits",
            )
        if self.config.check_controller_poses:
            for i, p in enumerate(poses):
                why = self.arm.check_pose(p)
                if why:
                    return Refusal("controller_refused", f"step {i}: the controller refuses the pose ({why})")
        return None

    def _pose_at(self, t: float) -> np.ndarray:
        """The commanded TCP pose at time ``t`` on the current path (else the last commanded)."""
        if self._path is None or self.state is not DriverState.RUNNING:
            return self._pose_cmd
        pos, rot, _ = self._path.sample(np.array([t]))
        return pose_matrix(pos[0], rot[0])

    def _seed(self, st: ArmState) -> None:
        """Commanded joints / pose from the measured ones (no path, no earlier chunks)."""
        self._q_cmd = np.asarray(st.q, dtype=np.float64).copy()
        self._pose_cmd = np.asarray(st.tcp, dtype=np.float64).copy()
        self._path = None
        self.executor.reset()
        self._grip_sent, self._grip_sent_t = None, -math.inf  # the clock may have restarted (the twin)
        if self.gripper is not None:
            self._grip_cmd = float(self.gripper.state().target)

    def _refuse_cmd(self, refusal: Refusal, dropped: int = 0) -> ChunkResult:
        self._stop(self.safety.count(refusal))
        return ChunkResult(False, refusal, dropped=dropped)

    def _stop(self, refusal: Refusal, count: bool = True) -> None:
        """A refusal or the watchdog: decelerate and stop (servoStop), STOPPED until a valid command."""
        self._path = None
        self.arm.servo_stop()
        if self.state is not DriverState.FAULT:
            self.state, self.reason = DriverState.STOPPED, str(refusal)
        if count:
            self.stops[refusal.reason] += 1

    def _fault(self, cause: str, message: str) -> None:
        """A hardware fault: stop and latch until acknowledge()."""
        self._path = None
        try:
            self.arm.servo_stop()  # may fail on a dead link; the controller's watchdog stops it then
        except Exception:  # a backend failing here must not hide the fault
            pass
        self.state, self.reason = DriverState.FAULT, f"{cause}: {message}"
        self.faults[cause] += 1

    # ------------------------------------------------------------------ reading
    def status(self) -> DriverStatus:
        with self._lock:
            return DriverStatus(
                self.state,
                self.clock.now(),
                self.reason,
                self._q_cmd.copy(),
                self._pose_cmd.copy(),
                self._grip_cmd,
                self._path.end if self._path is not None else -math.inf,
            )

    def diagnostics(self) -> dict:
        """What the operator reads: observation age, inference time, how far ahead chunks arrive,
        servo tracking error, refusals / stops / faults by reason."""
        with self._lock:
            out = {k: v.summary() for k, v in self._diag.items()}
            out |= {
                "state": self.state.value,
                "reason": self.reason,
                "ticks": self.ticks,
                "chunks_accepted": self.chunks_accepted,
                "refusals": dict(self.safety.refusals),
                "stops": dict(self.stops),
                "faults": dict(self.faults),
            }
            return out


def paced_servo_loop(
    driver: ArmDriver,
    running: Callable[[], bool],
    lock: threading.Lock | threading.RLock,
    after_tick: Callable[[int], None] | None = None,
) -> None:
    """The twin's servo loop at wall-clock pace: one ``driver.tick()`` under the world ``lock``
    (physics and camera renders share the MuJoCo data), then sleep to the next period outside it.

    On the robot the backend paces the loop (ur_rtde's ``waitPeriod``); the twin's backend does not,
    so this loop does. ``after_tick(k)`` runs under the lock after tick ``k`` (the twin's success
    checks). It always lets go of the world for a moment: a loop that runs behind its period would
    otherwise re-take the lock at once and starve the state publisher and the cameras (seen on a
    loaded CPU: a policy saw no state for minutes). After falling more than 0.1 s behind it goes on
    from now instead of bursting to catch up."""
    dt = driver.dt
    next_t = time.perf_counter()
    k = 0
    while running():
        with lock:
            driver.tick()
            k += 1
            if after_tick is not None:
                after_tick(k)
        next_t += dt
        wait = next_t - time.perf_counter()
        if wait < -0.1:
            next_t = time.perf_counter()
        time.sleep(max(wait, 0.0005))
