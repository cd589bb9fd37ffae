"""ONNX export of a trained policy: ``carp-export --run RUN_DIR --out MODEL_DIR [--fp16]``.

A model directory holds the graphs, ``manifest.json`` and nothing else; ``carp_policy.engine.OnnxPolicy``
runs it with onnxruntime (no torch needed on the robot PC).

CARP (K scales, 4 by default) becomes K + 1 graphs with fully static shapes. The batch is 1, or the
config's shift-ensemble size (``ensemble.grid`` squared), so the engine runs the shifted copies of
one observation in one pass (``OnnxPolicy.predict_batch``) instead of one pass each:

    carp_obs.onnx      state, image_<cam>           -> cond, tokens, f_hat_out, x_next, present_k/v
                       (observation encoder + scale 1: start tokens, K/V of scale 1, greedy argmax,
                        the tokenizer's accumulation and the next scale's input)
    carp_scale<i>.onnx cond, x_in, f_hat, past_k/v  -> tokens, f_hat_out, x_next, present_k/v
                       (i = 2..K; the last scale has no x_next)
    carp_decoder.onnx  f_hat                        -> actions (normalised, (1, H, D))

Why one graph per scale rather than one reused graph: the scale step differs between scales in more
than the K/V length (the slice of position embeddings, the tokenizer's interpolation matrices and
phi_k conv, the length of the next input), so one graph would need dynamic shapes and a data-driven
choice of weights. Four static graphs let onnxruntime fold every constant and pre-plan memory; the
transformer weights are stored four times, which costs < 7 MB for the shipped configs. Greedy argmax
is inside the graphs, so tokens and K/V never leave the device between steps.

Un-normalisation and the rot6d re-orthonormalisation stay in numpy (the same functions the torch
policy calls), so ONNX and torch share that code exactly.

DP-C becomes two graphs: ``dpc_obs.onnx`` (state, image_<cam> -> cond) and ``dpc_denoise.onnx``
(sample, timestep, cond -> eps), called in a loop by the engine with the DDIM/DDPM update done in
numpy from the scheduler's ``alphas_cumprod`` saved in the manifest (so the robot PC needs no
diffusers).

The manifest records the policy family, the config, the observation spec, the normalisation stats,
the opset, per-file sha256, the source commit, the export date and parity results (torch vs ONNX on
random observations, run at export time).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from carp_policy.actions import Observation
from carp_policy.carp import CarpModel, CarpPolicy
from carp_policy.engine import MANIFEST, sha256
from carp_policy.factory import load_torch_policy
from carp_policy.normalization import Normalizer

OPSET = 17
FORMAT_VERSION = 1
PARITY_TOL = 1e-4  # max |action difference| (physical units) accepted between torch and ONNX in fp32


# ----------------------------------------------------------------------------- graph wrappers
class _CarpObsGraph(nn.Module):
    """Observation encoder + scale 1 (see the module docstring for inputs and outputs)."""

    def __init__(self, model: CarpModel, cameras: tuple[str, ...], half: bool = False) -> None:
        super().__init__()
        self.model, self.cameras, self.half_ = model, cameras, half

    def forward(self, state: torch.Tensor, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m, tok, gpt = self.model, self.model.tokenizer, self.model.gpt
        dt = torch.float16 if self.half_ else torch.float32
        if not hasattr(m.encoder, "trunks"):  # the state MLP runs in the graph's precision
            state = state.to(dt)
        cond = m.encoder({"state": state, "images": dict(zip(self.cameras, images))}).to(dt)  # (1, E)
        B = cond.shape[0]
        past_k, past_v = gpt.empty_cache(B)
        logits, k, v = gpt.step(gpt.start_tokens(cond), cond, past_k.to(dt), past_v.to(dt))  # (1, D, V)
        idx = logits.argmax(dim=-1).view(B, tok.D, tok.scales[0])  # greedy, on the device
        f_hat, nxt = tok.next_input(0, cond.new_zeros(B, tok.D * tok.C, tok.L), idx)
        outs = [cond, idx, f_hat] + ([nxt] if len(tok.scales) > 1 else []) + [k, v]
        return tuple(o if o.dtype == torch.int64 else o.float() for o in outs)


class _CarpScaleGraph(nn.Module):
    """Scale ``si`` (>= 1) with past keys/values in and present keys/values out."""

    def __init__(self, model: CarpModel, si: int, half: bool = False) -> None:
        super().__init__()
        self.model, self.si, self.half_ = model, si, half

    def forward(
        self,
        cond: torch.Tensor,
        x_in: torch.Tensor,
        f_hat: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        tok, gpt, si = self.model.tokenizer, self.model.gpt, self.si
        if self.half_:
            cond, x_in, f_hat, past_k, past_v = (t.half() for t in (cond, x_in, f_hat, past_k, past_v))
        B = cond.shape[0]
        logits, k, v = gpt.step(gpt.word_embed(x_in), cond, past_k, past_v)  # (1, D*k, V)
        idx = logits.argmax(dim=-1).view(B, tok.D, tok.scales[si])
        f_hat, nxt = tok.next_input(si, f_hat, idx)
        outs = [idx, f_hat] + ([nxt] if si + 1 < len(tok.scales) else []) + [k, v]
        return tuple(o if o.dtype == torch.int64 else o.float() for o in outs)


class _CarpDecoderGraph(nn.Module):
    """f_hat (1, D*C, L) -> normalised actions (1, H, D)."""

    def __init__(self, model: CarpModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.model.tokenizer.decode_features(f_hat)


class _DpcObsGraph(nn.Module):
    """DP-C observation encoder: state, images -> cond (1, E)."""

    def __init__(self, policy: nn.Module, cameras: tuple[str, ...]) -> None:
        super().__init__()
        self.policy, self.cameras = policy, cameras

    def forward(self, state: torch.Tensor, *images: torch.Tensor) -> torch.Tensor:
        return self.policy.encode_obs(state, dict(zip(self.cameras, images)))


class _DpcDenoiseGraph(nn.Module):
    """One U-Net evaluation: sample (1, T, A), timestep (1,) int64, cond (1, E) -> eps (1, T, A)."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.policy.denoise_step(sample, timestep, cond)


