"""ONNX export and the onnxruntime engine: parity with the torch policies, manifest checks, bad input.

Tiny CARP (state and visual) and DP-C models with random weights are exported once per module; every
check then runs the real graphs in onnxruntime's CPU provider.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from carp_policy.actions import Observation
from carp_policy.engine import ModelDirError, OnnxPolicy, sha256
from carp_policy.export import export_policy
from carp_policy.export import random_observation as _random_observation
from carp_policy.normalization import Normalizer
from carp_policy.policies.carp.configuration_carp import CarpConfig
from carp_policy.policies.carp.modeling_carp import CarpPolicy
from carp_policy.policies.diffusion.onnx_diffusion import diffusion_timesteps, scheduler_step

LO = np.array([0.2, -0.4, 0.0, -1, -1, -1, -1, -1, -1, 0.0])
HI = np.array([0.7, 0.4, 0.5, 1, 1, 1, 1, 1, 1, 0.085])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def _carp_cfg(kind: str) -> CarpConfig:
    enc = {"kind": "state", "obs_horizon": 2, "hidden": 32, "out_dim": 32}
    if kind == "visual":
        enc = {
            "kind": "visual",
            "obs_horizon": 1,
            "cameras": ["wrist", "scene"],
            "image_size": [40, 48],
            "crop_size": [32, 40],
            "resnet_width": 8,
            "keypoints": 4,
            "hidden": 32,
            "out_dim": 32,
        }
    return CarpConfig.from_dict(
        {
            "name": f"tiny_{kind}",
            "tokenizer": {"codebook_size": 32, "hidden": 8},
            "encoder": enc,
            "transformer": {"depth": 2, "width": 32, "heads": 2},
        }
    )


def _torch_tokens(policy: CarpPolicy, obs: Observation) -> list[np.ndarray]:
    """The greedy token maps the torch policy picks for ``obs``."""
    return policy.predict_with_tokens(obs)[1]


def _torch_dpc_ddim(policy, obs: Observation, noise: torch.Tensor) -> np.ndarray:
    """DP-C torch reference from a given initial noise (1, T, A): diffusers' DDIM, physical actions."""
    return policy.predict(obs, noise=noise[0].numpy(), sampler="ddim").actions


def _wake(params) -> None:
    """adaLN gates start at zero: give every all-zero tensor weight so every block matters."""
    with torch.no_grad():
        for p in params:
            if p.abs().sum() == 0:
                p.normal_(std=0.05)


def _carp_policy(kind: str, seed: int = 0) -> CarpPolicy:
    torch.manual_seed(seed)
    policy = CarpPolicy(_carp_cfg(kind), None, Normalizer(LO, HI, LO, HI))
    _wake(policy.model.parameters())
    return policy


def _dpc_policy():
    from carp_policy.policies.diffusion.modeling_diffusion import DiffusionConfig, DiffusionPolicy

    torch.manual_seed(0)
    cfg = DiffusionConfig.from_dict(
        {
            "name": "tiny_dpc",
            "encoder": {"kind": "state", "obs_horizon": 2, "hidden": 32, "out_dim": 32},
            "unet": {"down_dims": [16, 32], "kernel_size": 3, "n_groups": 8, "step_embed_dim": 16},
            "noise": {"sampler": "ddim", "num_inference_steps": 10},
        }
    )
    return DiffusionPolicy(cfg, Normalizer(LO, HI, LO, HI))


@pytest.fixture(scope="module")
def carp_state(tmp_path_factory):
    policy = _carp_policy("state")
    out = tmp_path_factory.mktemp("carp_state")
    return policy, out, export_policy(policy, out, fp16=True, parity_samples=4, verbose=False)


@pytest.fixture(scope="module")
def carp_visual(tmp_path_factory):
    policy = _carp_policy("visual")
    out = tmp_path_factory.mktemp("carp_visual")
    return policy, out, export_policy(policy, out, parity_samples=2, verbose=False)


