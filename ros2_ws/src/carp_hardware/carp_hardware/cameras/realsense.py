"""Intel RealSense cameras by serial number through ``pyrealsense2``.

Colour at 640x480@30 (RGB8) by default, optionally depth aligned to it; the frames' device
timestamps are mapped onto the host clock (``ClockMapper``); exposure either auto (the first
``settle_frames`` are dropped while it converges) or fixed in microseconds; an unplugged camera is
reopened by serial when it comes back. The intrinsics come from the device.

The module is passed in (``rs=``) so tests can hand a fake with pyrealsense2's names; by default
the real one is imported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from carp_hardware.cameras.base import CameraError, CameraInfo, ClockMapper, HostClock, ThreadedCamera
from carp_policy.actions import StreamBuffer


@dataclass
class RealSenseConfig:
    """Settings of one RealSense camera (a section of the cameras YAML)."""

    serial: str = ""
    width: int = 640
    height: int = 480
    fps: int = 30
    depth: bool = False  # also stream depth, aligned to colour, into ``<name>_depth`` (metres, float32)
    exposure_us: float | None = None  # None: auto exposure; a number: fixed exposure (microseconds)
    gain: float | None = None  # with a fixed exposure: fixed gain (device units), None leaves it
    settle_frames: int = 30  # frames dropped after opening (auto exposure converges in ~1 s)
    timeout_ms: int = 1000  # a wait for frames longer than this counts as a stall


def list_serials(rs=None) -> list[str]:
    """Serial numbers of the RealSense devices plugged in."""
    rs = rs or _import_rs()
    return [d.get_info(rs.camera_info.serial_number) for d in rs.context().query_devices()]


def _import_rs():
    try:
        import pyrealsense2 as rs
    except ImportError as e:  # libusb missing is the usual cause on a fresh machine
        raise CameraError(f"pyrealsense2 cannot be imported ({e}); run scripts/bootstrap.sh") from e
    return rs


class RealSenseCamera(ThreadedCamera):
    """A RealSense colour (+ aligned depth) stream in its own thread."""

    def __init__(
        self, name: str, config: RealSenseConfig, rs=None, clock: HostClock = time.monotonic, **kw
    ) -> None:
        if not config.serial:
            raise ValueError(f"camera '{name}': a RealSense camera needs its serial number")
        super().__init__(name, grab_timeout_s=config.timeout_ms / 1e3, clock=clock, **kw)
        self.config = config
        self.rs = rs or _import_rs()
        self.depth_buffer = (
            StreamBuffer(f"{name}_depth", self.buffer.capacity) if config.depth else None
        )
        self._pipe = None
        self._align = None
        self._info: CameraInfo | None = None
        self._depth_scale = 1.0
        self._map = ClockMapper()
        self.timestamp_domain = ""

    def _open(self) -> None:
        rs, c = self.rs, self.config
        serials = list_serials(rs)
        if c.serial not in serials:
            raise CameraError(f"camera '{self.name}': no RealSense with serial {c.serial} (found {serials})")
        pipe, cfg = rs.pipeline(), rs.config()
        cfg.enable_device(c.serial)
        cfg.enable_stream(rs.stream.color, c.width, c.height, rs.format.rgb8, c.fps)
        if c.depth:
            cfg.enable_stream(rs.stream.depth, c.width, c.height, rs.format.z16, c.fps)
        profile = pipe.start(cfg)
        try:
            dev = profile.get_device()
            sensor = dev.first_color_sensor()
            if c.exposure_us is None:
                sensor.set_option(rs.option.enable_auto_exposure, 1)
            else:
                sensor.set_option(rs.option.enable_auto_exposure, 0)
                sensor.set_option(rs.option.exposure, float(c.exposure_us))
                if c.gain is not None:
                    sensor.set_option(rs.option.gain, float(c.gain))
            if c.depth:
                self._depth_scale = float(dev.first_depth_sensor().get_depth_scale())
                self._align = rs.align(rs.stream.color)
            intr = profile.get_stream(rs.stream.color).as_video_stream_profile().get_intrinsics()
            self._info = CameraInfo(
                width=intr.width,
                height=intr.height,
                K=[[intr.fx, 0.0, intr.ppx], [0.0, intr.fy, intr.ppy], [0.0, 0.0, 1.0]],
                D=[float(x) for x in intr.coeffs],
                frame_id=f"{self.name}_optical_frame",
                serial=c.serial,
                source="device",
            )
            # Let auto exposure converge: the first frames of a RealSense are dark.
            for _ in range(c.settle_frames if c.exposure_us is None else 0):
                pipe.wait_for_frames(max(c.timeout_ms, 5000))
        except Exception:
            pipe.stop()
            raise
        self._pipe = pipe
        self._map.reset()  # a reopened device restarts its clock

    def _grab(self) -> tuple[float, np.ndarray] | None:
        ok, frames = self._pipe.try_wait_for_frames(self.config.timeout_ms)
        arrival = self.clock()
        if not ok:
            # a stall and an unplug look alike here; the device list tells them apart
            if self.config.serial not in list_serials(self.rs):
                raise CameraError(f"RealSense {self.config.serial} was unplugged")
            return None
        if self._align is not None:
            frames = self._align.process(frames)
        color = frames.get_color_frame()
        # ms on the device's clock (hardware_clock) or on the host's (system/global time): the
        # mapper estimates the offset onto our monotonic clock either way
        self.timestamp_domain = str(color.get_frame_timestamp_domain())
        t = self._map(color.get_timestamp() / 1e3, arrival)
        img = np.asanyarray(color.get_data()).copy()
        if self.depth_buffer is not None:
            depth = frames.get_depth_frame()
            self.depth_buffer.push(t, np.asanyarray(depth.get_data()).astype(np.float32) * self._depth_scale)
        return t, img

    def _close(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            try:
                pipe.stop()
            except Exception:  # already gone with the device
                pass

    def info(self) -> CameraInfo:
        if self._info is None:
            raise CameraError(f"camera '{self.name}': intrinsics are known once it is started")
        return self._info

    def status(self) -> dict:
        return {
            **super().status(),
            "serial": self.config.serial,
            "clock_offset_s": self._map.offset,
            "timestamp_domain": self.timestamp_domain,
        }
