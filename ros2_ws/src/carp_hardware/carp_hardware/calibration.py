"""Calibration of a cell: camera intrinsics from a ChArUco board, the wrist camera's hand-eye
transform (eye-in-hand), the scene camera's pose in the base frame and the TCP offset.

Conventions: ``T_a_b`` is the (4, 4) pose of frame b in frame a (maps b coordinates to a). Camera
frames are OpenCV's (x right, y down, z forward). ``tcp`` is the TCP frame the arm reports (UR's
getActualTCPPose), ``base`` the robot base.

The procedure (``calibration/README.md``, ``docs/recording.md``):
1. intrinsics: 15-30 views of the board at varied angles -> K, D (``calibrate_intrinsics``);
2. wrist hand-eye: the board fixed on the table, the arm at 10-20 poses with varied rotations, the
   wrist camera sees it -> T_tcp_cam (``hand_eye``, OpenCV's calibrateHandEye, Park's method);
3. scene camera: the same fixed board seen by the wrist camera places it in the base frame
   (T_base_tcp T_tcp_cam T_cam_board); the scene camera's own view of it then gives T_base_scene
   (``scene_extrinsics``);
4. TCP offset: the tool tip held on one fixed point in several orientations (pivot calibration,
   ``tcp_offset_pivot``).
Every result is written as YAML with an ``id`` that each recorded episode stores.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from scipy.spatial.transform import Rotation


@dataclass
class BoardSpec:
    """A ChArUco board (print it at 100 % scale; measure the square to check the printer)."""

    squares: tuple[int, int] = (7, 5)  # (columns, rows)
    square: float = 0.04  # m, chessboard square side
    marker: float = 0.03  # m, ArUco marker side
    dictionary: str = "DICT_5X5_100"

    def board(self):
        import cv2

        d = cv2.aruco.getPredefinedDictionary(getattr(cv2.aruco, self.dictionary))
        return cv2.aruco.CharucoBoard(tuple(self.squares), self.square, self.marker, d)

    @property
    def size_m(self) -> tuple[float, float]:
        return self.squares[0] * self.square, self.squares[1] * self.square

    def image(self, px_per_square: int = 100) -> np.ndarray:
        """The board as an (H, W) uint8 image with no margin (for printing or a twin texture)."""
        w, h = self.squares[0] * px_per_square, self.squares[1] * px_per_square
        return self.board().generateImage((w, h), marginSize=0, borderBits=1)


def detect(board, image: np.ndarray, min_corners: int = 6) -> tuple[np.ndarray, np.ndarray] | None:
    """ChArUco corners in an RGB or grey image: (object points (N, 3), image points (N, 2)) or None."""
    import cv2

    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    corners, ids, _, _ = cv2.aruco.CharucoDetector(board).detectBoard(gray)
    if ids is None or len(ids) < min_corners:
        return None
    obj, img = board.matchImagePoints(corners, ids)
    return obj.reshape(-1, 3).astype(np.float64), img.reshape(-1, 2).astype(np.float64)


def calibrate_intrinsics(board, images: list[np.ndarray], distortion: bool = True) -> dict:
    """K (3, 3), D (5,), the RMS reprojection error (px) and the views used.

    distortion=False fits a pure pinhole (D = 0): right for an ideal lens (the twin's renders),
    where free distortion terms only trade off against the focal length."""
    import cv2

    flags = (
        0
        if distortion
        else (cv2.CALIB_FIX_K1 | cv2.CALIB_FIX_K2 | cv2.CALIB_FIX_K3 | cv2.CALIB_ZERO_TANGENT_DIST)
    )

    views = [v for v in (detect(board, im) for im in images) if v is not None]
    if len(views) < 4:
        raise ValueError(f"intrinsics need the board in >= 4 images; it was found in {len(views)}")
    h, w = images[0].shape[:2]
    rms, K, D, _, _ = cv2.calibrateCamera(
        [v[0].astype(np.float32) for v in views],
        [v[1].astype(np.float32) for v in views],
        (w, h),
        None,
        None,
        flags=flags,
    )
    return {
        "K": K,
        "D": D.reshape(-1)[:5],
        "rms_px": float(rms),
        "views": len(views),
        "width": w,
        "height": h,
    }


def board_pose(board, image: np.ndarray, K: np.ndarray, D: np.ndarray) -> np.ndarray | None:
    """T_cam_board (4, 4) from one image, or None if the board is not seen well enough."""
    import cv2

    v = detect(board, image)
    if v is None:
        return None
    ok, rvec, tvec = cv2.solvePnP(v[0], v[1], K, D, flags=cv2.SOLVEPNP_IPPE)
    if not ok:
        return None
    rvec, tvec = cv2.solvePnPRefineLM(v[0], v[1], K, D, rvec, tvec)
    T = np.eye(4)
    T[:3, :3] = cv2.Rodrigues(rvec)[0]
    T[:3, 3] = tvec.reshape(3)
    return T


def hand_eye(T_base_tcp: list[np.ndarray], T_cam_board: list[np.ndarray]) -> np.ndarray:
    """Eye-in-hand: the camera's pose on the TCP, T_tcp_cam (4, 4), from paired arm poses and board
    views (the board fixed in the cell). Needs >= 3 poses with rotations about different axes."""
    import cv2

    if len(T_base_tcp) != len(T_cam_board) or len(T_base_tcp) < 3:
        raise ValueError(f"hand-eye needs >= 3 paired poses, got {len(T_base_tcp)} and {len(T_cam_board)}")
    R, t = cv2.calibrateHandEye(
        [T[:3, :3] for T in T_base_tcp],
        [T[:3, 3] for T in T_base_tcp],
        [T[:3, :3] for T in T_cam_board],
        [T[:3, 3] for T in T_cam_board],
        method=cv2.CALIB_HAND_EYE_PARK,
    )
    X = np.eye(4)
    X[:3, :3], X[:3, 3] = R, t.reshape(3)
    return X


def average_pose(poses: list[np.ndarray]) -> np.ndarray:
    """Mean of poses: mean translation, chordal mean rotation."""
    T = np.eye(4)
    T[:3, 3] = np.mean([p[:3, 3] for p in poses], axis=0)
    T[:3, :3] = Rotation.from_matrix(np.stack([p[:3, :3] for p in poses])).mean().as_matrix()
    return T


def scene_extrinsics(T_base_board: np.ndarray, T_scene_board: np.ndarray) -> np.ndarray:
    """Eye-to-hand: the scene camera's pose in the base, T_base_scene, from the board's pose in the
    base and the scene camera's view of it."""
    return T_base_board @ np.linalg.inv(T_scene_board)


def tcp_offset_pivot(T_base_flange: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, float]:
    """Pivot calibration: flange poses with the tool tip on one fixed point -> (tip in the flange
    frame (3,), the point in the base (3,), RMS residual m). Solves R_i p + t_i = q in least squares."""
    if len(T_base_flange) < 3:
        raise ValueError("a pivot calibration needs >= 3 orientations")
    A = np.concatenate([np.hstack([T[:3, :3], -np.eye(3)]) for T in T_base_flange])
    b = np.concatenate([-T[:3, 3] for T in T_base_flange])
    x, *_ = np.linalg.lstsq(A, b, rcond=None)
    res = A @ x - b
    return x[:3], x[3:], float(np.sqrt(np.mean(res.reshape(-1, 3).sum(axis=1) ** 2)))


def pose_error(T_est: np.ndarray, T_true: np.ndarray) -> tuple[float, float]:
    """(translation error m, rotation error deg) between two poses."""
    dt = float(np.linalg.norm(T_est[:3, 3] - T_true[:3, 3]))
    dr = float(np.degrees(Rotation.from_matrix(T_est[:3, :3].T @ T_true[:3, :3]).magnitude()))
    return dt, dr


def save_calibration(path: str | Path, kind: str, data: dict) -> str:
    """Write a calibration YAML with an ``id`` (kind, date and a hash of the numbers); return the id."""
    plain = {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v) for k, v in data.items()}
    digest = hashlib.sha256(yaml.safe_dump(plain, sort_keys=True).encode()).hexdigest()[:8]
    cal_id = f"{kind}-{time.strftime('%Y%m%d')}-{digest}"
    out = {"id": cal_id, "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **plain}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(out, sort_keys=False))
    return cal_id