# ----------------------------------------------------------------------------- helpers
def source_commit() -> str:
    """The git commit this package is installed from (suffix ``-dirty`` if modified), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", str(here)],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _dtype_name(t: torch.Tensor) -> str:
    return {torch.float32: "float32", torch.int64: "int64", torch.uint8: "uint8"}[t.dtype]


def _export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    path: Path,
) -> dict[str, Any]:
    """Export one static-shape graph with the legacy exporter; return its manifest entry."""
    module.eval()
    with torch.no_grad():
        outs = module(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if len(outs) != len(output_names):
        raise RuntimeError(f"{path.name}: {len(outs)} outputs but {len(output_names)} names")
    export_kw: dict[str, Any] = dict(
        input_names=input_names, output_names=output_names, opset_version=OPSET, do_constant_folding=True
    )
    # the legacy TorchScript exporter: works on torch 2.11 and 2.14, needs no onnxscript; older torch
    # versions have no `dynamo` argument and use it anyway
    with warnings.catch_warnings():  # tracer warnings about shapes as Python ints: static by design
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, **export_kw)
        except TypeError:
            torch.onnx.export(module, args, str(path), **export_kw)
    return {
        "file": path.name,
        "inputs": {n: {"shape": list(a.shape), "dtype": _dtype_name(a)} for n, a in zip(input_names, args)},
        "outputs": {n: {"shape": list(o.shape), "dtype": _dtype_name(o)} for n, o in zip(output_names, outs)},
        "precision": "fp32",
    }


def observation_spec(encoder_cfg: Any, state_names: list[str] | None = None) -> dict[str, Any]:
    """What the node must feed: state layout, obs horizon, cameras and image size.

    state_names: the training data's names of the policy's state vector (robot state, then the
    environment state if the policy uses one)."""
    from carp_policy.actions import STATE_NAMES

    cams = list(encoder_cfg.cameras) if encoder_cfg.kind == "visual" else []
    S, E = encoder_cfg.state_dim, encoder_cfg.env_state_dim
    names = list(state_names) if state_names and len(state_names) == S + E else None
    env_names = names[S:] if names else [f"env_{i}" for i in range(E)]
    return {
        "obs_horizon": encoder_cfg.obs_horizon,
        "state_dim": S,
        "state_names": STATE_NAMES[:S],
        "state_units": "x, y, z in m (robot base frame); rotation6d; gripper opening in m",
        # appended to the state inside the graph input "state" (obs_horizon, state_dim + env_state_dim)
        "env_state_dim": E,
        "env_state_names": env_names,
        "cameras": cams,
        "image_size": list(encoder_cfg.image_size) if cams else None,
        "image_format": "uint8 RGB, (obs_horizon, H, W, 3), oldest first" if cams else None,
    }


def _random_observation(
    spec: dict[str, Any], normalizer: Normalizer, rng: np.random.Generator
) -> Observation:
    """A random but plausible observation: state inside the normalisation range, random images."""
    O, S, E = spec["obs_horizon"], spec["state_dim"], spec.get("env_state_dim", 0)
    lo, hi = normalizer.state_min, normalizer.state_max
    full = lo + (hi - lo) * rng.uniform(-0.1, 1.1, size=(O, S + E))
    images = {}
    for cam in spec["cameras"]:
        H, W = spec["image_size"]
        images[cam] = rng.integers(0, 256, size=(O, H, W, 3), dtype=np.uint8)
    env = full[:, S:] if E else None
    return Observation(state=full[:, :S], images=images, timestamp=0.0, env_state=env)


def _example_inputs(spec: dict[str, Any], batch: int = 1) -> tuple[list[torch.Tensor], list[str]]:
    O, S = spec["obs_horizon"], spec["state_dim"] + spec.get("env_state_dim", 0)
    args, names = [torch.zeros(batch, O, S)], ["state"]
    for cam in spec["cameras"]:
        H, W = spec["image_size"]
        args.append(torch.zeros(batch, O, H, W, 3, dtype=torch.uint8))
        names.append(f"image_{cam}")
    return args, names


# ----------------------------------------------------------------------------- CARP
def _export_carp_graphs(
    model: CarpModel, spec: dict[str, Any], out: Path, half: bool, suffix: str, batch: int = 1
) -> list[dict]:
    """Write the K encoder/scale graphs into ``out`` (static batch ``batch``); return their manifest
    entries in run order."""
    tok, gpt = model.tokenizer, model.gpt
    D, C, L, K = tok.D, tok.C, tok.L, len(tok.scales)
    cams = tuple(spec["cameras"])
    if half:
        # a half copy: rounding the caller's weights through fp16 would change the fp32 policy
        model = copy.deepcopy(model).half()  # integer buffers (code offsets, ids) stay int64
        enc = model.encoder
        if hasattr(enc, "trunks"):
            # visual: the ResNet trunks (nearly all the FLOPs) in half; the spatial-softmax heads and
            # the fusion MLP stay fp32 (the exporter cannot build a half-precision arange grid)
            enc.heads.float()
            enc.fuse.float()
            for trunk in enc.trunks.values():  # the encoder makes float32 frames itself: cast here
                trunk.register_forward_pre_hook(lambda _m, a: tuple(x.half() for x in a))
            for head in enc.heads.values():
                head.register_forward_pre_hook(lambda _m, a: tuple(x.float() for x in a))
    entries = []
    obs_args, obs_names = _example_inputs(spec, batch)
    B = batch
    kv = ["present_k", "present_v"]
    nxt = ["x_next"] if K > 1 else []
    entries.append(
        _export_graph(
            _CarpObsGraph(model, cams, half),
            tuple(obs_args),
            obs_names,
            ["cond", "tokens", "f_hat_out", *nxt, *kv],
            out / f"carp_obs{suffix}.onnx",
        )
    )
    entries[-1]["stage"] = "encoder + scale 1"
    c = gpt.cfg
    hd = c.width // c.heads
    for si in range(1, K):
        t_past = D * sum(tok.scales[:si])
        args = (
            torch.zeros(B, model.encoder.cfg.out_dim),
            torch.zeros(B, D * tok.scales[si], C),
            torch.zeros(B, D * C, L),
            torch.zeros(c.depth, B, c.heads, t_past, hd),
            torch.zeros(c.depth, B, c.heads, t_past, hd),
        )
        names = ["tokens", "f_hat_out"] + (["x_next"] if si + 1 < K else []) + kv
        entries.append(
            _export_graph(
                _CarpScaleGraph(model, si, half),
                args,
                ["cond", "x_in", "f_hat", "past_k", "past_v"],
                names,
                out / f"carp_scale{si + 1}{suffix}.onnx",
            )
        )
        entries[-1]["stage"] = f"scale {si + 1}"
    return entries


def _export_carp_decoder(model: CarpModel, out: Path, batch: int = 1) -> dict:
    tok = model.tokenizer
    e = _export_graph(
        _CarpDecoderGraph(model),
        (torch.zeros(batch, tok.D * tok.C, tok.L),),
        ["f_hat"],
        ["actions"],
        out / "carp_decoder.onnx",
    )
    e["stage"] = "decoder"
    return e


# ----------------------------------------------------------------------------- DP-C
def _scheduler_spec(policy: Any) -> dict[str, Any]:
    """The DDPM/DDIM constants the engine's numpy update needs, checked against what it implements."""
    ddpm, ddim = policy.ddpm.config, policy.ddim.config
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
    n = policy.config.noise
    policy.ddim.set_timesteps(n.num_inference_steps)
    return {
        "num_train_timesteps": ddpm.num_train_timesteps,
        "alphas_cumprod": policy.ddpm.alphas_cumprod.double().tolist(),
        "clip_sample": bool(ddpm.clip_sample),
        "clip_sample_range": float(ddpm.clip_sample_range),
        "steps_offset": int(ddim.steps_offset),
        "timestep_spacing": "leading",
        "sampler": n.sampler,
        "num_inference_steps": n.num_inference_steps,
        "ddim_timesteps": policy.ddim.timesteps.tolist(),  # for reference; the engine recomputes them
    }


