"""Diffusion Policy baseline (DP-C): the U-Net (unet.py) denoising action chunks, and its policy.

The reference CARP is measured against (Chi et al. 2023, "Diffusion Policy", the CNN variant).
``DiffusionModel`` holds the observation encoder (shared with CARP), the U-Net and the diffusers
schedulers, with the same entry points as ``CarpModel``: ``loss`` (DDPM epsilon-prediction MSE,
what ``carp-train`` runs) and ``generate`` (DDIM or the full DDPM chain), both built on the pure
tensor function ``denoise_step``, which is exactly what the ONNX export turns into the one-step
graph the engine calls in a loop. ``DiffusionPolicy`` is the shared ``ChunkPolicy``
(policies/policy.py) with this model as its runner.

Shapes: B batch, T = action horizon (16), A = action dim (10), E = observation embedding. The
public API is (B, T, A) like every action chunk in the stack; the U-Net works on (B, A, T).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from carp_policy.encoders import build_encoder
from carp_policy.normalization import Normalizer
from carp_policy.policies.carp.modeling_carp import TorchRunner, count_parameters
from carp_policy.policies.diffusion.configuration_diffusion import DiffusionConfig
from carp_policy.policies.diffusion.unet import ConditionalUNet1D
from carp_policy.policies.policy import ChunkPolicy


class DiffusionModel(nn.Module):
    """Observation encoder + temporal U-Net + DDPM/DDIM schedulers: everything a DP-C checkpoint holds."""

    stages = ("policy",)  # carp-train's stages (no tokenizer)
    policy_log_fields: tuple[str, ...] = ()

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__()
        self.cfg = config
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

    # --------------------------------------------------------------- training (carp-train)
    def loss(self, batch: dict, actions: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Normalised obs batch {"state", "images"} and (B, T, A) normalised actions -> (loss,
        {"loss": float}): MSE between the true and predicted noise at a uniformly drawn step."""
        if actions.shape[1:] != (self.horizon, self.action_dim):
            want = f"(B, {self.horizon}, {self.action_dim})"
            raise ValueError(f"actions must be {want}, got {tuple(actions.shape)}")
        emb = self.encoder(batch)  # (B, E)
        noise = torch.randn_like(actions)  # (B, T, A)
        t = torch.randint(0, self.ddpm.config.num_train_timesteps, (actions.shape[0],), device=actions.device)
        noisy = self.ddpm.add_noise(actions, noise, t)  # sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
        loss = F.mse_loss(self.denoise_step(noisy, t, emb), noise)
        return loss, {"loss": loss.item()}

    def policy_stage_modules(self) -> nn.ModuleDict:
        """What training optimises and averages into the EMA (keys of policy.safetensors)."""
        return nn.ModuleDict({"encoder": self.encoder, "unet": self.unet})

    def prepare_policy_stage(self, run: Path, device: torch.device) -> None:
        """DP-C's one stage needs nothing from an earlier one."""

    def with_policy_weights(self, net: nn.ModuleDict) -> DiffusionModel:
        """A copy of this model with the weights of ``net`` (e.g. the EMA)."""
        out = DiffusionModel(self.cfg).to(next(self.parameters()).device)
        out.load_state_dict(net.state_dict())
        return out

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per part (reports)."""
        return {"encoder": count_parameters(self.encoder), "unet": count_parameters(self.unet)}

    # --------------------------------------------------------------- inference
    @torch.no_grad()
    def generate(
        self,
        batch: dict,
        sampler: str | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: Any = None,
    ) -> torch.Tensor:
        """Normalised obs batch -> (B, T, A) normalised actions with the configured sampler.

        noise: the initial sample x_T, (T, A) or (B, T, A) (default: drawn from ``generator``)."""
        emb = self.encoder(batch)
        if noise is not None:
            noise = torch.as_tensor(np.asarray(noise, dtype=np.float32))
            if noise.shape[-2:] != (self.horizon, self.action_dim):
                raise ValueError(
                    f"noise must have shape ({self.horizon}, {self.action_dim}), got {tuple(noise.shape)}"
                )
            noise = noise.reshape(-1, self.horizon, self.action_dim).expand(emb.shape[0], -1, -1)
        return self.sample(emb, sampler, num_inference_steps, generator, noise)

    @torch.no_grad()
    def sample(
        self,
        obs_embedding: torch.Tensor,
        sampler: str | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reverse diffusion from Gaussian noise: (B, E) embedding -> (B, T, A) normalised actions.

        sampler "ddim" (deterministic, `num_inference_steps`, default from config) or "ddpm"
        (all training steps, stochastic). `generator` fixes the initial noise (and DDPM's noise);
        `noise` (B, T, A) gives the initial sample x_T itself.
        """
        n = self.cfg.noise
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
        if noise is None:
            x = torch.randn((b, self.horizon, self.action_dim), generator=generator, device=dev)  # x_T
        else:
            x = noise.to(dev).float()
        for t in sched.timesteps:
            eps = self.denoise_step(x, t.to(dev).expand(b), obs_embedding)  # (B, T, A)
            x = sched.step(eps, t, x, generator=generator).prev_sample  # x_{t-1}
        return x


class DiffusionPolicy(ChunkPolicy):
    """DP-C behind the ``Policy`` protocol: observation -> (16, 10) action chunk in physical units."""

    def __init__(
        self,
        config: DiffusionConfig,
        normalizer: Normalizer,
        weights: dict[str, torch.Tensor] | None = None,
        device: str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = DiffusionModel(config)
        if weights is not None:
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"checkpoint does not match its config: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}"
                )
        self.model.to(self.device).eval()
        # the diffusers schedulers keep their timesteps on themselves: one sampling at a time
        super().__init__(config, normalizer, TorchRunner(self.model, self.device, lock=True))

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu") -> DiffusionPolicy:
        """Load a `carp-train` DP-C run directory (config.yaml, normalization.json, the EMA weights
        in policy.safetensors), in eval mode on `device`."""
        from safetensors.torch import load_file

        run = Path(run_dir)
        for name in ("config.yaml", "normalization.json", "policy.safetensors"):
            if not (run / name).exists():
                raise FileNotFoundError(f"{run / name} missing: is {run} a finished DP-C run?")
        return cls(
            DiffusionConfig.load(run / "config.yaml"),
            Normalizer.load(run / "normalization.json"),
            load_file(str(run / "policy.safetensors")),
            device=device,
        )


Model = DiffusionModel  # the names the registry looks up (policies/__init__.py)
Policy = DiffusionPolicy
