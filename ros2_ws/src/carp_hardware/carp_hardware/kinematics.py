"""Exact UR5e forward kinematics and closed-form inverse kinematics (pure numpy).

The same module serves the MuJoCo twin (whose kinematic chain is built from these DH parameters, so
FK here and in MuJoCo agree to machine precision) and the real driver (joint targets streamed by
servoJ). Poses are 4x4 homogeneous transforms of the *flange* (DH frame 6) or the *TCP* (flange
moved by ``TCP_OFFSET`` along its z axis) in the robot base frame (DH frame 0, the frame the UR
controller reports poses in).

The inverse follows Hawkins, "Analytic Inverse Kinematics for the Universal Robots UR-5/UR-10 Arms"
(2013): shoulder pan from the wrist-centre position, wrist 2 and wrist 3 from the orientation, then a
planar 2-link problem for shoulder lift / elbow, and wrist 1 from the remainder. Written by hand
because the 8-solution closed form is ~40 lines, exact and ~50x faster than a numerical solver, and
the driver needs all branches to keep joint motion continuous. The closed form is vectorised over
poses and branches: a servo stream's poses are solved in one numpy pass (``ik_nearest_path``), as
per-pose calls would spend most of their time in numpy's per-call overhead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Standard DH parameters of the UR5e (Universal Robots' published values), metres / radians.
DH_D = np.array([0.1625, 0.0, 0.0, 0.1333, 0.0997, 0.0996])
DH_A = np.array([0.0, -0.425, -0.3922, 0.0, 0.0, 0.0])
DH_ALPHA = np.array([np.pi / 2, 0.0, 0.0, np.pi / 2, -np.pi / 2, 0.0])
JOINT_NAMES = ("shoulder_pan", "shoulder_lift", "elbow", "wrist_1", "wrist_2", "wrist_3")

# The one place the tool centre point is defined: the 2F-85 fingertip centre, measured along the
# flange z axis (Robotiq 2F-85 on its coupling: ~0.15 m to the pad centres).
TCP_OFFSET = 0.16

# UR5e joint limits (rad). The elbow is limited to +-pi to keep the forearm out of the upper arm.
JOINT_LIMITS = np.array([[-2 * np.pi, 2 * np.pi]] * 2 + [[-np.pi, np.pi]] + [[-2 * np.pi, 2 * np.pi]] * 3)
# The arm's home configuration (elbow up, wrist down, gripper over the table): where an episode
# starts near, the driver's home move goes, and the IK reference for top-down poses.
HOME_Q = np.array([0.0, -1.75, 1.85, -1.67, -1.5708, 0.0])
_DEFAULT_WEIGHTS = np.array([1.0, 1.0, 1.0, 0.5, 0.5, 0.3])  # ik_nearest: wrist joints count less


class IKError(ValueError):
    """Raised when a pose has no inverse-kinematics solution inside the joint limits."""


def dh_transform(theta: float | np.ndarray, d: float, a: float, alpha: float) -> np.ndarray:
    """One standard-DH link transform Rz(theta) Tz(d) Tx(a) Rx(alpha), (4, 4).

    An array of angles gives the stack of transforms, (..., 4, 4) (the batched IK builds all
    branches at once).
    """
    theta = np.asarray(theta, dtype=np.float64)
    ct, st, ca, sa = np.cos(theta), np.sin(theta), np.cos(alpha), np.sin(alpha)
    t = np.zeros((*theta.shape, 4, 4))  # filled in place: much cheaper than stacking 16 arrays
    t[..., 0, 0], t[..., 0, 1], t[..., 0, 2], t[..., 0, 3] = ct, -st * ca, st * sa, a * ct
    t[..., 1, 0], t[..., 1, 1], t[..., 1, 2], t[..., 1, 3] = st, ct * ca, -ct * sa, a * st
    t[..., 2, 1], t[..., 2, 2], t[..., 2, 3] = sa, ca, d
    t[..., 3, 3] = 1.0
    return t


def tcp_transform(offset: float = TCP_OFFSET) -> np.ndarray:
    """Flange -> TCP transform (pure translation along the flange z axis), (4, 4)."""
    t = np.eye(4)
    t[2, 3] = offset
    return t


def fk_all(q: np.ndarray) -> list[np.ndarray]:
    """Base -> DH frame i transforms for i = 1..6 (frame 6 is the flange), list of (4, 4)."""
    q = _check_q(q)
    frames, t = [], np.eye(4)
    for i in range(6):
        t = t @ dh_transform(q[i], DH_D[i], DH_A[i], DH_ALPHA[i])
        frames.append(t)
    return frames


def fk(q: np.ndarray, tcp_offset: float = TCP_OFFSET) -> np.ndarray:
    """Joint angles (6,) -> TCP pose in the base frame, (4, 4). ``tcp_offset=0`` gives the flange."""
    return fk_all(q)[-1] @ tcp_transform(tcp_offset)


def ik_all(pose: np.ndarray, tcp_offset: float = TCP_OFFSET, q6_default: float = 0.0) -> np.ndarray:
    """All closed-form IK solutions of a TCP pose (4, 4) -> (N, 6), N <= 8, angles in (-pi, pi].

    Branches: shoulder left/right x wrist up/down x elbow up/down. At the wrist singularity
    (sin(q5) ~ 0) q6 is free; ``q6_default`` is used there. Raises IKError if the pose is
    out of reach (no branch exists).
    """
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape != (4, 4) or not np.all(np.isfinite(pose)):
        raise IKError(f"IK needs a finite (4, 4) pose, got shape {pose.shape}")
    sols, valid, _, wrist_r = _ik_branches(pose[None] @ tcp_transform(-tcp_offset), np.array([q6_default]))
    if wrist_r[0] < DH_D[3]:
        raise IKError(
            f"pose out of reach: wrist centre {wrist_r[0]:.3f} m from the base axis (< d4 = {DH_D[3]})"
        )
    if not np.any(valid[0]):
        raise IKError("pose out of reach: no elbow solution (too far from or too close to the shoulder)")
    return sols[0][valid[0]]


def ik_nearest(
    pose: np.ndarray,
    q_ref: np.ndarray,
    tcp_offset: float = TCP_OFFSET,
    limits: np.ndarray = JOINT_LIMITS,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """The IK solution closest to ``q_ref`` (joint-space continuity), inside ``limits``, (6,).

    Each joint of each branch is shifted by multiples of 2*pi towards ``q_ref`` (the UR joints turn
    +-2*pi), then the branch with the smallest weighted distance to ``q_ref`` wins. Raises IKError
    if no branch fits the limits.
    """
    q_ref = _check_q(q_ref)
    q = _nearest(ik_all(pose, tcp_offset, q6_default=q_ref[5]), q_ref, limits, _weights(weights))
    if q is None:
        raise IKError("pose reachable only outside the joint limits")
    return q


def ik_nearest_path(
    poses: np.ndarray,
    q_ref: np.ndarray,
    tcp_offset: float = TCP_OFFSET,
    limits: np.ndarray = JOINT_LIMITS,
    weights: np.ndarray | None = None,
    max_step: float | None = None,
) -> np.ndarray:
    """Joint targets for a stream of TCP poses (N, 4, 4), each the ``ik_nearest`` of its pose
    relative to the target before it (the first relative to ``q_ref``), (M, 6).

    ``max_step`` (rad) rate-limits every joint between consecutive targets, as a servo driver does;
    the limited target is then the reference for the next pose. The result is what calling
    ``ik_nearest`` pose by pose gives, but the closed-form solutions of all poses are computed in
    one vectorised pass and only the cheap nearest-branch choice runs pose by pose. Streaming stops
    at the first pose without a solution inside the limits: then M < N and targets ``[:M]`` are the
    ones before it (a driver does not send an unreachable target).
    """
    q_ref = _check_q(q_ref)
    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4):
        raise IKError(f"IK needs a stack of (4, 4) poses, got shape {poses.shape}")
    w = _weights(weights)
    t06 = poses @ tcp_transform(-tcp_offset)
    sols, valid, singular, _ = _ik_branches(t06, np.full(len(poses), q_ref[5]))
    valid &= np.all(np.isfinite(poses), axis=(1, 2))[:, None]
    out = np.empty((len(poses), 6))
    for i in range(len(poses)):
        if singular[i] and i > 0:
            # At the wrist singularity q6 is free and takes the reference's q6, known only now.
            sols_i, valid_i, _, _ = _ik_branches(t06[i : i + 1], q_ref[5:6])
            sols[i], valid[i] = sols_i[0], valid_i[0]
        q = _nearest(sols[i][valid[i]], q_ref, limits, w) if valid[i].any() else None
        if q is None:
            return out[:i]
        if max_step is not None:
            # minimum/maximum: the same numbers as np.clip at a fraction of its call overhead.
            q = q_ref + np.minimum(np.maximum(q - q_ref, -max_step), max_step)
        out[i] = q_ref = q
    return out


def pose_matrix(position: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Position (3,) and rotation matrix (3, 3) -> homogeneous pose (4, 4)."""
    t = np.eye(4)
    t[:3, :3] = rotation
    t[:3, 3] = position
    return t


