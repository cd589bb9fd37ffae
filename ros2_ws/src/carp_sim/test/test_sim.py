"""The MuJoCo twin: seam, determinism, success checks, cameras, experts, configuration errors."""

import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

from carp_hardware.kinematics import fk, pose_matrix
from carp_policy.actions import Policy
from carp_sim.cell import GRIPPER_STROKE
from carp_sim.env import SimCell, SimConfig
from carp_sim.expert import make_expert, run_expert_episode
from carp_sim.tasks import TaskConfig, top_down


@pytest.fixture(scope="module")
def cup_env():
    env = SimCell("cup", SimConfig(render=False))
    yield env
    env.close()


def test_measured_tcp_matches_kinematics_and_tracks_targets(cup_env):
    obs = cup_env.reset(0)
    np.testing.assert_allclose(fk(cup_env.joint_positions)[:3, 3], obs.state[:3], atol=1e-9)
    action = obs.state.copy()
    action[:3] += [0.03, -0.02, -0.04]  # a 5.4 cm move in one control step
    for _ in range(3):
        obs = cup_env.step(action)
    assert np.linalg.norm(obs.state[:3] - action[:3]) < 2e-3
    assert abs(obs.state[9] - GRIPPER_STROKE) < 1e-3
    assert obs.timestamp == pytest.approx(0.3)


def test_observation_carries_the_privileged_scene_state(cup_env):
    from carp_sim.env import ENV_STATE_NAMES

    obs = cup_env.reset(3)
    assert obs.env_state.shape == (len(ENV_STATE_NAMES),) == (8,)
    pos, rot = cup_env.object_pose()
    np.testing.assert_allclose(obs.env_state[:3], pos)
    np.testing.assert_allclose(obs.env_state[3:6], rot[:, 2])  # upright cup: up axis ~ +z
    assert obs.env_state[5] > 0.99
    np.testing.assert_allclose(obs.env_state[6:], cup_env.layout.target_xy, atol=1e-9)
    tipped = (np.cos(0.5), np.sin(0.5), 0.0, 0.0)  # 57 deg about x
    cup_env.set_object_pose(pos + np.array([0.05, 0.0, 0.0]), tipped)
    env = cup_env.observe().env_state
    assert env[0] == pytest.approx(pos[0] + 0.05) and env[5] == pytest.approx(np.cos(1.0))


def test_unreachable_target_holds_the_arm_and_counts_an_ik_failure(cup_env):
    obs = cup_env.reset(0)
    start = cup_env.tcp_pose()
    far = obs.state.copy()
    far[:3] = [-1.6, 0.0, 0.3]  # beyond the UR5e's reach (and the workspace): the driver refuses it whole
    obs = cup_env.step(far)
    assert cup_env.ik_failures == 1
    assert cup_env.driver.status().reason.startswith("workspace")
    moved = cup_env.tcp_pose()[:3, 3] - start[:3, 3]
    assert np.linalg.norm(moved) < 1e-4  # not streamed at all: the arm held where it was
    back = obs.state.copy()
    back[:3] = start[:3, 3]  # the next reachable target is followed again
    for _ in range(5):
        obs = cup_env.step(back)
    assert cup_env.ik_failures == 1
    assert np.linalg.norm(obs.state[:3] - start[:3, 3]) < 2e-3


@pytest.mark.parametrize("task,seeds", [("cup", (0, 1)), ("bowl", (0, 1))])
def test_expert_succeeds_on_fixed_seeds(task, seeds):
    with SimCell(task, SimConfig(render=False)) as env:
        for seed in seeds:
            outcome, steps = run_expert_episode(env, seed)
            assert outcome.success, f"{task} seed {seed}: {outcome.reason}"
            assert env.done and steps * 0.1 < env.max_duration_s


def test_same_seed_same_trajectory_different_seed_differs(cup_env):
    def rollout(seed):
        obs = cup_env.reset(seed)
        expert = make_expert(cup_env, seed)
        states = [obs.state]
        for _ in range(25):
            obs = cup_env.step(expert.predict(obs).actions[0])
            states.append(obs.state)
        return np.array(states), cup_env.object_pose()[0]

    a, cup_a = rollout(5)
    b, cup_b = rollout(5)
    c, cup_c = rollout(6)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(cup_a, cup_b)
    assert np.abs(a - c).max() > 0.01 and np.linalg.norm(cup_a - cup_c) > 0.01


