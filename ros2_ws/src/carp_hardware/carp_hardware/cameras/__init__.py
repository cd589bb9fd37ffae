"""Cameras: one ``Camera`` interface, backends for RealSense (pyrealsense2), UVC (OpenCV V4L2) and
the twin's MuJoCo renders; each runs in its own thread and fills a timestamped ``StreamBuffer``."""

from carp_hardware.cameras.base import Camera, CameraError, CameraInfo, ClockMapper, ThreadedCamera
from carp_hardware.cameras.factory import CameraConfig, load_camera_info, make_camera
from carp_hardware.cameras.realsense import RealSenseCamera, RealSenseConfig, list_serials
from carp_hardware.cameras.sim import SimCamera, mujoco_camera_info
from carp_hardware.cameras.uvc import UVCCamera, UVCConfig

__all__ = [
    "Camera",
    "CameraConfig",
    "CameraError",
    "CameraInfo",
    "ClockMapper",
    "RealSenseCamera",
    "RealSenseConfig",
    "SimCamera",
    "ThreadedCamera",
    "UVCCamera",
    "UVCConfig",
    "list_serials",
    "load_camera_info",
    "make_camera",
    "mujoco_camera_info",
]
