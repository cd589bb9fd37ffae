"""The temporal conditional U-Net of Diffusion Policy (DP-C, Chi et al. 2023): the network alone.

Read top to bottom: the sinusoidal step embedding, the Conv1d-GroupNorm-Mish block, the
FiLM-conditioned residual block, the U-Net. It works channels-first on (B, A, T): B batch,
A action dim, T action horizon, C channels.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from carp_policy.policies.diffusion.configuration_diffusion import UNetConfig


class SinusoidalStepEmbedding(nn.Module):
    """Diffusion timestep (B,) -> (B, dim) sin/cos features at geometric frequencies (as in DDPM)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"step embedding dim must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None]  # (B, dim/2)
        return torch.cat([args.sin(), args.cos()], dim=-1)  # (B, dim)


class Conv1dBlock(nn.Sequential):
    """Conv1d -> GroupNorm -> Mish, length preserving: (B, Cin, T) -> (B, Cout, T)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int) -> None:
        super().__init__(
            nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, c_out),
            nn.Mish(),
        )


class FiLMResBlock(nn.Module):
    """Two Conv1dBlocks with FiLM between them: the condition sets a per-channel scale and bias.

    FiLM (Perez et al. 2018) is how DP-C injects both the diffusion step and the observation into
    every block; the residual path is a 1x1 conv when the channel count changes.
    """

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel_size: int, n_groups: int) -> None:
        super().__init__()
        self.block1 = Conv1dBlock(c_in, c_out, kernel_size, n_groups)
        self.block2 = Conv1dBlock(c_out, c_out, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x: (B, Cin, T), cond: (B, cond_dim)
        h = self.block1(x)  # (B, Cout, T)
        scale, bias = self.film(cond)[..., None].chunk(2, dim=1)  # 2 x (B, Cout, 1)
        h = self.block2(scale * h + bias)  # (B, Cout, T)
        return h + self.skip(x)


class ConditionalUNet1D(nn.Module):
    """Temporal U-Net: noisy actions (B, A, T) + step (B,) + global condition (B, G) -> noise (B, A, T).

    Levels follow `down_dims`: two FiLM blocks per level, a stride-2 conv between levels (T halves),
    two FiLM blocks in the middle, then the mirror path up with skip connections from each level.
    The horizon T must be divisible by 2 ** (len(down_dims) - 1).
    """

    def __init__(self, action_dim: int, global_cond_dim: int, cfg: UNetConfig) -> None:
        super().__init__()
        dims = [action_dim, *cfg.down_dims]
        k, g, e = cfg.kernel_size, cfg.n_groups, cfg.step_embed_dim
        self.n_down = len(cfg.down_dims) - 1  # number of halvings of T
        self.step_embed = nn.Sequential(
            SinusoidalStepEmbedding(e), nn.Linear(e, 4 * e), nn.Mish(), nn.Linear(4 * e, e)
        )
        cond_dim = e + global_cond_dim

        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(itertools.pairwise(dims)):
            last = i == len(cfg.down_dims) - 1
            self.down.append(
                nn.ModuleList(
                    [
                        FiLMResBlock(c_in, c_out, cond_dim, k, g),
                        FiLMResBlock(c_out, c_out, cond_dim, k, g),
                        nn.Identity() if last else nn.Conv1d(c_out, c_out, 3, stride=2, padding=1),
                    ]
                )
            )
        c_mid = cfg.down_dims[-1]
        self.mid = nn.ModuleList(
            [FiLMResBlock(c_mid, c_mid, cond_dim, k, g), FiLMResBlock(c_mid, c_mid, cond_dim, k, g)]
        )
        # Up path mirrors the down path except the first level: input = current x concatenated with
        # the skip of the same resolution, then upsample (transposed conv, T doubles).
        self.up = nn.ModuleList()
        for c_out, c_in in reversed(list(zip(cfg.down_dims[:-1], cfg.down_dims[1:]))):
            self.up.append(
                nn.ModuleList(
                    [
                        FiLMResBlock(2 * c_in, c_out, cond_dim, k, g),
                        FiLMResBlock(c_out, c_out, cond_dim, k, g),
                        nn.ConvTranspose1d(c_out, c_out, 4, stride=2, padding=1),
                    ]
                )
            )
        self.head = nn.Sequential(
            Conv1dBlock(cfg.down_dims[0], cfg.down_dims[0], k, g), nn.Conv1d(cfg.down_dims[0], action_dim, 1)
        )

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        # x: (B, A, T), timestep: (B,), global_cond: (B, G)
        cond = torch.cat([self.step_embed(timestep), global_cond], dim=-1)  # (B, e + G)
        skips = []
        for res1, res2, downsample in self.down:
            x = res2(res1(x, cond), cond)  # (B, C_level, T_level)
            skips.append(x)
            x = downsample(x)  # (B, C_level, T_level / 2), except at the deepest level
        for res in self.mid:
            x = res(x, cond)  # (B, C_deepest, T / 2**n_down)
        # The deepest skip is the mid input itself; shallower ones are used on the way up, and the
        # finest level's skip is unused, as in DP-C (its information reaches the head via the path).
        for (res1, res2, upsample), skip in zip(self.up, reversed(skips[1:])):
            x = res2(res1(torch.cat([x, skip], dim=1), cond), cond)  # (B, C_out, T_level)
            x = upsample(x)  # (B, C_out, 2 T_level)
        return self.head(x)  # (B, A, T)