@pytest.fixture(scope="module")
def dpc(tmp_path_factory):
    policy = _dpc_policy()
    out = tmp_path_factory.mktemp("dpc")
    return policy, out, export_policy(policy, out, parity_samples=2, verbose=False)


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("which", ["carp_state", "carp_visual"])
def test_carp_parity_same_tokens_and_actions(which, request):
    policy, out, manifest = request.getfixturevalue(which)
    assert manifest["parity"]["passed"] and manifest["parity"]["tokens_equal"]
    engine = OnnxPolicy(out, device="cpu", intra_op_threads=1)
    assert engine.obs_horizon == policy.obs_horizon and engine.cameras == policy.cameras
    rng = np.random.default_rng(123)
    distinct = set()
    for _ in range(6):
        obs = _random_observation(engine.spec, policy.normalizer, rng)
        chunk, tokens = engine.predict_with_tokens(obs)
        ref_tokens = _torch_tokens(policy, obs)
        assert [t.shape for t in tokens] == [(1, 10, k) for k in (1, 2, 3, 4)]
        for got, ref in zip(tokens, ref_tokens):
            np.testing.assert_array_equal(got, ref)
        ref = policy.predict(obs)
        assert chunk.actions.shape == (16, 10)
        # measured max |diff| 7e-7 with identical tokens: 1e-5 leaves a 14x margin
        np.testing.assert_allclose(chunk.actions, ref.actions, atol=1e-5, rtol=0)
        distinct.add(tuple(np.concatenate([t.ravel() for t in tokens])))
    assert len(distinct) > 1, "random observations should not all give the same tokens"


def test_carp_manifest_contents(carp_state):
    policy, out, m = carp_state
    assert m["family"] == "carp" and m["opset"] == 17
    assert m["observation"]["obs_horizon"] == 2 and m["observation"]["cameras"] == []
    assert [g["stage"] for g in m["graphs"]] == [
        "encoder + scale 1",
        "scale 2",
        "scale 3",
        "scale 4",
        "decoder",
    ]
    for g in m["graphs"]:
        assert g["sha256"] == sha256(out / g["file"])
    assert Normalizer.from_stats(m["normalization"]).action_max.tolist() == HI.tolist()
    assert CarpConfig.from_dict(m["config"]) == policy.config
    assert m["source_commit"] and m["export_date"]
    # fp16 is recorded either way, and kept exactly when every token matched fp32 on the test set
    fp16 = m["fp16"]
    assert fp16["used"] == (fp16["same_tokens"] == fp16["samples"]), fp16
    on_disk = sorted(out.glob("*_fp16.onnx"))
    if fp16["used"]:
        assert [out / g["file"] for g in fp16["graphs"]] == on_disk and len(on_disk) == 4
        assert OnnxPolicy(out, precision="fp16", intra_op_threads=1).precision == "fp16"
    else:
        assert not on_disk and "graphs" not in fp16 and fp16["reason"]
        with pytest.raises(ModelDirError, match="no fp16 graphs"):
            OnnxPolicy(out, precision="fp16")


@pytest.mark.parametrize("tokens, kept", [("differ", False), ("match", True)])
def test_fp16_graphs_are_kept_only_when_every_token_matches(tokens, kept, tmp_path, monkeypatch):
    """Both outcomes of the fp16 rule, forced: fp16 tokens one code off fp32 -> graphs deleted and the
    reason recorded; identical tokens -> graphs kept and runnable."""
    from carp_policy.policies.carp.export_carp import try_fp16

    policy = _carp_policy("state", seed=4)
    m = export_policy(policy, tmp_path, parity_samples=1, verbose=False)
    real = OnnxPolicy.predict_with_tokens

    def forced(self, obs):
        chunk, t = real(self, obs)
        if tokens == "match":
            return chunk, [np.zeros_like(x) for x in t]
        return chunk, [x + int(self.precision == "fp16") for x in t]

    monkeypatch.setattr(OnnxPolicy, "predict_with_tokens", forced)
    r = try_fp16(policy, tmp_path, m, 3, 0)
    assert r["used"] is kept and r["same_tokens"] == (3 if kept else 0), r
    assert len(list(tmp_path.glob("*_fp16.onnx"))) == (4 if kept else 0)
    if not kept:
        assert r["reason"] == "tokens differ from fp32 on 3/3 observations"


def test_dpc_parity_ddim(dpc):
    policy, out, m = dpc
    assert m["family"] == "diffusion" and m["parity"]["passed"]
    engine = OnnxPolicy(out, intra_op_threads=1)
    assert engine.runner.sampler == "ddim" and len(engine.runner.timesteps) == 10
    rng = np.random.default_rng(5)
    for i in range(3):
        obs = _random_observation(engine.spec, policy.normalizer, rng)
        noise = torch.randn(1, 16, 10, generator=torch.Generator().manual_seed(100 + i))
        ref = _torch_dpc_ddim(policy, obs, noise)
        got = engine.predict(obs, noise=noise[0].numpy()).actions
        # measured max |diff| 7.1e-6 (ten DDIM steps in float32): 5e-5 leaves a 7x margin
        np.testing.assert_allclose(got, ref, atol=5e-5, rtol=0)
    ddpm = OnnxPolicy(out, sampler="ddpm", intra_op_threads=1, warmup=0)
    assert len(ddpm.runner.timesteps) == 100
    chunk = ddpm.predict(obs)
    assert chunk.actions.shape == (16, 10) and np.all(np.isfinite(chunk.actions))


