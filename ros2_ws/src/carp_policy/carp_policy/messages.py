"""Conversions between the stack's contract types and standard ROS 2 messages (docs/design.md).

The only module that knows both sides: nodes call these and nothing else touches message fields.
Standard messages only (custom .msg packages would need a cmake build):

- ``ActionChunk`` <-> ``trajectory_msgs/MultiDOFJointTrajectory``: joint_names ``[tcp, gripper]``, the
  TCP pose in ``transforms[0]``, the gripper opening (m) in ``transforms[1].translation.x``,
  ``header.stamp`` = the observation time, ``time_from_start`` = (i + 1) * dt;
- TCP pose (4, 4) <-> ``geometry_msgs/PoseStamped`` in the base frame, quaternion (x, y, z, w);
- camera frame (H, W, 3) uint8 <-> ``sensor_msgs/Image``, encoding ``rgb8``;
- capture time, s <-> ``builtin_interfaces/Time``, through integer nanoseconds, so a wall-clock
  time keeps its nanoseconds;
- a teleop target (one 10-number action) <-> a one-point ``MultiDOFJointTrajectory`` in the chunk's
  layout (``/ur5e/pose_cmd``), stamped with the time it was sent;
- SpaceMouse readings (six axes in [-1, 1], buttons) <-> ``sensor_msgs/Joy``.

A malformed message raises ``ValueError`` naming what is wrong; the receiving node logs it, counts
it and drops the message (it never reaches the arm).
"""

from __future__ import annotations

import threading
import time

import numpy as np
from builtin_interfaces.msg import Duration, Time
from geometry_msgs.msg import PoseStamped, Transform
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import Image, Joy
from trajectory_msgs.msg import MultiDOFJointTrajectory, MultiDOFJointTrajectoryPoint

from carp_policy.actions import ACTION_DIM, GRIPPER, POS, ROT6D, ActionChunk, matrix_to_rot6d

CHUNK_JOINTS = ("tcp", "gripper")
BASE_FRAME = "base"