@dataclass
class UR5eKinematics:
    """Stateful IK for streaming: remembers the last joint solution so motion stays on one branch."""

    q: np.ndarray
    tcp_offset: float = TCP_OFFSET

    def solve(self, pose: np.ndarray) -> np.ndarray:
        """Next joint target for a TCP pose (4, 4), nearest to the previous one, (6,)."""
        self.q = ik_nearest(pose, self.q, self.tcp_offset)
        return self.q

    def forward(self, q: np.ndarray | None = None) -> np.ndarray:
        """TCP pose (4, 4) of ``q`` (default: the last solution)."""
        return fk(self.q if q is None else q, self.tcp_offset)


def _ik_branches(t06: np.ndarray, q6_default: np.ndarray) -> tuple[np.ndarray, ...]:
    """The closed form of ``ik_all`` for flange poses (N, 4, 4), every branch at once.

    Returns the 8 branches (N, 8, 6) in ``ik_all``'s order (shoulder, then wrist, then elbow),
    which exist (N, 8), whether a pose used ``q6_default[i]`` (wrist singularity) (N,), and the
    wrist centre's distance from the base axis (N,). Branches that do not exist hold NaN or
    meaningless numbers.
    """
    d1, d4, d5, d6 = DH_D[0], DH_D[3], DH_D[4], DH_D[5]
    a2, a3 = DH_A[1], DH_A[2]
    n = len(t06)
    # Out-of-reach poses give NaN (arcsin > 1, ...) and are masked out below, so no warnings.
    with np.errstate(invalid="ignore", divide="ignore"):
        # Shoulder pan: the wrist centre p05 sits at distance d4 from the plane of the arm.
        p05 = t06[:, :3, 3] - d6 * t06[:, :3, 2]
        r = np.hypot(p05[:, 0], p05[:, 1])
        phi, psi = np.arctan2(p05[:, 1], p05[:, 0]), np.arcsin(d4 / r)
        q1 = np.stack([phi + psi, phi + np.pi - psi], axis=1)  # (N, 2)
        t16 = _hinv(dh_transform(q1, d1, 0.0, DH_ALPHA[0])) @ t06[:, None]  # (N, 2, 4, 4)
        # Wrist 2: the z1 axis seen from the flange is (s5 c6, -s5 s6, c5) (see module doc).
        c5 = (t06[:, None, 0, 3] * np.sin(q1) - t06[:, None, 1, 3] * np.cos(q1) - d4) / d6
        c5 = np.clip(c5, -1.0, 1.0)
        q5 = np.stack([np.arccos(c5), -np.arccos(c5)], axis=2)  # (N, 2, 2)
        s5 = np.sin(q5)
        at_singularity = np.abs(s5) < 1e-9
        q6 = np.arctan2(-t16[:, :, None, 2, 1] / s5, t16[:, :, None, 2, 0] / s5)
        q6 = np.where(at_singularity, q6_default[:, None, None], q6)
        t45 = dh_transform(q5, d5, 0.0, DH_ALPHA[4])
        t56 = dh_transform(q6, DH_D[5], 0.0, DH_ALPHA[5])
        t14 = t16[:, :, None] @ _hinv(t45 @ t56)  # (N, 2, 2, 4, 4)
        p13 = t14[..., :3, 3] - d4 * t14[..., :3, 1]  # frame 3 origin: back from frame 4 along z3 = y4
        # Shoulder lift + elbow: planar two-link arm in frame 1's xy plane.
        c3 = (p13[..., 0] ** 2 + p13[..., 1] ** 2 - a2**2 - a3**2) / (2 * a2 * a3)
        elbow_ok = ~(np.abs(c3) > 1.0 + 1e-9)  # (N, 2, 2); NaN (out of reach) fails the reach test
        c3 = np.clip(c3, -1.0, 1.0)
        q3 = np.stack([np.arccos(c3), -np.arccos(c3)], axis=3)  # (N, 2, 2, 2)
        forearm = np.arctan2(a3 * np.sin(q3), a2 + a3 * np.cos(q3))  # upper arm to wrist-centre line
        q2 = np.arctan2(p13[..., 1], p13[..., 0])[..., None] - forearm
        q4 = np.arctan2(t14[..., 1, 0], t14[..., 0, 0])[..., None] - q2 - q3
    sols = np.empty((n, 2, 2, 2, 6))  # branch axes: shoulder, wrist, elbow
    sols[..., 0] = q1[:, :, None, None]
    sols[..., 1], sols[..., 2], sols[..., 3] = q2, q3, q4
    sols[..., 4] = q5[..., None]
    sols[..., 5] = q6[..., None]
    # A branch exists if the wrist centre is in reach and its elbow triangle closes (both elbows).
    valid = np.repeat((r >= d4)[:, None, None] & elbow_ok, 2, axis=-1).reshape(n, 8)
    # Not masked by ``valid``: with a q6 that is not the final one, the elbow may wrongly fail.
    singular = np.any(at_singularity, axis=(1, 2))
    return _wrap(sols.reshape(n, 8, 6)), valid, singular, r


