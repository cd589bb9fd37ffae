"""What every camera is: a thread that grabs frames and pushes them, timestamped on the host clock,
into a ``StreamBuffer`` (Diffusion Policy's real-world pattern: each device in its own loop).

A backend implements three methods (``_open``, ``_grab``, ``_close``); ``ThreadedCamera`` owns the
thread, reconnects after an unplug, counts frames and faults, and refuses frames that are too old.
The host clock is ``time.monotonic()`` (CLOCK_MONOTONIC: what V4L2 stamps buffers with, and never
stepped by NTP); the twin's cameras use the same clock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from carp_policy.actions import Sample, StreamBuffer

HostClock = Callable[[], float]


class CameraError(RuntimeError):
    """A camera that cannot deliver: not found, unplugged for good, or its newest frame too old."""


@dataclass
class CameraInfo:
    """The camera model of an image stream, as sensor_msgs/CameraInfo carries it."""

    width: int
    height: int
    K: list[list[float]]  # 3x3 camera matrix (fx, 0, cx; 0, fy, cy; 0, 0, 1), pixels
    D: list[float] = field(default_factory=lambda: [0.0] * 5)  # distortion coefficients
    distortion_model: str = "plumb_bob"  # ROS name of OpenCV's (k1, k2, p1, p2, k3)
    frame_id: str = ""  # the optical frame the image is expressed in
    serial: str = ""  # the device it came from ("" for the twin)
    source: str = ""  # where the numbers came from: "device", a calibration file id, "twin"

    def matrix(self) -> np.ndarray:
        return np.asarray(self.K, dtype=np.float64)

    def to_camera_info_msg(self) -> dict:
        """The fields of a sensor_msgs/CameraInfo message (the ROS node copies them 1:1)."""
        K = self.matrix()
        P = np.concatenate([K, np.zeros((3, 1))], axis=1)
        return {
            "header": {"frame_id": self.frame_id},
            "height": self.height,
            "width": self.width,
            "distortion_model": self.distortion_model,
            "d": [float(x) for x in self.D],
            "k": K.reshape(-1).tolist(),
            "r": np.eye(3).reshape(-1).tolist(),
            "p": P.reshape(-1).tolist(),
        }


@runtime_checkable
class Camera(Protocol):
    """One image stream: start it, read its ring buffer, stop it."""

    name: str
    buffer: StreamBuffer  # (H, W, 3) uint8 RGB frames, capture time on the host clock

    def start(self) -> None:
        """Open the device and start the grab thread (returns once the first frame arrived)."""

    def stop(self) -> None:
        """Stop the thread and release the device."""

    def info(self) -> CameraInfo:
        """The intrinsics of the frames in ``buffer``."""
        ...

    def latest(self, max_age: float, now: float | None = None) -> Sample:
        """The newest frame; ``CameraError`` if there is none or it is older than ``max_age`` s."""
        ...

    def status(self) -> dict:
        """Counters for diagnostics: frames, reconnects, last error, fps."""
        ...


class ClockMapper:
    """Maps a device's own clock (seconds) onto the host clock.

    host ~= device + offset. Each frame gives an upper bound on the offset (it arrived after it was
    captured: host_arrival - device_t >= true offset), so the offset is the smallest bound seen in
    a sliding window: the frame with the least transport delay pins it. The window lets the estimate
    follow a slow drift between the two clocks; ``latency`` (s) is the known minimum transport
    delay (exposure end to USB delivery), subtracted so stamps mean capture, not arrival.
    """

    def __init__(self, window: int = 300, latency: float = 0.0) -> None:
        self._bounds: deque[float] = deque(maxlen=window)
        self.latency = float(latency)
        self._last = -np.inf

    def reset(self) -> None:
        """Forget the estimate (a reconnected device restarts its clock)."""
        self._bounds.clear()
        self._last = -np.inf

    def __call__(self, device_t: float, host_arrival: float) -> float:
        self._bounds.append(host_arrival - device_t)
        t = device_t + min(self._bounds) - self.latency
        # A new smallest bound moves the mapping back by a few microseconds; capture times must not
        # run backwards (StreamBuffer refuses that), so a stamp never precedes the previous one.
        t = max(t, self._last)
        self._last = t
        return t

    @property
    def offset(self) -> float:
        return min(self._bounds) if self._bounds else float("nan")


class ThreadedCamera:
    """Base of the backends: the grab loop, reconnects, the ring buffer, age checks."""

    def __init__(
        self,
        name: str,
        capacity: int = 64,
        reconnect_s: float = 1.0,
        max_reconnects: int | None = None,
        grab_timeout_s: float = 1.0,
        clock: HostClock = time.monotonic,
    ) -> None:
        """reconnect_s: wait between reopen attempts after a fault; max_reconnects: give up after
        this many consecutive failed reopen attempts (None: keep trying while running);
        grab_timeout_s: a grab that delivers nothing for this long counts as a stalled stream."""
        self.name = name
        self.buffer = StreamBuffer(name, capacity)
        self.reconnect_s = float(reconnect_s)
        self.max_reconnects = max_reconnects
        self.grab_timeout_s = float(grab_timeout_s)
        self.clock = clock
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._first = threading.Event()
        self._lock = threading.Lock()
        self.frames = 0
        self.reconnects = 0
        self.faults = 0
        self.last_error: str | None = None
        self.failed = False  # True once the thread gave up (max_reconnects exhausted)
        self._fps_times: deque[float] = deque(maxlen=60)

    # ---------------------------------------------------------------- backend interface
    def _open(self) -> None:
        """Open the device (raise on failure)."""
        raise NotImplementedError

    def _grab(self) -> tuple[float, np.ndarray] | None:
        """Block for the next frame: (capture time on the host clock, (H, W, 3) uint8 RGB), or None
        if nothing came within ``grab_timeout_s`` (a stall). Raise if the device is gone."""
        raise NotImplementedError

    def _close(self) -> None:
        """Release the device (must not raise)."""

    def info(self) -> CameraInfo:
        raise NotImplementedError

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout_s: float = 10.0) -> None:
        """Open the device, start the grab thread and wait for the first frame."""
        if self._thread is not None:
            raise RuntimeError(f"camera '{self.name}' is already started")
        self._stop.clear()
        self._first.clear()
        self.failed = False
        self._open()  # the first open raises to the caller: a wrong serial is the user's to fix
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.name}", daemon=True)
        self._thread.start()
        if not self._first.wait(timeout_s):
            self.stop()
            raise CameraError(
                f"camera '{self.name}': no frame within {timeout_s:.1f} s of starting"
                + (f" ({self.last_error})" if self.last_error else "")
            )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        self._close()

    def __enter__(self) -> ThreadedCamera:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        opened = True
        failures = 0
        fault = ""
        while not self._stop.is_set():
            if not opened:
                try:
                    self._open()
                    opened = True
                    failures = 0
                    self.reconnects += 1
                except Exception as e:  # still unplugged: wait and try again
                    failures += 1
                    self.last_error = f"{fault}; reopen failed: {e}"
                    if self.max_reconnects is not None and failures > self.max_reconnects:
                        self.failed = True
                        return
                    self._stop.wait(self.reconnect_s)
                    continue
            try:
                got = self._grab()
            except Exception as e:  # unplugged or driver error: close, then reopen
                self.faults += 1
                fault = f"{type(e).__name__}: {e}"
                self.last_error = fault
                self._close()
                opened = False
                self._stop.wait(self.reconnect_s)
                continue
            if got is None:  # a stall: no frame within grab_timeout_s; the age check reports it
                self.last_error = f"no frame for {self.grab_timeout_s:.1f} s (stalled stream)"
                continue
            t, img = got
            self.buffer.push(t, img)
            self.frames += 1
            self._fps_times.append(t)
            self._first.set()

    # ---------------------------------------------------------------- reading
    def latest(self, max_age: float, now: float | None = None) -> Sample:
        """The newest frame, refused (``CameraError``) when older than ``max_age`` s at ``now``."""
        now = self.clock() if now is None else now
        s = self.buffer.latest()
        if s is None:
            raise CameraError(f"camera '{self.name}': no frame yet" + self._why())
        age = now - s.t
        if age > max_age:
            raise CameraError(
                f"camera '{self.name}': newest frame is {age * 1e3:.0f} ms old (limit "
                f"{max_age * 1e3:.0f} ms)" + self._why()
            )
        return s

    def _why(self) -> str:
        return f"; last error: {self.last_error}" if self.last_error else ""

    def status(self) -> dict:
        ts = list(self._fps_times)
        fps = (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] else 0.0
        return {
            "name": self.name,
            "frames": self.frames,
            "reconnects": self.reconnects,
            "faults": self.faults,
            "fps": fps,
            "running": self.running,
            "failed": self.failed,
            "last_error": self.last_error,
        }
