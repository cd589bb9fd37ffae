"""The driver core against the scripted fake of ur_rtde and against the twin's SimArm.

Every fault test ends in a stopped arm (servoStop sent, no servo command after the fault) and a
message naming the cause. Time is the fake controller's clock (it advances one period per
``waitPeriod``), so nothing here waits on the wall clock.
"""

from __future__ import annotations

import inspect
import os
import re

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

from carp_hardware import fake_rtde
from carp_hardware.driver import (
    ArmDriver,
    DriverConfig,
    DriverError,
    DriverState,
    KeyframeEnsembleExecutor,
    held_keyframe,
)
from carp_hardware.fake_rtde import FakeUR
from carp_hardware.kinematics import fk, pose_matrix
from carp_hardware.safety import SafetyLimits, SafetyMonitor
from carp_hardware.ur_rtde_arm import RtdeArm, RtdeConfig
from carp_policy.actions import ActionChunk, matrix_to_rot6d

HOME = np.array([0.0, -1.75, 1.85, -1.67, -1.5708, 0.0])
DOWN = np.diag([1.0, -1.0, -1.0])


class FakeClock:
    """The driver's clock = the fake controller's clock."""

    def __init__(self, ur: FakeUR) -> None:
        self.ur = ur

    def now(self) -> float:
        return self.ur.t


def make(limits: SafetyLimits | None = None, **cfg) -> tuple[ArmDriver, FakeUR]:
    ur = FakeUR.create("fake-ur5e", HOME)
    arm = RtdeArm(RtdeConfig(host="fake-ur5e"), factories=fake_rtde.FACTORIES)
    arm.connect()
    config = DriverConfig(**({"ik": "local", "blend_s": 0.0} | cfg))
    drv = ArmDriver(arm, None, limits or SafetyLimits(), config, FakeClock(ur))
    drv.enable()
    return drv, ur


def chunk_along(
    drv: ArmDriver, start: np.ndarray, step: np.ndarray, t_obs: float, n: int = 16
) -> ActionChunk:
    """A chunk whose step i sits at ``start + (i + 1) * step`` with the start orientation."""
    acts = np.zeros((n, 10))
    acts[:, :3] = start[:3, 3] + np.arange(1, n + 1)[:, None] * step
    acts[:, 3:9] = matrix_to_rot6d(start[:3, :3])
    acts[:, 9] = 0.085
    return ActionChunk(acts, timestamp=t_obs)


def commanded_tcp(ur: FakeUR) -> np.ndarray:
    """TCP positions (N, 3) of every servoJ the fake received."""
    return np.array([fk(np.array(args[0]))[:3, 3] for name, args in ur.calls if name == "servoJ"])


def assert_stopped(drv: ArmDriver, ur: FakeUR, n_calls_at_fault: int, state: DriverState, words: str) -> None:
    after = ur.names()[n_calls_at_fault:]
    assert "servoStop" in after, after
    assert "servoJ" not in after[after.index("servoStop") :]
    assert drv.state is state, drv.state
    assert re.search(words, drv.reason), drv.reason


# ----------------------------------------------------------------------------- the fake is the wheel
def _signature_from_doc(doc: str) -> list[str]:
    """Parameter names of the first signature line of a pybind docstring (without self)."""
    head = doc.strip().splitlines()[0]
    params = head[head.index("(") + 1 : head.rindex(") ->")]
    names = [p.split(":")[0].strip() for p in re.split(r",(?![^\[]*\])", params)]
    return names[1:]


@pytest.mark.parametrize(
    "module,real,fake",
    [
        ("rtde_control", "RTDEControlInterface", fake_rtde.FakeRTDEControlInterface),
        ("rtde_receive", "RTDEReceiveInterface", fake_rtde.FakeRTDEReceiveInterface),
        ("dashboard_client", "DashboardClient", fake_rtde.FakeDashboardClient),
    ],
)
def test_fake_has_the_installed_wheels_names_and_signatures(module, real, fake):
    real_cls = getattr(pytest.importorskip(module), real)
    for name, member in vars(fake).items():
        if name.startswith("_") and name != "__init__":
            continue
        assert hasattr(real_cls, name), f"{real}.{name} does not exist in the installed ur_rtde"
        doc = getattr(real_cls, name).__doc__ or ""
        if "Overloaded function" in doc:  # moveJ: check the joint-vector overload
            doc = doc.split("2. ", 1)[1]
            doc = doc[doc.index(name) :]
        want = _signature_from_doc(doc)
        params = list(inspect.signature(member).parameters.values())[1:]
        got = [p.name for p in params]
        if want and all(re.fullmatch(r"arg\d", w) for w in want):  # pybind positional-only arguments
            assert len(got) == len(want) and all(p.kind is p.POSITIONAL_ONLY for p in params), (name, got)
        else:
            assert got == want, f"{real}.{name}: fake {got} != wheel {want}"


