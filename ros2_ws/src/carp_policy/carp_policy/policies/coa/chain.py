"""What Chain-of-Action does around its network, in NumPy: keyframes in the demonstrations, when the
chain decoding stops, and how a chain becomes the stack's chunk. The torch policy (modeling_coa.py)
and the engine (onnx_coa.py) share these functions, so they cannot drift apart.

A chain is decoded backwards in time: step 0 is the keyframe (where the current segment ends),
the last step is the action of the current frame. Shapes: B windows, L = chain.max_len, D = 10.
"""

from __future__ import annotations

import numpy as np

from carp_policy.actions import GRIPPER, POS
from carp_policy.policies.coa.configuration_coa import ChainConfig


def keyframe_offsets(actions: np.ndarray, dt: float, cfg: ChainConfig) -> np.ndarray:
    """(B, L, D) physical action windows (rows t..t+L-1 of frame t, the last row repeated past the
    episode's end) -> (B,) int64 row k of each window's keyframe; the chain of frame t is rows 0..k.

    The keyframe is the first row k >= min_len - 1 where the arm arrives at rest (the commanded TCP
    slower than ``rest_speed`` with the gripper steady, after a row that was not at rest) or, with
    ``gripper_onsets``, the gripper starts to move; the episode's end is an arrival too (its
    repeated rows stand still).
    A window without one keeps all L rows (a segment longer than the longest chain is cut).
    Positions move the same in either frame (absolute or relative to the TCP): speeds are
    differences, so the window may be in the policy's frame.
    """
    a = np.asarray(actions, dtype=np.float64)
    if a.ndim != 3 or a.shape[1] < 2:
        raise ValueError(f"actions must be (B, L >= 2, D), got {a.shape}")
    _B, L, _ = a.shape
    speed = np.linalg.norm(np.diff(a[..., POS], axis=1), axis=-1) / dt  # (B, L-1): into rows 1..L-1
    moving_gripper = np.abs(np.diff(a[..., GRIPPER], axis=1)) > cfg.gripper_step  # (B, L-1)
    rest = (speed < cfg.rest_speed) & ~moving_gripper
    # row 1 has no row before it in the window: it counts as continuing row 0's state
    arrival = rest & ~np.concatenate([rest[:, :1], rest[:, :-1]], axis=1)
    onset = moving_gripper & ~np.concatenate([moving_gripper[:, :1], moving_gripper[:, :-1]], axis=1)
    event = arrival | onset if cfg.gripper_onsets else arrival  # column j is row j + 1
    event[:, : max(cfg.min_len - 2, 0)] = False  # the refractory window: chains of >= min_len rows
    has = event.any(axis=1)
    return np.where(has, event.argmax(axis=1) + 1, L - 1).astype(np.int64)


def reverse_chains(actions: np.ndarray, keyframe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, L, D) windows and (B,) keyframe rows -> (chains (B, L, D), valid (B, L) bool): chain step i
    is row keyframe - i (keyframe first, the current frame's action last), padded past its end."""
    L = actions.shape[1]
    i = np.arange(L)[None]  # (1, L)
    rows = np.clip(keyframe[:, None] - i, 0, None)  # (B, L)
    return np.take_along_axis(actions, rows[..., None], axis=1), i <= keyframe[:, None]


class ChainStop:
    """The dynamic stop of one batch of chains, step by step.

    Decoding runs from the keyframe back toward the current pose; the distance to the TCP shrinks
    until the chain arrives (the public code stops when it no longer shrinks). Row b stops at a
    step within ``stop_radius`` of the TCP (where the arm already is: not kept, unless it is the
    keyframe), at a step farther than the chain's nearest step by ``stop_overshoot`` (past the TCP:
    the chain is cut after its nearest step), or at the longest chain. A plateau (a pause within a
    segment) does not stop it. here: (B, D) the current pose and gripper as a normalised action;
    scale: (D,) metres per normalised unit (the normalizer's), so distances are physical."""

    def __init__(self, here: np.ndarray, scale: np.ndarray, cfg: ChainConfig) -> None:
        self.here = np.asarray(here, dtype=np.float64)[:, POS]  # (B, 3)
        self.scale = np.asarray(scale, dtype=np.float64)[POS]  # (3,)
        self.cfg = cfg
        B = self.here.shape[0]
        self.length = np.zeros(B, dtype=np.int64)  # steps kept, per row
        self.done = np.zeros(B, dtype=bool)
        self._steps = 0
        self._nearest = np.full(B, np.inf)  # distance of the nearest step so far ...
        self._nearest_len = np.zeros(B, dtype=np.int64)  # ... and the chain length up to it

    def update(self, step: np.ndarray) -> np.ndarray:
        """Step i of every row ((B, D) normalised) -> done (B,); rows already done are unchanged."""
        c, live = self.cfg, ~self.done
        d = np.linalg.norm((np.asarray(step, np.float64)[:, POS] - self.here) * self.scale, axis=1)
        self._steps += 1
        arrived = live & (d < c.stop_radius)
        past = live & ~arrived & (d > self._nearest + c.stop_overshoot)
        go_on = live & ~arrived & ~past
        self.length[go_on] = self._steps
        self.length[arrived] = np.maximum(self._steps - 1, 1)  # the keyframe is always kept
        self.length[past] = self._nearest_len[past]
        nearer = go_on & (d < self._nearest)
        self._nearest[nearer], self._nearest_len[nearer] = d[nearer], self._steps
        self.done |= arrived | past | (go_on & (self._steps >= c.max_len))
        return self.done


def chain_to_chunk(chain: np.ndarray, length: int, horizon: int) -> np.ndarray:
    """A decoded chain (>= length, D) in decoding order -> (horizon, D) chunk forward in time: the
    first ``horizon`` steps toward the keyframe, or all of them and then the keyframe held (the next
    chunk, planned from there, starts the next segment)."""
    fwd = np.asarray(chain)[:length][::-1]  # current frame's action first, keyframe last
    if length >= horizon:
        return fwd[:horizon].copy()
    return np.concatenate([fwd, np.repeat(fwd[-1:], horizon - length, axis=0)])
