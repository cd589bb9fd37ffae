"""The driver core in a process of its own: the robot's servo loop away from the policy's GIL.

On the robot the servo loop must hold its period while the policy computes beside it. In one
Python process they share the GIL, so every inference and every ROS callback delays ticks;
``benchmarks/servo_loop.py`` measured on this 2-core machine that a loop in its own process leaves
the policy more predictions (118 against 83 in 15 s) at the same jitter. Diffusion Policy's RTDE
controller runs its loop in a process for the same reason.

``DriverProcess(build)`` spawns a process that calls ``build()`` (a picklable callable returning an
``ArmDriver``: ``rtde_driver`` on the robot, ``fake_rtde.fake_driver`` in tests), then loops: the
requests waiting on its pipe, then one ``tick()`` (paced by ur_rtde's ``initPeriod``/``waitPeriod``).
The parent calls the driver's commands by name over the pipe and gets their results or their
exceptions back (a ``DriverError`` stays a ``DriverError``).

Safety across the process boundary:
- the parent gone (killed, crashed: the pipe closes) -> the child stops the arm and exits; the
  controller-side watchdog (``setWatchdog``) stops it if the whole PC dies;
- the child gone -> every call raises ``ConnectionError`` naming its exit code; the node stops.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

# what the parent may call on the driver (and ``measured``: the arm's and the gripper's readings)
_METHODS = ("submit_chunk", "command_pose", "command_twist", "enable", "stop", "home", "acknowledge",
            "diagnostics", "status", "measured", "open_gripper", "set_executor", "refusal_counts",
            "serial")  # fmt: skip


def realtime(rt_priority: int = 0, cpu: int | None = None) -> dict[str, Any]:
    """Put the calling process under SCHED_FIFO at ``rt_priority`` (0: leave the scheduler alone)
    and pin it to core ``cpu`` (None: any). Returns what took effect: ``{"priority", "cpu",
    "error"}``; an error (no CAP_SYS_NICE / rtprio limit, no such core) is reported, never raised:
    the loop still runs, under the normal scheduler, and says so."""
    out: dict[str, Any] = {"priority": 0, "cpu": None, "error": None}
    errors = []
    if cpu is not None:
        try:
            os.sched_setaffinity(0, {int(cpu)})
            out["cpu"] = int(cpu)
        except (OSError, ValueError) as e:
            errors.append(f"core {cpu}: {e}")
    if rt_priority > 0:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(int(rt_priority)))
            out["priority"] = int(rt_priority)
        except (OSError, AttributeError) as e:  # EPERM without the capability; no SCHED_FIFO off Linux
            errors.append(f"SCHED_FIFO {rt_priority}: {e} (grant CAP_SYS_NICE or an rtprio limit)")
    out["error"] = "; ".join(errors) or None
    return out


def _serve(build: Callable[[], Any], conn, rt_priority: int = 0, cpu: int | None = None) -> None:
    """The child: build the driver, then requests between ticks until told to close or orphaned."""
    import signal

    # Ctrl-C in a terminal reaches the whole process group: the parent stops the arm in order
    # (close), the child must not die mid-tick on its own KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rt = realtime(rt_priority, cpu)  # before build: ur_rtde's threads inherit the policy
    try:
        driver = build()
    except Exception as e:  # a robot that cannot be opened: the parent raises it
        conn.send((0, "err", e))
        return
    conn.send((0, "ok", (driver.dt, rt)))
    periods: deque[float] = deque(maxlen=2000)
    last = time.perf_counter()

    def orphaned() -> None:  # the parent is gone (its end of the pipe closed): stop the arm
        driver.stop("the driver node is gone")
        print("carp-servo: the driver node is gone: arm stopped (servoStop)", file=sys.stderr)

    try:
        while True:
            while conn.poll(0):
                try:
                    seq, name, args = conn.recv()
                except (EOFError, OSError):
                    return orphaned()
                if name == "close":
                    driver.stop("driver node shutting down")
                    reply = (seq, "ok", None)
                else:
                    try:
                        reply = (seq, "ok", _call(driver, name, args, periods))
                    except Exception as e:  # the command's own answer (DriverError, ValueError, ...)
                        reply = (seq, "err", e)
                try:
                    try:
                        conn.send(reply)
                    except (pickle.PicklingError, TypeError, AttributeError) as e:  # will not pickle
                        conn.send((seq, "err", RuntimeError(f"servo process: {name}'s answer: {e}")))
                except OSError:  # BrokenPipeError: the parent died while we answered
                    return orphaned()
                if name == "close":
                    return
            driver.tick()
            now = time.perf_counter()
            periods.append(now - last)
            last = now
    finally:
        for dev in (driver.arm, driver.gripper):
            if dev is not None:
                try:
                    dev.close()
                except Exception:  # closing must not hide why the loop ended
                    pass


def _call(driver, name: str, args: tuple, periods: deque) -> Any:
    if name == "serial":  # the controller's (RtdeArm.serial; "" for a backend without one)
        return driver.arm.serial() if hasattr(driver.arm, "serial") else ""
    if name == "measured":
        g = driver.gripper.state() if driver.gripper is not None else None
        return driver.arm.state(), g
    if name == "diagnostics":
        out = driver.diagnostics()
        p = np.asarray(periods) * 1e3
        out["servo_period_ms"] = (
            {"p50": float(np.percentile(p, 50)), "p99": float(np.percentile(p, 99)), "max": float(p.max())}
            if len(p)
            else {"p50": None, "p99": None, "max": None}
        )
        return out
    return getattr(driver, name)(*args)


class DriverProcess:
    """An ``ArmDriver`` in a child process, called like the driver itself (module docstring).

    ``timeout_s``: how long a call may wait for the child's answer (``home`` waits its move).
    ``rt_priority`` / ``cpu``: the child's SCHED_FIFO priority and core (``realtime``; what took
    effect is ``self.realtime``, and a warning on stderr when it could not)."""

    def __init__(
        self,
        build: Callable[[], Any],
        timeout_s: float = 2.0,
        start_timeout_s: float = 60,
        rt_priority: int = 0,
        cpu: int | None = None,
    ) -> None:
        ctx = mp.get_context("spawn")  # no fork of a process that holds DDS, onnxruntime or MuJoCo threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve, args=(build, child, rt_priority, cpu), name="carp-servo", daemon=True
        )
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        self._seq = 0
        self.timeout_s = float(timeout_s)
        dt, self.realtime = self._answer(0, start_timeout_s, "start")
        self.dt = float(dt)
        if self.realtime["error"]:
            print(f"carp-servo: warning: normal scheduling: {self.realtime['error']}", file=sys.stderr)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def _answer(self, seq: int, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:  # answers to earlier calls that timed out arrive first: skip them
            if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                if not self._proc.is_alive():
                    raise ConnectionError(self._gone())
                raise TimeoutError(f"servo process: no answer to {what} within {timeout:.1f} s")
            try:
                got, kind, value = self._conn.recv()
            except (EOFError, OSError):
                raise ConnectionError(self._gone()) from None
            if got == seq:
                break
        if kind == "err":
            raise value
        return value

    def _gone(self) -> str:
        self._proc.join(timeout=1.0)
        return f"the servo process is gone (exit code {self._proc.exitcode}); the arm is stopped"

    def call(self, name: str, *args, timeout: float | None = None) -> Any:
        """The driver's method ``name`` in the child; its result, or its exception raised here."""
        if name not in _METHODS:
            raise ValueError(f"servo process: no command {name!r} (one of {_METHODS})")
        with self._lock:  # one request in flight: answers come back in order
            if not self._proc.is_alive():
                raise ConnectionError(self._gone())
            self._seq += 1
            try:
                self._conn.send((self._seq, name, args))
            except (BrokenPipeError, OSError):
                raise ConnectionError(self._gone()) from None
            return self._answer(self._seq, self.timeout_s if timeout is None else timeout, name)

    # the driver's commands, by name
    def submit_chunk(self, chunk):
        return self.call("submit_chunk", chunk)

    def command_pose(self, pose, gripper=None, t=None):
        return self.call("command_pose", pose, gripper, t)

    def command_twist(self, twist, gripper=None, duration=None):
        return self.call("command_twist", twist, gripper, duration)

    def enable(self) -> None:
        self.call("enable")

    def stop(self, reason: str = "operator stop") -> None:
        self.call("stop", reason)

    def home(self, pose=None, timeout: float = 60.0) -> None:
        self.call("home", pose, timeout=timeout)

    def open_gripper(self) -> None:
        self.call("open_gripper")

    def set_executor(self, name: str, execute_steps: int | None = None) -> None:
        self.call("set_executor", name, execute_steps)

    def refusal_counts(self) -> dict[str, int]:
        return self.call("refusal_counts")

    def serial(self) -> str:
        """The controller's serial number."""
        return self.call("serial")

    def acknowledge(self) -> str:
        return self.call("acknowledge", timeout=30.0)

    def diagnostics(self) -> dict:
        """The driver's diagnostics plus ``servo_period_ms`` (p50 / p99 / max of the last 2000 ticks)."""
        return self.call("diagnostics")

    def status(self):
        return self.call("status")

    def measured(self):
        """(ArmState, GripperState or None): the arm's and the gripper's readings between two ticks.
        (``ArmDriver.state`` is the driver's state machine: ``diagnostics()["state"]`` here.)"""
        return self.call("measured")

    def close(self, timeout: float = 5.0) -> None:
        """Stop the arm, close the backends, end the child (killed if it does not answer)."""
        with self._lock:
            if self._proc.is_alive():
                self._seq += 1
                try:
                    self._conn.send((self._seq, "close", ()))
                    self._answer(self._seq, timeout, "close")
                except (ConnectionError, TimeoutError, OSError):
                    pass
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(1.0)
            self._conn.close()