def _nearest(sols: np.ndarray, q_ref: np.ndarray, limits: np.ndarray, w: np.ndarray) -> np.ndarray | None:
    """Of IK solutions (K, 6), the one nearest ``q_ref`` within ``limits`` (see ik_nearest), or None."""
    # Runs once per servo tick, so it uses ndarray methods rather than the slower np.all / np.sum
    # wrappers (same numbers).
    lo, hi = limits[:, 0], limits[:, 1]
    sols = q_ref + _wrap(sols - q_ref)  # nearest 2*pi-equivalent of every joint
    # Where the nearest equivalent violates a limit, try the other way round.
    for shift in (2 * np.pi, -2 * np.pi):
        sols = np.where((sols < lo) | (sols > hi), sols + shift, sols)
    ok = ((sols >= lo - 1e-9) & (sols <= hi + 1e-9)).all(axis=1)
    if not ok.any():
        return None
    sols = sols[ok]
    cost = (w * (sols - q_ref) ** 2).sum(axis=1)
    return sols[cost.argmin()]


def _weights(weights: np.ndarray | None) -> np.ndarray:
    """Per-joint weights of the nearest-solution distance (default: wrist joints count less)."""
    return _DEFAULT_WEIGHTS if weights is None else np.asarray(weights, dtype=np.float64)


def _hinv(t: np.ndarray) -> np.ndarray:
    """Inverse of a rigid transform (..., 4, 4) without a general matrix inverse."""
    rt = np.swapaxes(t[..., :3, :3], -1, -2)
    out = np.zeros(t.shape)
    out[..., :3, :3] = rt
    out[..., :3, 3] = (-rt @ t[..., :3, 3:])[..., 0]
    out[..., 3, 3] = 1.0
    return out


def _wrap(x: np.ndarray) -> np.ndarray:
    """Angles into (-pi, pi]."""
    return np.pi - np.mod(np.pi - x, 2 * np.pi)


def _check_q(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    if q.shape != (6,) or not np.all(np.isfinite(q)):
        raise ValueError(f"joint vector must be 6 finite angles, got {q!r}")
    return q