# ----------------------------------------------------------------------------- one contract, two arms
@pytest.fixture(params=["fake_rtde", "sim"])
def arm(request):
    if request.param == "fake_rtde":
        FakeUR.create("fake-ur5e", HOME)
        a = RtdeArm(RtdeConfig(host="fake-ur5e"), factories=fake_rtde.FACTORIES)
        a.connect()
        yield a
        a.close()
    else:
        from carp_sim.env import SimCell, SimConfig

        with SimCell("cup", SimConfig(render=False)) as cell:
            cell.reset(0)
            yield cell.arm


def test_arm_contract(arm):
    st = arm.state()
    assert st.q.shape == (6,) and st.tcp.shape == (4, 4) and st.fault() is None
    np.testing.assert_allclose(fk(st.q)[:3, 3], st.tcp[:3, 3], atol=1e-6)
    # the backend's IK inverts its own forward kinematics nearest the given joints
    q = arm.inverse_kinematics(st.tcp, st.q)
    np.testing.assert_allclose(fk(q), st.tcp, atol=1e-6)
    assert arm.check_pose(st.tcp) is None
    # streamed joint targets are followed
    target = st.q + np.array([0.02, -0.02, 0.02, 0.0, 0.0, 0.02])
    path = st.q + np.linspace(0, 1, 20)[1:, None] * (target - st.q)
    assert arm.servo(path, 0.01)
    arm.kick_watchdog()  # the driver kicks it every tick
    arm.idle(20, 0.01)
    arm.kick_watchdog()
    assert np.abs(arm.state().q - target).max() < 2e-3
    assert arm.servo_stop()
    assert arm.move_joints(HOME, 1.0, 1.4)
    assert np.abs(arm.state().q - HOME).max() < 5e-3
    arm.kick_watchdog()
    assert isinstance(arm.recover(), str)


# ----------------------------------------------------------------------------- scheduling
def test_late_chunk_drops_exactly_the_past_steps_and_meets_the_rest_on_time():
    drv, ur = make()
    start = drv.status().tcp_cmd
    t = ur.t
    chunk = chunk_along(drv, start, np.array([-0.002, 0.0, 0.0]), t_obs=t - 0.25)  # 250 ms old
    res = drv.submit_chunk(chunk)
    assert res.accepted and res.dropped == 2 and res.kept == 6  # t-0.15, t-0.05 past; 8 executed
    assert res.lead_s == pytest.approx(0.05)
    for i in range(2, 8):  # each kept step is reached exactly at its time
        drv.run_until(chunk.step_times()[i])
        np.testing.assert_allclose(drv.status().tcp_cmd[:3, 3], chunk.actions[i, :3], atol=1e-9)


def test_execute_n_is_honoured_then_the_arm_holds():
    drv, ur = make(execute_steps=3)
    start = drv.status().tcp_cmd
    chunk = chunk_along(drv, start, np.array([-0.002, 0.0, 0.0]), t_obs=ur.t)
    res = drv.submit_chunk(chunk)
    assert res.kept == 3 and res.end_time == pytest.approx(chunk.step_times()[2])
    drv.run_for(0.35)
    np.testing.assert_allclose(drv.status().tcp_cmd[:3, 3], chunk.actions[2, :3], atol=1e-9)
    assert commanded_tcp(ur)[:, 0].min() >= chunk.actions[2, 0] - 1e-9  # never towards step 3
    assert drv.state is DriverState.RUNNING


