"""Operator inputs: a 3Dconnexion SpaceMouse (``pyspacemouse``), the keyboard, or a scripted stream.

Every source answers one question, ``read() -> InputState``: six axes in [-1, 1] (x, y, z, roll,
pitch, yaw, in the device's right-handed z-up frame) and the buttons held down now. Deadzone,
scaling, frame mapping and button meanings are the teleop core's (``carp_teleop.teleop``), so every
source behaves alike.

The SpaceMouse is read in its own thread (Diffusion Policy's ``Spacemouse`` process pattern): HID
reports arrive only when something changes, so the thread keeps the latest state, and an input
older than ``max_age`` (device unplugged, thread stalled) reads as "hands off": zero motion.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

AXES = ("x", "y", "z", "roll", "pitch", "yaw")


@dataclass
class InputState:
    """One reading of an operator input."""

    t: float  # host time of the reading (time.monotonic)
    axes: np.ndarray = field(default_factory=lambda: np.zeros(6))  # (6,) in [-1, 1]
    buttons: tuple[int, ...] = ()  # 1 = held, per button index
    keys: tuple[str, ...] = ()  # key commands typed since the last read (keyboard only)


@runtime_checkable
class TeleopInput(Protocol):
    """What the teleop core reads at every control tick."""

    def read(self) -> InputState: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------ SpaceMouse
class SpaceMouseInput:
    """A SpaceMouse read by a background thread through ``pyspacemouse``.

    device: an opened ``pyspacemouse.SpaceMouseDevice`` (tests pass one built on a fake HID device);
    None opens the first one plugged in, in the right-handed z-up convention (``HID_Z_UP``).
    """

    def __init__(self, device=None, poll_hz: float = 250.0, max_age: float = 0.5) -> None:
        if device is None:
            import pyspacemouse

            try:
                device = pyspacemouse.open(axis_convention=pyspacemouse.AxisConvention.HID_Z_UP)
            except Exception as e:
                raise RuntimeError(
                    f"no SpaceMouse could be opened ({e}); plug one in, check the udev rule "
                    "(docs/recording.md) or use --input keyboard"
                ) from e
        self.device = device
        self.poll_s = 1.0 / poll_hz
        self.max_age = max_age
        self._lock = threading.Lock()
        self._state = InputState(time.monotonic())
        self._stop = threading.Event()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="spacemouse", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                s = self.device.read()  # non-blocking: the latest state after the pending reports
            except Exception as e:  # unplugged: the readings go stale, the core sees zero motion
                self.error = f"{type(e).__name__}: {e}"
                self._stop.wait(0.2)
                continue
            now = time.monotonic()
            axes = np.array([s.x, s.y, s.z, s.roll, s.pitch, s.yaw], dtype=np.float64)
            # A still device sends no reports, so "no new report" is not "stale": every successful
            # read refreshes the state; read errors (an unplug) let it go stale.
            with self._lock:
                self._state = InputState(now, axes, tuple(int(b) for b in s.buttons))
            self.error = None
            self._stop.wait(self.poll_s)

    def read(self) -> InputState:
        with self._lock:
            s = self._state
        now = time.monotonic()
        if now - s.t > self.max_age:  # the thread stopped delivering: hands off
            return InputState(now, np.zeros(6), ())
        return InputState(now, s.axes.copy(), s.buttons)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        try:
            self.device.close()
        except Exception:
            pass


# ------------------------------------------------------------------ keyboard
KEY_AXES = {  # key -> (axis, sign); the keyboard fallback when no SpaceMouse is at hand
    "w": (0, 1),
    "s": (0, -1),
    "a": (1, 1),
    "d": (1, -1),
    "r": (2, 1),
    "f": (2, -1),
    "u": (3, 1),
    "o": (3, -1),
    "i": (4, 1),
    "k": (4, -1),
    "j": (5, 1),
    "l": (5, -1),
}
KEY_COMMANDS = {" ": "record", "x": "discard", "g": "gripper", "t": "translation_only", "q": "quit"}
KEYBOARD_HELP = (
    "keys: w/s a/d r/f move x/y/z, u/o i/k j/l rotate, g gripper, t translation only, "
    "space start/save episode, x discard, q quit"
)


class KeyboardInput:
    """Terminal keys as a coarse SpaceMouse: a motion key holds its axis at ``level`` for
    ``hold_s`` (the terminal's key repeat keeps it held); command keys become ``keys``."""

    def __init__(self, level: float = 0.6, hold_s: float = 0.15, stream=None, listen: bool = True) -> None:
        """stream: where keys come from (default stdin); listen=False: only ``feed`` (tests)."""
        self.level, self.hold_s = level, hold_s
        self.stream = stream if stream is not None else sys.stdin
        self._until = np.zeros(6)
        self._sign = np.zeros(6)
        self._keys: deque[str] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._saved = None
        if listen and _is_tty(self.stream):
            import termios
            import tty

            self._saved = termios.tcgetattr(self.stream.fileno())
            tty.setcbreak(self.stream.fileno())  # keys arrive one by one, without Enter
        self._thread = threading.Thread(target=self._run, name="keyboard", daemon=True)
        if listen:
            self._thread.start()

    def feed(self, ch: str) -> None:
        """One typed character (the reader thread calls this; tests may too)."""
        now = time.monotonic()
        with self._lock:
            if ch in KEY_AXES:
                ax, sign = KEY_AXES[ch]
                self._sign[ax], self._until[ax] = sign, now + self.hold_s
            elif ch in KEY_COMMANDS:
                self._keys.append(KEY_COMMANDS[ch])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.stream], [], [], 0.05)
            except (ValueError, OSError, TypeError):
                return
            if ready:
                ch = self.stream.read(1)
                if not ch:
                    return
                self.feed(ch.lower())

    def read(self) -> InputState:
        now = time.monotonic()
        with self._lock:
            axes = np.where(self._until > now, self._sign * self.level, 0.0)
            keys = tuple(self._keys)
            self._keys.clear()
        return InputState(now, axes, (), keys)

    def close(self) -> None:
        self._stop.set()
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.stream.fileno(), termios.TCSADRAIN, self._saved)


def _is_tty(stream) -> bool:
    try:
        return os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False


# ------------------------------------------------------------------ scripted
class ScriptedInput:
    """A recorded or synthetic input stream: ``steps[i]`` is returned by the i-th ``read()`` (the
    last one repeats). Each step is (axes (6,), buttons) or an ``InputState``."""

    def __init__(self, steps: Sequence) -> None:
        self.steps = list(steps)
        self.i = 0

    def read(self) -> InputState:
        step = self.steps[min(self.i, len(self.steps) - 1)] if self.steps else (np.zeros(6), ())
        self.i += 1
        if isinstance(step, InputState):
            return InputState(time.monotonic(), np.asarray(step.axes, float), step.buttons, step.keys)
        axes, buttons = step
        return InputState(time.monotonic(), np.asarray(axes, float), tuple(buttons))

    def close(self) -> None:
        pass
