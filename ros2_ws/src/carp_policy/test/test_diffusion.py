"""Tests of the Diffusion Policy baseline (DP-C): U-Net shapes, DDPM training, DDIM/DDPM sampling,
the exported denoising step, EMA, configs and bad input. Tiny models on the synthetic
pick-and-place demonstrations, CPU only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from carp_policy.actions import ActionChunk, Observation, Policy, rot6d_to_matrix, rotation_error_deg
from carp_policy.normalization import Normalizer
from carp_policy.policies.base import EncoderConfig
from carp_policy.policies.diffusion.configuration_diffusion import (
    DiffusionConfig,
    DiffusionTrainConfig,
    NoiseConfig,
    UNetConfig,
)
from carp_policy.policies.diffusion.modeling_diffusion import DiffusionModel, DiffusionPolicy
from carp_policy.policies.diffusion.unet import ConditionalUNet1D
from carp_policy.synthetic import SyntheticEpisodes, SyntheticWindows
from carp_policy.train import BatchNormalizer, policy_ema

IMG = (24, 32)  # tiny frames keep the visual tests fast; the real configs use 120x160


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def tiny_config(kind: str = "state", **noise) -> DiffusionConfig:
    enc = EncoderConfig(kind="state", obs_horizon=2, hidden=64, out_dim=32)
    if kind == "visual":
        enc = EncoderConfig(
            kind="visual",
            obs_horizon=1,
            cameras=("wrist", "scene"),
            image_size=IMG,
            crop_size=(20, 28),
            resnet_width=8,
            keypoints=4,
            hidden=64,
            out_dim=32,
        )
    return DiffusionConfig(
        name=f"tiny_{kind}",
        encoder=enc,
        unet=UNetConfig(down_dims=(32, 64), step_embed_dim=32),
        noise=NoiseConfig(**noise),
        train=DiffusionTrainConfig(ema_decay=0.99),
    )


def episodes(kind: str = "state", n: int = 4) -> tuple[SyntheticEpisodes, Normalizer]:
    cams = ("wrist", "scene") if kind == "visual" else ()
    ds = SyntheticEpisodes(n, seed=0, image_size=IMG, cameras=cams)
    return ds, Normalizer.from_stats(ds.stats())


def windows(ds: SyntheticEpisodes, cfg: DiffusionConfig, idx: list[int]) -> dict:
    """Collated windows at the given indices: state/action float tensors, uint8 image tensors."""
    w = SyntheticWindows(
        ds,
        np.arange(len(ds)),
        obs_horizon=cfg.encoder.obs_horizon,
        action_horizon=16,
        cameras=list(cfg.encoder.cameras),
    )
    items = [w[i] for i in idx]
    return {
        "state": torch.from_numpy(np.stack([it["state"] for it in items])),
        "action": torch.from_numpy(np.stack([it["action"] for it in items])),
        "images": {
            c: torch.from_numpy(np.stack([it["images"][c] for it in items])) for c in cfg.encoder.cameras
        },
    }


def observation(batch: dict, i: int) -> Observation:
    return Observation(
        state=batch["state"][i].numpy(), images={c: v[i].numpy() for c, v in batch["images"].items()}
    )


def normalised(batch: dict, norm: Normalizer) -> tuple[dict, torch.Tensor]:
    """Collated windows -> (normalised obs batch, (B, T, A) normalised actions), as carp-train does."""
    return BatchNormalizer(norm, torch.device("cpu"))(batch)


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("batch", [1, 5])
def test_unet_and_denoise_step_shapes(batch):
    unet = ConditionalUNet1D(10, 32, UNetConfig(down_dims=(32, 64, 128), step_embed_dim=32))
    x, t, c = torch.randn(batch, 10, 16), torch.randint(0, 100, (batch,)), torch.randn(batch, 32)
    assert unet(x, t, c).shape == (batch, 10, 16)
    _, norm = episodes()
    policy = DiffusionPolicy(tiny_config(), norm)
    eps = policy.model.denoise_step(torch.randn(batch, 16, 10), t, torch.randn(batch, 32))
    assert eps.shape == (batch, 16, 10)


@pytest.mark.parametrize("kind", ["state", "visual"])
def test_generate_batch_and_single_observation(kind):
    """Batch 1 and >1 through the same weights; single predict gives a 16 x 10 physical chunk."""
    cfg = tiny_config(kind)
    ds, norm = episodes(kind)
    torch.manual_seed(0)
    policy = DiffusionPolicy(cfg, norm)
    assert isinstance(policy, Policy) and policy.obs_horizon == cfg.encoder.obs_horizon
    assert policy.cameras == (("wrist", "scene") if kind == "visual" else ())
    obs, _ = normalised(windows(ds, cfg, [0, 7, 15]), norm)
    out = policy.model.generate(obs, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 16, 10)
    # batch 1 with the same initial noise as row 0 of the batch gives row 0 (the U-Net is per-sample;
    # measured max |diff| 4.6e-6 over ten DDIM steps from batched kernels: 3e-5 leaves a 6x margin)
    one = {"state": obs["state"][:1], "images": {c: x[:1] for c, x in obs["images"].items()}}
    out1 = policy.model.generate(one, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out1[0], out[0], atol=3e-5, rtol=0)
    chunk = policy.predict(observation(windows(ds, cfg, [1]), 0))
    assert isinstance(chunk, ActionChunk) and chunk.actions.shape == (16, 10) and chunk.latency_s > 0


def test_ddim10_and_ddpm100_give_finite_physical_actions():
    """Random weights: DDIM (10 U-Net steps) and DDPM (100) chunks are finite, rot6d orthonormal, and
    the clipped samples land inside the normaliser's physical range (xyz, gripper)."""
    ds, norm = episodes()
    cfg = tiny_config()
    policy = DiffusionPolicy(cfg, norm)
    obs = observation(windows(ds, cfg, [5]), 0)
    lo, hi = norm.action_min, norm.action_max
    calls = []
    step = policy.model.denoise_step
    policy.model.denoise_step = lambda *a: calls.append(1) or step(*a)  # count the U-Net evaluations
    for sampler, steps in (("ddim", 10), ("ddpm", 100)):
        policy.config.noise.sampler = sampler
        calls.clear()
        a = policy.predict(obs).actions
        assert len(calls) == steps, (sampler, len(calls))
        assert np.all(np.isfinite(a))
        assert np.all(a[:, :3] >= lo[:3] - 1e-6) and np.all(a[:, :3] <= hi[:3] + 1e-6)
        assert np.all(a[:, 9] >= lo[9] - 1e-6) and np.all(a[:, 9] <= hi[9] + 1e-6)
        mats = rot6d_to_matrix(a[:, 3:9])
        np.testing.assert_allclose(
            mats @ mats.transpose(0, 2, 1), np.broadcast_to(np.eye(3), mats.shape), atol=1e-9
        )


