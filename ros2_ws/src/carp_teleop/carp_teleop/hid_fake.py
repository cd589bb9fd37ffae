"""A fake HID device for the SpaceMouse: the real ``pyspacemouse.SpaceMouseDevice`` parses the
reports, so tests run the library's own decoding; only the USB device is replaced.

``FakeHIDDevice`` has ``easyhid.HIDDevice``'s methods (``open``, ``close``, ``read(size=64,
timeout=None)``, ``set_nonblocking``, ``is_open``) and serves queued reports. ``encode`` turns a
wanted state (six axes in [-1, 1], buttons) into the reports a device of that model would send,
by inverting the device spec pyspacemouse decodes with.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

import numpy as np


class FakeHIDDevice:
    """Serves queued HID reports; ``unplug()`` makes reads fail like a removed device."""

    def __init__(self, product: str = "SpaceMouse Compact", serial: str = "FAKE0001") -> None:
        self.product_string = product
        self.manufacturer_string = "3Dconnexion"
        self.release_number = 0x0100
        self.serial_number = serial
        self._reports: deque[bytes] = deque()
        self._lock = threading.Lock()
        self._open = False
        self.plugged = True
        self.nonblocking = False

    def open(self) -> None:
        self._open = True

    def close(self) -> None:
        self._open = False

    def is_open(self) -> bool:
        return self._open

    def set_nonblocking(self, enable_nonblocking) -> None:
        self.nonblocking = bool(enable_nonblocking)

    def read(self, size: int = 64, timeout=None) -> bytes:
        if not self.plugged:
            raise OSError("HID device not connected")
        with self._lock:
            return self._reports.popleft()[:size] if self._reports else b""

    def write(self, data, report_id: int = 0) -> int:
        return len(data)

    def push(self, reports: Sequence[bytes]) -> None:
        with self._lock:
            self._reports.extend(reports)

    def pending(self) -> int:
        with self._lock:
            return len(self._reports)


def encode(spec, axes: Sequence[float], buttons: Sequence[int] = ()) -> list[bytes]:
    """The HID reports that make ``SpaceMouseDevice(spec)`` read ``axes`` (x, y, z, roll, pitch,
    yaw in [-1, 1], after the spec's signs) and ``buttons``; one report per channel."""
    from carp_teleop.inputs import AXES

    size = max(int(spec.bytes_to_read), 8)
    reports: dict[int, bytearray] = {}
    for name, value in zip(AXES, axes, strict=True):
        m = spec.mappings[name]
        raw = int(np.clip(round(float(value) * spec.axis_scale / m.scale), -32768, 32767))
        rep = reports.setdefault(m.channel, bytearray([m.channel] + [0] * (size - 1)))
        rep[m.byte1], rep[m.byte2] = raw & 0xFF, (raw >> 8) & 0xFF
    if spec.button_specs:
        held = list(buttons) + [0] * (len(spec.button_specs) - len(buttons))
        for b, held_b in zip(spec.button_specs, held, strict=False):
            if b.channel is None:
                continue
            rep = reports.setdefault(b.channel, bytearray([b.channel] + [0] * (size - 1)))
            if held_b:
                rep[b.byte] |= 1 << b.bit
    return [bytes(r) for r in reports.values()]


def fake_spacemouse(model: str = "SpaceMouseCompact"):
    """(an opened ``pyspacemouse.SpaceMouseDevice`` on a fake HID device, that fake, the spec)."""
    from pyspacemouse.config_helpers import apply_axis_convention
    from pyspacemouse.device import SpaceMouseDevice
    from pyspacemouse.loader import get_device_specs
    from pyspacemouse.types import AxisConvention

    spec = apply_axis_convention(get_device_specs()[model], AxisConvention.HID_Z_UP)
    hid = FakeHIDDevice()
    dev = SpaceMouseDevice(info=spec, device=hid)
    dev.open()
    hid.set_nonblocking(True)
    return dev, hid, spec