def rtde_driver(host: str, driver_config: dict | None = None, limits: str | None = None,
                gripper_port: int | None = 63352, clock=None, factories: tuple | None = None,
                gripper_host: str | None = None):  # fmt: skip
    """The cell's driver, connected: the UR5e through ur_rtde, the 2F-85 through its URCap at
    ``gripper_host`` (default: the controller) unless ``gripper_port`` is None, the limits of
    ``limits`` (default: the shipped YAML), on ``clock`` (default the host's monotonic clock; the
    driver node passes ``EpochClock``, the ROS clock). What ``DriverProcess`` builds in its child on
    the robot and ``carp-record`` opens; ``factories`` are ur_rtde's classes (tests: the fakes')."""
    from carp_hardware.driver import ArmDriver, DriverConfig
    from carp_hardware.robotiq import Robotiq2F85, RobotiqConfig
    from carp_hardware.safety import SafetyLimits
    from carp_hardware.ur_rtde_arm import RtdeArm, RtdeConfig
    from carp_policy.yaml_config import from_dict

    cfg = from_dict(DriverConfig, driver_config or {})
    safety = SafetyLimits.load(limits) if limits else SafetyLimits.load()  # before connecting
    arm = RtdeArm(RtdeConfig(host=host, servo_hz=cfg.servo_hz), factories=factories)
    arm.connect()
    gripper = None
    if gripper_port is not None:
        gripper = Robotiq2F85(RobotiqConfig(host=gripper_host or host, port=gripper_port))
        try:
            gripper.connect()
        except Exception:
            arm.close()
            raise
    return ArmDriver(arm, gripper, safety, cfg, clock)