def _export_dpc_graphs(policy: Any, spec: dict[str, Any], out: Path) -> list[dict]:
    cams = tuple(spec["cameras"])
    obs_args, obs_names = _example_inputs(spec)
    e1 = _export_graph(_DpcObsGraph(policy, cams), tuple(obs_args), obs_names, ["cond"], out / "dpc_obs.onnx")
    e1["stage"] = "encoder"
    args = (
        torch.zeros(1, policy.horizon, policy.action_dim),
        torch.zeros(1, dtype=torch.int64),
        torch.zeros(1, policy.config.encoder.out_dim),
    )
    e2 = _export_graph(
        _DpcDenoiseGraph(policy), args, ["sample", "timestep", "cond"], ["eps"], out / "dpc_denoise.onnx"
    )
    e2["stage"] = "denoising step"
    return [e1, e2]


# ----------------------------------------------------------------------------- loading runs
# ----------------------------------------------------------------------------- export
def export_policy(
    policy: Any,
    out_dir: str | Path,
    fp16: bool = False,
    parity_samples: int = 8,
    seed: int = 0,
    source: str = "",
    verbose: bool = True,
    batch: int | None = None,
) -> dict[str, Any]:
    """Export a torch policy (CarpPolicy or DiffusionPolicy) into ``out_dir``; return the manifest.

    batch: the graphs' static batch (CARP only). Default: the config's shift-ensemble size
    (``ensemble.grid`` squared), so the engine runs the whole ensemble in one pass of the graphs;
    a single observation then fills every row (``OnnxPolicy.predict``).

    fp32 graphs always; with ``fp16`` the CARP encoder/scale graphs are also exported in half
    precision and kept only if they give the same tokens as fp32 on ``parity_samples`` random
    observations (recorded in the manifest either way). Parity of the fp32 graphs against the torch
    policy is measured on the same observations and must hold (same tokens, actions within 1e-4),
    else the export fails.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.onnx"), out / MANIFEST]:
        old.unlink(missing_ok=True)  # a model dir is one export: never mix graphs of two exports
    log = print if verbose else (lambda *a, **k: None)
    is_carp = isinstance(policy, CarpPolicy)
    cfg = policy.config
    if batch is None:
        batch = cfg.ensemble.grid**2 if is_carp else 1
    if batch < 1 or (batch > 1 and not is_carp):
        raise ValueError(f"batch must be >= 1, and 1 for DP-C (one noise sample per chunk); got {batch}")
    spec = observation_spec(cfg.encoder, policy.normalizer.state_names)
    t0 = time.perf_counter()
    with torch.no_grad():
        if is_carp:
            model = policy.model.float().cpu().eval()
            graphs = [
                *_export_carp_graphs(model, spec, out, False, "", batch),
                _export_carp_decoder(model, out, batch),
            ]
            family, scheduler = "carp", None
            normalizer = policy.normalizer
        else:
            policy = policy.float().cpu().eval()
            graphs = _export_dpc_graphs(policy, spec, out)
            family, scheduler = "diffusion", _scheduler_spec(policy)
            normalizer = policy.normalizer
    log(f"exported {len(graphs)} fp32 graphs (batch {batch}) in {time.perf_counter() - t0:.1f} s")
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "family": family,
        "name": cfg.name,
        "batch": batch,  # rows of every graph: a shift ensemble's copies run in one pass
        "config": cfg.to_dict(),
        "observation": spec,
        "action": {
            "horizon": 16 if is_carp else policy.horizon,
            "dim": 10,
            "units": "physical (m, rot6d, m)",
        },
        "normalization": normalizer.to_dict(),
        "opset": OPSET,
        "graphs": graphs,
        "scheduler": scheduler,
        "source_commit": source_commit(),
        "source_run": source,
        "export_date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "exporter": {"torch": torch.__version__, "python": platform.python_version()},
    }
    _write_manifest(out, manifest)
    manifest["parity"] = check_parity(policy, out, parity_samples, seed)
    p = manifest["parity"]
    log(
        f"parity (fp32, {p['samples']} random observations): max |action diff| {p['max_abs_action_diff']:.2e}"
        + (f", tokens equal {p['tokens_equal']}" if is_carp else "")
    )
    if not p["passed"]:
        _write_manifest(out, manifest)
        raise RuntimeError(f"ONNX export of {cfg.name} does not match the torch policy: {p}")
    if fp16:
        manifest["fp16"] = (
            _try_fp16(policy, out, manifest, parity_samples, seed)
            if is_carp
            else {"used": False, "reason": "DP-C is exported in fp32 only"}
        )
        log(f"fp16: {manifest['fp16']}")
    _write_manifest(out, manifest)
    return manifest


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Stamp every graph's sha256 and write manifest.json."""
    for g in manifest["graphs"] + (manifest.get("fp16") or {}).get("graphs", []):
        g["sha256"] = sha256(out / g["file"])
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def check_parity(policy: Any, model_dir: Path, samples: int, seed: int) -> dict[str, Any]:
    """Torch policy vs the ONNX engine (CPU) on random observations: tokens and actions."""
    from carp_policy.engine import OnnxPolicy

    engine = OnnxPolicy(model_dir, device="cpu", precision="fp32")
    rng = np.random.default_rng(seed)
    max_diff, tokens_equal = 0.0, True
    for i in range(samples):
        obs = _random_observation(engine.spec, policy.normalizer, rng)
        if isinstance(policy, CarpPolicy):
            ref = policy.predict(obs).actions
            ref_tokens = _torch_tokens(policy, obs)
            chunk, tokens = engine.predict_with_tokens(obs)
            got = chunk.actions
            tokens_equal &= all(np.array_equal(a, b) for a, b in zip(ref_tokens, tokens))
        else:
            noise = torch.randn(
                1, policy.horizon, policy.action_dim, generator=torch.Generator().manual_seed(i)
            )
            ref = _torch_dpc_ddim(policy, obs, noise)
            got = engine.predict(obs, noise=noise[0].numpy()).actions
        max_diff = max(max_diff, float(np.abs(ref - got).max()))
    if engine.batch > 1:  # every row of a batched pass, each against the torch policy alone
        batch = [_random_observation(engine.spec, policy.normalizer, rng) for _ in range(engine.batch)]
        for obs, chunk in zip(batch, engine.predict_batch(batch)):
            max_diff = max(max_diff, float(np.abs(policy.predict(obs).actions - chunk.actions).max()))
    return {
        "samples": samples,
        "batch": engine.batch,
        "max_abs_action_diff": max_diff,
        "tokens_equal": bool(tokens_equal) if isinstance(policy, CarpPolicy) else None,
        "tolerance": PARITY_TOL,
        "sampler": None
        if isinstance(policy, CarpPolicy)
        else f"ddim-{policy.config.noise.num_inference_steps}",
        "passed": bool(tokens_equal and max_diff <= PARITY_TOL),
        "provider": "CPUExecutionProvider",
    }


