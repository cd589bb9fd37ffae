"""A scripted fake of the ur_rtde surface, for tests and benchmarks (no robot needed).

``FakeRTDEControlInterface``, ``FakeRTDEReceiveInterface`` and ``FakeDashboardClient`` carry the
installed ur_rtde 1.6 wheel's method names and signatures (a test compares them with the wheel's
own ``__doc__`` signatures); positional-only where the bindings are. All three talk to one
:class:`FakeUR` per host name (``FakeUR.create(host)``), which records every call and can be told to
misbehave the way a real controller does:

- ``protective_stop()``: the controller kills the control script; the sockets stay up,
  ``isConnected()`` stays True, every command returns False and prints "RTDE control script is not
  running" (the known trap);
- ``emergency_stop()``, ``drop_connection()``;
- the controller-side watchdog (``setWatchdog``): no ``kickWatchdog`` for longer than its period
  while the script runs -> the script stops.

Time: with ``realtime=False`` (tests) ``waitPeriod`` returns at once and the fake's clock advances
one period; with ``realtime=True`` (benchmarks) it sleeps until the period ends, as ur_rtde does.
"""

from __future__ import annotations

import datetime
import time
from typing import ClassVar

import numpy as np
from scipy.spatial.transform import Rotation

from carp_hardware.kinematics import IKError, fk, ik_nearest

NOT_RUNNING = "RTDE control script is not running!"


class FakeUR:
    """The fake controller behind the three fake interfaces."""

    robots: ClassVar[dict[str, FakeUR]] = {}

    def __init__(self, host: str, q: np.ndarray, realtime: bool = False, frequency: float = 500.0) -> None:
        self.host = host
        self.q = np.asarray(q, dtype=np.float64).copy()
        self.realtime = realtime
        self.frequency = frequency
        self.t = 0.0  # the controller's clock, s
        self.calls: list[tuple[str, tuple]] = []
        self.connected = True
        self.script_running = True
        self.protective = False
        self.estop = False
        self.remote_control = True
        self.servoing = False
        self.watchdog_period: float | None = None
        self.last_kick = 0.0
        self.safety_box = (np.array([-1.0, -1.0, -0.05]), np.array([1.0, 1.0, 1.2]))
        self.printed: list[str] = []
        self.fail_next: set[str] = set()  # method names whose next call returns False
        self.serial = "20235500000"  # what the dashboard's getSerialNumber() answers

    @classmethod
    def create(cls, host: str = "fake-ur5e", q=(0.0, -1.75, 1.85, -1.67, -1.5708, 0.0), **kw) -> FakeUR:
        robot = cls(host, np.asarray(q, float), **kw)
        cls.robots[host] = robot
        return robot

    @classmethod
    def get(cls, host: str) -> FakeUR:
        if host not in cls.robots:
            raise RuntimeError(f"fake ur_rtde: no robot at {host!r} (FakeUR.create it first)")
        return cls.robots[host]

    # -- misbehaviour
    def protective_stop(self) -> None:
        self.protective, self.script_running, self.servoing = True, False, False

    def emergency_stop(self) -> None:
        self.estop, self.script_running, self.servoing = True, False, False

    def drop_connection(self) -> None:
        self.connected, self.servoing = False, False

    def release_emergency_stop(self) -> None:
        self.estop = False

    # -- helpers
    def record(self, name: str, *args) -> None:
        self.calls.append((name, args))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def commandable(self, name: str) -> bool:
        if name in self.fail_next:
            self.fail_next.discard(name)
            return False
        if not self.connected:
            return False
        self._watchdog()
        if not self.script_running:
            self.printed.append(NOT_RUNNING)
            print(NOT_RUNNING)
            return False
        return True

    def _watchdog(self) -> None:
        if self.watchdog_period and self.script_running and self.t - self.last_kick > self.watchdog_period:
            self.script_running, self.servoing = False, False  # the controller shuts the control down

    def tcp(self) -> list[float]:
        t = fk(self.q)
        return [*t[:3, 3], *Rotation.from_matrix(t[:3, :3]).as_rotvec()]


def _pose(x) -> np.ndarray:
    t = np.eye(4)
    t[:3, :3] = Rotation.from_rotvec(np.asarray(x[3:6], float)).as_matrix()
    t[:3, 3] = x[:3]
    return t


