"""Diffusion Policy baseline (DP-C): a 1D temporal conditional U-Net denoising action chunks.

The reference CARP is measured against (Chi et al. 2023, "Diffusion Policy", the CNN variant). Read
top to bottom: the config, the U-Net pieces (sinusoidal step embedding, Conv1d-GroupNorm-Mish
block, FiLM-conditioned residual block, the U-Net), then the policy (observation encoder shared with
CARP, DDPM training loss, DDIM/DDPM sampling, `predict`).

Shapes: B batch, T = action horizon (16), A = action dim (10), E = observation embedding,
C channels. The U-Net works channels-first on (B, A, T); the public API is (B, T, A) like every
action chunk in the stack.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from diffusers import DDIMScheduler, DDPMScheduler

from carp_policy.actions import (
    ROT6D,
    ActionChunk,
    Observation,
    matrix_to_rot6d,
    rot6d_to_matrix,
    validate_observation,
)
from carp_policy.config import (
    EncoderConfig,
    EnsembleConfig,
    TrainConfig,
    _build,
    check_data_options,
    config_path,
)
from carp_policy.encoders import build_encoder
from carp_policy.normalization import Normalizer


# ----------------------------------------------------------------------------- config
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
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True  # normalised actions live in [-1, 1], so x0 estimates are clipped there
    sampler: str = "ddim"  # "ddim" (fast, deterministic) or "ddpm" (all num_train_timesteps steps)
    num_inference_steps: int = 10  # DDIM steps at inference (ignored for "ddpm")


@dataclass
class DiffusionConfig:
    """Everything that defines a DP-C policy; `encoder` and `train` are the same sections as CARP's."""

    name: str = "dpc_state"
    family: str = "diffusion"  # the switch `carp-train` reads to pick the policy family
    frame: str = "absolute"  # positions as recorded, or "relative" to the TCP (normalization.py)
    horizon: int = 16  # T: action chunk length
    action_dim: int = 10  # A
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)

    def __post_init__(self) -> None:
        if self.family != "diffusion":
            raise ValueError(f"DiffusionConfig.family must be 'diffusion', got {self.family!r}")
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
        if self.encoder.kind == "visual" and not self.encoder.cameras:
            raise ValueError("a visual encoder needs at least one camera in encoder.cameras")
        check_data_options(self.frame, self.train, self.encoder, self.ensemble)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists) for YAML."""
        return _plain(dataclasses.asdict(self))

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiffusionConfig:
        """Build from a nested dict; unknown keys raise ValueError naming them."""
        sections = {
            "encoder": EncoderConfig,
            "unet": UNetConfig,
            "noise": NoiseConfig,
            "train": TrainConfig,
            "ensemble": EnsembleConfig,
        }
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**{k: _build(sections[k], v or {}, k) if k in sections else v for k, v in d.items()})

    @classmethod
    def load(cls, path: str | Path) -> DiffusionConfig:
        """Load a YAML file, or a shipped variant by name (`diffusion_state`, `diffusion_visual`)."""
        return cls.from_dict(yaml.safe_load(config_path(path).read_text()) or {})


def _plain(v: Any) -> Any:
    """Tuples -> lists, recursively (YAML-safe)."""
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


# ----------------------------------------------------------------------------- U-Net pieces
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


# ----------------------------------------------------------------------------- policy
class DiffusionPolicy(nn.Module):
    """DP-C as a `carp_policy.actions.Policy`: observation -> (16, 10) action chunk in physical units.

    Training: `compute_loss(batch)` (DDPM epsilon-prediction MSE) and `update_ema()` after each
    optimiser step. Inference: `predict(obs)` runs DDIM (`noise.num_inference_steps`) or the full
    DDPM chain, built on the pure tensor function `denoise_step`, which is exactly what the ONNX
    export turns into the one-step graph called in a loop.
    """

    def __init__(self, config: DiffusionConfig, normalizer: Normalizer | None = None) -> None:
        super().__init__()
        self.config = config
        self.horizon, self.action_dim = config.horizon, config.action_dim
        self.encoder = build_encoder(config.encoder)
        self.unet = ConditionalUNet1D(config.action_dim, config.encoder.out_dim, config.unet)
        n = config.noise
        kw = dict(
            num_train_timesteps=n.num_train_timesteps,
            beta_schedule=n.beta_schedule,
            clip_sample=n.clip_sample,
            prediction_type="epsilon",
        )
        self.ddpm, self.ddim = DDPMScheduler(**kw), DDIMScheduler(**kw)
        self.normalizer = normalizer
        self._ema: dict[str, torch.Tensor] | None = None  # EMA of the weights (not a submodule on purpose)
        self._ema_updates = 0

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu") -> DiffusionPolicy:
        """Load a `carp-train` DP-C run directory (config.yaml, normalization.json, the EMA weights
        in policy.safetensors), in eval mode on `device`."""
        from safetensors.torch import load_file

        run = Path(run_dir)
        for name in ("config.yaml", "normalization.json", "policy.safetensors"):
            if not (run / name).exists():
                raise FileNotFoundError(f"{run / name} missing: is {run} a finished DP-C run?")
        policy = cls(DiffusionConfig.load(run / "config.yaml"), Normalizer.load(run / "normalization.json"))
        missing, unexpected = policy.load_state_dict(load_file(str(run / "policy.safetensors")), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return policy.to(device).eval()

    # --------------------------------------------------------------- Policy protocol
    @property
    def obs_horizon(self) -> int:
        """Observation steps the policy sees (O)."""
        return self.config.encoder.obs_horizon

    @property
    def cameras(self) -> tuple[str, ...]:
        """Camera names the policy needs in every observation."""
        enc = self.config.encoder
        return tuple(enc.cameras) if enc.kind == "visual" else ()

    def reset(self) -> None:
        """DP-C keeps no state between chunks; present for the Policy protocol."""

    # --------------------------------------------------------------- the exported step
    def denoise_step(
        self, noisy_actions: torch.Tensor, timestep: torch.Tensor, obs_embedding: torch.Tensor
    ) -> torch.Tensor:
        """One U-Net evaluation: predicted noise for `noisy_actions` at diffusion step `timestep`.

        noisy_actions (B, T, A) normalised, timestep (B,) int64, obs_embedding (B, E) -> (B, T, A).
        A pure tensor function (no scheduler, no Python branching on values), so it exports as is.
        """
        eps = self.unet(noisy_actions.transpose(1, 2), timestep, obs_embedding)  # (B, A, T)
        return eps.transpose(1, 2)

    def encode_obs(self, state: torch.Tensor, images: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised state (B, O, S) + images {cam: (B, O, H, W, 3) uint8} -> embedding (B, E)."""
        return self.encoder({"state": state, "images": images})

    # --------------------------------------------------------------- training
    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """DDPM loss on a batch in the dataset's window format, physical units.

        batch: "state" (B, O, S), "action" (B, T, A) float, "images" {cam: (B, O, H, W, 3) uint8}.
        Returns {"loss": scalar}: MSE between the true and predicted noise at a uniformly drawn step.
        """
        state = batch["state"].float()
        obs = {"state": self._normalize_state(state), "images": batch.get("images", {})}
        actions = self._norm().actions_to_frame(batch["action"].float(), state[:, -1])
        loss, _ = self.loss(obs, self._normalize_action(actions))
        return {"loss": loss}

    def loss(self, batch: dict, actions: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The `carp-train` hook (same signature as `CarpModel.loss`): normalised obs batch
        {"state", "images"} and (B, T, A) normalised actions -> (loss, {"loss": float})."""
        if actions.shape[1:] != (self.horizon, self.action_dim):
            want = f"(B, {self.horizon}, {self.action_dim})"
            raise ValueError(f"actions must be {want}, got {tuple(actions.shape)}")
        emb = self.encoder(batch)  # (B, E)
        noise = torch.randn_like(actions)  # (B, T, A)
        t = torch.randint(0, self.ddpm.config.num_train_timesteps, (actions.shape[0],), device=actions.device)
        noisy = self.ddpm.add_noise(actions, noise, t)  # sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
        loss = F.mse_loss(self.denoise_step(noisy, t, emb), noise)
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def generate(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """The `carp-train` evaluation hook (as `CarpModel.generate`): normalised obs batch ->
        (B, T, A) normalised actions with the configured sampler."""
        return self.sample(self.encoder(batch), generator=generator)

    @torch.no_grad()
    def update_ema(self, decay: float | None = None) -> None:
        """Move the EMA weights toward the current ones (call after every optimiser step).

        The effective decay warms up as min(decay, (1 + n) / (10 + n)) so early, random weights
        are forgotten quickly (short runs would otherwise evaluate an average of noise).
        """
        decay = self.config.train.ema_decay if decay is None else decay
        current = self.state_dict()
        if self._ema is None:
            self._ema = {k: v.detach().clone() for k, v in current.items()}
        d = min(decay, (1 + self._ema_updates) / (10 + self._ema_updates))
        for k, v in current.items():
            if v.dtype.is_floating_point:
                self._ema[k].lerp_(v.detach(), 1.0 - d)
            else:
                self._ema[k].copy_(v)
        self._ema_updates += 1

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """EMA weights (the ones to evaluate and export); the live weights before any update."""
        return {k: v.clone() for k, v in (self._ema or self.state_dict()).items()}

    # --------------------------------------------------------------- inference
    @torch.no_grad()
    def sample(
        self,
        obs_embedding: torch.Tensor,
        sampler: str | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Reverse diffusion from Gaussian noise: (B, E) embedding -> (B, T, A) normalised actions.

        sampler "ddim" (deterministic, `num_inference_steps`, default from config) or "ddpm"
        (all training steps, stochastic). `generator` fixes the initial noise (and DDPM's noise).
        """
        n = self.config.noise
        sampler = sampler or n.sampler
        if sampler == "ddim":
            sched = self.ddim
            sched.set_timesteps(num_inference_steps or n.num_inference_steps)
        elif sampler == "ddpm":
            sched = self.ddpm
            sched.set_timesteps(n.num_train_timesteps)
        else:
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        b, dev = obs_embedding.shape[0], obs_embedding.device
        x = torch.randn((b, self.horizon, self.action_dim), generator=generator, device=dev)  # x_T
        for t in sched.timesteps:
            eps = self.denoise_step(x, t.to(dev).expand(b), obs_embedding)  # (B, T, A)
            x = sched.step(eps, t, x, generator=generator).prev_sample  # x_{t-1}
        return x

    @torch.no_grad()
    def predict_batch(
        self, state: torch.Tensor, images: dict[str, torch.Tensor] | None = None, **sample_kw
    ) -> torch.Tensor:
        """Physical state (B, O, S) + uint8 images -> (B, T, A) physical actions (rot6d as sampled)."""
        emb = self.encode_obs(self._normalize_state(state), images or {})
        actions = self._unnormalize_action(self.sample(emb, **sample_kw))  # (B, T, A) in the policy's frame
        return self._norm().actions_from_frame(actions, state[:, -1])

    @torch.no_grad()
    def predict(self, observation: Observation) -> ActionChunk:
        """Observation -> ActionChunk of (16, 10) physical actions with rot6d re-orthonormalised."""
        t0 = time.perf_counter()
        state, images = self._observation_tensors(observation)
        was_training = self.training
        self.eval()
        actions = self.predict_batch(state, images)[0].cpu().double().numpy()  # (T, A)
        self.train(was_training)
        # The U-Net's rot6d is only approximately orthonormal: project it back onto SO(3).
        actions[:, ROT6D] = matrix_to_rot6d(rot6d_to_matrix(actions[:, ROT6D]))
        return ActionChunk(actions, timestamp=observation.timestamp, latency_s=time.perf_counter() - t0)

    # --------------------------------------------------------------- helpers
    def _observation_tensors(self, observation: Observation) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Validate one observation and batch it: state (1, O, S), images {cam: (1, O, H, W, 3)}."""
        enc, dev = self.config.encoder, self._device()
        state, images = validate_observation(
            observation, enc.obs_horizon, enc.state_dim, self.cameras, enc.image_size, enc.env_state_dim
        )
        batch_images = {cam: torch.from_numpy(img).unsqueeze(0).to(dev) for cam, img in images.items()}
        return torch.from_numpy(state).float().unsqueeze(0).to(dev), batch_images

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _norm(self) -> Normalizer:
        if self.normalizer is None:
            raise RuntimeError("DiffusionPolicy has no normalizer: pass one built from the dataset stats")
        return self.normalizer

    def _norm_params(self, which: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, o = self._norm().torch_params(which)
        return torch.as_tensor(s, device=like.device), torch.as_tensor(o, device=like.device)

    def _normalize_state(self, x: torch.Tensor) -> torch.Tensor:
        """(..., S) physical state -> the policy's frame, normalised."""
        s, o = self._norm_params("state", x)
        return (self._norm().state_to_frame(x.float()) - o) / s

    def _normalize_action(self, x: torch.Tensor) -> torch.Tensor:
        s, o = self._norm_params("action", x)
        return (x.float() - o) / s

    def _unnormalize_action(self, x: torch.Tensor) -> torch.Tensor:
        s, o = self._norm_params("action", x)
        return x * s + o
