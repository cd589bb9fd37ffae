"""Cameras from configuration: one YAML section per camera, ``kind`` chooses the backend.

cameras:
  wrist: {kind: realsense, realsense: {serial: "123622270811"}}
  scene: {kind: uvc, uvc: {device: /dev/v4l/by-id/usb-Logitech_C920-video-index0,
                           intrinsics: calibration/scene_intrinsics.yaml}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from carp_hardware.cameras.base import CameraInfo, ThreadedCamera
from carp_hardware.cameras.realsense import RealSenseCamera, RealSenseConfig
from carp_hardware.cameras.uvc import UVCCamera, UVCConfig
from carp_policy.yaml_config import from_dict


@dataclass
class CameraConfig:
    """One camera: its backend and that backend's settings."""

    kind: str = "realsense"  # realsense | uvc | sim (the twin's renders; built by the twin)
    realsense: RealSenseConfig = field(default_factory=RealSenseConfig)
    uvc: UVCConfig = field(default_factory=UVCConfig)


def make_camera(name: str, config: CameraConfig | dict, **kw) -> ThreadedCamera:
    """A camera from its config (``kw`` go to the backend: ``rs=``/``cv2=`` fakes in tests)."""
    if isinstance(config, dict):
        config = from_dict(CameraConfig, config, name)
    if config.kind == "realsense":
        return RealSenseCamera(name, config.realsense, **kw)
    if config.kind == "uvc":
        return UVCCamera(name, config.uvc, **kw)
    raise ValueError(
        f"camera '{name}': kind must be realsense or uvc here (the twin makes its own), got {config.kind!r}"
    )


def load_camera_info(path: str | Path) -> CameraInfo:
    """Intrinsics from a calibration YAML (``calibration/intrinsics.py`` writes them)."""
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict) or "K" not in raw:
        raise ValueError(f"{path}: not an intrinsics file (no 'K')")
    return CameraInfo(
        width=int(raw["width"]),
        height=int(raw["height"]),
        K=[list(map(float, r)) for r in raw["K"]],
        D=[float(x) for x in raw.get("D", [0.0] * 5)],
        distortion_model=raw.get("distortion_model", "plumb_bob"),
        frame_id=raw.get("frame_id", ""),
        serial=str(raw.get("serial", "")),
        source=str(raw.get("id", path)),
    )