def test_numpy_scheduler_matches_diffusers():
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    ddim, ddpm = DDIMScheduler(**kw), DDPMScheduler(**kw)
    sched = {"num_train_timesteps": 100, "clip_sample": True, "clip_sample_range": 1.0, "steps_offset": 0}
    alphas = ddpm.alphas_cumprod.double().numpy()
    for steps in (10, 7, 100):
        ddim.set_timesteps(steps)
        np.testing.assert_array_equal(diffusion_timesteps(sched, "ddim", steps), ddim.timesteps.numpy())
    ddpm.set_timesteps(100)
    np.testing.assert_array_equal(diffusion_timesteps(sched, "ddpm", 100), ddpm.timesteps.numpy())
    g = torch.Generator().manual_seed(0)
    ddim.set_timesteps(10)
    for name, s, ts in (("ddim", ddim, ddim.timesteps), ("ddpm", ddpm, ddpm.timesteps)):
        for j in (0, 3, len(ts) - 1):
            t = int(ts[j])
            prev_t = int(ts[j + 1]) if j + 1 < len(ts) else -1
            x, eps = torch.randn(1, 16, 10, generator=g) * 2, torch.randn(1, 16, 10, generator=g)
            ref = s.step(eps, ts[j], x, generator=torch.Generator().manual_seed(7)).prev_sample
            # diffusers draws DDPM's variance noise as randn(shape) from the generator it is given
            vn = torch.randn(1, 16, 10, generator=torch.Generator().manual_seed(7)).numpy()[0]
            got = scheduler_step(sched, alphas, name, eps.numpy()[0], t, prev_t, x.numpy()[0], vn)
            # float32 rounding of values up to ~6: measured max |diff| 2.4e-7, 2e-6 leaves an 8x margin
            np.testing.assert_allclose(got, ref.numpy()[0], atol=2e-6, rtol=0)


