"""Any UVC camera through OpenCV's V4L2 backend.

MJPG by default (raw YUYV at 640x480 does not fit 30 fps on a shared USB 2 bus), optionally fixed
exposure. Frames are stamped with the V4L2 buffer time when the driver gives one (CLOCK_MONOTONIC,
the host clock: ``CAP_PROP_POS_MSEC``), else with the arrival time. Intrinsics come from a
calibration file (``calibration/``): a UVC camera does not report them.

The OpenCV module is passed in (``cv2=``) so tests can hand a fake ``VideoCapture``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from carp_hardware.cameras.base import CameraError, CameraInfo, HostClock, ThreadedCamera


@dataclass
class UVCConfig:
    """Settings of one UVC camera (a section of the cameras YAML)."""

    device: str = "/dev/video0"  # a path (prefer /dev/v4l/by-id/..., stable across replugs) or an index
    width: int = 640
    height: int = 480
    fps: int = 30
    fourcc: str = "MJPG"
    exposure: float | None = None  # None: auto; a number: fixed, in the V4L2 driver's units (100 us)
    intrinsics: str | None = None  # calibration YAML with K and D for this camera


class UVCCamera(ThreadedCamera):
    """A UVC colour stream in its own thread (OpenCV ``VideoCapture`` with ``CAP_V4L2``)."""

    def __init__(
        self,
        name: str,
        config: UVCConfig,
        cv2=None,
        clock: HostClock = time.monotonic,
        info: CameraInfo | None = None,
        **kw,
    ) -> None:
        super().__init__(name, clock=clock, **kw)
        self.config = config
        if cv2 is None:
            import cv2
        self.cv2 = cv2
        self._cap = None
        self._failed_reads = 0
        self._info = info
        if self._info is None and config.intrinsics:
            from carp_hardware.cameras.factory import load_camera_info

            self._info = load_camera_info(config.intrinsics)

    def _source(self) -> int | str:
        d = str(self.config.device)
        return int(d) if d.isdigit() else d

    def _open(self) -> None:
        cv2, c = self.cv2, self.config
        cap = cv2.VideoCapture(self._source(), cv2.CAP_V4L2)
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"camera '{self.name}': cannot open UVC device {c.device}")
        cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*c.fourcc))
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, c.width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, c.height)
        cap.set(cv2.CAP_PROP_FPS, c.fps)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # newest frame, not a queue of old ones
        if c.exposure is not None:
            cap.set(cv2.CAP_PROP_AUTO_EXPOSURE, 1)  # V4L2: 1 = manual, 3 = aperture priority (auto)
            cap.set(cv2.CAP_PROP_EXPOSURE, float(c.exposure))
        else:
            cap.set(cv2.CAP_PROP_AUTO_EXPOSURE, 3)
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if (w, h) != (c.width, c.height):
            cap.release()
            raise CameraError(
                f"camera '{self.name}': asked for {c.width}x{c.height}, the device gives {w}x{h}"
            )
        self._cap = cap
        self._failed_reads = 0

    def _grab(self) -> tuple[float, np.ndarray] | None:
        ok, bgr = self._cap.read()  # blocks up to the V4L2 select timeout
        arrival = self.clock()
        if not ok or bgr is None:
            # read() fails both when unplugged and on a select timeout; the device node tells them apart
            src = self._source()
            if isinstance(src, str) and not _exists(src):
                raise CameraError(f"UVC device {src} was unplugged")
            self._failed_reads += 1
            if not self._cap.isOpened() or self._failed_reads >= 3:
                # OpenCV keeps a capture "open" after an unplug: reopening is how to find out
                raise CameraError(f"UVC device {src}: {self._failed_reads} reads without a frame")
            return None
        self._failed_reads = 0
        stamp = self._cap.get(self.cv2.CAP_PROP_POS_MSEC) / 1e3
        # trust the driver's buffer time only if it is on our clock (within 1 s before arrival)
        t = stamp if 0.0 <= arrival - stamp < 1.0 else arrival
        last = self.buffer.latest()
        if last is not None and t <= last.t:
            t = max(arrival, last.t + 1e-6)
        return t, np.ascontiguousarray(bgr[..., ::-1])  # OpenCV delivers BGR

    def _close(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()

    def info(self) -> CameraInfo:
        if self._info is None:
            raise CameraError(
                f"camera '{self.name}': a UVC camera reports no intrinsics; calibrate it "
                "(calibration/README.md) and set 'intrinsics:' to the file"
            )
        return self._info


def _exists(path: str) -> bool:
    import os

    return os.path.exists(path)
