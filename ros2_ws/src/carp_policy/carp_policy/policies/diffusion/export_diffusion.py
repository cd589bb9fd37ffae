"""DP-C's ONNX graphs: ``dpc_obs.onnx`` (state, image_<cam> -> cond) and ``dpc_denoise.onnx``
(sample, timestep, cond -> eps), called in a loop by the engine (onnx_diffusion.py) with the
DDIM/DDPM update done in numpy from the scheduler's ``alphas_cumprod`` saved in the manifest (so the
robot PC needs no diffusers). Batch 1: one noise sample per chunk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class _DpcObsGraph(nn.Module):
    """DP-C observation encoder: state, images -> cond (1, E)."""

    def __init__(self, model: nn.Module, cameras: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.cameras = model, cameras

    def forward(self, state: torch.Tensor, *images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_obs(state, dict(zip(self.cameras, images)))


class _DpcDenoiseGraph(nn.Module):
    """One U-Net evaluation: sample (1, T, A), timestep (1,) int64, cond (1, E) -> eps (1, T, A)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.model.denoise_step(sample, timestep, cond)


def default_batch(config: Any) -> int:
    """One noise sample per chunk."""
    return 1


def check_batch(batch: int) -> None:
    if batch != 1:
        raise ValueError(f"batch must be 1 for DP-C (one noise sample per chunk); got {batch}")


def scheduler_spec(model: Any) -> dict[str, Any]:
    """The DDPM/DDIM constants the engine's numpy update needs, checked against what it implements."""
    ddpm, ddim = model.ddpm.config, model.ddim.config
    for name, cfg in (("ddpm", ddpm), ("ddim", ddim)):
        if cfg.prediction_type != "epsilon" or cfg.thresholding or cfg.timestep_spacing != "leading":
            raise ValueError(
                f"{name} scheduler config not supported by the ONNX engine (needs epsilon prediction, "
                f"no thresholding, leading spacing): {dict(cfg)}"
            )
    if ddpm.variance_type != "fixed_small":
        raise ValueError(f"DDPM variance_type {ddpm.variance_type!r} not supported (fixed_small only)")
    if not ddim.set_alpha_to_one:
        raise ValueError("DDIM set_alpha_to_one=False not supported by the ONNX engine")
    n = model.cfg.noise
    model.ddim.set_timesteps(n.num_inference_steps)
    return {
        "num_train_timesteps": ddpm.num_train_timesteps,
        "alphas_cumprod": model.ddpm.alphas_cumprod.double().tolist(),
        "clip_sample": bool(ddpm.clip_sample),
        "clip_sample_range": float(ddpm.clip_sample_range),
        "steps_offset": int(ddim.steps_offset),
        "timestep_spacing": "leading",
        "sampler": n.sampler,
        "num_inference_steps": n.num_inference_steps,
        "ddim_timesteps": model.ddim.timesteps.tolist(),  # for reference; the engine recomputes them
    }


def export_graphs(policy: Any, spec: dict[str, Any], out: Path, batch: int) -> tuple[list[dict], dict]:
    """The two graphs of a ``DiffusionPolicy`` -> (manifest entries, {"scheduler": ...})."""
    from carp_policy.export import example_inputs, export_graph

    check_batch(batch)
    model = policy.model.float().cpu().eval()
    cams = tuple(spec["cameras"])
    obs_args, obs_names = example_inputs(spec)
    e1 = export_graph(_DpcObsGraph(model, cams), tuple(obs_args), obs_names, ["cond"], out / "dpc_obs.onnx")
    e1["stage"] = "encoder"
    args = (
        torch.zeros(1, model.horizon, model.action_dim),
        torch.zeros(1, dtype=torch.int64),
        torch.zeros(1, model.cfg.encoder.out_dim),
    )
    e2 = export_graph(
        _DpcDenoiseGraph(model), args, ["sample", "timestep", "cond"], ["eps"], out / "dpc_denoise.onnx"
    )
    e2["stage"] = "denoising step"
    return [e1, e2], {"scheduler": scheduler_spec(model)}


def parity_sampler(config: Any) -> str:
    """What the parity check compares: the torch DDIM chain against the engine's."""
    return f"ddim-{config.noise.num_inference_steps}"


def parity_pair(policy: Any, engine: Any, obs: Any, i: int) -> tuple[np.ndarray, np.ndarray, None]:
    """Torch (diffusers' DDIM) vs ONNX (numpy DDIM) from the same initial noise."""
    noise = torch.randn(
        1, policy.model.horizon, policy.model.action_dim, generator=torch.Generator().manual_seed(i)
    )
    ref = policy.predict(obs, noise=noise[0].numpy(), sampler="ddim").actions
    got = engine.predict(obs, noise=noise[0].numpy()).actions
    return ref, got, None
