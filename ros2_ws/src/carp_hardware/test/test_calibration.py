"""Calibration: the hand-eye and pivot solvers on exact synthetic poses, the YAML id, and the whole
procedure on the twin's renders against its ground truth (goal: wrist hand-eye < 2 mm / 0.5 deg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from scipy.spatial.transform import Rotation

from carp_hardware import calibration as cal


def _T(rotvec, t) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = Rotation.from_rotvec(rotvec).as_matrix(), t
    return T


def test_hand_eye_and_pivot_recover_exact_transforms(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = _T([0.1, -0.2, 1.5], [0.08, 0.01, 0.05])  # camera on the TCP
    B = _T([0.0, 0.0, 0.3], [-0.45, 0.05, 0.0])  # board in the base
    tcp = [_T(rng.normal(0, 0.4, 3), np.array([-0.45, 0.0, 0.3]) + rng.normal(0, 0.03, 3)) for _ in range(8)]
    cam_board = [np.linalg.inv(T @ X) @ B for T in tcp]
    dt, dr = cal.pose_error(cal.hand_eye(tcp, cam_board), X)
    assert dt < 1e-6 and dr < 1e-5
    tip = np.array([0.0, 0.01, 0.16])
    point = np.array([-0.4, 0.1, 0.1])
    flanges = []
    for _ in range(5):
        R = Rotation.from_rotvec(rng.normal(0, 0.5, 3)).as_matrix()
        flanges.append(_T(Rotation.from_matrix(R).as_rotvec(), point - R @ tip))
    est, q, _ = cal.tcp_offset_pivot(flanges)
    np.testing.assert_allclose(est, tip, atol=1e-9)
    np.testing.assert_allclose(q, point, atol=1e-9)
    cid = cal.save_calibration(tmp_path / "he.yaml", "hand_eye", {"T_tcp_cam": X})
    saved = yaml.safe_load((tmp_path / "he.yaml").read_text())
    assert saved["id"] == cid and cid.startswith("hand_eye-") and np.allclose(saved["T_tcp_cam"], X)


def test_twin_calibration_meets_the_error_goal() -> None:
    from carp_sim.calibration_check import run

    r = run(n_poses=16, seed=0)
    assert r["views_used"] >= 12
    he = r["wrist_hand_eye"]
    print(
        f"wrist hand-eye {he['error_mm']:.2f} mm {he['error_deg']:.3f} deg; scene "
        f"{r['scene_extrinsics']['error_mm']:.1f} mm; f {r['intrinsics']['fx']:.2f} "
        f"vs {r['intrinsics']['f_true']:.2f}"
    )
    assert he["error_mm"] < 2.0 and he["error_deg"] < 0.5
    i = r["intrinsics"]
    assert abs(i["fx"] / i["f_true"] - 1) < 0.01 and abs(i["cx"] - i["cx_true"]) < 2 and i["rms_px"] < 0.3
    assert r["scene_extrinsics"]["error_mm"] < 15 and r["scene_extrinsics"]["error_deg"] < 1.0
    assert r["tcp_offset"]["error_mm"] < 0.01