def _plan_shape(env, seed, variety):
    """(approach height above the grasp, grasp yaw - start yaw, seconds per metre of the first segment)."""
    obs = env.reset(seed)
    expert = make_expert(env, seed, variety)
    expert.predict(obs)
    start, above, grasp = expert.plan[0], expert.plan[1], expert.plan[2]
    per_metre = (above.t - start.t - 0.15) / (
        np.linalg.norm(above.pos - start.pos) + 0.1 * abs(above.yaw - start.yaw)
    )
    return above.pos[2] - grasp.pos[2], above.yaw - start.yaw, per_metre


@pytest.mark.parametrize("task", ["cup", "bowl"])
def test_shipped_expert_is_consistent_and_wide_expert_varies(task):
    # The shipped task YAMLs fix every expert choice: what differs between seeds is the scene only.
    with SimCell(task, SimConfig(render=False)) as env:
        consistent = np.array([_plan_shape(env, s, "task") for s in range(6)])
        wide = np.array([_plan_shape(env, s, "wide") for s in range(6)])
        layouts = {tuple(np.round(env.reset(s).env_state[:2], 4)) for s in range(6)}
    assert len(layouts) == 6
    np.testing.assert_allclose(consistent[:, 0], 0.10, atol=1e-9)  # approach height, m
    np.testing.assert_allclose(consistent[:, 1], 0.0, atol=1e-9)  # grasp yaw = start yaw
    assert np.ptp(consistent[:, 2]) < 1e-9  # one speed: same time per metre
    assert np.ptp(wide[:, 0]) > 0.01 and np.ptp(wide[:, 1]) > 0.05 and np.ptp(wide[:, 2]) > 0.1


@pytest.mark.parametrize("task", ["cup", "bowl"])
def test_shipped_expert_never_keeps_the_observed_state_still_for_long(task):
    # A policy re-plans from what it observes. Where the expert waits with the arm still and the
    # fingers blocked by the object, the state does not change; a wait longer than the steps a policy
    # executes per chunk (8) can stall it at that state for good. The wide expert waits up to 9 steps.
    def longest_still(env, seed):
        states = []
        run_expert_episode(env, seed, on_step=lambda obs, action: states.append(obs.state.copy()))
        still = np.abs(np.diff(np.array(states), axis=0)).max(axis=1) < 5e-4
        best = run = 0
        for s in still:
            run = run + 1 if s else 0
            best = max(best, run)
        return best

    with SimCell(task, SimConfig(render=False)) as env:
        assert max(longest_still(env, seed) for seed in range(3)) <= 4


def test_expert_variety_errors_are_clear(cup_env, tmp_path):
    with pytest.raises(ValueError, match="'task' or 'wide'"):
        make_expert(cup_env, 0, "narrow")
    p = tmp_path / "t.yaml"
    p.write_text("name: cup\nexpert:\n  approach_hieght: [0.1, 0.1]\n")
    with (
        SimCell(TaskConfig.load(p), SimConfig(render=False)) as env,
        pytest.raises(ValueError, match="hieght"),
    ):
        make_expert(env, 0)
    p.write_text("name: cup\nexpert:\n  speed: [0.4, 0.3]\n")
    with (
        SimCell(TaskConfig.load(p), SimConfig(render=False)) as env,
        pytest.raises(ValueError, match="low <= high"),
    ):
        make_expert(env, 0)


def test_expert_is_a_policy_with_16_step_chunks(cup_env):
    obs = cup_env.reset(3)
    expert = make_expert(cup_env, 3)
    assert isinstance(expert, Policy)
    chunk = expert.predict(obs)
    assert chunk.actions.shape == (16, 10) and chunk.timestamp == obs.timestamp