def test_a_replacing_chunk_blends_without_a_jump():
    drv, ur = make(blend_s=0.05)
    start = drv.status().tcp_cmd
    v = np.array([-0.02, 0.0, 0.0])  # 0.2 m/s along -x
    drv.submit_chunk(chunk_along(drv, start, v, t_obs=ur.t))
    drv.run_for(0.33)
    mid = drv.status().tcp_cmd
    # a new plan from an observation 30 ms ago: heading 1 cm off to the side, same speed
    c2 = chunk_along(drv, mid, v, t_obs=ur.t - 0.03)
    c2.actions[:, 1] += 0.01
    res = drv.submit_chunk(c2)
    assert res.accepted and res.dropped == 0  # step 0 is 70 ms ahead: kept (the blend needs >= 50 ms)
    drv.run_for(0.5)
    p = commanded_tcp(ur)
    steps = np.linalg.norm(np.diff(p, axis=0), axis=1)
    # measured: no tick moves more than the fastest segment allows (0.2 m/s, and the 1 cm sideways
    # catch-up over the 120 ms entry segment), i.e. no jump at the switch
    assert steps.max() < 1.2 * np.hypot(0.2 + 0.02 / 0.12, 0.01 / 0.12) * drv.dt
    assert steps.max() < 0.8e-3  # 2 ms ticks: < 0.4 m/s


def coa_chunk(start: np.ndarray, keyframe: np.ndarray, n: int, t_obs: float) -> ActionChunk:
    """A Chain-of-Action chunk: n steps from ``start`` straight to ``keyframe``, then held."""
    acts = np.zeros((16, 10))
    s = np.minimum(np.arange(1, 17), n)[:, None] / n
    acts[:, :3] = start[:3, 3] + s * (keyframe - start[:3, 3])
    acts[:, 3:9] = matrix_to_rot6d(start[:3, :3])
    acts[:, 9] = 0.085
    return ActionChunk(acts, timestamp=t_obs)


def test_held_keyframe_finds_the_chain_end_or_none():
    start = pose_matrix(np.array([-0.4, 0.1, 0.3]), DOWN)
    kf = np.array([-0.45, 0.1, 0.25])
    assert held_keyframe(coa_chunk(start, kf, 10, 0.0).actions) == 9
    assert held_keyframe(coa_chunk(start, kf, 1, 0.0).actions) == 0
    assert held_keyframe(coa_chunk(start, kf, 16, 0.0).actions) is None  # cut or exactly 16: unseen


def test_keyframe_ensemble_aligns_chains_on_their_keyframe():
    ex = KeyframeEnsembleExecutor(execute_steps=16, blend_s=0.0, decay=0.5)
    start = pose_matrix(np.array([-0.4, 0.1, 0.3]), DOWN)
    kf = np.array([-0.45, 0.1, 0.25])
    old = coa_chunk(start, kf, 10, 0.0)
    ex.plan(old, 0.0, start, 0.085)
    # 0.3 s later, from 1.5 steps further along: 7 steps left, ending 1 cm beside the old keyframe
    now = 0.3
    mid = pose_matrix(old.actions[2, :3] + [0.0, 0.0, 0.001], DOWN)
    new = coa_chunk(mid, kf + np.array([0.0, 0.01, 0.0]), 7, now)
    plan = ex.plan(new, now, mid, 0.085)
    w = np.exp(-0.5)
    # aligned on the keyframe: the new chain's step 6 - j meets the old chain's step 9 - j
    for j in range(7):
        want = (new.actions[6 - j, :3] + w * old.actions[9 - j, :3]) / (1 + w)
        np.testing.assert_allclose(plan.path.positions[1 + 6 - j], want, atol=1e-12)
    np.testing.assert_allclose(plan.path.positions[-1], plan.path.positions[7])  # the keyframe held
    assert plan.first_step_time == pytest.approx(new.step_times()[0])  # the newest chain's timing
    # a keyframe 5 cm away starts a new segment: nothing averaged
    other = coa_chunk(mid, kf + np.array([0.0, 0.05, 0.0]), 7, now)
    np.testing.assert_allclose(ex.plan(other, now, mid, 0.085).path.positions[1:], other.actions[:, :3])
    ex.reset()
    np.testing.assert_allclose(ex.plan(new, now, mid, 0.085).path.positions[1:], new.actions[:, :3])


def test_driver_runs_the_executor_its_config_names():
    drv, ur = make(executor="keyframe_ensemble")
    assert isinstance(drv.executor, KeyframeEnsembleExecutor)
    start = drv.status().tcp_cmd
    res = drv.submit_chunk(coa_chunk(start, start[:3, 3] + [-0.02, 0.0, 0.0], 8, ur.t))
    assert res.accepted and res.kept == 8
    drv.run_for(1.0)
    np.testing.assert_allclose(drv.status().tcp_cmd[:3, 3], start[:3, 3] + [-0.02, 0.0, 0.0], atol=1e-9)
    with pytest.raises(ValueError, match="executor"):
        DriverConfig(executor="ensemble")


