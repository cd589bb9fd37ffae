"""A live view of what the robot sees and plans, with rerun (optional: ``pip install rerun-sdk``).

Both camera streams, the measured TCP path, each predicted chunk as a 3D trajectory (the executed
part and the rest in two colours), and refusals (safety, stale inputs) as warning events, on one
timeline in seconds. ``LiveView(save="eval.rrd")`` writes a recording to open later with
``rerun eval.rrd``; ``LiveView(spawn=True)`` opens the viewer now (where a display exists).
Off by default everywhere: ``carp-eval --rerun FILE.rrd`` turns it on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from carp_policy.actions import ActionChunk, Observation


class LiveView:
    """One rerun recording; every method is cheap enough to call from the control loop."""

    def __init__(self, name: str = "carp", save: str | Path | None = None, spawn: bool = False) -> None:
        try:
            import rerun as rr
        except ImportError as e:  # optional dependency: a clear message, not a traceback
            raise ValueError("the live view needs rerun: pip install rerun-sdk") from e
        self.rr = rr
        self.rec = rr.RecordingStream(f"carp_{name}")
        if save is not None:
            Path(save).parent.mkdir(parents=True, exist_ok=True)
            self.rec.save(str(save))
        if spawn:
            self.rec.spawn()
        self._tcp: list[np.ndarray] = []
        self._offset = 0.0  # each trial's clock starts at 0: trials follow each other on the timeline
        self._t_max = 0.0
        self.rec.log("world/table", rr.Boxes3D(centers=[[-0.45, 0.0, -0.01]], half_sizes=[[0.4, 0.55, 0.01]],
                                               colors=[[120, 100, 80]]), static=True)  # fmt: skip

    def _at(self, t: float) -> None:
        t = self._offset + float(t)
        self._t_max = max(self._t_max, t)
        self.rr.set_time("time", duration=t, recording=self.rec)

    def start_trial(self, seed: int, t: float = 0.0) -> None:
        """A new episode whose clock restarts at ``t``: placed 1 s after the previous one, with its
        TCP path started afresh and an event naming its seed."""
        self._offset = self._t_max + 1.0 - float(t) if self._t_max > 0 else -float(t)
        self._tcp = []
        self.rr.set_time("trial", sequence=int(seed), recording=self.rec)
        self.event(t, f"trial seed {seed}", warning=False)

    def observation(self, obs: Observation) -> None:
        """The newest row of an observation: camera frames and the TCP position."""
        o = obs.with_horizon()
        self._at(o.timestamp)
        for cam, img in o.images.items():
            self.rec.log(f"cameras/{cam}", self.rr.Image(np.asarray(img[-1])))
        tcp = np.asarray(o.state[-1, :3], dtype=np.float64)
        self._tcp.append(tcp)
        self.rec.log("world/tcp", self.rr.Points3D([tcp], radii=0.008, colors=[[255, 200, 0]]))
        self.rec.log("world/tcp_path", self.rr.LineStrips3D([np.asarray(self._tcp)], colors=[[255, 200, 0]]))
        self.rec.log("state/gripper_mm", self.rr.Scalars(float(o.state[-1, 9]) * 1e3))

    def chunk(self, chunk: ActionChunk, executed: int) -> None:
        """A predicted chunk: the first ``executed`` steps in green, the rest in grey."""
        self._at(chunk.timestamp)
        pos = chunk.positions
        strips = [pos[: max(executed, 1) + 1]]
        colors = [[40, 200, 80]]
        if executed < len(pos) - 1:
            strips.append(pos[executed:])
            colors.append([160, 160, 160])
        self.rec.log("world/chunk", self.rr.LineStrips3D(strips, colors=colors, radii=0.003))
        self.rec.log("policy/latency_ms", self.rr.Scalars(chunk.latency_s * 1e3))

    def event(self, t: float, text: str, warning: bool = True) -> None:
        """A refusal or another event, on the timeline."""
        self._at(t)
        level = self.rr.TextLogLevel.WARN if warning else self.rr.TextLogLevel.INFO
        self.rec.log("events", self.rr.TextLog(text, level=level))

    def close(self) -> None:
        """Flush the recording to its file."""
        self.rec.flush()
