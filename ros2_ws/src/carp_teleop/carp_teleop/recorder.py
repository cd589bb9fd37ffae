"""The demonstration recorder: live streams -> episodes in the crash-safe dataset, at 10 Hz.

One control tick at time t (the same order as the twin's collector, ``carp-sim collect``):

1. the observation for t is assembled from the streams (``ObservationAligner``: the newest TCP
   pose, gripper opening and camera frames at or before t; ages and camera skew measured; a frame
   older than ``max_frame_age`` or streams further apart than ``max_skew`` refused);
2. the teleop core reads the operator and sends the next target through the arm's limits;
3. while recording, the frame is written: the state of step 1 (TCP pose + gripper, the collector's
   ``[x, y, z, rot6d, gripper]``), the commanded target of step 2 as the action, the images made
   policy-sized by ``fit_image``, and the capture times and skew.

Operator control: the record button (or space) starts an episode and saves it; a long press (or x)
discards it. Each change is cued on the terminal (and with the bell). Before an episode starts,
the free disk space is checked. A camera that stops mid-episode discards only that episode, with a
message naming the camera. ``kill -9`` loses at most the episode in progress (the writer commits an
episode with one atomic rename).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from carp_hardware.cameras.base import Camera
from carp_policy.actions import AlignerConfig, ObservationAligner, StaleObservationError, StreamBuffer
from carp_policy.images import fit_image
from carp_teleop.teleop import TeleopConfig, TeleopCore


@dataclass
class RecorderConfig:
    """Settings of a recording session (YAML through ``carp_policy.yaml_config``)."""

    fps: float = 10.0  # the control and recording rate (the policies' rate)
    image_size: tuple[int, int] = (120, 160)  # (H, W) stored: the policies' input size
    cameras: tuple[str, ...] = ("wrist", "scene")
    max_frame_age: float = 0.1  # s: a frame older than this at the tick is refused
    max_skew: float = 0.05  # s: the streams' newest samples must lie this close together
    min_free_gb: float = 2.0  # free space needed in the output directory to start an episode
    max_episode_s: float = 120.0  # an episode this long is saved and a new one must be started
    calibration_id: str = ""  # the id of the calibration in use (calibration/*.yaml), recorded
    teleop: TeleopConfig = field(default_factory=TeleopConfig)


class EpisodeSink:
    """Everything the recorder writes goes through here: the one place that knows the dataset
    writer's API. Per-frame capture times and camera skew travel in the episode metadata."""

    def __init__(self, writer, task_text: str) -> None:
        self.writer, self.task_text = writer, task_text
        self.active = False
        self._stamps: dict[str, list[float]] = {}
        self._skew: list[float] = []
        self._human: list[int] = []

    def begin(self) -> None:
        self.writer.begin_episode(task=self.task_text)
        self.active = True
        self._stamps, self._skew, self._human = {}, [], []

    def add(
        self,
        t: float,
        images: dict[str, np.ndarray],
        state: np.ndarray,
        action: np.ndarray,
        env_state: np.ndarray | None,
        stamps: Mapping[str, float],
        skew: float,
        human: bool,
    ) -> None:
        self.writer.add_frame(t, images, state, action, env_state=env_state)
        for k, v in stamps.items():
            self._stamps.setdefault(k, []).append(round(float(v), 6))
        self._skew.append(round(float(skew), 6))
        self._human.append(int(human))

    @property
    def frames(self) -> int:
        return len(self._skew)

    def save(self, metadata: dict, success: bool = True) -> int:
        skew = np.asarray(self._skew)
        meta = {
            **metadata,
            "capture_times": self._stamps,  # stream -> per-frame capture time (host clock, s)
            "camera_skew_s": self._skew,  # per frame: newest minus oldest capture time of the streams
            "camera_skew_p99_s": float(np.percentile(skew, 99)) if len(skew) else 0.0,
            "intervention": self._human,  # per frame: 1 = a human commanded it, 0 = a policy
        }
        self.active = False
        return self.writer.save_episode(success=success, metadata=meta)

    def discard(self) -> None:
        self.active = False
        self.writer.discard_episode()