def test_success_checks_reject_tipped_outside_held_and_arm_not_clear(cup_env):
    env = cup_env
    env.reset(2)
    target = env.layout.target_xy
    above = pose_matrix([target[0], target[1], 0.35], top_down(0.0))
    grasp = pose_matrix([target[0], target[1], 0.06], top_down(0.0))

    env.teleport_arm(above, gripper=GRIPPER_STROKE)
    env.set_object_pose([*target, 0.0])
    assert env.outcome().reason == "cup never lifted"  # put there without a pick (a push, a hand)
    env.set_object_pose([*target, 0.10])
    env.hold(0.002)  # the cup was up in the air for a moment: lifted
    env.set_object_pose([*target, 0.0])
    assert env.outcome().reason == "success not held for 0.5 s" and not env.outcome().success
    for _ in range(6):
        env.hold(0.1)
    assert env.outcome().reason == "ok" and env.outcome().success and env.done

    # the whole footprint must be inside: centre 5 cm from the target's centre, rim 8 cm > 7 cm radius
    env.set_object_pose([target[0], target[1] + 0.05, 0.0])
    assert env.outcome().reason == "cup outside target area"

    tilt = np.radians(30)
    env.set_object_pose([*target, 0.0], [np.cos(tilt / 2), np.sin(tilt / 2), 0, 0])
    assert env.outcome().reason == "cup tipped" and not env.outcome().success

    env.set_object_pose([target[0], target[1] + 0.12, 0.0])
    assert env.outcome().reason == "cup outside target area"

    env.set_object_pose([*target, 0.0])
    env.teleport_arm(grasp, gripper=GRIPPER_STROKE)  # fingers open around the cup
    assert env.outcome().reason == "arm not clear"

    action = np.concatenate([grasp[:3, 3], grasp[:3, 0], grasp[:3, 1], [0.0]])
    for _ in range(8):  # close on the cup
        env.step(action)
    assert env.in_contact_with_gripper("cup")
    assert env.outcome().reason == "cup still held"


def test_cup_knocked_over_is_unrecoverable(cup_env):
    env = cup_env
    env.reset(4)
    pos, _ = env.object_pose()
    env.set_object_pose([pos[0], pos[1], 0.05], [np.cos(np.pi / 4), np.sin(np.pi / 4), 0, 0])  # lying down
    env.hold(0.5)
    assert env.done and env.outcome().reason == "cup tipped"


def test_cameras_show_the_scene_and_change_when_the_arm_moves():
    with SimCell("cup", SimConfig(image_size=(60, 80))) as env:
        obs = env.reset(0)
        assert set(obs.images) == {"wrist", "scene"}
        for img in obs.images.values():
            assert img.shape == (60, 80, 3) and img.dtype == np.uint8
            assert img.std() > 10  # not blank
        before = {k: v.astype(float) for k, v in obs.images.items()}
        action = obs.state.copy()
        action[:3] += [0.0, 0.08, -0.12]
        for _ in range(5):
            obs = env.step(action)
        for cam in ("wrist", "scene"):
            assert np.abs(obs.images[cam].astype(float) - before[cam]).mean() > 2.0, cam
        # The cup is red: the scene camera sees red pixels where the cup stands.
        red = (obs.images["scene"][..., 0] > 150) & (obs.images["scene"][..., 1] < 90)
        assert red.sum() > 3
        frame = env.render_video_frame(120, 160)
        assert frame.shape == (120, 160, 3) and frame.std() > 10


def test_bad_configuration_and_actions_give_clear_errors(cup_env):
    with pytest.raises(ValueError, match="unknown task 'mug'"):
        SimCell("mug")
    with pytest.raises(ValueError, match="unreachable"):
        TaskConfig(name="cup", object_x=(-0.75, -0.72), object_y=(0.40, 0.44)).validate()
    with pytest.raises(ValueError, match="leaves the table"):
        TaskConfig(name="cup", object_x=(-1.5, -1.2)).validate()
    with pytest.raises(ValueError, match="low <= high"):
        TaskConfig(name="cup", object_y=(0.3, 0.1)).validate()
    with pytest.raises(ValueError, match="unknown camera"):
        SimConfig(cameras=("wrist", "top"))
    with pytest.raises(ValueError, match="multiples of physics_dt"):
        SimConfig(control_hz=7.0)
    cup_env.reset(0)
    with pytest.raises(ValueError, match="non-finite action"):
        cup_env.step(np.full(10, np.nan))
    with pytest.raises(ValueError, match="shape"):
        cup_env.step(np.zeros(7))