def _torch_tokens(policy: CarpPolicy, obs: Observation) -> list[np.ndarray]:
    """The greedy token maps the torch policy picks for ``obs`` (for parity checks)."""
    m, tok, gpt = policy.model, policy.model.tokenizer, policy.model.gpt
    with torch.no_grad():
        cond = m.encoder(policy._batch(obs))
        past_k, past_v = gpt.empty_cache(1, cond.device)
        f_hat = cond.new_zeros(1, tok.D * tok.C, tok.L)
        h, out = gpt.start_tokens(cond), []
        for si, k in enumerate(tok.scales):
            logits, past_k, past_v = gpt.step(h, cond, past_k, past_v)
            idx = logits.argmax(-1).view(1, tok.D, k)
            out.append(idx.cpu().numpy())
            f_hat, nxt = tok.next_input(si, f_hat, idx)
            h = gpt.word_embed(nxt)
    return out


def _torch_dpc_ddim(policy: Any, obs: Observation, noise: torch.Tensor) -> np.ndarray:
    """DP-C torch reference from a given initial noise: the policy's own DDIM loop, physical actions."""
    from carp_policy.actions import ROT6D, matrix_to_rot6d, rot6d_to_matrix

    state, images = policy._observation_tensors(obs)
    with torch.no_grad():
        emb = policy.encode_obs(policy._normalize_state(state), images)
        sched = policy.ddim
        sched.set_timesteps(policy.config.noise.num_inference_steps)
        x = noise.clone()
        for t in sched.timesteps:
            x = sched.step(policy.denoise_step(x, t.expand(1), emb), t, x).prev_sample
        actions = policy._norm().actions_from_frame(policy._unnormalize_action(x), state[:, -1])
        actions = actions[0].double().numpy()
    actions[:, ROT6D] = matrix_to_rot6d(rot6d_to_matrix(actions[:, ROT6D]))
    return actions


