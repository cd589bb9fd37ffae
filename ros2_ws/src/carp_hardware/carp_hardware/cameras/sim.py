"""The twin's cameras: MuJoCo offscreen renders of a running cell, in their own threads like a
real camera, stamped on the same host clock (sim replaces the device, never the stack).

Each camera owns its renderer (a GL context belongs to the thread that made it). The scene is
copied out of ``MjData`` under the world lock, the same lock the arm holds while it steps the
physics, so a frame never shows half a physics step; the render itself runs outside the lock.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from carp_hardware.cameras.base import CameraInfo, HostClock, ThreadedCamera


def mujoco_camera_info(model, camera: str, height: int, width: int) -> CameraInfo:
    """Pinhole intrinsics of a MuJoCo camera rendered at ``height`` x ``width`` (square pixels,
    principal point at the image centre; OpenCV's convention: pixel centres at integers)."""
    fovy = np.radians(float(model.cam(camera).fovy[0]))
    f = 0.5 * height / np.tan(0.5 * fovy)
    return CameraInfo(
        width=width,
        height=height,
        K=[[f, 0.0, width / 2 - 0.5], [0.0, f, height / 2 - 0.5], [0.0, 0.0, 1.0]],
        D=[0.0] * 5,
        frame_id=f"{camera}_optical_frame",
        source="twin",
    )


class SimCamera(ThreadedCamera):
    """Renders camera ``camera`` of a MuJoCo model at ``fps`` on the host clock."""

    def __init__(
        self,
        name: str,
        model,
        data,
        lock: threading.Lock,
        size: tuple[int, int] = (120, 160),
        fps: float = 30.0,
        camera: str | None = None,
        clock: HostClock = time.monotonic,
        **kw,
    ) -> None:
        super().__init__(name, clock=clock, **kw)
        self.model, self.data, self.world_lock = model, data, lock
        self.size = (int(size[0]), int(size[1]))
        self.fps = float(fps)
        self.camera = camera or name
        self._renderer = None
        self._next = 0.0
        self.paused = False  # tests: True stops delivering frames (a stalled camera)
        self._key: tuple | None = None
        self._image: np.ndarray | None = None
        self.renders = 0

    def _open(self) -> None:
        self.model.cam(self.camera)  # raises KeyError naming a camera the model lacks
        self._next = self.clock()

    def _grab(self) -> tuple[float, np.ndarray] | None:
        import mujoco

        if self._renderer is None:  # made in the grab thread, which owns its GL context
            self._renderer = mujoco.Renderer(self.model, *self.size)
        wait = self._next - self.clock()
        if wait > 0:
            time.sleep(wait)
        # Fixed rate on the host clock; after an overrun skip ahead rather than burst to catch up.
        self._next = max(self._next + 1.0 / self.fps, self.clock())
        if self.paused:
            time.sleep(min(self.grab_timeout_s, 0.05))
            return None
        with self.world_lock:
            t = self.clock()
            key = (float(self.data.time), self.data.qpos.tobytes())
            if key != self._key:
                self._renderer.update_scene(self.data, camera=self.camera)
        # The twin's world moves in control steps and stands still between them: a frame of an
        # unchanged world is the previous image, stamped now (it is what the camera would see).
        # Rendering only on change keeps 30 fps of fresh stamps at a third of the CPU.
        if key != self._key or self._image is None:
            self._image = self._renderer.render().copy()
            self._key = key
            self.renders += 1
        return t, self._image

    def _close(self) -> None:
        """Nothing to release here: the grab thread closes its own renderer when it ends."""

    def _run(self) -> None:
        try:
            super()._run()
        finally:
            r, self._renderer = self._renderer, None
            if r is not None:
                r.close()

    def info(self) -> CameraInfo:
        return mujoco_camera_info(self.model, self.camera, *self.size)
