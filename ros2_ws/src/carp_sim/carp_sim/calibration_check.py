"""The calibration procedure run in the twin against its ground truth.

A ChArUco board (its image as a MuJoCo texture on a thin box, exactly the board's size) lies on
the table. The arm visits poses above it with varied tilt and yaw; the wrist camera renders each
view at 480x640; the procedure of ``carp_hardware.calibration`` runs on the renders only:
intrinsics from the views, the board's pose in each, the hand-eye transform, the board's pose in
the base, the scene camera's extrinsics; the TCP offset by a pivot. Its results are compared with
the twin's own camera poses (MuJoCo's camera frame turned into OpenCV's) and its TCP offset.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mujoco
import numpy as np
from scipy.spatial.transform import Rotation

from carp_hardware import calibration as cal
from carp_hardware.kinematics import HOME_Q, TCP_OFFSET, ik_nearest, pose_matrix
from carp_sim.cell import TABLE_CENTER, build_mjcf
from carp_sim.tasks import TaskConfig, top_down

MJ_TO_CV = np.diag([1.0, -1.0, -1.0])  # MuJoCo cameras look along -z with y up; OpenCV's along +z, y down
BOARD_CENTER = (TABLE_CENTER[0], 0.05)


def board_scene(spec: cal.BoardSpec, png: Path) -> mujoco.MjModel:
    """The cup cell with the board on the table (a texture exactly the board's size)."""
    import cv2

    cv2.imwrite(str(png), spec.image(100))
    w, h = spec.size_m
    xml = build_mjcf(TaskConfig.load("cup").layout)
    xml = xml.replace(
        "</asset>",
        f'  <texture name="charuco" type="2d" file="{png}"/>\n'
        '    <material name="charuco" texture="charuco" texrepeat="1 1" specular="0" shininess="0"/>\n'
        "  </asset>",
    )
    board = (
        f'<geom name="charuco" type="box" size="{w / 2} {h / 2} 0.0005" pos="{BOARD_CENTER[0]} '
        f'{BOARD_CENTER[1]} 0.0005" material="charuco" contype="0" conaffinity="0"/>'
    )
    xml = xml.replace("</worldbody>", f"  {board}\n  </worldbody>")
    # bright, even light: the board must read as black and white
    xml = xml.replace('<headlight ambient="0.45 0.45 0.45"', '<headlight ambient="0.7 0.7 0.7"')
    return mujoco.MjModel.from_xml_string(xml)


def camera_pose(model, data, name: str) -> np.ndarray:
    """T_world_cam in OpenCV's camera convention."""
    cid = model.cam(name).id
    return pose_matrix(data.cam_xpos[cid], data.cam_xmat[cid].reshape(3, 3) @ MJ_TO_CV)


def arm_poses(n: int, rng: np.random.Generator, max_tilt: float = 0.45) -> list[np.ndarray]:
    """TCP poses above the board: heights 0.25-0.33 m, yaw +-40 deg, tilts up to max_tilt rad, with the
    wrist camera (ahead of the tool) kept looking at the board."""
    poses = []
    for _ in range(n):
        yaw = rng.uniform(-0.7, 0.7)
        tilt = Rotation.from_euler("xy", rng.uniform(-max_tilt, max_tilt, 2)).as_matrix()
        R = top_down(yaw) @ tilt
        cam_ahead = R @ np.array([0.085, 0.0, 0.0])  # the camera sits 8.5 cm along tool x
        p = np.array([*BOARD_CENTER, 0.0]) - np.array([cam_ahead[0], cam_ahead[1], 0.0])
        p[:2] += rng.uniform(-0.03, 0.03, 2)
        p[2] = rng.uniform(0.25, 0.33)
        poses.append(pose_matrix(p, R))
    return poses


def run(
    n_poses: int = 14, seed: int = 0, size: tuple[int, int] = (480, 640), distortion: bool = False
) -> dict:
    """Run the procedure in the twin; return estimates, ground truth and errors."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    spec = cal.BoardSpec()
    board = spec.board()
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = board_scene(spec, Path(tmp) / "charuco.png")
    data = mujoco.MjData(model)
    renderer = mujoco.Renderer(model, *size)
    tcp_site, flange = model.site("tcp").id, model.body("flange").id
    q = HOME_Q.copy()
    wrist_imgs, T_base_tcp, T_tcp_cam_true = [], [], []
    for T in arm_poses(n_poses, rng):
        q = ik_nearest(T, q)
        data.qpos[:6] = q
        mujoco.mj_forward(model, data)
        renderer.update_scene(data, camera="wrist")
        wrist_imgs.append(renderer.render().copy())
        T_tcp = pose_matrix(data.site_xpos[tcp_site], data.site_xmat[tcp_site].reshape(3, 3))
        T_base_tcp.append(T_tcp)
        T_tcp_cam_true.append(np.linalg.inv(T_tcp) @ camera_pose(model, data, "wrist"))
    renderer.update_scene(data, camera="scene")
    scene_img = renderer.render().copy()
    T_base_scene_true = camera_pose(model, data, "scene")
    fovy = np.radians(model.cam("wrist").fovy[0])
    f_true = 0.5 * size[0] / np.tan(0.5 * fovy)

    # 1. intrinsics (the same lens for both twin cameras is not assumed: each calibrated alone)
    intr = cal.calibrate_intrinsics(board, wrist_imgs, distortion=distortion)
    K, D = intr["K"], intr["D"]
    # 2. board in each wrist view, hand-eye
    views = [(T, cal.board_pose(board, im, K, D)) for T, im in zip(T_base_tcp, wrist_imgs, strict=True)]
    views = [(T, B) for T, B in views if B is not None]
    X = cal.hand_eye([v[0] for v in views], [v[1] for v in views])
    he_t, he_r = cal.pose_error(X, T_tcp_cam_true[0])
    # 3. the board in the base from the wrist, then the scene camera (its K from its fovy here: one
    #    view cannot calibrate intrinsics; on a cell it gets its own intrinsics run)
    T_base_board = cal.average_pose([T @ X @ B for T, B in views])
    fy_s = 0.5 * size[0] / np.tan(0.5 * np.radians(model.cam("scene").fovy[0]))
    K_s = np.array([[fy_s, 0, size[1] / 2 - 0.5], [0, fy_s, size[0] / 2 - 0.5], [0, 0, 1]])
    B_s = cal.board_pose(board, scene_img, K_s, np.zeros(5))
    sc = {"found": B_s is not None}
    if B_s is not None:
        T_bs = cal.scene_extrinsics(T_base_board, B_s)
        sc["T_base_scene"] = T_bs
        sc["error_mm"], sc["error_deg"] = (
            x * s for x, s in zip(cal.pose_error(T_bs, T_base_scene_true), (1e3, 1))
        )
    # 4. TCP offset by a pivot: the TCP site held on one point in several orientations
    point = np.array([*BOARD_CENTER, 0.12])
    flanges = []
    for k in range(6):
        R = top_down(0.5 * k) @ Rotation.from_euler("xy", rng.uniform(-0.4, 0.4, 2)).as_matrix()
        q = ik_nearest(pose_matrix(point, R), q)
        data.qpos[:6] = q
        mujoco.mj_forward(model, data)
        flanges.append(pose_matrix(data.xpos[flange], data.xmat[flange].reshape(3, 3)))
    tip, _, pivot_rms = cal.tcp_offset_pivot(flanges)
    renderer.close()
    return {
        "poses": n_poses,
        "views_used": len(views),
        "intrinsics": {
            "fx": float(K[0, 0]),
            "fy": float(K[1, 1]),
            "cx": float(K[0, 2]),
            "cy": float(K[1, 2]),
            "f_true": float(f_true),
            "cx_true": size[1] / 2 - 0.5,
            "cy_true": size[0] / 2 - 0.5,
            "rms_px": intr["rms_px"],
            "D": D.tolist(),
        },
        "wrist_hand_eye": {
            "T_tcp_cam": X,
            "T_tcp_cam_true": T_tcp_cam_true[0],
            "error_mm": he_t * 1e3,
            "error_deg": he_r,
        },
        "scene_extrinsics": sc,
        "tcp_offset": {
            "tip_in_flange": tip,
            "true": [0.0, 0.0, TCP_OFFSET],
            "error_mm": float(np.linalg.norm(tip - [0, 0, TCP_OFFSET]) * 1e3),
            "rms_m": pivot_rms,
        },
    }