def _try_fp16(
    policy: CarpPolicy, out: Path, manifest: dict[str, Any], samples: int, seed: int
) -> dict[str, Any]:
    """Export fp16 encoder/scale graphs next to the fp32 ones; mark them usable only if every token
    matches fp32 on a test set of random observations (the decoder always stays fp32)."""
    from carp_policy.engine import OnnxPolicy

    spec = manifest["observation"]
    try:
        entries = _export_carp_graphs(policy.model, spec, out, True, "_fp16", manifest["batch"])
    except Exception as e:  # e.g. a torch build without some half kernel: fp32 stays, and we say why
        return {"used": False, "reason": f"fp16 export failed: {type(e).__name__}: {e}"[:300]}
    for e in entries:
        e["precision"] = "fp16"
    manifest["fp16"] = {"used": False, "graphs": entries}
    _write_manifest(out, manifest)
    fp32 = OnnxPolicy(out, device="cpu", precision="fp32")
    try:
        fp16 = OnnxPolicy(out, device="cpu", precision="fp16")
    except Exception as e:  # onnxruntime's CPU provider lacks some fp16 kernels
        return _drop_fp16(out, entries, f"onnxruntime could not run the fp16 graphs here: {e}"[:300])
    rng = np.random.default_rng(seed + 1)
    same, diff = 0, 0.0
    for _ in range(samples):
        obs = _random_observation(spec, policy.normalizer, rng)
        a32, t32 = fp32.predict_with_tokens(obs)
        a16, t16 = fp16.predict_with_tokens(obs)
        same += all(np.array_equal(x, y) for x, y in zip(t32, t16))
        diff = max(diff, float(np.abs(a32.actions - a16.actions).max()))
    result = {
        "samples": samples,
        "same_tokens": same,
        "max_abs_action_diff_vs_fp32": diff,
        "checked_with": fp16.providers[0],
    }
    if same < samples:
        return _drop_fp16(
            out, entries, f"tokens differ from fp32 on {samples - same}/{samples} observations", result
        )
    return {"used": True, "graphs": entries, **result}