def test_teleop_pose_and_twist_commands_go_through_the_limits():
    drv, _ = make()
    start = drv.status().tcp_cmd
    target = start.copy()
    target[:3, 3] += [0.0, 0.02, 0.0]
    assert drv.command_pose(target).accepted
    drv.run_for(0.1)
    np.testing.assert_allclose(drv.status().tcp_cmd[:3, 3], target[:3, 3], atol=1e-9)
    assert drv.command_twist(np.array([0.0, 0.0, -0.1, 0.0, 0.0, 0.0])).accepted
    drv.run_for(0.1)
    assert drv.status().tcp_cmd[2, 3] == pytest.approx(target[2, 3] - 0.01)
    far = target.copy()
    far[:3, 3] = [-0.3, 0.0, -0.2]  # below the table
    res = drv.command_pose(far)
    assert not res.accepted and res.refusal.reason == "workspace"
    assert drv.state is DriverState.STOPPED and drv.diagnostics()["refusals"] == {"workspace": 1}
    assert drv.command_pose(target).accepted  # a valid target resumes from where the arm is
    assert drv.state is DriverState.RUNNING


def test_controller_ik_is_asked_per_tick_with_the_current_joints():
    drv, ur = make(ik="controller", ik_cross_check_rad=0.01)
    start = drv.status().tcp_cmd
    drv.submit_chunk(chunk_along(drv, start, np.array([-0.002, 0.0, 0.0]), t_obs=ur.t))
    n = len(ur.calls)
    drv.run_for(0.05)
    ik = [args for name, args in ur.calls[n:] if name == "getInverseKinematics"]
    servo = [args for name, args in ur.calls[n:] if name == "servoJ"]
    assert len(ik) == len(servo) == 25
    np.testing.assert_allclose(ik[1][1], servo[0][0])  # qnear = the joints commanded last tick
    assert servo[0][3:] == (0.002, 0.05, 500.0)  # time = period, lookahead, gain
    # every step was checked on the controller before the chunk was accepted
    assert "isPoseWithinSafetyLimits" in ur.names() and "getInverseKinematicsHasSolution" in ur.names()


# ----------------------------------------------------------------------------- one test per fault
def test_fault_nan_in_a_chunk():
    drv, ur = make()
    chunk = chunk_along(drv, drv.status().tcp_cmd, np.array([-0.002, 0, 0]), t_obs=ur.t)
    chunk.actions[5, 1] = np.nan  # ActionChunk refuses NaN when built; a later write must not slip by
    n = len(ur.calls)
    res = drv.submit_chunk(chunk)
    assert not res.accepted and res.refusal.reason == "non_finite"
    assert_stopped(drv, ur, n, DriverState.STOPPED, r"non-finite value \(NaN/inf\) at index \(5, 1\)")


def test_fault_pose_outside_the_workspace():
    drv, ur = make()
    chunk = chunk_along(drv, drv.status().tcp_cmd, np.array([0.0, 0.0, -0.04]), t_obs=ur.t)  # into the table
    n = len(ur.calls)
    assert not drv.submit_chunk(chunk).accepted
    assert_stopped(drv, ur, n, DriverState.STOPPED, r"^workspace: step \d+: TCP .* outside the workspace box")
    assert not any(p[2] < 0.015 for p in commanded_tcp(ur))


def test_fault_speed_violation():
    drv, ur = make()
    chunk = chunk_along(drv, drv.status().tcp_cmd, np.array([-0.05, 0.0, 0.0]), t_obs=ur.t)
    chunk.actions[:, :3] = drv.status().tcp_cmd[:3, 3] + [-0.01, 0, 0]
    chunk.actions[3:, 0] -= 0.2  # a 20 cm leap between step 2 and 3: 2 m/s
    n = len(ur.calls)
    assert not drv.submit_chunk(chunk).accepted
    assert_stopped(
        drv, ur, n, DriverState.STOPPED, r"^tcp_speed: step 3->4: TCP speed 2\.000 m/s over the limit"
    )


