"""UR5e kinematics: FK against MuJoCo-independent identities, IK round trips, continuity, errors."""

import numpy as np
import pytest

from carp_hardware.kinematics import (
    IKError,
    UR5eKinematics,
    fk,
    ik_all,
    ik_nearest,
    ik_nearest_path,
    pose_matrix,
)


def _ang(a):
    return np.abs((a + np.pi) % (2 * np.pi) - np.pi)


def test_fk_known_configuration():
    # All joints zero: the arm is stretched along -x; reach = a2 + a3, height = d1 - d5,
    # y = -(d4 + d6 + tcp) is the sum of the offsets along the joint axes.
    t = fk(np.zeros(6), tcp_offset=0.0)
    np.testing.assert_allclose(t[:3, 3], [-0.425 - 0.3922, -(0.1333 + 0.0996), 0.1625 - 0.0997], atol=1e-12)


def test_ik_all_solutions_round_trip_random_joints():
    rng = np.random.default_rng(0)
    for _ in range(300):
        q = rng.uniform(-np.pi, np.pi, 6)
        pose = fk(q)
        sols = ik_all(pose)
        assert 1 <= len(sols) <= 8
        for s in sols:
            np.testing.assert_allclose(fk(s), pose, atol=1e-9)
        # The generating configuration is one of the branches.
        assert np.min(_ang(sols - q).max(axis=1)) < 1e-6


def test_ik_round_trip_across_the_workspace_top_down():
    down = np.diag([1.0, -1.0, -1.0])
    q_ref = np.array([0.0, -1.75, 1.85, -1.67, -1.5708, 0.0])
    # The table area the tasks use (and beyond): x in [-0.65, -0.3], y in [-0.35, 0.35].
    for x in np.linspace(-0.65, -0.3, 5):
        for y in np.linspace(-0.35, 0.35, 5):
            for z in (0.02, 0.15, 0.4):
                pose = pose_matrix([x, y, z], down)
                q = ik_nearest(pose, q_ref)
                np.testing.assert_allclose(fk(q), pose, atol=1e-9)


def test_nearest_solution_keeps_continuity_along_a_path():
    kin = UR5eKinematics(q=np.array([0.0, -1.75, 1.85, -1.67, -1.5708, 0.0]))
    down = np.diag([1.0, -1.0, -1.0])
    kin.solve(pose_matrix([-0.45, -0.25, 0.1], down))  # start on the path
    prev = kin.q.copy()
    for s in np.linspace(0, 1, 200):  # 0.5 m sweep with a 3 rad yaw turn
        yaw = 3.0 * s
        rz = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
        q = kin.solve(pose_matrix([-0.45, -0.25 + 0.5 * s, 0.1], rz @ down))
        assert np.max(np.abs(q - prev)) < 0.1  # no branch flips, no 2*pi jumps
        prev = q
    np.testing.assert_allclose(kin.forward(), pose_matrix([-0.45, 0.25, 0.1], rz @ down), atol=1e-9)


def test_out_of_reach_and_bad_input_raise():
    with pytest.raises(IKError, match="out of reach"):
        ik_all(pose_matrix([2.0, 0.0, 0.3], np.eye(3)))
    with pytest.raises(IKError, match="finite"):
        ik_all(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="6 finite"):
        fk(np.zeros(5))


def _pose_by_pose(poses, q_ref, max_step=None, **kw):
    """The reference for ik_nearest_path: ik_nearest pose by pose, rate-limited, stopping at IKError."""
    out = []
    for pose in poses:
        try:
            q = ik_nearest(pose, q_ref, **kw)
        except IKError:
            break
        if max_step is not None:
            q = q_ref + np.clip(q - q_ref, -max_step, max_step)
        out.append(q)
        q_ref = q
    return np.array(out).reshape(-1, 6)


@pytest.mark.parametrize("max_step", [None, 0.03])
def test_ik_nearest_path_equals_ik_nearest_pose_by_pose(max_step):
    rng = np.random.default_rng(3)
    limits = np.array([[-4.0, 1.0], [-3.0, 0.0], [-2.5, 2.5], [-1.0, 5.0], [-3.0, 3.0], [0.0, 6.0]])
    for trial in range(200):
        q0 = rng.uniform(-np.pi, np.pi, 6)
        q1 = q0 + rng.normal(0.0, 0.5, 6)
        if trial % 5 == 0:
            q1[4] = 0.0  # ends at the wrist singularity: q6 comes from the reference
        poses = np.stack([fk(q0 + s * (q1 - q0)) for s in np.linspace(0.1, 1.0, 10)])
        q_ref = q0 + rng.normal(0.0, 0.05, 6)
        kw = {"limits": limits} if trial % 2 else {"weights": rng.uniform(0.1, 2.0, 6)}
        expected = _pose_by_pose(poses, q_ref, max_step, **kw)
        got = ik_nearest_path(poses, q_ref, max_step=max_step, **kw)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_ik_nearest_path_stops_before_the_first_unreachable_pose():
    q_ref = np.array([0.0, -1.75, 1.85, -1.67, -1.5708, 0.0])
    down = np.diag([1.0, -1.0, -1.0])
    poses = np.stack([pose_matrix([-0.3 - 0.1 * k, 0.1, 0.2], down) for k in range(10)])  # leaves reach
    expected = _pose_by_pose(poses, q_ref)
    assert 0 < len(expected) < 10
    np.testing.assert_allclose(ik_nearest_path(poses, q_ref), expected, rtol=0, atol=1e-12)
    poses[2, 0, 3] = np.nan  # a non-finite pose is unreachable too
    assert len(ik_nearest_path(poses, q_ref)) == 2
    assert ik_nearest_path(poses[:0], q_ref).shape == (0, 6)
