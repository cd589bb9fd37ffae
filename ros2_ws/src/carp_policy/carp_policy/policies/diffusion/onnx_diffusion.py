"""How the engine runs an exported DP-C model: the encoder graph once, then the denoising-step
graph in a loop with the DDIM / DDPM update done here in numpy from the scheduler constants in the
manifest (the same formulas as diffusers' ``DDIMScheduler`` (eta = 0) and ``DDPMScheduler``
(``fixed_small``); a test holds them equal). numpy + onnxruntime only: the robot PC needs no
diffusers and no torch."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from carp_policy.processor import EncodedObservations


class OnnxRunner:
    """Runner of a ``ChunkPolicy`` over ``carp_policy.engine.OnnxGraphs``.

    sampler / num_inference_steps: override the manifest's (``"ddim"`` with any step count, or
    ``"ddpm"``). seed: the noise generator's; it restarts from it at every ``reset`` (reproducible
    episodes)."""

    CARRY: ClassVar[dict[str, str]] = {
        "cond": "cond"
    }  # the denoising graph reads the encoder's output on the device

    def __init__(
        self,
        graphs: Any,
        manifest: dict[str, Any],
        sampler: str | None = None,
        num_inference_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        self.graphs = graphs
        self.batch = 1  # one noise sample per chunk
        sch = manifest["scheduler"]
        self._alphas = np.asarray(sch["alphas_cumprod"], dtype=np.float64)
        self._sched = sch
        self.sampler = sampler or sch["sampler"]
        if self.sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {self.sampler!r}")
        self.num_inference_steps = int(num_inference_steps or sch["num_inference_steps"])
        self.timesteps = diffusion_timesteps(sch, self.sampler, self.num_inference_steps)
        self.horizon, self.action_dim = int(manifest["action"]["horizon"]), int(manifest["action"]["dim"])
        self._seed = seed
        self._rng = np.random.default_rng(seed)

    def reset(self) -> None:
        """The noise generator restarts from its seed (reproducible episodes)."""
        self._rng = np.random.default_rng(self._seed)

    def run(self, obs: EncodedObservations, noise: np.ndarray | None = None) -> np.ndarray:
        """-> (1, H, A) normalised actions. noise: the initial sample x_T (H, A) (default: drawn
        from the runner's generator)."""
        H, A = self.horizon, self.action_dim
        if noise is not None:
            noise = np.asarray(noise, dtype=np.float64)
            if noise.shape != (H, A):
                raise ValueError(f"noise must have shape ({H}, {A}), got {noise.shape}")
        g = self.graphs
        with g.lock:
            g.feed(obs, 1)
            g.start_run()
            g.run_graph(0)
            x = (self._rng.standard_normal((H, A)) if noise is None else noise).astype(np.float32)
            sample, timestep, eps = g.inputs["sample"], g.inputs["timestep"], g.outputs[1]["eps"]
            ts = self.timesteps
            for j, t in enumerate(ts):
                sample.update_inplace(x[None])
                timestep.update_inplace(np.array([t], dtype=np.int64))
                g.run_graph(1)
                prev_t = int(ts[j + 1]) if j + 1 < len(ts) else -1
                var_noise = self._rng.standard_normal(x.shape) if self.sampler == "ddpm" and t > 0 else None
                x = scheduler_step(
                    self._sched, self._alphas, self.sampler, eps.numpy()[0], int(t), prev_t, x, var_noise
                )
        return x[None]


def diffusion_timesteps(sched: dict[str, Any], sampler: str, steps: int) -> np.ndarray:
    """Descending timesteps as diffusers sets them ("leading" spacing); DDPM uses every training step."""
    N = int(sched["num_train_timesteps"])
    if sampler == "ddpm":
        return np.arange(N)[::-1].copy()
    if not 1 <= steps <= N:
        raise ValueError(f"num_inference_steps must be in [1, {N}], got {steps}")
    ratio = N // steps
    return (np.arange(steps) * ratio).round()[::-1].astype(np.int64) + int(sched.get("steps_offset", 0))


def scheduler_step(
    sched: dict[str, Any],
    alphas: np.ndarray,
    sampler: str,
    eps: np.ndarray,
    t: int,
    prev_t: int,
    x: np.ndarray,
    variance_noise: np.ndarray | None = None,
) -> np.ndarray:
    """x_t -> x_prev for epsilon prediction: DDIM with eta = 0, or DDPM with ``fixed_small`` variance.

    Written out here (rather than calling diffusers) so the robot PC needs only numpy; the formulas
    are diffusers' (DDIMScheduler.step / DDPMScheduler.step), and a test checks them against it.
    """
    a_t = alphas[t]
    a_prev = alphas[prev_t] if prev_t >= 0 else 1.0  # set_alpha_to_one / DDPM's "one"
    x64, eps64 = x.astype(np.float64), eps.astype(np.float64)
    x0 = (x64 - np.sqrt(1.0 - a_t) * eps64) / np.sqrt(a_t)
    if sched["clip_sample"]:
        r = sched["clip_sample_range"]
        x0 = np.clip(x0, -r, r)
    if sampler == "ddim":
        prev = np.sqrt(a_prev) * x0 + np.sqrt(1.0 - a_prev) * eps64
    else:
        cur_alpha = a_t / a_prev
        cur_beta = 1.0 - cur_alpha
        prev = (np.sqrt(a_prev) * cur_beta / (1.0 - a_t)) * x0 + (
            np.sqrt(cur_alpha) * (1.0 - a_prev) / (1.0 - a_t)
        ) * x64
        if t > 0:
            if variance_noise is None:
                raise ValueError("DDPM steps with t > 0 need variance noise")
            var = max((1.0 - a_prev) / (1.0 - a_t) * cur_beta, 1e-20)
            prev = prev + np.sqrt(var) * variance_noise
    return prev.astype(np.float32)