def test_fault_ik_jump():
    # A slow joint limit makes an ordinary 0.3 m/s move a joint step the limit forbids: the tick
    # check (the one that catches IK branch flips) must refuse it before it is streamed.
    drv, ur = make(limits=SafetyLimits(max_joint_speed=0.2))
    chunk = chunk_along(drv, drv.status().tcp_cmd, np.array([-0.03, 0.0, 0.0]), t_obs=ur.t)
    chunk.actions[:, 0] += 0.0298  # step 0 is 0.2 mm away (reachable in time); then 3 cm per step
    assert drv.submit_chunk(chunk).accepted
    n = len(ur.calls)
    drv.run_for(0.3)
    want = r"^ik_jump: tick \d+: joint \d would jump .* rad in one 2 ms tick"
    assert_stopped(drv, ur, n, DriverState.STOPPED, want)
    assert np.all(
        np.abs(np.diff([c[1][0] for c in ur.calls if c[0] == "servoJ"], axis=0)) <= 0.2 * 0.002 + 1e-12
    )
    # and a branch flip (same pose, other elbow) is refused by the same check
    mon = SafetyMonitor()
    flipped = HOME.copy()
    flipped[2] = -flipped[2]
    assert mon.joint_path(HOME, flipped[None], 0.002).reason == "ik_jump"


def test_fault_stale_chunk():
    drv, ur = make()
    chunk = chunk_along(drv, drv.status().tcp_cmd, np.array([-0.002, 0, 0]), t_obs=ur.t - 0.6)
    n = len(ur.calls)
    assert not drv.submit_chunk(chunk).accepted
    assert_stopped(
        drv, ur, n, DriverState.STOPPED, r"^stale_chunk: chunk computed from an observation 600 ms old"
    )


def test_fault_watchdog_expiry_stops_within_100_ms():
    drv, ur = make()
    chunk = chunk_along(drv, drv.status().tcp_cmd, np.array([-0.002, 0, 0]), t_obs=ur.t)
    res = drv.submit_chunk(chunk)
    n_end = None
    while ur.t < res.end_time + 0.5:
        drv.tick()  # the robot's loop: one tick at a time
        if n_end is None and ur.t >= res.end_time:
            n_end = len(ur.calls)
    calls = ur.calls[n_end:]
    servo_after = sum(1 for c in calls if c[0] == "servoJ")
    assert servo_after <= 50  # <= 100 ms of holding ticks at 500 Hz after the last target
    assert_stopped(drv, ur, n_end, DriverState.STOPPED, r"^watchdog: no valid target for 100 ms")
    # the controller-side watchdog was armed and kicked every tick
    assert ("setWatchdog", (20.0,)) in ur.calls and ur.names().count("kickWatchdog") >= 200


def test_fault_protective_stop_mid_chunk_then_recovery_on_acknowledge(capsys):
    drv, ur = make()
    chunk = chunk_along(drv, drv.status().tcp_cmd, np.array([-0.002, 0, 0]), t_obs=ur.t)
    drv.submit_chunk(chunk)
    drv.run_for(0.2)
    ur.protective_stop()  # the script dies, the socket stays up
    assert ur.connected
    n = len(ur.calls)
    drv.run_for(0.1)
    assert_stopped(drv, ur, n, DriverState.FAULT, r"^protective_stop")
    assert not drv.submit_chunk(chunk_along(drv, drv.status().tcp_cmd, np.zeros(3), ur.t)).accepted
    with pytest.raises(DriverError, match="acknowledge"):
        drv.enable()
    assert (
        "unlocked the protective stop" in drv.acknowledge()
        and "re-uploaded the control script" in drv.last_recovery
    )
    assert {"unlockProtectiveStop", "reuploadScript"} <= set(ur.names()[n:])
    drv.enable()  # re-seeded from the measured pose
    np.testing.assert_allclose(drv.status().tcp_cmd, fk(ur.q), atol=1e-9)
    assert drv.submit_chunk(chunk_along(drv, drv.status().tcp_cmd, np.array([-0.002, 0, 0]), ur.t)).accepted


def test_fault_dead_script_is_found_from_the_command_return_value():
    drv, ur = make()
    drv.submit_chunk(chunk_along(drv, drv.status().tcp_cmd, np.array([-0.002, 0, 0]), t_obs=ur.t))
    drv.run_for(0.05)
    ur.fail_next.add("servoJ")  # the controller answers False once (the state still looks fine)
    n = len(ur.calls)
    drv.run_for(0.05)
    assert_stopped(drv, ur, n, DriverState.FAULT, r"servo command refused by the controller")


