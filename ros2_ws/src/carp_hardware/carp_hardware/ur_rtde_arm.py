"""``RtdeArm``: the real UR5e behind the driver's ``Arm`` seam, through ur_rtde (SDU Robotics).

ur_rtde 1.6 (https://sdurobotics.gitlab.io/ur_rtde/api/api.html) exposes three objects; this
backend uses exactly these calls (signatures as the installed wheel reports them with ``help()``;
the pybind bindings of ``servoJ``/``servoL``/``waitPeriod``/``isPoseWithinSafetyLimits`` take
positional arguments only):

- ``RTDEControlInterface(hostname, frequency=-1.0, flags=FLAG_UPLOAD_SCRIPT, ur_cap_port=50002,
  rt_priority=0)``: ``initPeriod() -> timedelta``, ``waitPeriod(t)``,
  ``servoJ(q, speed, acceleration, time, lookahead_time, gain) -> bool`` (speed/acceleration
  unused; lookahead 0.03-0.2 s; gain 100-2000), ``servoL(pose, ...)`` likewise,
  ``servoStop(a=10.0)``, ``moveJ(q, speed=1.05, acceleration=1.4, asynchronous=False)``,
  ``getInverseKinematics(x, qnear=[], max_position_error=1e-10, max_orientation_error=1e-10)``,
  ``getInverseKinematicsHasSolution(...)``, ``isPoseWithinSafetyLimits(pose)``,
  ``setWatchdog(min_frequency=10.0)``, ``kickWatchdog()``, ``isConnected()``, ``reconnect()``,
  ``isProgramRunning()``, ``reuploadScript()``, ``stopScript()``, ``disconnect()``.
- ``RTDEReceiveInterface(hostname, frequency=-1.0, variables=[], verbose=False,
  use_upper_range_registers=False, rt_priority=0)``: ``getActualQ()``, ``getActualTCPPose()``,
  ``getSafetyMode()``, ``isProtectiveStopped()``, ``isEmergencyStopped()``, ``isConnected()``,
  ``reconnect()``.
- ``DashboardClient(hostname, port=29999, verbose=False)``: ``connect(timeout_ms=2000)``,
  ``closeSafetyPopup()``, ``unlockProtectiveStop()``, ``isInRemoteControl()``.

The known trap: after a protective stop the controller kills the uploaded control script while the
socket stays up; ``isConnected()`` stays True and every command returns False (printing "RTDE
control script is not running"). So every command's return value is checked, and ``state()``
reports ``isProgramRunning()`` and the safety flags on every tick; ``recover()`` unlocks the stop
through the dashboard, reconnects, re-uploads the script and re-arms the watchdog.

The interface is not thread-safe: one thread (the driver's servo loop) owns it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from carp_hardware.interfaces import ArmState, ensure_joint_path
from carp_hardware.kinematics import TCP_OFFSET, fk
from carp_policy.yaml_config import load_yaml

# UR safety modes (RTDE safety_mode; ur_rtde getSafetyMode)
SAFETY_MODES = {
    1: "normal",
    2: "reduced",
    3: "protective_stop",
    4: "recovery",
    5: "safeguard_stop",
    6: "system_emergency_stop",
    7: "robot_emergency_stop",
    8: "violation",
    9: "fault",
    10: "validate_joint_id",
    11: "undefined",
    12: "automatic_mode_safeguard_stop",
    13: "system_three_position_enabling_stop",
}
_MOVING_OK = {1, 2}  # normal and reduced mode allow motion


@dataclass
class RtdeConfig:
    """Connection and streaming settings of the real arm (``carp_hardware/config/ur5e_rtde.yaml``)."""

    host: str = "192.168.1.102"  # the robot's IP (PolyScope: Settings > System > Network)
    servo_hz: float = 500.0  # RTDE frequency: 500 (e-Series), 125 (CB3)
    command: str = "servoJ"  # servoJ (joint targets from the driver's IK) | servoL (TCP poses)
    # servoJ smoothing: lookahead 0.03-0.2 s (more = smoother, more lag), gain 100-2000 (more =
    # stiffer). 0.05 s / 500: between UR's ROS 2 driver (0.03 / 2000, crisp, can shake on a
    # 10 Hz policy's steps) and Diffusion Policy's servoL (0.1 / 300, smooth, ~0.1 s behind).
    lookahead_time: float = 0.05
    gain: float = 500.0
    servo_stop_deceleration: float = 10.0  # rad/s^2 (servoStop a)
    watchdog_min_hz: float = 20.0  # controller stops the arm if not kicked this often (PC died)
    tcp_check_m: float = 0.005  # connect(): the controller's TCP must match carp's TCP_OFFSET this well
    dashboard: bool = True  # use the dashboard server (port 29999) to unlock protective stops

    def __post_init__(self) -> None:
        if self.command not in ("servoJ", "servoL"):
            raise ValueError(f"RtdeConfig.command must be servoJ or servoL, got {self.command!r}")
        if not 0.03 <= self.lookahead_time <= 0.2:
            raise ValueError(f"RtdeConfig.lookahead_time must be in [0.03, 0.2] s, got {self.lookahead_time}")
        if not 100 <= self.gain <= 2000:
            raise ValueError(f"RtdeConfig.gain must be in [100, 2000], got {self.gain}")

    @classmethod
    def load(cls, path) -> RtdeConfig:
        return load_yaml(cls, path)


def pose_to_ur(pose: np.ndarray) -> list[float]:
    """(4, 4) -> [x, y, z, rx, ry, rz] (rotation vector), what ur_rtde takes."""
    return [*map(float, pose[:3, 3]), *map(float, Rotation.from_matrix(pose[:3, :3]).as_rotvec())]


def ur_to_pose(x: list[float]) -> np.ndarray:
    """[x, y, z, rx, ry, rz] -> (4, 4)."""
    t = np.eye(4)
    t[:3, :3] = Rotation.from_rotvec(np.asarray(x[3:6], float)).as_matrix()
    t[:3, 3] = x[:3]
    return t


def _real_factories() -> tuple[Callable, Callable, Callable]:
    from dashboard_client import DashboardClient
    from rtde_control import RTDEControlInterface
    from rtde_receive import RTDEReceiveInterface

    return RTDEControlInterface, RTDEReceiveInterface, DashboardClient


class RtdeArm:
    """A UR e-Series (or CB3 at 125 Hz) arm through ur_rtde.

    ``factories`` = (control, receive, dashboard) classes; tests pass the scripted fakes of
    ``carp_hardware.fake_rtde`` (same names and signatures), the robot the real ones.
    """

    name = "ur_rtde"

    def __init__(self, config: RtdeConfig | None = None, factories: tuple | None = None) -> None:
        self.config = config or RtdeConfig()
        self._factories = factories
        self.c: Any = None  # RTDEControlInterface
        self.r: Any = None  # RTDEReceiveInterface
        self.d: Any = None  # DashboardClient
        self.failed_command: str | None = None  # the last command that returned False
        self._t_next: Any = None  # when the last waitPeriod returned (initPeriod's timedelta)

    # ------------------------------------------------------------------ connection
    def connect(self) -> None:
        """Open receive, control (uploads the control script) and dashboard; arm the controller's
        watchdog; check that the controller's TCP is carp's TCP."""
        if self.c is not None:
            return
        control, receive, dashboard = self._factories or _real_factories()
        host, hz = self.config.host, self.config.servo_hz
        self.r = receive(host, hz)
        self.c = control(host, hz)
        if self.config.dashboard:
            self.d = dashboard(host)
            self.d.connect()
        if not self.c.setWatchdog(self.config.watchdog_min_hz):
            raise RuntimeError(
                "ur_rtde setWatchdog failed: is the control script running (remote control mode)?"
            )
        q, tcp = np.asarray(self.r.getActualQ(), float), ur_to_pose(self.r.getActualTCPPose())
        err = float(np.linalg.norm(fk(q)[:3, 3] - tcp[:3, 3]))
        if err > self.config.tcp_check_m:
            raise RuntimeError(
                f"the controller's TCP is {err * 1e3:.0f} mm from carp's (flange + {TCP_OFFSET} m along z): "
                f"set the TCP in PolyScope (Installation > General > TCP) to z = {TCP_OFFSET * 1e3:.0f} mm"
            )

    def serial(self) -> str:
        """The controller's serial number (dashboard ``getSerialNumber()``; "" without a dashboard),
        recorded with every demonstration."""
        return str(self.d.getSerialNumber()).strip() if self.d is not None else ""

    def close(self) -> None:
        if self.c is None:
            return
        try:
            self.c.servoStop(self.config.servo_stop_deceleration)
            self.c.stopScript()
        finally:
            self.c.disconnect()
            self.r.disconnect()
            if self.d is not None:
                self.d.disconnect()
            self.c = self.r = self.d = None

    # ------------------------------------------------------------------ reading
    def state(self) -> ArmState:
        t = time.monotonic()
        try:
            connected = bool(self.r.isConnected() and self.c.isConnected())
            q = np.asarray(self.r.getActualQ(), float)
            tcp = ur_to_pose(self.r.getActualTCPPose())
            mode = int(self.r.getSafetyMode())
            return ArmState(
                t=t,
                q=q,
                tcp=tcp,
                connected=connected,
                program_running=bool(connected and self.c.isProgramRunning()),
                protective_stop=bool(self.r.isProtectiveStopped()) or mode == 3,
                emergency_stop=bool(self.r.isEmergencyStopped()) or mode in (6, 7),
                safety_mode=mode,
            )
        except RuntimeError:  # ur_rtde raises on a dead socket
            return ArmState(
                t=t, q=np.full(6, np.nan), tcp=np.full((4, 4), np.nan), connected=False, program_running=False
            )

    # ------------------------------------------------------------------ commands
    def _ok(self, name: str, result: Any) -> bool:
        if result is False:
            self.failed_command = name
            return False
        return True

    def _period_start(self, dt: float):
        """The start of this servo period (ur_rtde's ``initPeriod`` time): the moment the last
        ``waitPeriod`` returned, while that is less than a period ago, else now.

        The driver's tick reads the state, interpolates, solves the IK and checks the limits before
        it calls ``servo``; a period started only then would leave that work outside it, and every
        cycle would last the period plus the tick (2.8 ms for 2 ms measured against the fake). So
        the period runs from the end of the last wait, as ur_rtde's examples place ``initPeriod``
        at the top of the loop; after a pause (IDLE, a home move) it restarts from now."""
        now = self.c.initPeriod()
        last = self._t_next
        if last is not None and 0.0 <= (now - last).total_seconds() < dt:
            return last
        return now

    def _end_period(self, t0) -> None:
        self.c.waitPeriod(t0)
        self._t_next = self.c.initPeriod()

    def servo(self, q: np.ndarray, dt: float, poses: np.ndarray | None = None) -> bool:
        """One servoJ (or servoL with ``poses``) per period inside initPeriod()/waitPeriod()."""
        q = ensure_joint_path(q)
        cfg = self.config
        for i, qi in enumerate(q):
            t0 = self._period_start(dt)
            if cfg.command == "servoL" and poses is not None:
                ok = self.c.servoL(pose_to_ur(poses[i]), 0.0, 0.0, dt, cfg.lookahead_time, cfg.gain)
            else:
                ok = self.c.servoJ([float(x) for x in qi], 0.0, 0.0, dt, cfg.lookahead_time, cfg.gain)
            if not self._ok(cfg.command, ok):
                self._t_next = None
                return False
            self.c.kickWatchdog()  # the loop is alive (the controller stops the arm if the PC dies)
            self._end_period(t0)
        return True

    def idle(self, n: int, dt: float) -> None:
        for _ in range(max(0, n)):
            t0 = self._period_start(dt)
            self.c.kickWatchdog()
            self._end_period(t0)

    def servo_stop(self) -> bool:
        return self._ok("servoStop", self.c.servoStop(self.config.servo_stop_deceleration))

    def move_joints(self, q: np.ndarray, speed: float, acceleration: float) -> bool:
        return self._ok(
            "moveJ", self.c.moveJ([float(x) for x in q], float(speed), float(acceleration), False)
        )

    def inverse_kinematics(self, pose: np.ndarray, q_near: np.ndarray) -> np.ndarray | None:
        """The controller's IK (``getInverseKinematics``) nearest ``q_near``; None without one."""
        try:
            q = self.c.getInverseKinematics(pose_to_ur(pose), [float(x) for x in q_near])
        except RuntimeError:
            return None
        q = np.asarray(q, dtype=np.float64)
        return q if q.shape == (6,) and np.all(np.isfinite(q)) else None

    def check_pose(self, pose: np.ndarray) -> str | None:
        x = pose_to_ur(pose)
        if not self.c.isPoseWithinSafetyLimits(x):
            return "outside the controller's safety limits (isPoseWithinSafetyLimits)"
        if not self.c.getInverseKinematicsHasSolution(x, [float(v) for v in self.r.getActualQ()]):
            return "no IK solution on the controller (getInverseKinematicsHasSolution)"
        return None

    def kick_watchdog(self) -> None:
        self.c.kickWatchdog()

    def recover(self) -> str:
        """Unlock a protective stop (dashboard), reconnect, re-upload the control script, re-arm the
        watchdog. Raises RuntimeError naming the step that failed."""
        did = []
        mode = int(self.r.getSafetyMode()) if self.r.isConnected() else None
        if self.r.isEmergencyStopped() if self.r.isConnected() else False:
            raise RuntimeError("emergency stop engaged: release it on the teach pendant first")
        if mode == 3 or (self.r.isConnected() and self.r.isProtectiveStopped()):
            if self.d is None:
                raise RuntimeError("protective stop: unlock it on the teach pendant (no dashboard client)")
            self.d.closeSafetyPopup()
            self.d.unlockProtectiveStop()
            did.append("unlocked the protective stop")
        if not self.r.isConnected():
            if not self.r.reconnect():
                raise RuntimeError(f"cannot reconnect RTDE receive to {self.config.host}")
            did.append("reconnected receive")
        if not self.c.isConnected():
            if not self.c.reconnect():
                raise RuntimeError(f"cannot reconnect RTDE control to {self.config.host}")
            did.append("reconnected control")
        if not self.c.isProgramRunning():
            if not self.c.reuploadScript():
                raise RuntimeError(
                    "reuploadScript failed (is the robot in remote control mode, stop unlocked?)"
                )
            did.append("re-uploaded the control script")
        if not self.c.setWatchdog(self.config.watchdog_min_hz):
            raise RuntimeError("setWatchdog failed after recovery")
        self.failed_command = None
        return ", ".join(did) or "nothing to recover"
