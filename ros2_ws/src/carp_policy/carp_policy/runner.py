"""The policy node's core, without ROS: timestamped streams in, stamped action chunks out.

Device callbacks (camera frames, the robot state, the gripper) push samples into one
``StreamBuffer`` per stream, from any thread. At each decision the runner assembles the observation
with the ``ObservationAligner`` (the latest sample at or before each of the O row times), refuses a
stale, missing or skewed one with a counted reason, runs the policy and returns the chunk stamped
with the observation's time, so the driver can drop what is already past. ``carp_policy.policy_node``
is the rclpy shell around it; tests and scripts use it directly.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from carp_policy.actions import (
    STATE_DIM,
    ActionChunk,
    AlignerConfig,
    Alignment,
    ObservationAligner,
    Policy,
    StaleObservationError,
    StreamBuffer,
)
from carp_policy.images import fit_image

TCP_STREAM, GRIPPER_STREAM, ENV_STREAM = "tcp", "gripper", "env_state"


@dataclass
class RunnerStats:
    """Live diagnostics of the policy path (what the node publishes)."""

    chunks: int = 0
    refusals: Counter = field(default_factory=Counter)  # reason -> count
    last_refusal: str = ""
    inference_ms: deque = field(default_factory=lambda: deque(maxlen=200))
    observation_age_ms: deque = field(default_factory=lambda: deque(maxlen=200))  # oldest stream, per chunk
    skew_ms: deque = field(default_factory=lambda: deque(maxlen=200))

    def summary(self) -> dict[str, float | int | str]:
        """Counts and p50/p99 of the recent latencies, as plain numbers."""

        def pct(d: deque, q: float) -> float:
            return float(np.percentile(list(d), q)) if d else float("nan")

        return {
            "chunks": self.chunks,
            "refused": int(sum(self.refusals.values())),
            **{f"refused_{k}": int(v) for k, v in sorted(self.refusals.items())},
            "last_refusal": self.last_refusal,
            "inference_ms_p50": pct(self.inference_ms, 50),
            "inference_ms_p99": pct(self.inference_ms, 99),
            "observation_age_ms_p50": pct(self.observation_age_ms, 50),
            "skew_ms_p50": pct(self.skew_ms, 50),
        }


class PolicyRunner:
    """Streams -> aligned observation -> policy -> stamped chunk, with refusals counted by reason.

    policy: a loaded model (``load_policy``): its ``contract`` (manifest) says what is assembled: the
    observation horizon, the control period, the cameras and their image sizes, and whether it
    reads the scene's measured state (twin-only models). config: the aligner's age and skew limits
    (its horizon and dt come from the contract). clock: the host clock the capture times are on.
    """

    def __init__(
        self,
        policy: Policy,
        config: AlignerConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        contract = policy.contract
        cfg = config or AlignerConfig()
        cfg = AlignerConfig(horizon=int(contract["obs_horizon"]), dt=float(contract["dt"]),
                            stride=int(contract.get("obs_stride", 1)),  # manifests before it: 1
                            max_age=cfg.max_age, max_skew=cfg.max_skew)  # fmt: skip
        self.contract = contract
        env_state_dim = len(contract.get("env_state_names") or [])
        self.policy, self.config, self.clock = policy, cfg, clock
        # Every buffer holds twice the span the oldest row looks back over, at the fastest rate its
        # stream comes at (cameras and the gripper up to 60 Hz, the robot state up to 500 Hz).
        span_s = (cfg.horizon - 1) * cfg.stride * cfg.dt
        capacity = max(64, int(np.ceil(2 * span_s * 60)))
        self.streams: dict[str, StreamBuffer] = {
            TCP_STREAM: StreamBuffer(TCP_STREAM, max(512, int(np.ceil(2 * span_s * 500)))),
            GRIPPER_STREAM: StreamBuffer(GRIPPER_STREAM, capacity),
        }
        for cam in policy.cameras:
            self.streams[cam] = StreamBuffer(cam, capacity)
        env = [StreamBuffer(ENV_STREAM, capacity)] if env_state_dim else []
        if env:
            self.streams[ENV_STREAM] = env[0]
        self.env_state_dim = env_state_dim
        self.aligner = ObservationAligner(
            [self.streams[TCP_STREAM], self.streams[GRIPPER_STREAM]],
            {cam: self.streams[cam] for cam in policy.cameras},
            env,
            cfg,
        )
        self.stats = RunnerStats()
        self._lock = threading.Lock()  # one decision at a time; pushes never wait for it

    # ------------------------------------------------------------------ inputs (any thread)
    def push_tcp(self, t: float, tcp_state: np.ndarray) -> None:
        """TCP position + rotation6d (9,) captured at t."""
        v = np.asarray(tcp_state, dtype=np.float64).reshape(-1)
        if v.shape != (STATE_DIM - 1,):
            raise ValueError(f"TCP state must be 9 numbers (xyz + rot6d), got {v.shape}")
        self.streams[TCP_STREAM].push(t, v)

    def push_gripper(self, t: float, opening: float) -> None:
        """Gripper opening (m) captured at t."""
        self.streams[GRIPPER_STREAM].push(t, np.array([float(opening)]))

    def push_image(self, camera: str, t: float, image: np.ndarray) -> None:
        """A camera frame (H, W, 3) uint8 RGB captured at t, fitted to the model's input size with
        the one camera-to-policy conversion (``images.fit_image``, as the recorder stores frames);
        frames of cameras the policy does not read are ignored."""
        buf = self.streams.get(camera)
        if buf is not None and camera in self.policy.cameras:
            buf.push(t, fit_image(image, tuple(self.contract["cameras"][camera])))

    def push_env_state(self, t: float, env_state: np.ndarray) -> None:
        """The scene's measured state (twin-only models)."""
        if ENV_STREAM in self.streams:
            self.streams[ENV_STREAM].push(t, np.asarray(env_state, dtype=np.float64).reshape(-1))

    # ------------------------------------------------------------------ decisions
    def _refuse(self, reason: str, message: str) -> None:
        self.stats.refusals[reason] += 1
        self.stats.last_refusal = message

    def decide(self, now: float | None = None) -> tuple[ActionChunk | None, str]:
        """One decision at ``now`` (default: the clock). Returns (chunk, "") or (None, why not).

        The chunk's timestamp is the observation's time, not the time it was finished: the driver
        schedules step i at ``timestamp + (i + 1) * dt`` and drops the steps already past."""
        with self._lock:
            now = self.clock() if now is None else float(now)
            try:
                obs, info = self.aligner.build(now)
            except StaleObservationError as e:
                self._refuse(e.reason, str(e))
                return None, str(e)
            t0 = time.perf_counter()
            try:
                chunk = self.policy.predict(obs)
            except ValueError as e:  # a malformed observation or a non-finite chunk: never forwarded
                self._refuse("policy", f"policy refused the observation: {e}")
                return None, self.stats.last_refusal
            dt_ms = (time.perf_counter() - t0) * 1e3
            chunk = ActionChunk(
                chunk.actions, timestamp=obs.timestamp, dt=self.config.dt, latency_s=dt_ms / 1e3
            )
            self._record(info, dt_ms)
            return chunk, ""

    def _record(self, info: Alignment, inference_ms: float) -> None:
        s = self.stats
        s.chunks += 1
        s.inference_ms.append(inference_ms)
        s.observation_age_ms.append(max(info.ages.values()) * 1e3)
        s.skew_ms.append(info.skew * 1e3)