def _drop_fp16(out: Path, entries: list[dict], reason: str, result: dict | None = None) -> dict[str, Any]:
    """Delete rejected fp16 graphs: a model dir only holds what the engine may run."""
    for e in entries:
        (out / e["file"]).unlink(missing_ok=True)
    return {"used": False, "reason": reason, **(result or {})}


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``carp-export --run RUN_DIR --out MODEL_DIR [--fp16]``."""
    ap = argparse.ArgumentParser(prog="carp-export", description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="carp-train run directory (config.yaml, weights, stats)")
    ap.add_argument("--out", required=True, help="model directory to write (graphs + manifest.json)")
    ap.add_argument("--fp16", action="store_true", help="also try fp16 graphs; kept only if tokens match")
    ap.add_argument("--parity-samples", type=int, default=16, help="random observations for the parity check")
    args = ap.parse_args(argv)
    try:
        policy = load_torch_policy(args.run)
        manifest = export_policy(
            policy,
            args.out,
            fp16=args.fp16,
            parity_samples=args.parity_samples,
            source=str(Path(args.run).resolve()),
        )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"carp-export: error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    print(f"\n{manifest['name']} ({manifest['family']}) -> {out}")
    for g in manifest["graphs"]:
        size = (out / g["file"]).stat().st_size / 1e6
        print(
            f"  {g['file']:<24} {g['stage']:<18} {g['precision']}  {size:7.2f} MB  sha256 {g['sha256'][:12]}"
        )
    p = manifest["parity"]
    print(
        f"  parity: {p['samples']} obs, max |action diff| {p['max_abs_action_diff']:.1e} "
        f"(tol {p['tolerance']:.0e})"
        + (f", same tokens: {p['tokens_equal']}" if p["tokens_equal"] is not None else "")
    )
    print(f"  opset {manifest['opset']}, commit {manifest['source_commit'][:12]}, {manifest['export_date']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