def test_task_yaml_with_unknown_key_is_rejected(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("name: cup\nobject_xx: [0, 1]\n")
    with pytest.raises(ValueError, match="object_xx"):
        TaskConfig.load(p)


def test_task_variants_change_only_what_they_list(tmp_path):
    for name in ("cup", "bowl"):
        base, beyond = TaskConfig.load(name), TaskConfig.load(f"{name}_beyond")
        assert beyond.name == name and beyond.object_y[0] == base.object_y[1]  # just past the edge
        assert beyond.object_y[1] - base.object_y[1] == pytest.approx(0.05)
        assert {**vars(beyond), "object_y": base.object_y} == vars(base)
    p = tmp_path / "v.yaml"
    p.write_text("variant_of: mug\nobject_y: [0.0, 0.1]\n")
    with pytest.raises(ValueError, match="variant_of must be one of cup, bowl"):
        TaskConfig.load(p)
    p.write_text("variant_of: cup\nobject_yy: [0.0, 0.1]\n")
    with pytest.raises(ValueError, match="object_yy"):
        TaskConfig.load(p)
    known = "known tasks and variants: bowl, bowl_beyond, cup, cup_beyond, cup_holed, cup_middle"
    with pytest.raises(ValueError, match=known):
        TaskConfig.load("mug")


def test_the_held_out_middle_band_is_left_out_of_cup_holed_and_is_all_of_cup_middle(tmp_path):
    """cup_holed never starts a cup in object_y_exclude; cup_middle starts it only there; without a
    band the layouts of a seed are what they always were."""
    from carp_sim.tasks import sample_layout

    base, holed, middle = TaskConfig.load("cup"), TaskConfig.load("cup_holed"), TaskConfig.load("cup_middle")
    lo, hi = holed.object_y_exclude
    assert (lo, hi) == tuple(middle.object_y) and {**vars(holed), "object_y_exclude": ()} == vars(base)
    ys_holed = [sample_layout(holed, np.random.default_rng(s)).object_xy[1] for s in range(300)]
    ys_mid = [sample_layout(middle, np.random.default_rng(s)).object_xy[1] for s in range(50)]
    assert not any(lo <= y <= hi for y in ys_holed) and min(ys_holed) < lo and max(ys_holed) > hi
    assert all(lo <= y <= hi for y in ys_mid)
    a = sample_layout(base, np.random.default_rng(7))
    b = sample_layout(TaskConfig.load("cup"), np.random.default_rng(7))
    assert np.array_equal(a.object_xy, b.object_xy)
    p = tmp_path / "bad.yaml"
    p.write_text("variant_of: cup\nobject_y_exclude: [0.2, 0.3]\n")
    with pytest.raises(ValueError, match="strictly inside object_y"):
        TaskConfig.load(p)


@pytest.mark.slow
def test_collect_cli_writes_a_valid_dataset(tmp_path):
    import json
    import subprocess
    import sys

    from carp_policy.dataset import EpisodeDataset, validate_dataset

    out = tmp_path / "cup"
    cmd = [sys.executable, "-m", "carp_sim.cli", "collect", "--task", "cup", "--episodes", "1",
           "--out", str(out), "--seed", "0", "--image-size", "48", "64"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "collected 1 cup episodes" in r.stdout
    summary = json.loads((out / "collect.json").read_text())
    assert summary["saved_episodes"] == 1 and summary["outcomes"] == {"ok": 1}
    report = validate_dataset(out)
    assert not getattr(report, "errors", []), report
    ds = EpisodeDataset(out)
    assert len(ds) == 1
    ep = ds.episode(0)
    assert ep.metadata["seed"] == 0 and ep.images["wrist"].shape[1:] == (48, 64, 3)
    # Data convention: action t is the target the next measured state reaches (servo tracking).
    err = np.linalg.norm(ep.action[:-1, :3] - ep.state[1:, :3], axis=1)
    assert np.median(err) < 2e-3, np.median(err)
    # the same seeds again would record identical twins: refused, naming the next free seed
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--seed 1" in r.stderr and "recorded twice" in r.stderr, r.stderr[-2000:]
    assert len(EpisodeDataset(out)) == 1
    r = subprocess.run([*cmd[:-5], "--seed", "1", *cmd[-3:]], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ds = EpisodeDataset(out)
    assert [ds.metadata(i)["seed"] for i in range(len(ds))] == [0, 1]  # appended: a new layout


def _snapshot(obj, tcp, target, contact=False, tilt_deg=0.0, lifted=0.0):
    from scipy.spatial.transform import Rotation

    from carp_sim.tasks import SceneSnapshot

    rot = Rotation.from_euler("x", tilt_deg, degrees=True).as_matrix()
    arr = np.asarray
    return SceneSnapshot(arr(obj, float), rot, arr(tcp, float), arr(target, float), contact, lifted)


def test_success_checks_are_pure_functions_of_a_snapshot():
    from carp_sim.cell import POT_FLOOR
    from carp_sim.tasks import check, unrecoverable

    cup, bowl = TaskConfig.load("cup"), TaskConfig.load("bowl")
    target = [-0.5, -0.2]
    high = [-0.5, -0.2, 0.4]  # TCP well above the object: arm clear
    assert check(cup, _snapshot([-0.5, -0.2, 0.0], high, target, lifted=0.1)).reason == "ok"
    assert check(cup, _snapshot([-0.5, -0.2, 0.0], high, target)).reason == "cup never lifted"
    assert check(cup, _snapshot([-0.5, -0.2, 0.0], high, target, contact=True)).reason == "cup still held"
    assert check(cup, _snapshot([-0.5, -0.2, 0.0], high, target, tilt_deg=30)).reason == "cup tipped"
    assert check(cup, _snapshot([-0.4, -0.2, 0.0], high, target)).reason == "cup outside target area"
    assert check(cup, _snapshot([-0.5, -0.2, 0.05], high, target)).reason == "cup not resting on table"
    assert check(cup, _snapshot([-0.5, -0.2, 0.0], [-0.5, -0.2, 0.12], target, lifted=0.1)).reason == (
        "arm not clear"
    )
    assert check(cup, _snapshot([-0.5, -0.15, 0.0], high, target, lifted=0.1)).reason == (
        "cup outside target area"  # centre 5 cm off: inside the 7 cm area, its 3 cm rim is not
    )
    assert check(cup, _snapshot([-0.5, -0.2, -0.2], high, target)).reason == "cup fell off table"
    assert unrecoverable(cup, _snapshot([-0.5, -0.2, 0.0], high, target, tilt_deg=80)) == "cup tipped"
    assert unrecoverable(cup, _snapshot([-0.5, -0.2, 0.0], high, target, contact=True, tilt_deg=80)) is None
    in_pot = [-0.5, -0.2, POT_FLOOR]
    assert check(bowl, _snapshot(in_pot, high, target, lifted=0.1)).reason == "ok"
    assert check(bowl, _snapshot(in_pot, high, target)).reason == "bowl never lifted"
    low = [-0.5, -0.2, POT_FLOOR + 0.03]  # fingertips inside the bowl's rim
    assert check(bowl, _snapshot(in_pot, low, target, lifted=0.1)).reason == "arm not clear"
    assert check(bowl, _snapshot(in_pot, high, target, contact=True)).reason == "bowl still held"
    assert check(bowl, _snapshot([-0.4, -0.2, POT_FLOOR], high, target)).reason == "bowl not in pot"
    assert check(bowl, _snapshot([-0.5, -0.2, POT_FLOOR + 0.05], high, target)).reason == "bowl not in pot"
    assert unrecoverable(bowl, _snapshot([0.5, -0.2, 0.0], high, target)) == "bowl fell off table"
