"""``camera_node``: one camera (RealSense by serial, or UVC) published as ROS 2 images.

Publishes ``/cameras/<camera>/image_raw`` (sensor_msgs/Image, rgb8, SensorDataQoS, the header stamp
is the frame's capture time on the host clock) and ``/cameras/<camera>/camera_info``. The camera runs
in its own thread (``carp_hardware.cameras``); this node only forwards each new frame.

Parameters: ``camera`` (name: wrist, scene), ``backend`` (realsense | uvc), ``serial`` (RealSense),
``device`` (UVC path or index), ``width`` / ``height`` / ``fps`` (the stream), ``exposure`` (0: auto),
``intrinsics`` (a calibration YAML; UVC cameras need one for camera_info), ``max_age`` (s: a frame
older than this is not published and the node warns, the policy then refuses a stale observation).
"""

from __future__ import annotations

import sys
import time

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo as CameraInfoMsg
from sensor_msgs.msg import Image

from carp_policy.messages import image_to_msg, spin_node, time_to_msg


class CameraPublisher:
    """Publishes the new frames of a ``Camera`` (any backend, the twin's included) on a node."""

    def __init__(self, node: Node, camera, rate_hz: float, max_age: float = 0.2) -> None:
        self.node, self.camera, self.max_age = node, camera, max_age
        name = camera.name
        self.pub = node.create_publisher(Image, f"/cameras/{name}/image_raw", qos_profile_sensor_data)
        self.pub_info = node.create_publisher(
            CameraInfoMsg, f"/cameras/{name}/camera_info", qos_profile_sensor_data
        )
        info = camera.info().to_camera_info_msg()
        self.info_msg = CameraInfoMsg(
            height=info["height"], width=info["width"], distortion_model=info["distortion_model"],
            d=info["d"], k=info["k"], r=info["r"], p=info["p"],
        )  # fmt: skip
        self.info_msg.header.frame_id = info["header"]["frame_id"] or f"{name}_optical_frame"
        self._last_t = -1.0
        self.published = 0
        node.create_timer(1.0 / (2.0 * rate_hz), self._poll)  # twice the frame rate: no frame waits long

    def _poll(self) -> None:
        s = self.camera.buffer.latest()
        if s is None or s.t <= self._last_t:
            return
        age = time.time() - s.t
        if age > self.max_age:
            msg = f"{self.camera.name}: newest frame {age * 1e3:.0f} ms old, not published"
            self.node.get_logger().warning(msg, throttle_duration_sec=1.0)
            return
        self._last_t = s.t
        self.pub.publish(image_to_msg(s.value, s.t, self.info_msg.header.frame_id))
        self.info_msg.header.stamp = time_to_msg(s.t)
        self.pub_info.publish(self.info_msg)
        self.published += 1


class CameraNode(Node):
    """One hardware camera behind ROS topics (module docstring)."""

    def __init__(self) -> None:
        super().__init__("camera_node")
        defaults = {"camera": "wrist", "backend": "realsense", "serial": "any", "device": "/dev/video0",
                    "width": 640, "height": 480, "fps": 30, "exposure": 0.0, "intrinsics": "none",
                    "max_age": 0.2}  # fmt: skip
        for k, v in defaults.items():
            self.declare_parameter(k, v, ParameterDescriptor(dynamic_typing=True))
        get = lambda k: self.get_parameter(k).value  # noqa: E731
        from carp_hardware.cameras import make_camera

        backend = get("backend")
        stream = {"width": int(get("width")), "height": int(get("height")), "fps": int(get("fps"))}
        exposure = float(get("exposure")) or None
        if backend == "realsense":
            serial = str(get("serial") or "any")
            rs = {"serial": "" if serial == "any" else serial, "exposure_us": exposure, **stream}
            cfg = {"kind": "realsense", "realsense": rs}
        elif backend == "uvc":
            intr = None if get("intrinsics") in ("", "none") else str(get("intrinsics"))
            uvc = {"device": str(get("device")), "exposure": exposure, "intrinsics": intr, **stream}
            cfg = {"kind": "uvc", "uvc": uvc}
        else:
            raise ValueError(f"camera_node: backend must be realsense or uvc, got {backend!r}")
        self.camera = make_camera(str(get("camera")), cfg, clock=time.time)
        self.camera.start()
        self.publisher = CameraPublisher(self, self.camera, float(get("fps")), float(get("max_age")))
        self.get_logger().info(f"camera {self.camera.name}: {backend} {stream}")

    def destroy_node(self) -> None:
        self.camera.stop()
        super().destroy_node()


def main(argv: list[str] | None = None) -> int:
    """Run the node until Ctrl-C; a camera that cannot start is one line on stderr, exit 2."""
    return spin_node(CameraNode, "camera_node", argv=argv)

if __name__ == "__main__":
    sys.exit(main())
