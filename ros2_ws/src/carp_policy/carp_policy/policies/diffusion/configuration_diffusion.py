"""Configuration of the Diffusion Policy baseline (DP-C, CNN U-Net): the shared sections
(policies/base.py) plus the U-Net and the noise schedule. Every field with its meaning and default;
the defaults are the published DP-C ones and ``configs/diffusion_state.yaml``'s.

Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from carp_policy.policies.base import EncoderConfig, PolicyConfig, TrainConfig


@dataclass
class UNetConfig:
    """Size of the temporal U-Net. The defaults are the published DP-C ones (robomimic state)."""

    down_dims: tuple[int, ...] = (256, 512, 1024)  # channels per resolution level; T halves per level
    kernel_size: int = 5  # temporal kernel of every Conv1d
    n_groups: int = 8  # GroupNorm groups (every entry of down_dims must divide by it)
    step_embed_dim: int = 256  # diffusion-step embedding width


@dataclass
class NoiseConfig:
    """DDPM training / DDIM inference schedule (diffusers schedulers underneath)."""

    num_train_timesteps: int = 100  # DDPM steps the model is trained on
    beta_schedule: str = "squaredcos_cap_v2"  # diffusers' beta schedule name
    clip_sample: bool = True  # normalised actions live in [-1, 1], so x0 estimates are clipped there
    sampler: str = "ddim"  # "ddim" (fast, deterministic) or "ddpm" (all num_train_timesteps steps)
    num_inference_steps: int = 10  # DDIM steps at inference (ignored for "ddpm")


@dataclass
class DiffusionEncoderConfig(EncoderConfig):
    """The shared observation encoder at DP-C's published widths."""

    hidden: int = 256  # MLP width of the state encoder / fusion MLP
    out_dim: int = 128  # observation embedding, the U-Net's global FiLM condition


@dataclass
class DiffusionTrainConfig(TrainConfig):
    """The shared training loop with Diffusion Policy's schedule (no tokenizer stage)."""

    tokenizer_steps: int = 0  # DP-C has no tokenizer stage
    policy_steps: int = 5000  # optimiser steps
    policy_lr: float = 1e-4  # as Diffusion Policy
    weight_decay: float = 1e-6  # as Diffusion Policy
    warmup_steps: int = 500  # as Diffusion Policy
    checkpoint_every: int = 500  # steps between weight + resume-state writes


@dataclass
class DiffusionConfig(PolicyConfig):
    """Everything that defines a DP-C policy; `encoder` and `train` are CARP's sections."""

    FAMILY: ClassVar[str] = "diffusion"

    name: str = "dpc_state"  # run / model name (manifest, reports)
    horizon: int = 16  # T: action chunk length
    action_dim: int = 10  # A: [x, y, z, r6d(6), gripper]
    encoder: DiffusionEncoderConfig = field(default_factory=DiffusionEncoderConfig)  # CARP's, wider
    train: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)  # DP's schedule
    unet: UNetConfig = field(default_factory=UNetConfig)  # the denoising network (unet.py)
    noise: NoiseConfig = field(default_factory=NoiseConfig)  # DDPM training / DDIM inference

    def __post_init__(self) -> None:
        levels = len(self.unet.down_dims)
        if self.horizon % 2 ** (levels - 1):
            raise ValueError(
                f"horizon {self.horizon} must be divisible by 2**{levels - 1} (unet.down_dims levels)"
            )
        if any(d % self.unet.n_groups for d in self.unet.down_dims):
            raise ValueError(f"every unet.down_dims entry must divide by n_groups={self.unet.n_groups}")
        if self.noise.sampler not in ("ddim", "ddpm"):
            raise ValueError(f"noise.sampler must be 'ddim' or 'ddpm', got {self.noise.sampler!r}")
        if not 1 <= self.noise.num_inference_steps <= self.noise.num_train_timesteps:
            raise ValueError("noise.num_inference_steps must be in [1, noise.num_train_timesteps]")
        super().__post_init__()