class Recorder:
    """Runs the tick loop of a recording session (see the module doc)."""

    def __init__(
        self,
        config: RecorderConfig,
        arm,
        cameras: Mapping[str, Camera],
        teleop: TeleopCore,
        writer,
        task_text: str,
        out: Path,
        metadata: dict | None = None,
        env_buffer: StreamBuffer | None = None,
        scene_reset: Callable[[], dict] | None = None,
        cue: Callable[[str], None] | None = None,
        episode_facts: Callable[[], dict] | None = None,
        policy=None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """metadata: facts recorded with every episode (task, operator, serials, calibration id);
        env_buffer: the twin's privileged scene state (recorded as ``observation.environment_state``
        exactly when given); scene_reset: called after each saved or discarded episode (the twin
        lays out a new scene and returns its facts, e.g. the seed); cue: where messages go."""
        self.config, self.arm, self.teleop = config, arm, teleop
        self.cameras = {c: cameras[c] for c in config.cameras}
        self.sink = EpisodeSink(writer, task_text)
        self.out = Path(out)
        self.metadata = dict(metadata or {})
        self.scene_reset = scene_reset
        self.episode_facts = episode_facts  # at save: facts of the ending episode (the twin's outcome)
        self.scene_facts: dict = {}
        self.env_buffer = env_buffer
        self.cue = cue or _terminal_cue
        self.clock = clock
        self.aligner = ObservationAligner(
            state=[arm.tcp_buffer, arm.gripper_buffer],
            cameras={c: cam.buffer for c, cam in self.cameras.items()},
            env_state=[env_buffer] if env_buffer is not None else [],
            config=AlignerConfig(
                horizon=1, dt=1.0 / config.fps, max_age=config.max_frame_age, max_skew=config.max_skew
            ),
        )
        self.saved: list[int] = []
        self.discarded = 0
        self.overruns = 0
        self.quit = False
        # DAgger: with a policy, it commands the arm until the operator moves the SpaceMouse; the
        # operator then has the arm until the device rests for ``handback_s``, and the policy
        # replans from there. Every frame is flagged human (1) or policy (0).
        self.policy = policy
        self.human = policy is None
        self.handback_s = 1.0
        self.execute_steps = 8
        self._chunk = None
        self._chunk_i = 0
        self._idle_since: float | None = None
        self._policy_aligner = None
        if policy is not None:
            self._policy_aligner = ObservationAligner(
                state=[arm.tcp_buffer, arm.gripper_buffer],
                cameras={c: self.cameras[c].buffer for c in policy.cameras},
                env_state=[env_buffer] if env_buffer is not None else [],
                config=AlignerConfig(
                    horizon=policy.obs_horizon,
                    stride=policy.obs_stride,
                    dt=1.0 / config.fps,
                    max_age=config.max_frame_age,
                    max_skew=config.max_skew,
                ),
            )
        self._episode_t0 = 0.0
        self._last_warn = -np.inf
        self.tick_cpu_s: list[float] = []

    # ------------------------------------------------------------------ episode control
    def start_episode(self, t: float) -> bool:
        free_gb = shutil.disk_usage(self.out).free / 1e9
        if free_gb < self.config.min_free_gb:
            self.cue(
                f"NOT RECORDING: only {free_gb:.1f} GB free in {self.out} (need "
                f"{self.config.min_free_gb:.1f} GB); free space or record elsewhere"
            )
            return False
        self.sink.begin()
        self._episode_t0 = t
        self.cue(
            f"\a● RECORDING episode {self.sink.writer.num_episodes} (record button/space: save, "
            "long press/x: discard)"
        )
        return True

    def save_episode(self, reason: str = "") -> None:
        n = self.sink.frames
        if n == 0:
            self.sink.discard()
            self.cue("episode had no frames: discarded")
        else:
            meta = {**self.metadata, **self.scene_facts, "frames": n}
            if self.episode_facts is not None:
                meta.update(self.episode_facts())
            if reason:
                meta["ended_by"] = reason
            idx = self.sink.save(meta)
            self.saved.append(idx)
            self.cue(
                f"\a■ SAVED episode {idx} ({n} frames, {n / self.config.fps:.1f} s){reason and ': ' + reason}"
            )
        self._next_scene()

    def discard_episode(self, why: str) -> None:
        self.sink.discard()
        self.discarded += 1
        self.cue(f"\a✗ DISCARDED the episode in progress: {why}; earlier episodes are intact")
        self._next_scene()

    def _next_scene(self) -> None:
        if self.policy is not None:  # a new rollout: the policy starts it
            self.policy.reset()
            self.human, self._chunk, self._idle_since = False, None, None
        if self.scene_reset is not None:
            self.scene_facts = self.scene_reset() or {}
            self.teleop.reseed()

    # ------------------------------------------------------------------ the tick
    def tick(self, t: float) -> None:
        """One control period at host time ``t``."""
        c0 = time.process_time()
        obs = align = None
        try:
            obs, align = self.aligner.build(t)
        except StaleObservationError as e:
            if self.sink.active:
                self.discard_episode(f"{e} (a camera or the robot state stopped)")
            elif t - self._last_warn > 5.0:
                self.cue(f"waiting for streams: {e}")
                self._last_warn = t
        if self.policy is not None and not self.human:
            self._policy_step(t)
        res = self.teleop.tick(t)
        if self.policy is not None:
            self._update_control(t, res.moving)
        if res.refusal and t - self._last_warn > 1.0:
            self.cue(f"target refused, the arm holds: {res.refusal}")
            self._last_warn = t
        if self.sink.active and obs is not None:
            images = {c: fit_image(obs.images[c][-1], self.config.image_size) for c in self.cameras}
            stamps = {k: v[-1] for k, v in obs.stamps.items()}
            env = obs.env_state[-1] if obs.env_state is not None else None
            try:
                self.sink.add(t, images, obs.state[-1], res.target, env, stamps, align.skew, self.human)
            except (OSError, ValueError) as e:  # disk full, an encoder fault: the writer discarded it
                self.sink.active = False
                self.discarded += 1
                self.cue(f"\a✗ DISCARDED the episode in progress: {e}")
                self._next_scene()
        for ev in res.events:
            if ev == "record":
                if self.sink.active:
                    self.save_episode()
                elif obs is not None:
                    self.start_episode(t)
                else:
                    self.cue("cannot start: the streams are not all live (see above)")
            elif ev == "discard" and self.sink.active:
                self.discard_episode("operator discarded it")
            elif ev == "quit":
                self.quit = True
        if self.sink.active and t - self._episode_t0 >= self.config.max_episode_s:
            self.save_episode(f"reached max_episode_s={self.config.max_episode_s:.0f} s")
        self.tick_cpu_s.append(time.process_time() - c0)

    # ------------------------------------------------------------------ policy rollouts (DAgger)
    def _policy_step(self, t: float) -> None:
        """Put the policy's target for this tick into the teleop core (which sends it)."""
        from carp_policy.actions import rot6d_to_matrix

        if self._chunk is None or self._chunk_i >= min(self.execute_steps, len(self._chunk)):
            try:
                obs, _ = self._policy_aligner.build(t)
            except StaleObservationError:
                return  # the arm holds its target; the recorder's own check reports the streams
            size = getattr(self.policy, "image_size", None) or self.config.image_size
            obs.images = {c: np.stack([fit_image(im, size) for im in v]) for c, v in obs.images.items()}
            self._chunk, self._chunk_i = self.policy.predict(obs), 0
        a = self._chunk.actions[self._chunk_i]
        self._chunk_i += 1
        self.teleop.pose[:3, 3] = a[:3]
        self.teleop.pose[:3, :3] = rot6d_to_matrix(a[3:9])
        self.teleop.gripper = self.teleop.gripper_goal = float(a[9])

    def _update_control(self, t: float, moving: bool) -> None:
        if moving:
            if not self.human:
                self.cue("operator took over")
            self.human, self._idle_since = True, None
        elif self.human:
            self._idle_since = t if self._idle_since is None else self._idle_since
            if t - self._idle_since >= self.handback_s:
                self.human, self._chunk = False, None
                self.cue("handed back to the policy")

    def run(
        self,
        max_episodes: int | None = None,
        duration_s: float | None = None,
        before_tick: Callable[[float], None] | None = None,
    ) -> dict:
        """Tick at ``fps`` on the host clock until quit, ``max_episodes`` saved or ``duration_s``.
        ``before_tick(t)`` runs first in each tick (a scripted operator acts there)."""
        dt = 1.0 / self.config.fps
        t0 = self.clock()
        k = 0
        try:
            while not self.quit:
                t_next = t0 + k * dt
                wait = t_next - self.clock()
                if wait > 0:
                    time.sleep(wait)
                elif wait < -dt:  # fell a whole period behind: skip ahead, never burst
                    self.overruns += 1
                    k = int(np.ceil((self.clock() - t0) / dt))
                    continue
                t = self.clock()
                if before_tick is not None:
                    before_tick(t)
                self.tick(t)
                k += 1
                if max_episodes is not None and len(self.saved) >= max_episodes:
                    break
                if duration_s is not None and t - t0 >= duration_s:
                    break
        finally:
            if self.sink.active:
                self.sink.discard()
                self.cue("stopped with an episode in progress: it was discarded")
        return self.summary()

    def summary(self) -> dict:
        cpu = np.asarray(self.tick_cpu_s) * 1e3
        return {
            "saved": list(self.saved),
            "discarded": self.discarded,
            "overruns": self.overruns,
            "tick_cpu_ms_p50": float(np.median(cpu)) if len(cpu) else 0.0,
            "tick_cpu_ms_p99": float(np.percentile(cpu, 99)) if len(cpu) else 0.0,
        }


def _terminal_cue(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
