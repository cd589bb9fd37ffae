"""The policy object every family and both runtimes share: Observation -> ActionChunk.

``ChunkPolicy`` is the one place that validates an observation, normalises it, runs a network,
un-normalises the chunk and re-orthonormalises its rotations (through ``carp_policy.processor``).
What runs in the middle is a ``Runner``: the torch model of a family (``modeling_<family>.py``) or
the ONNX graphs of an exported model (``carp_policy.engine``). So the torch policy and the engine
cannot drift apart in anything but the network itself.

Re-entrant: ``predict`` keeps nothing per call on ``self`` (the decision-time state travels with the
call), so a node may call it from a callback thread. Runners that own mutable buffers (the engine's
bound device buffers, a diffusers scheduler) serialise their own ``run`` with a lock.

Imports no torch.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np

from carp_policy.actions import ActionChunk, Observation
from carp_policy.normalization import Normalizer
from carp_policy.processor import EncodedObservations, PolicyProcessor


class Runner(Protocol):
    """The network behind a ``ChunkPolicy``: normalised observations -> normalised chunks."""

    batch: int  # most observations one ``run`` takes

    def run(self, obs: EncodedObservations, **kw: Any) -> np.ndarray:
        """-> (B, H, D) normalised actions, row i for observation i."""
        ...

    def reset(self) -> None:
        """Start of an episode (e.g. a noise generator restarts from its seed)."""


class ChunkPolicy:
    """Any family's network behind the stack's ``Policy`` protocol, in physical units.

    config: the family's ``PolicyConfig``; normalizer: the stats it was trained with; runner: the
    network (torch or ONNX). ``contract`` is what a node needs to run it (task, dt, horizon, steps to
    execute, cameras with sizes, state layout)."""

    def __init__(self, config: Any, normalizer: Normalizer, runner: Runner) -> None:
        enc = config.encoder
        self.config, self.normalizer, self.runner = config, normalizer, runner
        self.obs_horizon: int = enc.obs_horizon
        self.obs_stride: int = enc.obs_stride
        self.cameras: tuple[str, ...] = enc.used_cameras
        self.processor = PolicyProcessor(
            normalizer,
            enc.obs_horizon,
            enc.state_dim,
            enc.env_state_dim,
            self.cameras,
            tuple(enc.image_size) if self.cameras else None,
            name=config.name,
            tasks=tuple(enc.tasks),
        )
        self.contract: dict[str, Any] = config.contract(normalizer.state_names)

    def select_task(self, task: str) -> None:
        """The task this model runs: a multi-task model's choice of task embedding (ValueError for
        one it was not trained on); a single-task model only checks that it is its own task."""
        own = self.contract.get("task")
        if self.processor.tasks:
            self.processor.select_task(task)
        elif own and task != own:
            raise ValueError(f"{self.config.name} is a model for task {own!r}, not {task!r}")

    @property
    def batch(self) -> int:
        """Most observations one ``predict_batch`` runs in one pass."""
        return self.runner.batch

    def reset(self) -> None:
        """Start of an episode."""
        self.runner.reset()

    def predict(self, observation: Observation, **kw: Any) -> ActionChunk:
        """Observation (O steps) -> ActionChunk of H actions in physical units, rot6d re-orthonormalised.

        Raises ValueError for a malformed observation and for a non-finite output (the chunk is
        refused). ``kw`` goes to the runner (DP-C: ``noise``, the initial sample (H, A))."""
        return self._predict([observation], **kw)[0]

    def predict_batch(self, observations: list[Observation]) -> list[ActionChunk]:
        """Up to ``batch`` observations in one pass -> one chunk each; every chunk's ``latency_s`` is
        the time of the whole pass."""
        if not 1 <= len(observations) <= self.batch:
            raise ValueError(f"predict_batch takes 1..{self.batch} observations, got {len(observations)}")
        return self._predict(observations)

    def _predict(self, observations: list[Observation], **kw: Any) -> list[ActionChunk]:
        t0 = time.perf_counter()
        enc = self.processor.encode(observations)
        actions = self.runner.run(enc, **kw)  # (B, H, D) normalised
        out = [self.processor.decode(actions[i], enc.state_now[i]) for i in range(len(observations))]
        dt = time.perf_counter() - t0
        return [
            ActionChunk(a, timestamp=o.timestamp, dt=self.config.dt, latency_s=dt)
            for a, o in zip(out, observations)
        ]