class FakeRTDEControlInterface:
    """ur_rtde ``RTDEControlInterface`` (the calls carp uses, same signatures)."""

    def __init__(
        self,
        hostname: str,
        frequency: float = -1.0,
        flags: int = 1,
        ur_cap_port: int = 50002,
        rt_priority: int = 0,
    ) -> None:
        self.ur = FakeUR.get(hostname)
        if not self.ur.connected:
            raise RuntimeError(f"fake ur_rtde: cannot connect to {hostname}")
        self.ur.record("RTDEControlInterface", hostname, frequency)
        if frequency > 0:
            self.ur.frequency = frequency
        self._period = 1.0 / self.ur.frequency
        self._wall = time.perf_counter()

    def initPeriod(self) -> datetime.timedelta:
        self._start = time.perf_counter()
        return datetime.timedelta(seconds=self._start)

    def waitPeriod(self, t_cycle_start: datetime.timedelta, /) -> None:
        self.ur.t += self._period
        if self.ur.realtime:
            end = t_cycle_start.total_seconds() + self._period
            remaining = end - time.perf_counter()
            if remaining > 0.0002:
                time.sleep(remaining - 0.0002)  # sleep, then spin the rest (as ur_rtde does)
            while time.perf_counter() < end:
                pass

    def servoJ(self, q, speed, acceleration, time, lookahead_time, gain, /) -> bool:
        self.ur.record("servoJ", list(q), speed, acceleration, time, lookahead_time, gain)
        if not self.ur.commandable("servoJ"):
            return False
        self.ur.q, self.ur.servoing = np.asarray(q, float), True
        return True

    def servoL(self, pose, speed, acceleration, time, lookahead_time, gain, /) -> bool:
        self.ur.record("servoL", list(pose), speed, acceleration, time, lookahead_time, gain)
        if not self.ur.commandable("servoL"):
            return False
        try:
            self.ur.q = ik_nearest(_pose(pose), self.ur.q)
        except IKError:
            return False
        self.ur.servoing = True
        return True

    def servoStop(self, a: float = 10.0) -> bool:
        self.ur.record("servoStop", a)
        ok = self.ur.commandable("servoStop")
        self.ur.servoing = False
        return ok

    def moveJ(self, q, speed: float = 1.05, acceleration: float = 1.4, asynchronous: bool = False) -> bool:
        """Both overloads: a joint vector, or a path of [q..., speed, acceleration, blend] rows."""
        self.ur.record("moveJ", list(q), speed, acceleration, asynchronous)
        if not self.ur.commandable("moveJ"):
            return False
        q = np.asarray(q, float)
        self.ur.q = q[-1, :6] if q.ndim == 2 else q
        return True

    def getInverseKinematics(
        self, x, qnear=(), max_position_error: float = 1e-10, max_orientation_error: float = 1e-10
    ) -> list[float]:
        self.ur.record("getInverseKinematics", list(x), list(qnear))
        if not self.ur.commandable("getInverseKinematics"):
            raise RuntimeError(NOT_RUNNING)
        try:
            return list(ik_nearest(_pose(x), np.asarray(qnear if len(qnear) else self.ur.q, float)))
        except IKError:
            return []

    def getInverseKinematicsHasSolution(
        self, x, qnear=(), max_position_error: float = 1e-10, max_orientation_error: float = 1e-10
    ) -> bool:
        self.ur.record("getInverseKinematicsHasSolution", list(x))
        return len(self.getInverseKinematics(x, qnear)) == 6

    def isPoseWithinSafetyLimits(self, pose, /) -> bool:
        self.ur.record("isPoseWithinSafetyLimits", list(pose))
        lo, hi = self.ur.safety_box
        return bool(np.all(np.asarray(pose[:3]) >= lo) and np.all(np.asarray(pose[:3]) <= hi))

    def setWatchdog(self, min_frequency: float = 10.0) -> bool:
        self.ur.record("setWatchdog", min_frequency)
        if not self.ur.commandable("setWatchdog"):
            return False
        self.ur.watchdog_period, self.ur.last_kick = 1.0 / min_frequency, self.ur.t
        return True

    def kickWatchdog(self) -> bool:
        self.ur.record("kickWatchdog")
        if not self.ur.commandable("kickWatchdog"):
            return False
        self.ur.last_kick = self.ur.t
        return True

    def isConnected(self) -> bool:
        return self.ur.connected

    def reconnect(self) -> bool:
        self.ur.record("reconnect")
        return self.ur.connected

    def isProgramRunning(self) -> bool:
        self.ur._watchdog()
        return self.ur.connected and self.ur.script_running

    def reuploadScript(self) -> bool:
        self.ur.record("reuploadScript")
        if not self.ur.connected or self.ur.protective or self.ur.estop or not self.ur.remote_control:
            return False
        self.ur.script_running, self.ur.last_kick = True, self.ur.t
        return True

    def stopScript(self) -> None:
        self.ur.record("stopScript")
        self.ur.script_running = False

    def disconnect(self) -> None:
        self.ur.record("disconnect")

    def triggerProtectiveStop(self) -> bool:
        self.ur.record("triggerProtectiveStop")
        self.ur.protective_stop()
        return True


