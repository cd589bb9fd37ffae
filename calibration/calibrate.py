"""Calibration tools of a cell (see README.md here and docs/recording.md for the procedure).

    python calibration/calibrate.py board --out board.png                 # print at 100 %
    python calibration/calibrate.py intrinsics --images DIR --out calibration/wrist_intrinsics.yaml
    python calibration/calibrate.py hand-eye --views views.yaml \
        --intrinsics calibration/wrist_intrinsics.yaml --out calibration/wrist_hand_eye.yaml
    python calibration/calibrate.py twin-check --out calibration/twin     # against the twin's truth

views.yaml (hand-eye): a list of {image: PATH, tcp_pose: [x, y, z, rx, ry, rz]} (the UR TCP pose,
rotation vector, as the teach pendant and ur_rtde's getActualTCPPose report it).
Each output YAML carries an ``id``; ``carp-record --calibration FILE`` stores it with every episode.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml


def _images(d: Path) -> list[np.ndarray]:
    import cv2

    paths = sorted(p for p in d.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise FileNotFoundError(f"no .png/.jpg images in {d}")
    return [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]


def _pose(v) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    T = np.eye(4)
    T[:3, 3], T[:3, :3] = v[:3], Rotation.from_rotvec(v[3:6]).as_matrix()
    return T


def main(argv: list[str] | None = None) -> int:
    from carp_hardware import calibration as cal
    from carp_policy.cli import run_main

    ap = argparse.ArgumentParser(
        prog="calibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("board", help="write the ChArUco board image")
    b.add_argument("--out", type=Path, required=True)
    i = sub.add_parser("intrinsics", help="K and D from board images")
    i.add_argument("--images", type=Path, required=True)
    i.add_argument("--out", type=Path, required=True)
    i.add_argument("--serial", default="")
    h = sub.add_parser("hand-eye", help="the wrist camera on the TCP from paired poses and images")
    h.add_argument("--views", type=Path, required=True)
    h.add_argument("--intrinsics", type=Path, required=True)
    h.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("twin-check", help="run the procedure in the twin against its ground truth")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--poses", type=int, default=20)
    t.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    spec = cal.BoardSpec()

    def body() -> int:
        if a.cmd == "board":
            import cv2

            cv2.imwrite(str(a.out), spec.image(200))
            w, h_ = spec.size_m
            print(
                f"{a.out}: {spec.squares[0]}x{spec.squares[1]} squares of {spec.square * 1e3:.0f} mm "
                f"({w * 1e3:.0f} x {h_ * 1e3:.0f} mm); check the printed square with a ruler"
            )
        elif a.cmd == "intrinsics":
            imgs = _images(a.images)
            r = cal.calibrate_intrinsics(spec.board(), imgs)
            cid = cal.save_calibration(
                a.out,
                "intrinsics",
                {
                    "width": r["width"],
                    "height": r["height"],
                    "K": r["K"],
                    "D": r["D"],
                    "distortion_model": "plumb_bob",
                    "rms_px": r["rms_px"],
                    "views": r["views"],
                    "serial": a.serial,
                },
            )
            print(f"{a.out}: id {cid}, RMS {r['rms_px']:.3f} px over {r['views']} views")
        elif a.cmd == "hand-eye":
            intr = yaml.safe_load(a.intrinsics.read_text())
            K, D = np.array(intr["K"]), np.array(intr["D"])
            import cv2

            views = yaml.safe_load(a.views.read_text())
            pairs = []
            for v in views:
                img = cv2.cvtColor(cv2.imread(str(a.views.parent / v["image"])), cv2.COLOR_BGR2RGB)
                B = cal.board_pose(spec.board(), img, K, D)
                if B is not None:
                    pairs.append((_pose(v["tcp_pose"]), B))
            X = cal.hand_eye([p[0] for p in pairs], [p[1] for p in pairs])
            cid = cal.save_calibration(
                a.out, "hand_eye", {"T_tcp_cam": X, "views": len(pairs), "intrinsics_id": intr.get("id", "")}
            )
            print(f"{a.out}: id {cid} from {len(pairs)} of {len(views)} views")
        else:
            from carp_sim.calibration_check import run

            r = run(n_poses=a.poses, seed=a.seed)
            a.out.mkdir(parents=True, exist_ok=True)
            i_ = r["intrinsics"]
            cid = cal.save_calibration(
                a.out / "wrist_hand_eye.yaml",
                "hand_eye",
                {"T_tcp_cam": r["wrist_hand_eye"]["T_tcp_cam"], "views": r["views_used"]},
            )
            cal.save_calibration(
                a.out / "wrist_intrinsics.yaml",
                "intrinsics",
                {
                    "width": 640,
                    "height": 480,
                    "K": [[i_["fx"], 0, i_["cx"]], [0, i_["fy"], i_["cy"]], [0, 0, 1]],
                    "D": i_["D"],
                    "rms_px": i_["rms_px"],
                },
            )
            cal.save_calibration(
                a.out / "scene_extrinsics.yaml",
                "scene_extrinsics",
                {"T_base_cam": r["scene_extrinsics"].get("T_base_scene")},
            )
            cal.save_calibration(
                a.out / "tcp_offset.yaml", "tcp_offset", {"tip_in_flange": r["tcp_offset"]["tip_in_flange"]}
            )
            report = json.loads(json.dumps(r, default=lambda o: np.asarray(o).tolist()))
            (a.out / "twin_check.json").write_text(json.dumps(report, indent=2))
            he, sc, tc = r["wrist_hand_eye"], r["scene_extrinsics"], r["tcp_offset"]
            print(
                f"twin check ({r['views_used']} views, hand-eye id {cid}):\n"
                f"  intrinsics f {i_['fx']:.2f}/{i_['fy']:.2f} px (true {i_['f_true']:.2f}), "
                f"c ({i_['cx']:.2f}, {i_['cy']:.2f}) (true ({i_['cx_true']}, {i_['cy_true']})), "
                f"RMS {i_['rms_px']:.3f} px\n"
                f"  wrist hand-eye error {he['error_mm']:.2f} mm, {he['error_deg']:.3f} deg "
                f"(goal < 2 mm, 0.5 deg)\n"
                f"  scene extrinsics error {sc.get('error_mm', float('nan')):.2f} mm, "
                f"{sc.get('error_deg', float('nan')):.3f} deg\n"
                f"  TCP offset error {tc['error_mm']:.4f} mm"
            )
        return 0

    return run_main("calibrate", body)


if __name__ == "__main__":
    sys.exit(main())
