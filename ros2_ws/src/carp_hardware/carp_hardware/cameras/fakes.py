"""Stand-ins for camera hardware that cannot exist on a development machine, with the real
libraries' names and signatures (checked against pyrealsense2 2.59 and OpenCV 4.14 by
introspection): a fake ``pyrealsense2`` module and a fake ``cv2`` whose ``VideoCapture`` serves
frames. Both can unplug a device mid-stream, plug it back, or stall its stream.

Frames are flat colours whose red channel counts frames, so a test can tell which frame it got.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np


@dataclass
class FakeDevice:
    """One fake camera: its clock offset (device clock = host clock - offset), state switches."""

    serial: str
    width: int = 640
    height: int = 480
    fps: float = 30.0
    clock_offset: float = 1000.0  # s: the device's clock starts far from the host's
    latency: float = 0.004  # s from capture to delivery
    plugged: bool = True
    stalled: bool = False
    frames: int = 0
    _next: float = field(default=0.0, repr=False)

    def next_frame(self, timeout_s: float, clock=time.monotonic) -> tuple[float, np.ndarray] | None:
        """Block until the next frame: (device timestamp s, RGB image), or None on timeout."""
        deadline = clock() + timeout_s
        while True:
            now = clock()
            if not self.plugged:
                return None
            if not self.stalled and now >= self._next:
                self._next = max(self._next + 1.0 / self.fps, now)
                break
            if now >= deadline:
                return None
            time.sleep(min(0.002, max(0.0, deadline - now)))
        self.frames += 1
        img = np.zeros((self.height, self.width, 3), np.uint8)
        img[..., 0] = self.frames % 256
        img[..., 1] = 80
        return (now - self.latency) - self.clock_offset, img


# ------------------------------------------------------------------ pyrealsense2
class _Enum:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


class FakeRealSense:
    """A module-like object: ``rs = FakeRealSense([FakeDevice("123")])`` then
    ``RealSenseCamera(name, cfg, rs=rs)``; ``rs.devices`` switch plug/stall per serial."""

    def __init__(self, devices: list[FakeDevice]) -> None:
        self.devices = {d.serial: d for d in devices}
        self.options: dict[tuple[str, str], float] = {}  # (serial, option) -> value, for assertions
        outer = self
        self.stream = SimpleNamespace(color=_Enum("stream.color"), depth=_Enum("stream.depth"))
        self.format = SimpleNamespace(rgb8=_Enum("format.rgb8"), z16=_Enum("format.z16"))
        self.option = SimpleNamespace(
            enable_auto_exposure=_Enum("option.enable_auto_exposure"),
            exposure=_Enum("option.exposure"),
            gain=_Enum("option.gain"),
        )
        self.camera_info = SimpleNamespace(serial_number=_Enum("camera_info.serial_number"))
        self.timestamp_domain = SimpleNamespace(
            hardware_clock=_Enum("timestamp_domain.hardware_clock"),
            global_time=_Enum("timestamp_domain.global_time"),
        )

        class _DevHandle:
            def __init__(self, dev: FakeDevice) -> None:
                self.dev = dev

            def get_info(self, info) -> str:
                return self.dev.serial

            def first_color_sensor(self):
                return _Sensor(self.dev.serial)

            def first_depth_sensor(self):
                return _Sensor(self.dev.serial)

        class _Sensor:
            def __init__(self, serial: str) -> None:
                self.serial = serial

            def set_option(self, option, value: float) -> None:
                outer.options[(self.serial, option.name)] = float(value)

            def get_depth_scale(self) -> float:
                return 0.001

        class context:
            def query_devices(self):
                return [_DevHandle(d) for d in outer.devices.values() if d.plugged]

        class config:
            def __init__(self) -> None:
                self.serial, self.streams = None, {}

            def enable_device(self, serial: str) -> None:
                self.serial = serial

            def enable_stream(self, stream_type, width: int, height: int, format, framerate: int) -> None:
                self.streams[stream_type.name] = (width, height, format, framerate)

        class _Intrinsics:
            def __init__(self, w: int, h: int) -> None:
                self.width, self.height = w, h
                self.fx = self.fy = 0.9 * w
                self.ppx, self.ppy = w / 2 - 0.5, h / 2 - 0.5
                self.coeffs = [0.0] * 5
                self.model = "distortion.inverse_brown_conrady"

        class _Profile:
            def __init__(self, dev: FakeDevice) -> None:
                self.dev = dev

            def get_device(self):
                return _DevHandle(self.dev)

            def get_stream(self, stream_type):
                dev = self.dev
                return SimpleNamespace(
                    as_video_stream_profile=lambda: SimpleNamespace(
                        get_intrinsics=lambda: _Intrinsics(dev.width, dev.height)
                    )
                )

        class _Frame:
            def __init__(self, t_ms: float, data: np.ndarray) -> None:
                self._t, self._data = t_ms, data

            def get_data(self):
                return self._data

            def get_timestamp(self) -> float:
                return self._t

            def get_frame_timestamp_domain(self):
                return outer.timestamp_domain.hardware_clock

        class composite_frame:
            def __init__(self, color, depth=None) -> None:
                self._color, self._depth = color, depth

            def get_color_frame(self):
                return self._color

            def get_depth_frame(self):
                return self._depth

        class pipeline:
            def __init__(self) -> None:
                self.dev: FakeDevice | None = None
                self.depth = False

            def start(self, cfg):
                dev = outer.devices.get(cfg.serial)
                if dev is None or not dev.plugged:
                    raise RuntimeError("No device connected")
                w, h, _, fps = cfg.streams["stream.color"]
                dev.width, dev.height, dev.fps = w, h, fps
                self.dev, self.depth = dev, "stream.depth" in cfg.streams
                return _Profile(dev)

            def stop(self) -> None:
                self.dev = None

            def try_wait_for_frames(self, timeout_ms: int = 5000):
                if self.dev is None:
                    raise RuntimeError("wait_for_frames cannot be called before start()")
                got = self.dev.next_frame(timeout_ms / 1e3)
                if got is None:
                    return False, composite_frame(None)
                t, img = got
                depth = None
                if self.depth:
                    depth = _Frame(t * 1e3, np.full(img.shape[:2], 500, np.uint16))
                return True, composite_frame(_Frame(t * 1e3, img), depth)

            def wait_for_frames(self, timeout_ms: int = 5000):
                ok, frames = self.try_wait_for_frames(timeout_ms)
                if not ok:
                    raise RuntimeError(f"Frame didn't arrive within {timeout_ms}")
                return frames

        class align:
            def __init__(self, align_to) -> None:
                self.align_to = align_to

            def process(self, frames):
                return frames

        self.context, self.config, self.pipeline, self.align = context, config, pipeline, align
        self.composite_frame = composite_frame


# ------------------------------------------------------------------ cv2.VideoCapture
class FakeCV2:
    """A module-like object with OpenCV's constants and a ``VideoCapture`` that serves the fake
    devices registered by path (``/dev/video0``) or index."""

    def __init__(self, devices: dict[str | int, FakeDevice]) -> None:
        import cv2  # the real constants: a fake must not invent its own numbering

        self.devices = devices
        for k in dir(cv2):
            if k.startswith("CAP_"):
                setattr(self, k, getattr(cv2, k))
        self.VideoWriter_fourcc = cv2.VideoWriter_fourcc
        self.resize, self.INTER_AREA, self.INTER_LINEAR = cv2.resize, cv2.INTER_AREA, cv2.INTER_LINEAR
        outer = self

        class VideoCapture:
            def __init__(self, index, apiPreference: int = 0) -> None:
                self.dev = outer.devices.get(index)
                self.api = apiPreference
                self.props: dict[int, float] = {}
                self.opened = self.dev is not None and self.dev.plugged
                self._pos_ms = 0.0

            def isOpened(self) -> bool:
                return self.opened

            def set(self, propId: int, value: float) -> bool:
                self.props[propId] = float(value)
                if propId == outer.CAP_PROP_FRAME_WIDTH:
                    self.dev.width = int(value)
                if propId == outer.CAP_PROP_FRAME_HEIGHT:
                    self.dev.height = int(value)
                return True

            def get(self, propId: int) -> float:
                if propId == outer.CAP_PROP_FRAME_WIDTH:
                    return float(self.dev.width)
                if propId == outer.CAP_PROP_FRAME_HEIGHT:
                    return float(self.dev.height)
                if propId == outer.CAP_PROP_POS_MSEC:
                    return self._pos_ms
                return self.props.get(propId, 0.0)

            def read(self, image=None):
                if not self.opened or not self.dev.plugged:
                    return False, None
                got = self.dev.next_frame(1.0)
                if got is None:
                    return False, None
                t, rgb = got
                self._pos_ms = (t + self.dev.clock_offset) * 1e3  # V4L2 stamps on CLOCK_MONOTONIC
                return True, np.ascontiguousarray(rgb[..., ::-1])

            def release(self) -> None:
                self.opened = False

        self.VideoCapture = VideoCapture


def unplug_later(dev: FakeDevice, after_s: float, replug_after_s: float | None = None) -> threading.Thread:
    """Unplug ``dev`` after ``after_s`` (and plug it back ``replug_after_s`` later) in a thread."""

    def run() -> None:
        time.sleep(after_s)
        dev.plugged = False
        if replug_after_s is not None:
            time.sleep(replug_after_s)
            dev.plugged = True

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th
