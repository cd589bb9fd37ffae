"""Configuration of Chain-of-Action (CoA, Zhang et al. 2025, "Chain-of-Action: Trajectory
Autoregressive Modeling for Robotic Manipulation"): the shared sections (policies/base.py) plus the
keyframe rule, the chain decoder and the stop rule. Every field with its meaning and default; the
defaults are ``configs/coa_state_env.yaml``'s.

Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from carp_policy.policies.base import PolicyConfig, TrainConfig


@dataclass
class ChainConfig:
    """Keyframes (where a chain is anchored) and the chain's length and stop rule.

    A keyframe is where a demonstration reaches a sub-goal: the arm comes to rest (TCP speed under
    ``rest_speed`` with the gripper steady, after moving or after the gripper moved: a grasp or a
    release ends there), the episode ends, and with ``gripper_onsets`` the gripper starts to move.
    The chain of frame t runs from the first keyframe after t back to t, at most
    ``max_len`` steps (a longer segment is cut: its step ``max_len - 1`` stands in for the keyframe).
    """

    max_len: int = 32  # L: the longest chain (the twin's expert segments are <= 25 steps at 10 Hz)
    rest_speed: float = 0.01  # m/s: the commanded TCP under this is at rest
    # The gripper's first moving row as a keyframe too (the paper's "gripper state change"). Off by
    # default: that row's command is the ramp's first value, and while the fingers close the arm
    # waits in a state that barely changes, so the policy cannot tell the onset from the end of the
    # ramp; the arrival at rest after the ramp (gripper steady) marks the change instead. Measured
    # on the cup (seeds 40000-40019): with onsets the arm lifted before the fingers had closed.
    gripper_onsets: bool = False
    gripper_step: float = 0.002  # m per step: a gripper command that moves more is changing
    min_len: int = 3  # a keyframe closer than this to t is skipped (the refractory window)
    # Inference stops decoding when the chain has come back to the current pose (the public code's
    # rule: the distance to it stops shrinking). A step within ``stop_radius`` of the TCP is where
    # the arm already is: the chain ends before it. A step farther from the TCP than the chain's
    # nearest step by ``stop_overshoot`` has gone past it: the chain ends at that nearest step.
    stop_radius: float = 0.004  # m
    stop_overshoot: float = 0.01  # m: above the decoder's noise near a keyframe (a few mm)


@dataclass
class DecoderConfig:
    """The causal chain decoder: GPT blocks conditioned on the observation (adaptive LayerNorm, as
    CARP's transformer), over [start; keyframe; ...; current] with a KV cache at inference."""

    depth: int = 4  # blocks
    width: int = 128  # token embedding size
    heads: int = 4  # attention heads (width must divide by it)
    mlp_ratio: float = 4.0  # MLP hidden size / width
    dropout: float = 0.0  # attention and MLP dropout in training
    predict_ahead: int = 2  # multi-token heads: position i predicts chain steps i .. i + k - 1
    latent_weight: float = 0.1  # weight of the latent consistency loss (L1 to the next input's embedding)
    # weight of the keyframe's L1 against 1 for every later step: with teacher forcing a later step
    # is nearly its predecessor, while the keyframe must come from the observation alone (the hard,
    # object-dependent part); unweighted it is 1 / length of the loss
    keyframe_weight: float = 10.0


@dataclass
class CoaTrainConfig(TrainConfig):
    """The shared training loop, one stage (no tokenizer)."""

    tokenizer_steps: int = 0  # CoA has no tokenizer stage
    policy_steps: int = 4000  # optimiser steps
    policy_lr: float = 3e-4  # AdamW peak learning rate
    checkpoint_every: int = 500  # steps between weight + resume-state writes


@dataclass
class CoaConfig(PolicyConfig):
    """Everything that defines a Chain-of-Action policy and how it is trained."""

    FAMILY: ClassVar[str] = "coa"

    name: str = "coa_state"  # run / model name (manifest, reports)
    chunk: int = 16  # H: steps of each emitted chunk (the chain, forward in time, cut or held)
    action_dim: int = 10  # D: [x, y, z, r6d(6), gripper]
    chain: ChainConfig = field(default_factory=ChainConfig)  # keyframes, chain length, stop rule
    decoder: DecoderConfig = field(default_factory=DecoderConfig)  # the chain decoder
    train: CoaTrainConfig = field(default_factory=CoaTrainConfig)  # one stage

    @property
    def horizon(self) -> int:
        """H, actions per emitted chunk."""
        return self.chunk

    @property
    def window(self) -> int:
        """Actions per training window: the longest chain."""
        return self.chain.max_len

    def __post_init__(self) -> None:
        c, d = self.chain, self.decoder
        if not 2 <= c.min_len <= c.max_len:
            raise ValueError(f"chain: need 2 <= min_len <= max_len, got {c.min_len}, {c.max_len}")
        if min(c.rest_speed, c.gripper_step, c.stop_radius, c.stop_overshoot) < 0:
            raise ValueError("chain: rest_speed, gripper_step, stop_radius, stop_overshoot must be >= 0")
        if d.width % d.heads:
            raise ValueError(f"decoder.width {d.width} must divide by decoder.heads {d.heads}")
        if d.keyframe_weight <= 0 or d.latent_weight < 0:
            raise ValueError("decoder: keyframe_weight must be > 0 and latent_weight >= 0")
        if d.predict_ahead < 1:
            raise ValueError(f"decoder.predict_ahead must be >= 1, got {d.predict_ahead}")
        if self.action_dim != 10:
            raise ValueError(f"action_dim must be 10 ([x, y, z, r6d, gripper]), got {self.action_dim}")
        super().__post_init__()