# ----------------------------------------------------------------------------- time
def time_to_msg(t: float | int, *, ns: bool = False) -> Time:
    """Seconds (float) or, with ``ns=True``, integer nanoseconds -> builtin_interfaces/Time."""
    total = int(t) if ns else round(float(t) * 1e9)
    if total < 0:
        raise ValueError(f"a ROS time cannot be negative, got {total} ns")
    return Time(sec=total // 1_000_000_000, nanosec=total % 1_000_000_000)


def time_from_msg(msg: Time) -> float:
    """builtin_interfaces/Time -> seconds (float64: ~0.24 us resolution at today's epoch)."""
    return msg.sec + msg.nanosec * 1e-9


def time_ns_from_msg(msg: Time) -> int:
    """builtin_interfaces/Time -> integer nanoseconds (lossless)."""
    return msg.sec * 1_000_000_000 + msg.nanosec


def _duration(seconds: float) -> Duration:
    total = round(seconds * 1e9)
    return Duration(sec=total // 1_000_000_000, nanosec=total % 1_000_000_000)


def _seconds(d: Duration) -> float:
    return d.sec + d.nanosec * 1e-9


# ----------------------------------------------------------------------------- chunks
def chunk_to_msg(chunk: ActionChunk, frame_id: str = BASE_FRAME) -> MultiDOFJointTrajectory:
    """ActionChunk -> MultiDOFJointTrajectory (the layout in the module docstring)."""
    msg = MultiDOFJointTrajectory()
    msg.header.stamp = time_to_msg(chunk.timestamp)
    msg.header.frame_id = frame_id
    msg.joint_names = list(CHUNK_JOINTS)
    quats = chunk.quaternions  # (H, 4) x, y, z, w
    for i, a in enumerate(chunk.actions):
        tcp, grip = Transform(), Transform()
        tcp.translation.x, tcp.translation.y, tcp.translation.z = (float(v) for v in a[POS])
        q = quats[i]
        tcp.rotation.x, tcp.rotation.y, tcp.rotation.z, tcp.rotation.w = (float(v) for v in q)
        grip.translation.x = float(a[GRIPPER])
        grip.rotation.w = 1.0
        pt = MultiDOFJointTrajectoryPoint()
        pt.transforms = [tcp, grip]
        pt.time_from_start = _duration((i + 1) * chunk.dt)
        msg.points.append(pt)
    return msg


def chunk_from_msg(msg: MultiDOFJointTrajectory, latency_s: float = 0.0) -> ActionChunk:
    """MultiDOFJointTrajectory -> ActionChunk; a malformed message raises ValueError naming the fault.

    Checked: the joint names, two transforms per point, unit quaternions, step times (i + 1) * dt with
    one dt for the whole chunk, finite values (``ActionChunk`` refuses NaN/inf)."""
    if tuple(msg.joint_names) != CHUNK_JOINTS:
        raise ValueError(f"chunk joint_names must be {list(CHUNK_JOINTS)}, got {list(msg.joint_names)}")
    if not msg.points:
        raise ValueError("chunk has no points")
    H = len(msg.points)
    actions = np.zeros((H, ACTION_DIM))
    times = np.zeros(H)
    for i, pt in enumerate(msg.points):
        if len(pt.transforms) != 2:
            n = len(pt.transforms)
            raise ValueError(f"chunk point {i} has {n} transforms, expected 2 (tcp, gripper)")
        tcp, grip = pt.transforms
        q = np.array([tcp.rotation.x, tcp.rotation.y, tcp.rotation.z, tcp.rotation.w])
        if not np.all(np.isfinite(q)) or abs(np.linalg.norm(q) - 1.0) > 1e-3:
            raise ValueError(f"chunk point {i}: TCP rotation is not a unit quaternion ({q.tolist()})")
        actions[i, POS] = [tcp.translation.x, tcp.translation.y, tcp.translation.z]
        actions[i, ROT6D] = matrix_to_rot6d(Rotation.from_quat(q).as_matrix())
        actions[i, GRIPPER] = grip.translation.x
        times[i] = _seconds(pt.time_from_start)
    dt = times[0]
    if dt <= 0 or not np.allclose(times, dt * np.arange(1, H + 1), atol=1e-6):
        raise ValueError(
            f"chunk step times must be (i + 1) * dt with one dt > 0, got {np.round(times, 6).tolist()}"
        )
    return ActionChunk(actions, timestamp=time_from_msg(msg.header.stamp), dt=float(dt), latency_s=latency_s)


# ----------------------------------------------------------------------------- poses, images
def pose_to_msg(pose: np.ndarray, t: float, frame_id: str = BASE_FRAME) -> PoseStamped:
    """TCP pose (4, 4) at capture time t -> PoseStamped."""
    pose = np.asarray(pose, dtype=np.float64)
    msg = PoseStamped()
    msg.header.stamp = time_to_msg(t)
    msg.header.frame_id = frame_id
    p, q = pose[:3, 3], Rotation.from_matrix(pose[:3, :3]).as_quat()
    msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = (float(v) for v in p)
    o = msg.pose.orientation
    o.x, o.y, o.z, o.w = (float(v) for v in q)
    return msg


def pose_from_msg(msg: PoseStamped) -> tuple[np.ndarray, float]:
    """PoseStamped -> (TCP pose (4, 4), capture time s); refuses NaN and non-unit quaternions."""
    o, p = msg.pose.orientation, msg.pose.position
    q = np.array([o.x, o.y, o.z, o.w])
    xyz = np.array([p.x, p.y, p.z])
    if not (np.all(np.isfinite(q)) and np.all(np.isfinite(xyz))):
        raise ValueError("pose message is not finite (NaN/inf)")
    if abs(np.linalg.norm(q) - 1.0) > 1e-3:
        raise ValueError(f"pose orientation is not a unit quaternion ({q.tolist()})")
    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_quat(q).as_matrix()
    pose[:3, 3] = xyz
    return pose, time_from_msg(msg.header.stamp)


def image_to_msg(image: np.ndarray, t: float, frame_id: str) -> Image:
    """(H, W, 3) uint8 RGB at capture time t -> sensor_msgs/Image (rgb8)."""
    image = np.ascontiguousarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    msg = Image()
    msg.header.stamp = time_to_msg(t)
    msg.header.frame_id = frame_id
    msg.height, msg.width = image.shape[:2]
    msg.encoding = "rgb8"
    msg.is_bigendian = 0
    msg.step = image.shape[1] * 3
    msg.data = image.tobytes()
    return msg


def image_from_msg(msg: Image) -> tuple[np.ndarray, float]:
    """sensor_msgs/Image (rgb8 or bgr8) -> ((H, W, 3) uint8 RGB, capture time s)."""
    if msg.encoding not in ("rgb8", "bgr8"):
        raise ValueError(f"image encoding must be rgb8 or bgr8, got {msg.encoding!r}")
    H, W, step = msg.height, msg.width, msg.step
    if step < 3 * W or len(msg.data) != H * step:
        raise ValueError(f"image data has {len(msg.data)} bytes, expected {H} rows of step {step} >= {3 * W}")
    arr = np.frombuffer(bytes(msg.data), np.uint8).reshape(H, step)[:, : 3 * W].reshape(H, W, 3)
    if msg.encoding == "bgr8":
        arr = arr[..., ::-1]
    return np.ascontiguousarray(arr), time_from_msg(msg.header.stamp)


def target_to_msg(action: np.ndarray, t: float, lead_s: float = 0.1) -> MultiDOFJointTrajectory:
    """A teleop target (10,) sent at time t, meant for ``t + lead_s`` -> a one-point trajectory."""
    return chunk_to_msg(ActionChunk(np.asarray(action, np.float64)[None], timestamp=t, dt=lead_s))


def target_from_msg(msg: MultiDOFJointTrajectory) -> tuple[np.ndarray, float]:
    """One-point trajectory -> (target (10,), send time s); refuses a chunk of more than one step."""
    if len(msg.points) != 1:
        raise ValueError(f"a pose command has exactly one point, got {len(msg.points)}")
    chunk = chunk_from_msg(msg)
    return chunk.actions[0], chunk.timestamp


def joy_to_msg(axes: np.ndarray, buttons: tuple[int, ...], t: float, frame_id: str = "spacemouse") -> Joy:
    """Six axes in [-1, 1] and the held buttons, read at time t -> sensor_msgs/Joy."""
    axes = np.asarray(axes, np.float64)
    if axes.shape != (6,) or not np.all(np.isfinite(axes)):
        raise ValueError(f"a SpaceMouse reading has 6 finite axes, got {axes.tolist()}")
    msg = Joy()
    msg.header.stamp = time_to_msg(t)
    msg.header.frame_id = frame_id
    msg.axes = [float(a) for a in axes]
    msg.buttons = [int(b) for b in buttons]
    return msg


def joy_from_msg(msg: Joy) -> tuple[np.ndarray, tuple[int, ...], float]:
    """sensor_msgs/Joy -> (axes (6,), buttons, time s); refuses another axis count or NaN."""
    axes = np.asarray(msg.axes, np.float64)
    if axes.shape != (6,) or not np.all(np.isfinite(axes)):
        raise ValueError(f"a SpaceMouse Joy message has 6 finite axes, got {axes.tolist()}")
    return axes, tuple(int(b) for b in msg.buttons), time_from_msg(msg.header.stamp)


def state_vector(pose: np.ndarray, gripper: float) -> np.ndarray:
    """TCP pose (4, 4) + gripper opening -> the 10-number state vector (see carp_policy.actions)."""
    return np.concatenate([pose[:3, 3], matrix_to_rot6d(pose[:3, :3]), [gripper]])


__all__ = [
    "CHUNK_JOINTS",
    "chunk_from_msg",
    "chunk_to_msg",
    "image_from_msg",
    "image_to_msg",
    "joy_from_msg",
    "joy_to_msg",
    "pose_from_msg",
    "pose_to_msg",
    "state_vector",
    "target_from_msg",
    "target_to_msg",
    "time_from_msg",
    "time_ns_from_msg",
    "time_to_msg",
]


# ----------------------------------------------------------------------------- running a node
class Periodic:
    """Calls ``fn()`` every ``period`` s in a thread of its own until ``stop()``.

    The nodes' periodic work (the driver's state at 100 Hz, the policy's decisions) runs here and
    not in rclpy timers on a MultiThreadedExecutor: rclpy 7.1's MultiThreadedExecutor re-yields a
    task that its thread pool has queued but not started, so while every pool thread is busy (a
    decision computing, a callback waiting for the twin's lock) its spin loop never waits: it holds
    a core and the GIL and the node's own callbacks starve (measured: state 178 s old at the policy
    node in a loaded run). A loop that falls a whole period behind continues from now, without a
    burst. An exception is passed to ``on_error`` and the loop goes on; none ends the thread but
    ``stop()``.
    """

    def __init__(self, period: float, fn, name: str, on_error=None) -> None:
        if not period > 0:
            raise ValueError(f"{name}: period must be > 0 s, got {period}")
        self.period, self.fn, self.on_error = float(period), fn, on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            try:
                self.fn()
            except Exception as e:  # reported, and the loop keeps its rate
                if self.on_error is not None:
                    self.on_error(e)
            next_t += self.period
            wait = next_t - time.monotonic()
            if wait < -self.period:
                next_t, wait = time.monotonic(), 0.0
            self._stop.wait(max(wait, 0.0))


def spin_node(make_node, prog: str, argv: list[str] | None = None) -> int:
    """Run one node until Ctrl-C (or the launch's shutdown) on a single-threaded executor.

    Subscriptions, services and short timers share the executor's one thread; long or periodic work
    runs in a ``Periodic`` (see there why not a MultiThreadedExecutor). What a node's constructor
    refuses (a bad model, parameter, device or connection: ValueError, FileNotFoundError,
    RuntimeError, ConnectionError) is one line ``prog: error: ...`` on stderr and exit code 2, as for
    every ``carp-*`` command; the node is always destroyed and rclpy shut down."""
    import signal
    import sys

    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    rclpy.init(args=argv)
    node = None
    try:
        try:
            node = make_node()
        except (ValueError, FileNotFoundError, RuntimeError, ConnectionError) as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        ex = SingleThreadedExecutor()
        ex.add_node(node)
        try:
            ex.spin()
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        except ConnectionError as e:  # a device (the driver's servo process, a socket) is gone
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        except RuntimeError as e:
            # Ctrl-C or the launch's shutdown can invalidate the context while the executor builds
            # its next wait set ("the given context is not valid"): that is a clean stop too
            if rclpy.ok():
                print(f"{prog}: error: {e}", file=sys.stderr)
                return 2
    finally:
        # stopping (the arm stopped, a dataset closed) must not be cut short by the second SIGINT
        # that a launch or an impatient Ctrl-C sends: seen as a KeyboardInterrupt inside destroy_node
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0
