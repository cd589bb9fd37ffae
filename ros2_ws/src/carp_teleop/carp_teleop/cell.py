"""The robot side of ``carp-record``: the UR5e through the driver core behind ``TeleopArm``.

``DriverArm`` adapts ``carp_hardware.driver.ArmDriver``: teleop targets go to ``command_pose``
(the same safety limits a policy's chunks meet; a refusal stops the arm and is reported), the
servo loop runs in its own thread (``ArmDriver.tick``, paced by the backend's
``initPeriod()/waitPeriod()``), and the measured TCP pose and gripper opening are published into
``StreamBuffer``s at ``state_hz`` on the host clock, like a camera's frames.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from carp_policy.actions import StreamBuffer, matrix_to_rot6d


class DriverArm:
    """A ``TeleopArm`` over an ``ArmDriver`` (the cell; tests run it over the fake ur_rtde)."""

    name = "ur5e"

    def __init__(
        self,
        driver,
        serial: str = "",
        state_hz: float = 125.0,
        clock=time.monotonic,
        lock: threading.Lock | threading.RLock | None = None,
        after_tick: Callable[[int], None] | None = None,
    ) -> None:
        """A target is reached ``driver.config.pose_lead_s`` after it is sent (one control period,
        as the twin's step does). ``lock``: the twin standing in for the cell (its driver over
        ``SimArm`` on the wall clock): the servo loop is then paced here
        (``driver.paced_servo_loop``, with ``after_tick`` under the lock) and the state is read
        under the same world lock the cameras render under."""
        self.driver, self.serial = driver, serial
        self.state_hz, self.clock = state_hz, clock
        self.lock, self.after_tick = lock, after_tick
        self.tcp_buffer = StreamBuffer("tcp_pose", 256)
        self.gripper_buffer = StreamBuffer("gripper", 256)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, servo: bool = True) -> None:
        """Start publishing the state and (``servo``) the servo loop (a ``DriverProcess`` runs its
        own)."""
        self._stop.clear()
        servo = servo and hasattr(self.driver, "tick")
        loops = [self._publish_loop] + ([self._servo_loop] if servo else [])
        self._threads = [threading.Thread(target=f, daemon=True, name=f.__name__) for f in loops]
        for th in self._threads:
            th.start()

    def stop(self) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(timeout=2.0)
        self.driver.stop("recorder stopped")

    def _servo_loop(self) -> None:
        if self.lock is not None:  # the twin: nothing in the backend waits for the wall clock
            from carp_hardware.driver import paced_servo_loop

            paced_servo_loop(self.driver, lambda: not self._stop.is_set(), self.lock, self.after_tick)
            return
        while not self._stop.is_set():
            self.driver.tick()  # one servo period; the backend's waitPeriod paces the loop

    def _publish_loop(self) -> None:
        while not self._stop.wait(1.0 / self.state_hz):
            self.publish()

    def _measure(self):
        """(ArmState, GripperState or None) now: read directly, or between two ticks of a servo
        process (``DriverProcess.measured``)."""
        if hasattr(self.driver, "measured"):
            return self.driver.measured()
        g = self.driver.gripper
        return self.driver.arm.state(), (g.state() if g is not None else None)

    def publish(self) -> None:
        with self.lock or contextlib.nullcontext():
            s, gs = self._measure()
            t = self.clock()
        g = gs.opening if gs is not None else float("nan")
        self.tcp_buffer.push(t, np.concatenate([s.tcp[:3, 3], matrix_to_rot6d(s.tcp[:3, :3])]))
        self.gripper_buffer.push(t, np.array([g]))

    def tcp_pose(self) -> np.ndarray:
        return np.array(self._measure()[0].tcp, dtype=np.float64)

    def gripper_opening(self) -> float:
        gs = self._measure()[1]
        return float(gs.opening) if gs is not None else 0.0

    def command(self, pose: np.ndarray, gripper: float, t: float) -> str | None:
        # timed by the driver under its lock (now + pose_lead_s): a time read here, before waiting
        # for a servo tick to finish, could be almost "now" by then and the step would be refused
        # as too fast (seen: 9.7 mm in 0.15 ms)
        r = self.driver.command_pose(pose, gripper)
        return None if r.accepted else str(r.refusal)



class RobotCellDevices:
    """The cell's devices, opened and started: the UR5e through ur_rtde and the 2F-85 through its
    URCap behind the driver core (``ArmDriver`` with the limits of ``limits``) as a ``DriverArm``
    with its servo thread, and the cameras of a cameras YAML (``carp_hardware.cameras``). What
    ``carp-record`` and ``carp-eval --cell robot`` open; ``close()`` stops the arm first.

    ``rtde_factories`` (ur_rtde's control, receive and dashboard classes) and ``camera_kw`` (per
    camera, the backend's ``rs=`` / ``cv2=`` module) are the seams the tests fill with fakes."""

    def __init__(self, robot_ip: str, cameras_yaml, camera_names, gripper_port: int = 63352,
                 limits=None, rtde_factories: tuple | None = None, camera_kw: dict | None = None,
                 process: bool = False, build: Callable | None = None) -> None:  # fmt: skip
        """``process``: the servo loop in a process of its own (``DriverProcess``; what a policy
        beside it needs, driver_process.py: why), built by ``build`` (picklable; default
        ``rtde_driver`` at ``robot_ip``; tests: ``fake_rtde.fake_driver``)."""
        import functools

        import yaml

        from carp_hardware.cameras import make_camera
        from carp_hardware.driver import DriverConfig
        from carp_hardware.driver_process import DriverProcess, rtde_driver
        from carp_policy.cli import UserError

        if not cameras_yaml:
            raise UserError("on the robot, --cameras CAMERAS.yaml is needed (docs/recording.md)")
        if not Path(cameras_yaml).exists():
            raise FileNotFoundError(f"cameras file not found: {cameras_yaml}")
        spec = yaml.safe_load(Path(cameras_yaml).read_text()) or {}
        missing = [c for c in camera_names if c not in spec]
        if missing:
            raise UserError(f"{cameras_yaml} has no camera(s) {missing} (it has {sorted(spec)})")
        kw = camera_kw or {}
        # every section is checked before anything opens
        self.cameras = {c: make_camera(c, spec[c], **kw.get(c, {})) for c in camera_names}
        if limits and not Path(limits).exists():  # before the robot: not a connection error
            raise FileNotFoundError(f"limits file not found: {limits}")
        self._opened: list = []
        try:
            try:
                if process or build is not None:
                    lim = None if limits is None else str(limits)
                    build = build or functools.partial(rtde_driver, robot_ip, None, lim, gripper_port)
                    rt = DriverConfig()  # the servo process's real-time scheduling (its defaults)
                    driver = DriverProcess(build, rt_priority=rt.servo_rt_priority)
                    self._opened.append(driver.close)  # stops the arm, closes the backends in the child
                    serial = driver.serial()
                else:
                    driver = rtde_driver(robot_ip, limits=limits, gripper_port=gripper_port,
                                         factories=rtde_factories)  # fmt: skip
                    self._opened += [driver.arm.close] + ([driver.gripper.close] if driver.gripper else [])
                    serial = driver.arm.serial()
            except (OSError, RuntimeError) as e:  # no robot at that address, remote control off, no URCap
                raise UserError(f"cannot open the cell at {robot_ip}: {e} (docs/robot.md)") from None
            driver.enable()
            self.arm = DriverArm(driver, serial=serial)
            for cam in self.cameras.values():
                cam.start()
                self._opened.append(cam.stop)
            self.arm.start()
            self._opened.append(self.arm.stop)  # stops the driver: the arm halts before anything else closes
        except BaseException:
            self.close()
            raise

    @property
    def camera_serials(self) -> dict[str, str]:
        return {c: cam.info().serial for c, cam in self.cameras.items()}

    def defer(self, close: Callable[[], None]) -> None:
        """Close ``close`` with the devices (before them: newest first)."""
        self._opened.append(close)

    def close(self) -> None:
        """Newest first: the servo thread and the driver, the cameras, the gripper, the arm last."""
        while self._opened:
            close = self._opened.pop()
            try:
                close()
            except Exception as e:  # one device failing to close must not keep the others open
                print(f"cell: {getattr(close, '__qualname__', close)} failed: {e}")
