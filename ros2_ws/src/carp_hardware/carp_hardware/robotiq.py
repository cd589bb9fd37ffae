"""``Robotiq2F85``: the Robotiq 2F-85 through the Robotiq URCap's socket server (TCP port 63352).

The URCap (installed on the UR controller, "Robotiq Grippers" URCap 1.x) serves an ASCII protocol:
``SET <VAR> <value> [<VAR> <value> ...]\\n`` answered by ``ack``; ``GET <VAR>\\n`` answered by
``<VAR> <value>``. The variables (Robotiq 2F-85 manual, "Robot input/output registers"):

- ACT activate (0/1), GTO go to the requested position (0/1), ATR automatic release;
- POS requested position 0 (open) .. 255 (closed), SPE speed 0..255, FOR force 0..255;
- STA status 0 reset, 1 activating, 3 active; OBJ 0 moving, 1 stopped on an object while
  opening, 2 stopped on an object while closing, 3 at the requested position (no object);
- FLT fault code (0 = none; e.g. 5 action delayed, 7 activation bit not set, 8 max temperature,
  10 under minimum voltage, 11 automatic release in progress, 12 internal fault, 13 activation
  fault, 14 overcurrent, 15 automatic release completed); PRE the position echo 0..255.

Activation: ``SET ACT 0`` + ``SET ATR 0`` (reset), wait for STA 0; ``SET ACT 1``, wait for STA 3.
The 0..255 range maps to the opening by a per-gripper calibration (``calibrate()``: fully open and
fully closed, read PRE at each end; a 2F-85 stops at ~3 and ~228, not 0 and 255).

Never blocks the servo loop: one background thread owns the socket; ``command()`` only stores the
newest target (the thread sends it), ``state()`` returns the cached reading. Every read has a
timeout; replies are read as a byte stream split on newlines, so a reply fragmented over several
packets or several replies in one packet both work; a dropped or stalled connection is reported
(``connected=False``) and re-opened with a back-off.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from carp_hardware.interfaces import GripperState
from carp_policy.yaml_config import load_yaml

FAULTS = {5: "action delayed (activate first)", 7: "activation bit not set", 8: "max temperature",
          10: "under minimum voltage", 11: "automatic release in progress", 12: "internal fault",
          13: "activation fault", 14: "overcurrent", 15: "automatic release completed"}  # fmt: skip


@dataclass
class RobotiqConfig:
    """Connection and calibration of one 2F-85 (``carp_hardware/config/robotiq.yaml``)."""

    host: str = "192.168.1.102"  # the UR controller (the URCap serves the gripper there)
    port: int = 63352
    timeout_s: float = 0.5  # every socket read / connect
    poll_hz: float = 20.0  # status polling rate of the background thread
    reconnect_s: float = 0.5  # back-off between reconnection attempts
    stroke: float = 0.085  # m, fully open
    pos_open: int = 0  # 0..255 register value at the full stroke (calibrate() measures it)
    pos_closed: int = 255  # register value with the fingers closed
    speed: float = 1.0  # default speed, fraction of max (SPE 0..255)
    force: float = 0.5  # default force, fraction of max (FOR 0..255)

    @classmethod
    def load(cls, path) -> RobotiqConfig:
        return load_yaml(cls, path)


class RobotiqError(RuntimeError):
    """The gripper did not answer as the protocol says (timeout, fault, refused activation)."""


class _Link:
    """One socket with a newline-framed reader (handles fragmented and coalesced replies)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = b""

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode("ascii"))

    def readline(self) -> str:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(4096)  # raises socket.timeout after the timeout
            if not chunk:
                raise ConnectionError("gripper socket closed by the server")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode("ascii", "replace").strip()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Robotiq2F85:
    """The 2F-85 as a ``carp_hardware.interfaces.Gripper`` (opening in metres)."""

    name = "robotiq_2f85"

    def __init__(self, config: RobotiqConfig | None = None) -> None:
        self.config = config or RobotiqConfig()
        self.stroke = self.config.stroke
        self._lock = threading.Lock()  # the socket (held during a read: never taken by command())
        self._cmd_lock = threading.Lock()  # the pending target
        self._link: _Link | None = None
        self._target: tuple[int, int, int] | None = None  # (POS, SPE, FOR) not yet sent
        self._state = GripperState(t=time.monotonic(), opening=self.stroke, target=self.stroke,
                                   activated=False, connected=False)  # fmt: skip
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0

    # ------------------------------------------------------------------ conversions
    def to_register(self, opening: float) -> int:
        """Opening (m) -> POS 0..255 by the calibration; saturates at the end stops."""
        c = self.config
        frac = min(max(opening / self.stroke, 0.0), 1.0)
        return round(c.pos_closed + frac * (c.pos_open - c.pos_closed))

    def to_opening(self, pos: int) -> float:
        c = self.config
        frac = (pos - c.pos_closed) / (c.pos_open - c.pos_closed)
        return min(max(frac, 0.0), 1.0) * self.stroke

    # ------------------------------------------------------------------ blocking protocol calls
    def _request(self, text: str) -> list[str]:
        """Send one or more newline-terminated commands, read one reply per command."""
        with self._lock:
            if self._link is None:
                raise ConnectionError("gripper not connected")
            self._link.send(text)
            return [self._link.readline() for _ in range(text.count("\n"))]

    def set(self, **values: int) -> None:
        """``SET A a B b ...`` in one command; raises RobotiqError unless ``ack``."""
        cmd = "SET " + " ".join(f"{k.upper()} {int(v)}" for k, v in values.items()) + "\n"
        reply = self._request(cmd)[0]
        if reply != "ack":
            raise RobotiqError(f"gripper answered {reply!r} to {cmd.strip()!r}")

    def get(self, *names: str) -> dict[str, int]:
        """``GET`` several variables pipelined in one packet; replies parsed by name."""
        replies = self._request("".join(f"GET {n.upper()}\n" for n in names))
        out = {}
        for n, r in zip(names, replies):
            key, _, val = r.partition(" ")
            if key != n.upper() or not val.strip().lstrip("-").isdigit():
                raise RobotiqError(f"gripper answered {r!r} to GET {n.upper()}")
            out[n.upper()] = int(val)
        return out

    def _wait(self, done, what: str, timeout: float) -> dict[str, int]:
        end = time.monotonic() + timeout
        while True:
            regs = self.get("STA", "OBJ", "FLT", "PRE", "ACT")
            if done(regs):
                return regs
            if regs["FLT"] not in (0, 5):
                raise RobotiqError(
                    f"{what}: gripper fault {regs['FLT']} ({FAULTS.get(regs['FLT'], 'unknown')})"
                )
            if time.monotonic() > end:
                raise RobotiqError(f"{what}: no answer within {timeout} s (last {regs})")
            time.sleep(0.01)

    def activate(self, timeout: float = 5.0) -> None:
        """Reset, then activate and wait for STA 3 (skipped if already active)."""
        if self.get("STA")["STA"] == 3:
            return
        self.set(act=0)
        self.set(atr=0)
        self._wait(lambda r: r["STA"] == 0 and r["ACT"] == 0, "reset", timeout)
        self.set(act=1)
        self._wait(lambda r: r["STA"] == 3 and r["ACT"] == 1, "activation", timeout)

    def move_blocking(self, opening: float, speed: float | None = None, force: float | None = None,
                      timeout: float = 5.0) -> dict[str, int]:  # fmt: skip
        """Move and wait until it stops (at the position, OBJ 3, or on an object, OBJ 1/2)."""
        self.set(pos=self.to_register(opening), spe=_byte(speed, self.config.speed),
                 **{"for": _byte(force, self.config.force)}, gto=1)  # fmt: skip
        time.sleep(0.02)  # OBJ reads 3 from the previous move until motion starts
        return self._wait(lambda r: r["OBJ"] != 0, "move", timeout)

    def calibrate(self, timeout: float = 5.0) -> tuple[int, int]:
        """Measure the register values at the full stroke and closed; returns (open, closed)."""
        self.config.pos_open, self.config.pos_closed = 0, 255
        open_ = self.move_blocking(self.stroke, 1.0, 0.2, timeout)["PRE"]
        closed = self.move_blocking(0.0, 1.0, 0.2, timeout)["PRE"]
        if closed - open_ < 50:
            raise RobotiqError(
                f"calibration: closed {closed} and open {open_} too close (object in the way?)"
            )
        self.config.pos_open, self.config.pos_closed = open_, closed
        return open_, closed

    # ------------------------------------------------------------------ Gripper protocol
    def connect(self) -> None:
        """Open the socket, activate, start the background thread (idempotent)."""
        if self._thread is not None:
            return
        self._open()
        self.activate()
        self._poll()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="robotiq", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.config.timeout_s + 1.0)
            self._thread = None
        with self._lock:
            if self._link is not None:
                self._link.close()
                self._link = None

    def command(self, opening: float, speed: float | None = None, force: float | None = None) -> bool:
        """Store the newest target for the thread to send; False if the link is down or faulted."""
        pos = self.to_register(opening)
        with self._cmd_lock:
            self._target = (pos, _byte(speed, self.config.speed), _byte(force, self.config.force))
            st = self._state
            self._state = GripperState(st.t, st.opening, float(opening), st.moving, st.object_detected,
                                       st.activated, st.connected, st.fault)  # fmt: skip
        return st.connected and st.fault is None

    def state(self) -> GripperState:
        return self._state

    # ------------------------------------------------------------------ background thread
    def _open(self) -> None:
        link = _Link(self.config.host, self.config.port, self.config.timeout_s)
        with self._lock:
            if self._link is not None:
                self._link.close()
            self._link = link

    def _poll(self) -> None:
        regs = self.get("STA", "OBJ", "FLT", "PRE")
        flt = regs["FLT"]
        st = self._state
        self._state = GripperState(
            t=time.monotonic(), opening=self.to_opening(regs["PRE"]), target=st.target,
            moving=regs["OBJ"] == 0, object_detected=regs["OBJ"] in (1, 2), activated=regs["STA"] == 3,
            connected=True, fault=None if flt == 0 else f"fault_{flt}",
            extra={"registers": regs},
        )  # fmt: skip

    def _run(self) -> None:
        period = 1.0 / self.config.poll_hz
        while not self._stop.is_set():
            t0 = time.monotonic()
            target = None
            try:
                with self._cmd_lock:
                    target, self._target = self._target, None
                if target is not None:
                    pos, spe, force = target
                    self.set(pos=pos, spe=spe, **{"for": force}, gto=1)
                self._poll()
            except (OSError, ConnectionError, RobotiqError) as e:
                # socket.timeout is an OSError: a stalled server counts as a dropped link
                self.errors += 1
                with self._cmd_lock:  # an unsent target is sent after the reconnection
                    if self._target is None:
                        self._target = target
                st = self._state
                self._state = GripperState(
                    time.monotonic(),
                    st.opening,
                    st.target,
                    False,
                    False,
                    st.activated,
                    connected=False,
                    extra={"error": str(e)},
                )
                if self._stop.wait(self.config.reconnect_s):
                    return
                try:
                    self._open()
                    self.activate()
                except (OSError, ConnectionError, RobotiqError):
                    continue
            self._stop.wait(max(0.0, period - (time.monotonic() - t0)))


def _byte(value: float | None, default: float) -> int:
    """A fraction 0..1 (None = default) -> register 0..255."""
    v = default if value is None else value
    return round(min(max(v, 0.0), 1.0) * 255)
