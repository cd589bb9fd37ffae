"""Configuration of a CARP policy: the shared sections (policies/base.py) plus the tokenizer and the
transformer. Every field with its meaning and default; the defaults are ``configs/state.yaml``'s.

Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from carp_policy.policies.base import PolicyConfig


@dataclass
class TokenizerConfig:
    """Multi-scale action VQ-VAE (stage 1)."""

    action_dim: int = 10  # D: one VQ-VAE per action dimension
    horizon: int = 16  # H: action chunk length
    latent_len: int = 4  # L: temporal feature length after the encoder (H / 4)
    code_dim: int = 8  # C: feature / codebook entry size
    codebook_size: int = 512  # V: codebook entries per dimension, shared across scales
    scales: tuple[int, ...] = (1, 2, 3, 4)  # token-map lengths, coarse to fine; the last must be L
    hidden: int = 16  # channels per dimension inside encoder / decoder
    beta: float = 0.25  # commitment weight
    phi_ratio: float = 0.5  # phi_k(x) = (1 - r) x + r conv(x), as in VAR
    revive_every: int = 200  # training steps between dead-code re-initialisations (0: never)
    lookup: str = "l2"  # nearest-code metric: "l2" (matches magnitude too) or "cosine" (the paper's)


@dataclass
class TransformerConfig:
    """GPT-2-style coarse-to-fine transformer (stage 2)."""

    depth: int = 8  # blocks
    width: int = 64  # n: token embedding size
    heads: int = 4  # attention heads (width must divide by it)
    mlp_ratio: float = 4.0  # MLP hidden size / width
    dropout: float = 0.0  # attention and MLP dropout in training
    # weight of an auxiliary L1 loss on a small head that regresses the whole normalised chunk from
    # the observation embedding (training only: inference and the ONNX graphs never run it; 0: no
    # head). Cross-entropy over 512 unordered codes says nothing about *how far* a wrong code is,
    # so the encoder gets no graded signal for where the object lies; the head gives it one.
    aux_weight: float = 0.0
    # soft targets for the scale-1 tokens of x, y, z (training only; 0: one-hot). Scale 1 holds one
    # token per action dimension, the chunk's mean: where it goes. Its codes are unordered classes to
    # the cross-entropy, but their embeddings are ordered (on the cup, the scale-1 x codes lie along
    # a line in the order of the cup's x), so the target becomes a Gaussian over the code distance
    # ||c_v - c_target||, sigma = this x ||c_target||: relative to the size of the move, so a 13 cm
    # reach gives a code 1 cm off much of the credit and a small correction stays nearly one-hot.
    # Rotation and gripper keep one-hot targets: a code's length says nothing about their move
    # (soft targets on all ten dimensions raised the cup's validation rotation error 1.9 -> 7.5 deg).
    coarse_label_sigma: float = 0.0
    # how inference picks the scale-1 tokens of x, y, z: "argmax" (the most likely code) or
    # "expected" (the code nearest to the probability-weighted mean of the codebook, as HL-Gauss
    # reads a histogram out as its mean: Farebrother et al. 2024, "Stop Regressing"). With ordered
    # codes and a broad distribution, argmax returns the mode whatever the observation; the mean
    # moves with it. Rotation, gripper and the finer scales stay greedy. Part of the exported graphs.
    # A diagnostic more than a default: where the distribution has two modes the code nearest the
    # mean can be far from both (on the cup it sent chunks outside the workspace: docs/results.md).
    # ... or "head": the code picked by a regression head (needs coarse_head_weight > 0).
    coarse_decode: str = "argmax"
    # weight of an L1 loss on a head that regresses, from the observation embedding, the profile
    # (16 normalised steps) that the chunk's scale-1 x, y, z codes decode to (0: no head). With
    # coarse_decode "head", inference takes, per dimension, the scale-1 code whose profile is nearest
    # the regressed one, instead of the transformer's classification of it: a linear probe reads the
    # cup's x from the embedding to 13 mm while the scale-1 x token's argmax barely moves with it.
    # The finer scales stay the transformer's, conditioned on that code. In the exported graphs.
    coarse_head_weight: float = 0.0
    # the coarse head regresses the profile as a move from the current TCP pose (added back before
    # the match), not as positions: every demonstrated chunk starts at the arm, and a head that
    # predicts absolute heights can pick the z profile of another phase (measured: chunks starting
    # 10-17 cm above or below the arm, refused by the driver, replanned identically until timeout)
    coarse_head_anchor: bool = False
    # the coarse head also regresses the gripper's scale-1 profile, and coarse_decode "head" picks
    # that code too: the gripper's decision then comes from the regression that already follows the
    # cup. Motivation (docs/results.md, "twice the training"): at table height holding the cup, the
    # demonstrations lift with the gripper closed after the grasp and open it over the target; a
    # visual policy whose transformer took one for the other lifted with the gripper open, grasped
    # again and timed out (10 of 60 trials). Measured (docs/results.md, "the gripper in the coarse
    # head"): worse, the head opens on every plan after the grasp (10 of 60), as one frame cannot
    # tell the lift from the release and a regression keeps no odds between them. Off by default.
    coarse_head_gripper: bool = False


@dataclass
class CarpConfig(PolicyConfig):
    """Everything that defines a CARP policy and how it is trained."""

    FAMILY: ClassVar[str] = "carp"
    MULTI_TASK: ClassVar[bool] = True

    name: str = "carp_state"  # run / model name (manifest, reports)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # stage 1: action tokens
    transformer: TransformerConfig = field(default_factory=TransformerConfig)  # stage 2: the policy

    @property
    def horizon(self) -> int:
        """H, actions per chunk: the tokenizer's."""
        return self.tokenizer.horizon

    def __post_init__(self) -> None:
        tok = self.tokenizer
        if tok.scales[-1] != tok.latent_len:
            raise ValueError(f"tokenizer.scales must end at latent_len={tok.latent_len}, got {tok.scales}")
        if tok.horizon != 4 * tok.latent_len:
            raise ValueError("tokenizer.horizon must be 4 x latent_len (two stride-2 convolutions)")
        if tok.lookup not in ("l2", "cosine"):
            raise ValueError(f"tokenizer.lookup must be 'l2' or 'cosine', got {tok.lookup!r}")
        if self.transformer.aux_weight < 0:
            raise ValueError(f"transformer.aux_weight must be >= 0, got {self.transformer.aux_weight}")
        if self.transformer.coarse_label_sigma < 0:
            raise ValueError(
                f"transformer.coarse_label_sigma must be >= 0, got {self.transformer.coarse_label_sigma}"
            )
        decode = self.transformer.coarse_decode
        if decode not in ("argmax", "expected", "head"):
            raise ValueError(
                f"transformer.coarse_decode must be 'argmax', 'expected' or 'head', got {decode!r}"
            )
        if self.transformer.coarse_head_weight < 0:
            raise ValueError(
                f"transformer.coarse_head_weight must be >= 0, got {self.transformer.coarse_head_weight}"
            )
        if self.transformer.coarse_head_anchor and self.transformer.coarse_head_weight <= 0:
            raise ValueError("transformer.coarse_head_anchor needs transformer.coarse_head_weight > 0")
        if self.transformer.coarse_head_gripper and self.transformer.coarse_head_weight <= 0:
            raise ValueError("transformer.coarse_head_gripper needs transformer.coarse_head_weight > 0")
        if decode == "head" and self.transformer.coarse_head_weight <= 0:
            raise ValueError("transformer.coarse_decode 'head' needs transformer.coarse_head_weight > 0")
        if self.transformer.width % self.transformer.heads:
            raise ValueError("transformer.width must be divisible by transformer.heads")
        super().__post_init__()
