"""A loopback server that behaves like the Robotiq URCap's socket server (for tests, benchmarks).

It listens on 127.0.0.1 (a free port), answers the ASCII protocol of ``carp_hardware.robotiq``
(``SET ... -> ack``, ``GET VAR -> VAR value``), runs the activation sequence, moves the fingers at
a speed set by SPE, stops at the requested position (OBJ 3) or on an object placed at
``object_at`` (OBJ 2 closing / 1 opening), and can misbehave on request: a fault code, a dropped
connection, a stall (no reply for a while), replies fragmented over several packets, or all the
replies of a packet coalesced into one send. Every loop is bounded by ``close()`` and socket
timeouts, so nothing outlives the test.
"""

from __future__ import annotations

import socket
import threading
import time


class FakeURCapServer:
    def __init__(self, activation_s: float = 0.05, full_travel_s: float = 0.3) -> None:
        self.activation_s = activation_s
        self.full_travel_s = full_travel_s  # 0..255 at SPE 255
        self.regs = {"ACT": 0, "GTO": 0, "ATR": 0, "POS": 0, "SPE": 255, "FOR": 150, "STA": 0, "OBJ": 3,
                     "FLT": 0, "PRE": 3}  # fmt: skip
        self.pos_min, self.pos_max = 3, 228  # a real 2F-85's end stops
        self.object_at: int | None = None  # register value where an object blocks the fingers
        self.fragment = False  # send each reply in small pieces
        self.coalesce = True  # answer all requests of one packet in one send
        self.stall_s = 0.0  # the next request waits this long before it is answered
        self.drop_next = False  # close the connection instead of answering the next request
        self.received: list[str] = []
        self.connections = 0
        self._pre = 3.0
        self._act_t: float | None = None
        self._move_t = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2.0)
        self.sock.close()

    def __enter__(self) -> FakeURCapServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the gripper
    def _update(self) -> None:
        """Advance activation and finger motion to now."""
        now = time.monotonic()
        r = self.regs
        if r["ACT"] == 1 and r["STA"] == 1 and now - self._act_t >= self.activation_s:
            r["STA"] = 3
        dt, self._move_t = now - self._move_t, now
        if r["STA"] != 3 or r["GTO"] != 1 or r["FLT"]:
            return
        goal = min(max(r["POS"], self.pos_min), self.pos_max)
        step = 255 / self.full_travel_s * max(r["SPE"], 1) / 255 * dt
        direction = 1 if goal > self._pre else -1
        nxt = self._pre + direction * step
        blocked = self.object_at is not None and (self._pre - self.object_at) * (nxt - self.object_at) <= 0
        blocked = blocked and (goal - self.object_at) * direction > 0
        if blocked:
            self._pre, r["OBJ"] = float(self.object_at), 2 if direction > 0 else 1
        elif abs(goal - self._pre) <= step:
            self._pre, r["OBJ"] = float(goal), 3
        else:
            self._pre, r["OBJ"] = nxt, 0
        r["PRE"] = round(self._pre)

    def _answer(self, line: str) -> str:
        with self._lock:
            self._update()
            parts = line.split()
            r = self.regs
            if len(parts) >= 3 and parts[0] == "SET" and len(parts) % 2 == 1:
                for key, val in zip(parts[1::2], parts[2::2]):
                    if key not in r or not val.isdigit():
                        return "?"
                    r[key] = int(val)
                    if key == "ACT":
                        if r["ACT"] == 1 and r["STA"] == 0:
                            r["STA"], self._act_t = 1, time.monotonic()
                        elif r["ACT"] == 0:
                            r["STA"], r["GTO"] = 0, 0
                    if key in ("POS", "GTO") and r["GTO"] == 1 and r["STA"] == 3:
                        r["OBJ"] = 0
                if r["GTO"] == 1 and r["STA"] != 3:
                    r["FLT"] = 5  # action delayed: activate first
                self._move_t = time.monotonic()
                return "ack"
            if len(parts) == 2 and parts[0] == "GET" and parts[1] in r:
                return f"{parts[1]} {r[parts[1]]}"
            return "?"

    # ------------------------------------------------------------------ the socket
    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        buf = b""
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                buf += data
                lines, buf = buf.split(b"\n"), b""
                buf = lines.pop()  # an incomplete last line waits for the rest
                replies = []
                for raw in lines:
                    line = raw.decode().strip()
                    self.received.append(line)
                    if self.drop_next:
                        self.drop_next = False
                        return  # closes the connection mid-command
                    if self.stall_s:
                        stall, self.stall_s = self.stall_s, 0.0
                        if self._stop.wait(stall):
                            return
                    replies.append(self._answer(line) + "\n")
                out = [("".join(replies)).encode()] if self.coalesce else [x.encode() for x in replies]
                try:
                    for packet in out:
                        if self.fragment:  # 3 bytes at a time, cutting replies mid-line
                            for i in range(0, len(packet), 3):
                                conn.sendall(packet[i : i + 3])
                                time.sleep(0.001)
                        else:
                            conn.sendall(packet)
                except OSError:
                    return
