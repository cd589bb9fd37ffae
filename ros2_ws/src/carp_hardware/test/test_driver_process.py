"""The driver in a process of its own (``DriverProcess``), over the fake ur_rtde in the child: chunks
move the arm, refusals and exceptions come back as they are, and a parent that dies leaves the
arm stopped and the child gone."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from carp_hardware.driver_process import DriverProcess
from carp_hardware.fake_rtde import fake_driver
from carp_policy.actions import ActionChunk, matrix_to_rot6d


def _chunk_from(tcp: np.ndarray, t_obs: float, dy: float = 0.02) -> ActionChunk:
    acts = np.zeros((16, 10))
    acts[:, :3] = tcp[:3, 3] + np.outer(np.linspace(dy / 16, dy, 16), [0.0, 1.0, 0.0])
    acts[:, 3:9] = matrix_to_rot6d(tcp[:3, :3])
    acts[:, 9] = 0.085
    return ActionChunk(acts, timestamp=t_obs)


@pytest.fixture
def proc():
    p = DriverProcess(functools.partial(fake_driver, "fake-ur5e-proc", servo_hz=125.0))
    yield p
    p.close()


def test_a_chunk_sent_to_the_process_moves_the_arm(proc: DriverProcess) -> None:
    assert proc.dt == pytest.approx(1 / 125)
    proc.enable()
    arm, grip = proc.measured()
    assert grip is None and arm.connected
    y0 = arm.tcp[1, 3]
    # the whole chunk is due within 1.6 s of now; execute_steps 8 of 16 -> 0.8 s of it, 1 cm
    res = proc.submit_chunk(_chunk_from(arm.tcp, time.monotonic()))
    assert res.accepted, res.refusal
    time.sleep(1.2)
    arm2, _ = proc.measured()
    assert arm2.tcp[1, 3] - y0 == pytest.approx(0.01, abs=0.003)
    d = proc.diagnostics()
    assert d["chunks_accepted"] == 1
    # the chunk's executed part ended 0.4 s ago and nothing followed: the watchdog stopped the arm
    assert d["state"] == "stopped" and d["stops"].get("watchdog") == 1, d
    assert d["servo_period_ms"]["p50"] == pytest.approx(8.0, abs=2.0)  # the fake paces 125 Hz


def test_refusals_and_exceptions_cross_the_process_boundary(proc: DriverProcess) -> None:
    proc.enable()
    arm, _ = proc.measured()
    bad = _chunk_from(arm.tcp, time.monotonic())
    bad.actions[3, 0] = np.nan
    res = proc.submit_chunk(bad)
    assert not res.accepted and res.refusal.reason == "non_finite"
    far = arm.tcp.copy()
    far[2, 3] = -0.3  # below the table
    assert "workspace" in str(proc.command_pose(far).refusal)
    with pytest.raises(ValueError, match="no command"):
        proc.call("tick")  # the loop is the child's: not callable from outside


def test_the_servo_process_runs_under_sched_fifo_on_its_core_or_says_why_not() -> None:
    """``rt_priority`` / ``cpu``: the child's scheduling as asked where the OS allows it, and what
    did not take effect reported (the loop runs either way)."""
    import os

    p = DriverProcess(functools.partial(fake_driver, "fake-ur5e-rt", servo_hz=125.0), rt_priority=10, cpu=0)
    try:
        rt = p.realtime
        if rt["priority"] == 10:  # allowed here (CAP_SYS_NICE or an rtprio limit)
            assert os.sched_getscheduler(p.pid) == os.SCHED_FIFO and rt["error"] is None
            assert os.sched_getparam(p.pid).sched_priority == 10
        else:
            assert "SCHED_FIFO 10" in rt["error"] and os.sched_getscheduler(p.pid) == os.SCHED_OTHER
        assert rt["cpu"] == 0 and os.sched_getaffinity(p.pid) == {0}
        p.enable()
        assert p.diagnostics()["state"] == "running"
    finally:
        p.close()
    from carp_hardware.driver_process import realtime

    before = os.sched_getaffinity(0)
    got = realtime(0, cpu=4096)  # no such core: reported, nothing changed, nothing raised
    assert got["cpu"] is None and "core 4096" in got["error"] and os.sched_getaffinity(0) == before


def test_a_robot_that_cannot_be_opened_raises_in_the_parent() -> None:
    build = functools.partial(fake_driver, "fake-ur5e-absent", robot_present=False)
    with pytest.raises(RuntimeError, match="no robot at 'fake-ur5e-absent'"):
        DriverProcess(build)


PARENT = r"""
import functools, sys, time
from carp_hardware.driver_process import DriverProcess
from carp_hardware.fake_rtde import fake_driver
p = DriverProcess(functools.partial(fake_driver, "fake-ur5e-orphan"))
p.enable()
print(p.pid, flush=True)
time.sleep(60)
"""


def test_the_child_stops_the_arm_and_exits_when_the_parent_dies() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # alive
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the servo process outlived its parent by 10 s")
        said = parent.stderr.read()  # the child wrote to the stderr it inherited
        assert "the driver node is gone: arm stopped" in said, said
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_dead_child_is_a_connection_error_not_a_hang(proc: DriverProcess) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    time.sleep(0.2)
    with pytest.raises(ConnectionError, match="servo process is gone"):
        proc.diagnostics()
    with pytest.raises(ConnectionError):  # every command after it: the node stops, never hangs
        proc.enable()