# ----------------------------------------------------------------------------- the exported step
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_denoise_step_reproduces_the_policy_loop(sampler):
    """A loop of denoise_step + a fresh diffusers scheduler (what the ONNX engine runs) gives the
    model's own chunk from the same noise, bit for bit."""
    ds, norm = episodes()
    cfg = tiny_config()
    torch.manual_seed(1)
    model = DiffusionPolicy(cfg, norm).model
    obs, _ = normalised(windows(ds, cfg, [3, 9]), norm)
    ref = model.generate(obs, sampler=sampler, generator=torch.Generator().manual_seed(7))

    kw = dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    sched = DDIMScheduler(**kw) if sampler == "ddim" else DDPMScheduler(**kw)
    sched.set_timesteps(10 if sampler == "ddim" else 100)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        emb = model.encode_obs(obs["state"], {})
        x = torch.randn((2, 16, 10), generator=g)
        for t in sched.timesteps:
            x = sched.step(model.denoise_step(x, t.repeat(2), emb), t, x, generator=g).prev_sample
    torch.testing.assert_close(x, ref, atol=0, rtol=0)


# ----------------------------------------------------------------------------- training
def _train(model: DiffusionModel, obs: dict, actions: torch.Tensor, steps: int, lr: float = 3e-3):
    """carp-train's policy stage on one fixed batch: the modules it optimises, ``model.loss``, AdamW,
    and its EMA (``train.policy_ema``). Returns (losses, ema)."""
    net = model.policy_stage_modules().train()
    ema = policy_ema(net, model.cfg.train.ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss, info = model.loss(obs, actions)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update_parameters(net)
        losses.append(info["loss"])
    return losses, ema


def test_loss_decreases_and_ema_follows():
    ds, norm = episodes()
    cfg = tiny_config()
    torch.manual_seed(0)
    model = DiffusionModel(cfg)
    obs, actions = normalised(windows(ds, cfg, list(range(0, 64, 2))), norm)
    losses, ema = _train(model, obs, actions, 150)
    first, last = np.mean(losses[:15]), np.mean(losses[-15:])
    assert last < 0.5 * first, (first, last)
    ema_w, live = ema.module.state_dict(), model.policy_stage_modules().state_dict()
    assert set(ema_w) == set(live)  # the keys policy.safetensors holds
    k = "unet.head.1.weight"
    assert not torch.equal(ema_w[k], live[k])  # a moving average, not a copy
    assert (ema_w[k] - live[k]).abs().max() < 0.5 * live[k].abs().max()
    evaluated = model.with_policy_weights(ema.module)  # what policy_report and the export evaluate
    assert torch.equal(evaluated.state_dict()[k], ema_w[k])


@pytest.mark.slow
def test_tiny_policy_overfits_a_few_trajectories():
    """DDPM training on 4 windows from 4 demonstrations; the EMA model's DDIM-10 chunks must
    reproduce them to < 30 mm mean position error, < 6 deg mean rotation error and < 10 mm mean
    gripper error (measured: 12.7 mm, 3.4 deg, 1.6 mm; untrained: 270 mm, 125 deg, 36 mm)."""
    ds, norm = episodes(n=4)
    cfg = tiny_config()
    per_episode = len(SyntheticWindows(ds, np.arange(1), obs_horizon=2, action_horizon=16, cameras=[]))
    data = windows(ds, cfg, [i * per_episode + 8 for i in range(4)])  # mid-motion windows
    obs, actions = normalised(data, norm)
    torch.manual_seed(0)
    model = DiffusionModel(cfg)

    def errors(m: DiffusionModel) -> tuple[float, float, float]:
        m.eval()
        pred = m.generate(obs, generator=torch.Generator().manual_seed(1))
        pred = norm.unnormalize_action(pred.double().numpy())
        true = data["action"].double().numpy()
        pos = np.linalg.norm(pred[..., :3] - true[..., :3], axis=-1).mean() * 1000
        rot = rotation_error_deg(pred[..., 3:9], true[..., 3:9]).mean()
        return pos, rot, np.abs(pred[..., 9] - true[..., 9]).mean() * 1000

    before = errors(model)
    big = {"state": obs["state"].repeat(16, 1, 1), "images": {}}
    _, ema = _train(model, big, actions.repeat(16, 1, 1), 1500)
    pos, rot, grip = errors(model.with_policy_weights(ema.module))
    print(f"overfit: before {before}, after pos {pos:.1f} mm, rot {rot:.2f} deg, gripper {grip:.1f} mm")
    assert pos < 30 and rot < 6 and grip < 10, (before, (pos, rot, grip))


# ----------------------------------------------------------------------------- configs
def test_shipped_configs_and_parameter_counts():
    for name, cams in (("diffusion_state", ()), ("diffusion_visual", ("wrist", "scene"))):
        cfg = DiffusionConfig.load(name)
        assert cfg.family == "diffusion" and cfg.unet.down_dims == (256, 512, 1024)
        assert cfg.noise.num_train_timesteps == 100 and cfg.noise.num_inference_steps == 10
        assert DiffusionConfig.from_dict(cfg.to_dict()) == cfg
        n = sum(p.numel() for p in DiffusionModel(cfg).parameters())
        assert 60e6 < n < 80e6, n  # DP-C with the published U-Net: 65.9M in the paper (state)
        assert cfg.encoder.used_cameras == cams


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key\(s\) in DiffusionConfig: \['unet_dims'\]"):
        DiffusionConfig.from_dict({"unet_dims": [1]})
    with pytest.raises(ValueError, match=r"unknown config key\(s\) in section 'noise': \['steps'\]"):
        DiffusionConfig.from_dict({"noise": {"steps": 3}})
    with pytest.raises(ValueError, match="sampler"):
        DiffusionConfig(noise=NoiseConfig(sampler="euler"))
    with pytest.raises(ValueError, match=r"horizon 16 must be divisible by 2\*\*5"):
        DiffusionConfig(unet=UNetConfig(down_dims=(32, 64, 128, 256, 512, 1024)))
    with pytest.raises(ValueError, match="n_groups"):
        DiffusionConfig(unet=UNetConfig(down_dims=(30, 60)))
    with pytest.raises(ValueError, match="family"):
        DiffusionConfig(family="carp")
    with pytest.raises(FileNotFoundError, match="diffusion_state"):
        DiffusionConfig.load(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- bad input
def test_bad_observations_raise_clear_errors():
    ds, norm = episodes("visual")
    cfg = tiny_config("visual")
    policy = DiffusionPolicy(cfg, norm)
    good = observation(windows(ds, cfg, [2]), 0)
    policy.predict(good)  # sanity: the unmodified observation works

    with pytest.raises(
        ValueError, match=r"state must have shape \(1, 10\) \(obs_horizon, state_dim\), got \(3, 10\)"
    ):
        policy.predict(Observation(state=np.zeros((3, 10)), images=good.images))
    with pytest.raises(ValueError, match=r"state must have shape"):
        policy.predict(Observation(state=np.zeros(9), images=good.images))
    nan_state = good.state.copy()
    nan_state[0, 4] = np.nan
    with pytest.raises(ValueError, match=r"not finite \(NaN/inf\) at step 0, dim r6d_1"):
        policy.predict(Observation(state=nan_state, images=good.images))
    with pytest.raises(ValueError, match="missing camera 'scene'"):
        policy.predict(Observation(state=good.state, images={"wrist": good.images["wrist"]}))
    wrong_size = {**good.images, "wrist": np.zeros((1, 30, 32, 3), np.uint8)}
    with pytest.raises(ValueError, match=r"camera 'wrist' image must have shape \(1, "):
        policy.predict(Observation(state=good.state, images=wrong_size))
    as_float = {**good.images, "scene": good.images["scene"].astype(np.float32)}
    with pytest.raises(ValueError, match="camera 'scene' image must be uint8"):
        policy.predict(Observation(state=good.state, images=as_float))
    with pytest.raises(ValueError, match=r"actions must be \(B, 16, 10\)"):
        policy.model.loss({"state": torch.zeros(2, 1, 10), "images": {}}, torch.zeros(2, 8, 10))
    with pytest.raises(TypeError, match="normalizer"):
        DiffusionPolicy(tiny_config())  # a policy without the stats it was trained with cannot exist