class FakeRTDEReceiveInterface:
    """ur_rtde ``RTDEReceiveInterface`` (the calls carp uses, same signatures)."""

    def __init__(
        self,
        hostname: str,
        frequency: float = -1.0,
        variables=(),
        verbose: bool = False,
        use_upper_range_registers: bool = False,
        rt_priority: int = 0,
    ) -> None:
        self.ur = FakeUR.get(hostname)
        if not self.ur.connected:
            raise RuntimeError(f"fake ur_rtde: cannot connect to {hostname}")

    def _alive(self) -> None:
        if not self.ur.connected:
            raise RuntimeError("fake ur_rtde: RTDE receive connection lost")

    def getActualQ(self) -> list[float]:
        self._alive()
        return list(self.ur.q)

    def getActualTCPPose(self) -> list[float]:
        self._alive()
        return self.ur.tcp()

    def getTargetQ(self) -> list[float]:
        return self.getActualQ()

    def getActualTCPSpeed(self) -> list[float]:
        return [0.0] * 6

    def getSafetyMode(self) -> int:
        self._alive()
        return 7 if self.ur.estop else 3 if self.ur.protective else 1

    def getRobotMode(self) -> int:
        return 7

    def isProtectiveStopped(self) -> bool:
        self._alive()
        return self.ur.protective

    def isEmergencyStopped(self) -> bool:
        self._alive()
        return self.ur.estop

    def isConnected(self) -> bool:
        return self.ur.connected

    def reconnect(self) -> bool:
        return self.ur.connected

    def getTimestamp(self) -> float:
        return self.ur.t

    def disconnect(self) -> None:
        pass


class FakeDashboardClient:
    """ur_rtde ``DashboardClient`` (the calls carp uses, same signatures)."""

    def __init__(self, hostname: str, port: int = 29999, verbose: bool = False) -> None:
        self.ur = FakeUR.get(hostname)
        self._connected = False

    def connect(self, timeout_ms: int = 2000) -> None:
        self.ur.record("dashboard.connect")
        if not self.ur.connected:
            raise RuntimeError("fake dashboard: cannot connect")
        self._connected = True

    def isConnected(self) -> bool:
        return self._connected and self.ur.connected

    def closeSafetyPopup(self) -> None:
        self.ur.record("closeSafetyPopup")

    def unlockProtectiveStop(self) -> None:
        self.ur.record("unlockProtectiveStop")
        self.ur.protective = False

    def isInRemoteControl(self) -> bool:
        return self.ur.remote_control

    def safetymode(self) -> str:
        return "PROTECTIVE_STOP" if self.ur.protective else "NORMAL"

    def getSerialNumber(self) -> str:
        return self.ur.serial

    def disconnect(self) -> None:
        self._connected = False


FACTORIES = (FakeRTDEControlInterface, FakeRTDEReceiveInterface, FakeDashboardClient)


def fake_driver(host: str = "fake-ur5e", servo_hz: float = 125.0, realtime: bool = True,
                gripper_port: int | None = None, driver_config: dict | None = None,
                robot_present: bool = True, clock=None):  # fmt: skip
    """An ``ArmDriver`` over a new fake controller (and, with ``gripper_port``, a 2F-85 at a
    ``FakeURCapServer`` on loopback): what ``DriverProcess`` builds in its child in tests and
    benchmarks, as ``driver_process.rtde_driver`` does on the robot. ``robot_present=False``: no
    controller answers at ``host`` (connect raises, as ur_rtde's does)."""
    from carp_hardware.driver_process import rtde_driver

    if robot_present:
        FakeUR.create(host, realtime=realtime, frequency=servo_hz)
    cfg = {**(driver_config or {}), "servo_hz": servo_hz}
    return rtde_driver(host, cfg, None, gripper_port, clock, FACTORIES, gripper_host="127.0.0.1")
