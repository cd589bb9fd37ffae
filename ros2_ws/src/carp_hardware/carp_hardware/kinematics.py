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
the driver needs all branches to keep joint motion continuous.
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


class IKError(ValueError):
    """Raised when a pose has no inverse-kinematics solution inside the joint limits."""


def dh_transform(theta: float, d: float, a: float, alpha: float) -> np.ndarray:
    """One standard-DH link transform Rz(theta) Tz(d) Tx(a) Rx(alpha), (4, 4)."""
    ct, st, ca, sa = np.cos(theta), np.sin(theta), np.cos(alpha), np.sin(alpha)
    return np.array(
        [
            [ct, -st * ca, st * sa, a * ct],
            [st, ct * ca, -ct * sa, a * st],
            [0.0, sa, ca, d],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


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
    t06 = pose @ tcp_transform(-tcp_offset)  # flange pose
    d1, d4, d5, d6 = DH_D[0], DH_D[3], DH_D[4], DH_D[5]
    a2, a3 = DH_A[1], DH_A[2]

    # Shoulder pan: the wrist centre p05 sits at distance d4 from the plane of the arm.
    p05 = t06[:3, 3] - d6 * t06[:3, 2]
    r = np.hypot(p05[0], p05[1])
    if r < d4:
        raise IKError(f"pose out of reach: wrist centre {r:.3f} m from the base axis (< d4 = {d4})")
    phi, psi = np.arctan2(p05[1], p05[0]), np.arcsin(d4 / r)
    sols = []
    for q1 in (phi + psi, phi + np.pi - psi):
        t01 = dh_transform(q1, d1, 0.0, DH_ALPHA[0])
        t16 = _hinv(t01) @ t06
        # Wrist 2: the z1 axis seen from the flange is (s5 c6, -s5 s6, c5) (see module doc).
        c5 = np.clip((t06[0, 3] * np.sin(q1) - t06[1, 3] * np.cos(q1) - d4) / d6, -1.0, 1.0)
        for q5 in (np.arccos(c5), -np.arccos(c5)):
            s5 = np.sin(q5)
            if abs(s5) < 1e-9:
                q6 = q6_default
            else:
                q6 = np.arctan2(-t16[2, 1] / s5, t16[2, 0] / s5)
            t45 = dh_transform(q5, d5, 0.0, DH_ALPHA[4])
            t56 = dh_transform(q6, DH_D[5], 0.0, DH_ALPHA[5])
            t14 = t16 @ _hinv(t45 @ t56)
            p13 = t14[:3, 3] - d4 * t14[:3, 1]  # frame 3 origin: back from frame 4 along z3 = y4
            # Shoulder lift + elbow: planar two-link arm in frame 1's xy plane.
            c3 = (p13[0] ** 2 + p13[1] ** 2 - a2**2 - a3**2) / (2 * a2 * a3)
            if abs(c3) > 1.0 + 1e-9:
                continue
            c3 = np.clip(c3, -1.0, 1.0)
            for q3 in (np.arccos(c3), -np.arccos(c3)):
                q2 = np.arctan2(p13[1], p13[0]) - np.arctan2(a3 * np.sin(q3), a2 + a3 * np.cos(q3))
                q4 = np.arctan2(t14[1, 0], t14[0, 0]) - q2 - q3
                sols.append([q1, q2, q3, q4, q5, q6])
    if not sols:
        raise IKError("pose out of reach: no elbow solution (too far from or too close to the shoulder)")
    return _wrap(np.array(sols))


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
    w = np.array([1.0, 1.0, 1.0, 0.5, 0.5, 0.3]) if weights is None else np.asarray(weights)
    sols = ik_all(pose, tcp_offset, q6_default=q_ref[5])
    sols = q_ref + _wrap(sols - q_ref)  # nearest 2*pi-equivalent of every joint
    # Where the nearest equivalent violates a limit, try the other way round.
    for shift in (2 * np.pi, -2 * np.pi):
        bad = (sols < limits[:, 0]) | (sols > limits[:, 1])
        sols = np.where(bad, sols + shift, sols)
    ok = np.all((sols >= limits[:, 0] - 1e-9) & (sols <= limits[:, 1] + 1e-9), axis=1)
    if not np.any(ok):
        raise IKError("pose reachable only outside the joint limits")
    sols = sols[ok]
    cost = np.sum(w * (sols - q_ref) ** 2, axis=1)
    return sols[int(np.argmin(cost))]


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


def _hinv(t: np.ndarray) -> np.ndarray:
    """Inverse of a rigid transform (4, 4) without a general matrix inverse."""
    out = np.eye(4)
    out[:3, :3] = t[:3, :3].T
    out[:3, 3] = -t[:3, :3].T @ t[:3, 3]
    return out


def _wrap(x: np.ndarray) -> np.ndarray:
    """Angles into (-pi, pi]."""
    return np.pi - np.mod(np.pi - x, 2 * np.pi)


def _check_q(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    if q.shape != (6,) or not np.all(np.isfinite(q)):
        raise ValueError(f"joint vector must be 6 finite angles, got {q!r}")
    return q