def test_fault_connection_lost_mid_chunk():
    drv, ur = make()
    drv.submit_chunk(chunk_along(drv, drv.status().tcp_cmd, np.array([-0.002, 0, 0]), t_obs=ur.t))
    drv.run_for(0.2)
    ur.drop_connection()
    n = len(ur.calls)
    drv.run_for(0.1)
    assert "servoJ" not in ur.names()[n:]
    assert drv.state is DriverState.FAULT and drv.reason.startswith("connection_lost")
    with pytest.raises(DriverError, match="recovery failed: cannot reconnect"):
        drv.acknowledge()


def test_limits_yaml_is_strict(tmp_path):
    from dataclasses import asdict

    yaml_limits, defaults = (
        asdict(SafetyLimits.load()),
        asdict(SafetyLimits()),
    )  # the YAML = the documented defaults
    for k in ("joint_min", "joint_max"):
        np.testing.assert_allclose(yaml_limits.pop(k), defaults.pop(k), atol=1e-4)
    assert yaml_limits == defaults
    p = tmp_path / "l.yaml"
    p.write_text("max_tcp_sped: 1.0\n")
    with pytest.raises(ValueError, match="max_tcp_sped"):
        SafetyLimits.load(p)
    p.write_text("workspace_min: [0, 0, 0]\nworkspace_max: [0, 1, 1]\n")
    with pytest.raises(ValueError, match="workspace_min/max"):
        SafetyLimits.load(p)


def test_pose_matrix_roundtrip_helper():
    t = pose_matrix([-0.4, 0.1, 0.2], DOWN)
    from carp_hardware.ur_rtde_arm import pose_to_ur, ur_to_pose

    np.testing.assert_allclose(ur_to_pose(pose_to_ur(t)), t, atol=1e-12)


def test_home_to_a_start_pose_moves_there_and_refuses_one_outside_the_limits():
    drv, ur = make()
    rot = fk(HOME)[:3, :3]
    drv.home(pose_matrix(np.array([-0.45, 0.05, 0.30]), rot))
    np.testing.assert_allclose(drv.arm.state().tcp[:3, 3], [-0.45, 0.05, 0.30], atol=5e-3)
    assert drv.status().state is DriverState.IDLE
    moves = sum(c[0] == "moveJ" for c in ur.calls)
    nan = np.full((4, 4), np.nan)
    for bad, why in ((pose_matrix(np.array([-0.45, 0.05, 0.005]), rot), "outside the workspace"),
                     (pose_matrix(np.array([-0.45, 0.05, 3.0]), rot), "outside the workspace"),
                     (pose_matrix(np.array([-0.84, 0.49, 0.02]), rot), "no IK solution"),  # beyond reach
                     (nan, "finite")):  # fmt: skip
        with pytest.raises(DriverError, match=why):
            drv.home(bad)
    assert sum(c[0] == "moveJ" for c in ur.calls) == moves  # nothing moved


def test_a_servo_period_runs_from_the_end_of_the_last_wait_not_from_the_servo_command():
    """The tick's own work (state, IK, checks) must lie inside the period: servoJ's period starts
    when the last waitPeriod returned, unless that is a period or more ago (after a pause)."""
    import datetime

    class Control:  # ur_rtde's clock calls only, on a clock the test moves
        def __init__(self) -> None:
            self.t, self.waits = 0.0, []

        def initPeriod(self):
            return datetime.timedelta(seconds=self.t)

        def waitPeriod(self, t0, /):
            self.waits.append(t0.total_seconds())
            self.t = max(self.t, t0.total_seconds() + 0.002)

    arm = RtdeArm(RtdeConfig(host="unused"))
    arm.c = c = Control()
    t0 = arm._period_start(0.002)
    arm._end_period(t0)  # period 1: 0 .. 2 ms
    c.t += 0.0007  # the next tick computes for 0.7 ms before it streams
    t1 = arm._period_start(0.002)
    arm._end_period(t1)
    assert c.waits == [0.0, 0.002]  # period 2 started at 2 ms, so it ends at 4 ms, not 4.7
    assert c.t == pytest.approx(0.004)
    c.t += 0.5  # a pause (IDLE, a home move): the next period starts now
    assert arm._period_start(0.002).total_seconds() == pytest.approx(c.t)