# ----------------------------------------------------------------------------- CLI
def test_carp_export_cli_from_run_dir(tmp_path):
    policy = _carp_policy("state", seed=1)
    run = tmp_path / "run"
    run.mkdir()
    policy.config.save(run / "config.yaml")
    policy.normalizer.save(run / "normalization.json")
    sd = policy.model.state_dict()
    save_file({k: v for k, v in sd.items() if k.startswith("tokenizer.")}, str(run / "tokenizer.safetensors"))
    save_file(
        {k: v for k, v in sd.items() if not k.startswith("tokenizer.")}, str(run / "policy.safetensors")
    )
    out = tmp_path / "model"
    cmd = [
        sys.executable,
        "-m",
        "carp_policy.export",
        "--run",
        str(run),
        "--out",
        str(out),
        "--parity-samples",
        "2",
        "--coarse-decode",
        "expected",
    ]
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", **_env()}
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "parity" in res.stdout and "carp_scale4.onnx" in res.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["parity"]["passed"] and m["source_run"] == str(run.resolve())
    assert m["config"]["transformer"]["coarse_decode"] == "expected"  # the run's config said argmax
    policy.config.transformer.coarse_decode = "expected"
    obs = _random_observation(m["observation"], policy.normalizer, np.random.default_rng(0))
    # measured max |diff| 1e-7: 1e-6 leaves a 10x margin
    np.testing.assert_allclose(OnnxPolicy(out).predict(obs).actions, policy.predict(obs).actions, atol=1e-6)
    bad = subprocess.run(
        [sys.executable, "-m", "carp_policy.export", "--run", str(tmp_path / "nope"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    # a user's mistake: one line on stderr, exit code 2 (carp_policy.cli), no traceback
    assert (
        bad.returncode == 2
        and bad.stderr.startswith("carp-export: error: ")
        and "config.yaml missing" in bad.stderr
    )
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    # the head decode of a run trained without the head: refused with the reason
    nohead = subprocess.run(
        [*cmd[:-1], "head"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", **_env()},
    )
    assert nohead.returncode == 2 and "trained without a coarse head" in nohead.stderr, nohead.stderr[-500:]


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


# ----------------------------------------------------------------------------- load-time checks
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(d: Path, fn) -> None:
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def test_tampered_graph_is_refused(carp_state, tmp_path):
    d = _copy(carp_state[1], tmp_path / "m")
    f = d / "carp_scale3.onnx"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte inside the weights
    f.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match=r"carp_scale3.onnx: sha256 does not match"):
        OnnxPolicy(d)
    f.unlink()
    with pytest.raises(ModelDirError, match="missing"):
        OnnxPolicy(d)


def test_wrong_opset_is_refused(carp_state, tmp_path):
    import onnx

    d = _copy(carp_state[1], tmp_path / "m")
    _edit_manifest(d, lambda m: m.update(opset=18))
    with pytest.raises(ModelDirError, match="opset 18"):
        OnnxPolicy(d)
    # a graph whose own opset differs from the manifest's (checksums restamped, so only opset differs)
    d2 = _copy(carp_state[1], tmp_path / "m2")
    model = onnx.load(str(d2 / "carp_decoder.onnx"))
    model.opset_import[0].version = 16
    onnx.save(model, str(d2 / "carp_decoder.onnx"))
    _edit_manifest(d2, lambda m: m["graphs"][-1].update(sha256=sha256(d2 / "carp_decoder.onnx")))
    with pytest.raises(ModelDirError, match="graph opset 16 differs"):
        OnnxPolicy(d2)


def test_mismatched_observation_spec_is_refused(carp_state, carp_visual, tmp_path):
    d = _copy(carp_state[1], tmp_path / "m")
    _edit_manifest(d, lambda m: m["observation"].update(obs_horizon=1))
    with pytest.raises(ModelDirError, match="do not match the manifest's observation spec"):
        OnnxPolicy(d)
    d = _copy(carp_visual[1], tmp_path / "v")
    _edit_manifest(d, lambda m: m["observation"].update(image_size=[120, 160]))
    with pytest.raises(ModelDirError, match="observation spec"):
        OnnxPolicy(d)
    # a graph swapped for another one (checksum restamped): its inputs are not what the manifest says
    d = _copy(carp_state[1], tmp_path / "s")
    shutil.copy(d / "carp_scale2.onnx", d / "carp_scale3.onnx")
    _edit_manifest(d, lambda m: m["graphs"][2].update(sha256=sha256(d / "carp_scale3.onnx")))
    with pytest.raises(ModelDirError, match=r"carp_scale3\.onnx: inputs"):
        OnnxPolicy(d)


def test_cuda_request_without_cuda_provider_is_clear(carp_state):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        OnnxPolicy(carp_state[1], device="cuda")


# ----------------------------------------------------------------------------- bad input / output
def test_bad_observations_raise_like_the_torch_policy(carp_state, carp_visual):
    state_engine = OnnxPolicy(carp_state[1], intra_op_threads=1)
    good = np.tile((LO + HI) / 2, (2, 1))
    with pytest.raises(ValueError, match=r"shape \(2, 10\)"):
        state_engine.predict(Observation(state=good[0]))
    nan = good.copy()
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"not finite.*dim z"):
        state_engine.predict(Observation(state=nan))
    vis_policy, vis_dir, _ = carp_visual
    engine = OnnxPolicy(vis_dir, intra_op_threads=1)
    img = np.zeros((1, 40, 48, 3), np.uint8)
    state = ((LO + HI) / 2)[None]
    for images, pattern in (
        ({"wrist": img}, "missing camera 'scene'"),
        ({"wrist": img, "scene": np.zeros((1, 120, 160, 3), np.uint8)}, r"'scene' image must have shape"),
        ({"wrist": img, "scene": img.astype(np.float32)}, "must be uint8"),
    ):
        obs = Observation(state=state, images=images)
        with pytest.raises(ValueError, match=pattern):
            engine.predict(obs)
        with pytest.raises(ValueError, match=pattern):  # the torch policy says the same
            vis_policy.predict(obs)


def test_environment_state_policy_exports_and_checks_env_state(tmp_path):
    """A state policy that also sees the scene state (object poses): the ONNX graph takes robot +
    environment state, the manifest names both, and an observation without it is refused."""
    cfg = _carp_cfg("state")
    cfg.encoder.env_state_dim = 3
    env_lo, env_hi = np.array([-0.6, -0.3, 0.0]), np.array([-0.3, 0.3, 0.1])
    names = [f"s{i}" for i in range(10)] + ["object_x", "object_y", "object_z"]
    norm = Normalizer(np.r_[LO, env_lo], np.r_[HI, env_hi], LO, HI, state_names=names)
    torch.manual_seed(1)
    policy = CarpPolicy(cfg, None, norm)
    _wake(policy.model.parameters())
    manifest = export_policy(policy, tmp_path, parity_samples=4, verbose=False)
    spec = manifest["observation"]
    assert spec["state_dim"] == 10 and spec["env_state_dim"] == 3
    assert spec["env_state_names"] == ["object_x", "object_y", "object_z"]
    assert manifest["graphs"][0]["inputs"]["state"]["shape"] == [1, 2, 13]
    engine = OnnxPolicy(tmp_path, intra_op_threads=1)
    rng = np.random.default_rng(5)
    outs = []
    for _ in range(4):
        obs = _random_observation(engine.spec, norm, rng)
        assert obs.state.shape == (2, 10) and obs.env_state.shape == (2, 3)
        chunk = engine.predict(obs)
        # measured max |diff| 1.4e-7: 1e-6 leaves a 7x margin
        np.testing.assert_allclose(chunk.actions, policy.predict(obs).actions, atol=1e-6, rtol=0)
        outs.append(chunk.actions)
    # the environment state is an input that matters: moving only the object changes the chunk
    moved = Observation(state=obs.state, env_state=obs.env_state + np.array([0.2, -0.3, 0.0]))
    assert np.abs(engine.predict(moved).actions - outs[-1]).max() > 1e-6
    for bad, pattern in (
        (Observation(state=obs.state), "needs observation.env_state"),
        (Observation(state=obs.state, env_state=obs.env_state[:, :2]), r"env_state must have shape \(2, 3\)"),
        (Observation(state=obs.state, env_state=np.full((2, 3), np.nan)), "env_state is not finite"),
    ):
        with pytest.raises(ValueError, match=pattern):
            engine.predict(bad)
        with pytest.raises(ValueError, match=pattern):
            policy.predict(bad)


@pytest.mark.parametrize(
    "family, frame", [("carp", "relative"), ("dpc", "relative"), ("carp", "relative_xy")]
)
def test_relative_frame_policy_exports_with_parity(family, frame, tmp_path):
    """A relative-frame policy (chunk offsets from the TCP, scene positions from the TCP): the engine
    applies the same frame change as torch on both sides of the graphs, and the chunk it returns is
    in the base frame, following the TCP it was computed from."""
    names = [*(f"s{i}" for i in range(3)), *(f"r{i}" for i in range(6)), "gripper", "object_x", "object_y"]
    names[:3] = ["x", "y", "z"]
    rel_lo, rel_hi = np.array([-0.3, -0.3, -0.2]), np.array([0.3, 0.3, 0.2])
    a_lo, a_hi = np.r_[rel_lo, LO[3:]], np.r_[rel_hi, HI[3:]]
    norm = Normalizer(np.r_[LO, -0.5, -0.5], np.r_[HI, 0.5, 0.5], a_lo, a_hi, names, frame=frame)
    torch.manual_seed(3)
    if family == "carp":
        cfg = _carp_cfg("state")
        cfg.encoder.env_state_dim, cfg.frame = 2, frame
        policy = CarpPolicy(cfg, None, norm)
        params = policy.model.parameters()
    else:
        policy = _dpc_policy()
        policy.config.encoder.env_state_dim, policy.config.frame = 2, frame
        policy = type(policy)(policy.config, norm)
        params = policy.model.parameters()
    _wake(params)
    manifest = export_policy(policy, tmp_path, parity_samples=2, verbose=False)
    assert manifest["normalization"]["frame"] == frame
    engine = OnnxPolicy(tmp_path, intra_op_threads=1)
    state = np.tile(np.r_[0.4, 0.1, 0.3, 1, 0, 0, 0, -1, 0, 0.08], (2, 1))
    noise = np.random.default_rng(0).standard_normal((16, 10)).astype(np.float32)

    def both(obs: Observation) -> tuple[np.ndarray, np.ndarray]:
        if family == "carp":
            return engine.predict(obs).actions, policy.predict(obs).actions
        ref = _torch_dpc_ddim(policy, obs, torch.from_numpy(noise)[None])
        return engine.predict(obs, noise=noise).actions, ref

    obs = Observation(state=state, env_state=np.tile([0.5, 0.0], (2, 1)))
    chunk, ref = both(obs)
    # measured max |diff| 8.2e-6 (DP-C) and 1e-7 (CARP): 5e-5 leaves a 6x margin
    np.testing.assert_allclose(chunk, ref, atol=5e-5, rtol=0)
    # TCP and object moved together: the scene input in the frame is unchanged, the chunk's base
    # frame origin moves with the TCP (engine and torch agree on where)
    d = np.array([0.05, -0.04, 0.0])
    moved = Observation(state=state + np.r_[d, [0] * 7], env_state=obs.env_state + d[:2])
    moved_chunk, moved_ref = both(moved)
    np.testing.assert_allclose(moved_chunk, moved_ref, atol=5e-5, rtol=0)
    scene = lambda o: engine.normalizer.state_to_frame(np.c_[o.state, o.env_state])[:, 10:]  # noqa: E731
    np.testing.assert_allclose(scene(moved), scene(obs))
    assert np.abs(moved_chunk[:, :3] - chunk[:, :3]).max() > 1e-3


def test_visual_carp_with_layer3_keypoints_and_aux_head_exports_with_parity(tmp_path):
    """encoder.trunk_stages=3 and transformer.aux_weight > 0 (the training-only head): the graphs
    hold the shorter trunk and no head, and the engine matches torch token for token."""
    import onnx

    cfg = _carp_cfg("visual")
    cfg.encoder.trunk_stages, cfg.transformer.aux_weight = 3, 1.0
    torch.manual_seed(5)
    policy = CarpPolicy(cfg, None, Normalizer(LO, HI, LO, HI))
    _wake(policy.model.parameters())
    manifest = export_policy(policy, tmp_path, parity_samples=2, verbose=False)
    assert manifest["parity"]["passed"] and manifest["parity"]["tokens_equal"]
    names = [i.name for f in tmp_path.glob("*.onnx") for i in onnx.load(str(f)).graph.initializer]
    assert names and not any("aux_head" in n or "layer4" in n for n in names)
    engine = OnnxPolicy(tmp_path, intra_op_threads=1)
    obs = _random_observation(engine.spec, policy.normalizer, np.random.default_rng(7))
    chunk, tokens = engine.predict_with_tokens(obs)
    for got, ref in zip(tokens, _torch_tokens(policy, obs)):
        np.testing.assert_array_equal(got, ref)
    np.testing.assert_allclose(chunk.actions, policy.predict(obs).actions, atol=1e-5, rtol=0)


def _decode_differs_from_argmax(policy, engine, decode: str, seed: int, check=None) -> int:
    """On four random observations the engine's tokens and chunk match the torch policy's under
    ``coarse_decode = decode`` (``check(tokens)`` on torch's tokens, if given); returns on how many of
    them torch's argmax decode picks other scale-1 tokens."""
    rng = np.random.default_rng(seed)
    differs = 0
    for _ in range(4):
        obs = _random_observation(engine.spec, policy.normalizer, rng)
        chunk, tokens = engine.predict_with_tokens(obs)
        ref = _torch_tokens(policy, obs)
        for got, want in zip(tokens, ref):
            np.testing.assert_array_equal(got, want)
        if check is not None:
            check(ref)
        np.testing.assert_allclose(chunk.actions, policy.predict(obs).actions, atol=1e-5, rtol=0)
        policy.config.transformer.coarse_decode = "argmax"
        differs += int(not np.array_equal(_torch_tokens(policy, obs)[0], ref[0]))
        policy.config.transformer.coarse_decode = decode
    return differs


def test_expected_coarse_decode_is_in_the_graphs(tmp_path):
    """transformer.coarse_decode = "expected": the exported graphs pick the scale-1 tokens as torch
    does (the code nearest the codebook's mean under the softmax), not the argmax."""
    policy = _carp_policy("state", seed=6)
    policy.config.transformer.coarse_decode = "expected"
    manifest = export_policy(policy, tmp_path, parity_samples=2, verbose=False)
    assert manifest["parity"]["passed"] and manifest["parity"]["tokens_equal"]
    engine = OnnxPolicy(tmp_path, intra_op_threads=1)
    # the graphs do not merely match torch where both decodes agree
    assert _decode_differs_from_argmax(policy, engine, "expected", seed=8) > 0


@pytest.mark.parametrize(("anchor", "gripper"), [(False, False), (True, False), (True, True)])
def test_head_coarse_decode_is_in_the_graphs(tmp_path, anchor, gripper):
    """transformer.coarse_decode = "head": the exported graphs run the coarse head and pick the
    scale-1 x, y, z codes (and the gripper's, with coarse_head_gripper) as torch does (the seen code
    with the nearest profile), not the argmax; an anchored head reads the current pose, an extra
    input of the first graph that the engine fills from the observation."""
    torch.manual_seed(7)
    cfg = _carp_cfg("state")
    cfg.transformer.coarse_head_weight, cfg.transformer.coarse_decode = 1.0, "head"
    cfg.transformer.coarse_head_anchor, cfg.transformer.coarse_head_gripper = anchor, gripper
    policy = CarpPolicy(cfg, None, Normalizer(LO, HI, LO, HI))
    _wake(policy.model.parameters())
    with torch.no_grad():  # as if training had seen a third of the codes at scale 1
        policy.model.coarse_head.seen[:, ::3] = 1.0
    manifest = export_policy(policy, tmp_path, parity_samples=2, verbose=False)
    assert manifest["parity"]["passed"] and manifest["parity"]["tokens_equal"]
    assert ("action_now" in manifest["graphs"][0]["inputs"]) == anchor
    engine = OnnxPolicy(tmp_path, intra_op_threads=1)

    def seen_only(tokens: list[np.ndarray]) -> None:
        assert np.all(tokens[0][0, list(policy.model.coarse_dims), 0] % 3 == 0)

    assert _decode_differs_from_argmax(policy, engine, "head", seed=9, check=seen_only) > 0
    # the same weights exported with argmax read no pose: the graph has no such input
    policy.config.transformer.coarse_decode = "argmax"
    argmax = export_policy(policy, tmp_path / "argmax", parity_samples=1, verbose=False)
    assert argmax["parity"]["passed"] and "action_now" not in argmax["graphs"][0]["inputs"]


def test_nan_output_is_refused(tmp_path):
    policy = _carp_policy("state", seed=2)
    with torch.no_grad():
        policy.model.tokenizer.decoder[-1].bias[0] = float("nan")  # dimension x of every step
    # parity_samples=0: the torch policy refuses this chunk too, so there is nothing to compare
    export_policy(policy, tmp_path, parity_samples=0, verbose=False)
    engine = OnnxPolicy(tmp_path, intra_op_threads=1)
    obs = Observation(state=np.tile((LO + HI) / 2, (2, 1)))
    with pytest.raises(ValueError, match=r"not finite \(NaN/inf\) at step 0, dim x: chunk refused"):
        engine.predict(obs)


def test_a_parity_check_of_zero_samples_is_no_pass(tmp_path):
    """Zero samples compare nothing: check_parity refuses them, the manifest of an export asked not
    to check says so (passed None, no fp16), and carp-export refuses --parity-samples 0."""
    from carp_policy.export import check_parity, main

    policy = _carp_policy("state", seed=2)
    m = export_policy(policy, tmp_path, parity_samples=0, fp16=True, verbose=False)
    assert m["parity"]["passed"] is None and m["fp16"]["used"] is False
    with pytest.raises(ValueError, match="at least 1 sample"):
        check_parity(policy, tmp_path, 0, 0)
    with pytest.raises(SystemExit) as e:
        main(["--run", str(tmp_path), "--out", str(tmp_path / "x"), "--parity-samples", "0"])
    assert e.value.code == 2


def test_batched_export_runs_the_shift_ensemble_in_one_pass(tmp_path):
    """A CARP policy with a 3 x 3 shift ensemble exports its graphs at batch 9: each row of one pass
    matches the torch policy, a lone observation gives the batch-1 export's chunk, and the ensemble
    over the batched engine equals the ensemble run one copy at a time."""
    from carp_policy.policies.base import EnsembleConfig
    from carp_policy.policies.ensemble import ShiftEnsemble

    cfg = _carp_cfg("state")
    cfg.encoder.env_state_dim, cfg.train.shift_augment = 3, 0.03
    cfg.ensemble = EnsembleConfig(grid=3, radius=0.02)
    names = ["x", "y", "z", *(f"r6d_{i}" for i in range(6)), "gripper", "object_x", "object_y", "object_z"]
    env_lo, env_hi = np.array([0.3, -0.3, 0.0]), np.array([0.6, 0.3, 0.1])
    norm = Normalizer(np.r_[LO, env_lo], np.r_[HI, env_hi], LO, HI, state_names=names)
    torch.manual_seed(4)
    policy = CarpPolicy(cfg, None, norm)
    _wake(policy.model.parameters())
    manifest = export_policy(policy, tmp_path / "b9", parity_samples=2, verbose=False)
    assert manifest["batch"] == 9 and manifest["parity"]["passed"] and manifest["parity"]["batch"] == 9
    assert manifest["graphs"][0]["inputs"]["state"]["shape"] == [9, 2, 13]
    export_policy(policy, tmp_path / "b1", parity_samples=1, verbose=False, batch=1)
    b9, b1 = OnnxPolicy(tmp_path / "b9", intra_op_threads=1), OnnxPolicy(tmp_path / "b1", intra_op_threads=1)
    assert (b9.batch, b1.batch) == (9, 1)
    rng = np.random.default_rng(7)
    obs = [_random_observation(b9.spec, norm, rng) for _ in range(3)]
    for o, chunk in zip(obs, b9.predict_batch(obs)):  # a part-filled batch: the other rows are unused
        np.testing.assert_allclose(chunk.actions, b1.predict(o).actions, atol=1e-5, rtol=0)
    np.testing.assert_allclose(b9.predict(obs[0]).actions, b1.predict(obs[0]).actions, atol=1e-5, rtol=0)
    one_pass = ShiftEnsemble(b9, cfg.ensemble).predict(obs[1]).actions
    one_by_one = ShiftEnsemble(b1, cfg.ensemble).predict(obs[1]).actions
    np.testing.assert_allclose(one_pass, one_by_one, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"1\.\.9 observations"):
        b9.predict_batch(obs * 4)
    with pytest.raises(ValueError, match="1 for DP-C"):
        export_policy(_dpc_policy(), tmp_path / "dpc", verbose=False, batch=9)


def test_multi_task_policy_exports_a_task_input_and_needs_a_task(tmp_path):
    """A multi-task CARP (``encoder.tasks``): the encoder graph takes the task index, parity holds
    for every task, the task changes the chunk, and a model run without a task (or with one it was
    not trained on) is refused by name."""
    cfg = _carp_cfg("state")
    cfg.encoder.tasks = ("cup", "bowl")
    torch.manual_seed(2)
    policy = CarpPolicy(cfg, None, Normalizer(LO, HI, LO, HI))
    _wake(policy.model.parameters())  # the zero-initialised task rows too: the tasks differ
    manifest = export_policy(policy, tmp_path, parity_samples=4, verbose=False)
    assert manifest["contract"]["tasks"] == manifest["observation"]["tasks"] == ["cup", "bowl"]
    assert manifest["parity"]["passed"] and manifest["parity"]["tasks"] == ["cup", "bowl"]
    assert manifest["graphs"][0]["inputs"]["task"] == {"shape": [1], "dtype": "int64"}
    engine = OnnxPolicy(tmp_path, intra_op_threads=1)
    obs = _random_observation(engine.spec, policy.normalizer, np.random.default_rng(3))
    with pytest.raises(ValueError, match=r"multi-task model \(cup, bowl\): select the task"):
        engine.predict(obs)
    chunks = {}
    for task in ("cup", "bowl"):
        engine.select_task(task)
        policy.select_task(task)
        chunks[task] = engine.predict(obs).actions
        # measured max |diff| ~2e-7 (the export's parity): 1e-6 leaves a margin
        np.testing.assert_allclose(chunks[task], policy.predict(obs).actions, atol=1e-6, rtol=0)
    assert np.abs(chunks["cup"] - chunks["bowl"]).max() > 1e-6
    with pytest.raises(ValueError, match=r"trained for the tasks \['cup', 'bowl'\], not 'pour'"):
        engine.select_task("pour")
    # carp-eval selects the task it runs (a variant is its task) and refuses one the model lacks
    from carp_bringup.evaluate import EvalConfig
    from carp_bringup.evaluate import load_policy as eval_load

    loaded = eval_load(str(tmp_path), cfg=EvalConfig(task="bowl_beyond"))
    assert loaded.processor.task_index == 1
    np.testing.assert_allclose(loaded.predict(obs).actions, chunks["bowl"], atol=1e-6, rtol=0)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["config"]["encoder"]["tasks"] = ["cup", "pour"]  # a model of two other tasks
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"is a multi-task model for \['cup', 'pour'\], not 'bowl'"):
        eval_load(str(tmp_path), cfg=EvalConfig(task="bowl"))


def test_task_selection_of_single_task_models_and_families_without_multi_task():
    """A single-task model accepts only its own task; only CARP builds a multi-task model."""
    from carp_policy.policies.coa.configuration_coa import CoaConfig

    cfg = _carp_cfg("state")
    cfg.task = "cup"
    policy = CarpPolicy(cfg, None, Normalizer(LO, HI, LO, HI))
    policy.select_task("cup")
    with pytest.raises(ValueError, match="is a model for task 'cup', not 'bowl'"):
        policy.select_task("bowl")
    with pytest.raises(ValueError, match="not built for the coa family"):
        CoaConfig.from_dict({"encoder": {"tasks": ["cup", "bowl"]}})
    with pytest.raises(ValueError, match="distinct task names"):
        CarpConfig.from_dict({"encoder": {"tasks": ["cup", "cup"]}})
    with pytest.raises(ValueError, match=r"task 'pour' is not one of encoder\.tasks"):
        CarpConfig.from_dict({"task": "pour", "encoder": {"tasks": ["cup", "bowl"]}})
