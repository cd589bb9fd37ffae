"""CARP's ONNX graphs: K + 1 graphs with fully static shapes (batch 1, or the shift ensemble's size).

    carp_obs.onnx      state, image_<cam>[, task][, action_now]
                                                    -> cond, tokens, f_hat_out, x_next, present_k/v
                       (observation encoder + scale 1: start tokens, K/V of scale 1, greedy argmax,
                        the tokenizer's accumulation and the next scale's input)
    carp_scale<i>.onnx cond, x_in, f_hat, past_k/v  -> tokens, f_hat_out, x_next, present_k/v
                       (i = 2..K; the last scale has no x_next)
    carp_decoder.onnx  f_hat                        -> actions (normalised, (B, H, D))

Every graph runs ``CarpModel.scale_step``, the same step the torch policy runs. Why one graph per
scale rather than one reused graph: the step differs between scales in more than the K/V length
(the slice of position embeddings, the tokenizer's interpolation matrices and phi_k conv, the
length of the next input), so one graph would need dynamic shapes and a data-driven choice of
weights. Static graphs let onnxruntime fold every constant and pre-plan memory; the transformer
weights are stored K times, which costs < 7 MB for the shipped configs. Greedy argmax is inside
the graphs, so tokens and K/V never leave the device between steps. ``onnx_carp.py`` runs them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from carp_policy.policies.carp.modeling_carp import CarpModel


class _CarpObsGraph(nn.Module):
    """Observation encoder + scale 1 (see the module docstring for inputs and outputs)."""

    def __init__(self, model: CarpModel, cameras: tuple[str, ...], half: bool = False) -> None:
        super().__init__()
        self.model, self.cameras, self.half_ = model, cameras, half

    def forward(self, state: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # inputs: one (B, O, H, W, 3) uint8 image per camera, then a multi-task model's (B,) task,
        # then, for an anchored coarse head, action_now (B, D): the current pose as a normalised action
        m, tok, gpt = self.model, self.model.tokenizer, self.model.gpt
        dt = torch.float16 if self.half_ else torch.float32
        if m.cfg.encoder.kind != "visual":  # the state MLP runs in the graph's precision
            state = state.to(dt)
        batch = {"state": state, "images": dict(zip(self.cameras, inputs))}
        if m.cfg.encoder.tasks:
            batch["task"] = inputs[len(self.cameras)]
        action_now = inputs[-1] if m.reads_action_now else None  # (B, D)
        cond = m.encoder(batch).to(dt)  # (B, E)
        B = cond.shape[0]
        past_k, past_v = gpt.empty_cache(B)
        f_hat = cond.new_zeros(B, tok.D * tok.C, tok.L)
        idx, f_hat, nxt, k, v = m.scale_step(
            0, cond, None, f_hat, past_k.to(dt), past_v.to(dt), action_now=action_now
        )
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
        si = self.si
        if self.half_:
            cond, x_in, f_hat, past_k, past_v = (t.half() for t in (cond, x_in, f_hat, past_k, past_v))
        idx, f_hat, nxt, k, v = self.model.scale_step(si, cond, x_in, f_hat, past_k, past_v)
        outs = [idx, f_hat] + ([nxt] if si + 1 < len(self.model.tokenizer.scales) else []) + [k, v]
        return tuple(o if o.dtype == torch.int64 else o.float() for o in outs)


class _CarpDecoderGraph(nn.Module):
    """f_hat (B, D*C, L) -> normalised actions (B, H, D)."""

    def __init__(self, model: CarpModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.model.tokenizer.decode_features(f_hat)


def default_batch(config: Any) -> int:
    """The graphs' static batch: the shift ensemble's copies, so they run in one pass."""
    return config.ensemble.grid**2


def check_batch(batch: int) -> None:
    """Any batch >= 1 (a shift ensemble's copies in one pass)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")


def _scale_graphs(
    model: CarpModel, spec: dict[str, Any], out: Path, half: bool, suffix: str, batch: int
) -> list[dict]:
    """Write the K encoder/scale graphs into ``out``; return their manifest entries in run order."""
    from carp_policy.export import example_inputs, export_graph

    tok, gpt = model.tokenizer, model.gpt
    D, C, L, K = tok.D, tok.C, tok.L, len(tok.scales)
    cams = tuple(spec["cameras"])
    if half:
        # a half copy: rounding the caller's weights through fp16 would change the fp32 policy
        model = copy.deepcopy(model).half()  # integer buffers (code offsets, ids) stay int64
        enc = model.encoder
        if model.cfg.encoder.kind == "visual":
            # visual: the ResNet trunks (nearly all the FLOPs) in half; the spatial-softmax heads and
            # the fusion MLP stay fp32 (the exporter cannot build a half-precision arange grid)
            enc.heads.float()
            enc.fuse.float()
            for trunk in enc.trunks.values():  # the encoder makes float32 frames itself: cast here
                trunk.register_forward_pre_hook(lambda _m, a: tuple(x.half() for x in a))
            for head in enc.heads.values():
                head.register_forward_pre_hook(lambda _m, a: tuple(x.float() for x in a))
    entries = []
    obs_args, obs_names = example_inputs(spec, batch)
    if model.reads_action_now:  # the anchored coarse head reads the current pose
        obs_args, obs_names = [*obs_args, torch.zeros(batch, tok.D)], [*obs_names, "action_now"]
    B = batch
    kv = ["present_k", "present_v"]
    nxt = ["x_next"] if K > 1 else []
    entries.append(
        export_graph(
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
            export_graph(
                _CarpScaleGraph(model, si, half),
                args,
                ["cond", "x_in", "f_hat", "past_k", "past_v"],
                names,
                out / f"carp_scale{si + 1}{suffix}.onnx",
            )
        )
        entries[-1]["stage"] = f"scale {si + 1}"
    return entries


def export_graphs(policy: Any, spec: dict[str, Any], out: Path, batch: int) -> tuple[list[dict], dict]:
    """The fp32 graphs of a ``CarpPolicy`` -> (manifest entries in run order, manifest extras)."""
    from carp_policy.export import export_graph

    model = policy.model.float().cpu().eval()
    tok = model.tokenizer
    graphs = _scale_graphs(model, spec, out, False, "", batch)
    dec = export_graph(
        _CarpDecoderGraph(model),
        (torch.zeros(batch, tok.D * tok.C, tok.L),),
        ["f_hat"],
        ["actions"],
        out / "carp_decoder.onnx",
    )
    dec["stage"] = "decoder"
    return [*graphs, dec], {}


def parity_sampler(config: Any) -> None:
    """CARP's parity is greedy: no sampler to name."""
    return None


def parity_pair(policy: Any, engine: Any, obs: Any, i: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Torch vs ONNX on one observation: (torch actions, ONNX actions, same tokens)."""
    ref, ref_tokens = policy.predict_with_tokens(obs)
    got, tokens = engine.predict_with_tokens(obs)
    same = all(np.array_equal(a, b) for a, b in zip(ref_tokens, tokens))
    return ref.actions, got.actions, same


def try_fp16(policy: Any, out: Path, manifest: dict[str, Any], samples: int, seed: int) -> dict[str, Any]:
    """Export fp16 encoder/scale graphs next to the fp32 ones; mark them usable only if every token
    matches fp32 on a test set of random observations (the decoder always stays fp32). Rejected
    graphs are deleted: a model dir only holds what the engine may run."""
    from carp_policy.engine import OnnxPolicy
    from carp_policy.export import random_observation, select_task, write_manifest

    spec = manifest["observation"]
    try:
        entries = _scale_graphs(policy.model, spec, out, True, "_fp16", manifest["batch"])
    except Exception as e:  # e.g. a torch build without some half kernel: fp32 stays, and we say why
        return {"used": False, "reason": f"fp16 export failed: {type(e).__name__}: {e}"[:300]}
    for e in entries:
        e["precision"] = "fp16"

    def drop(reason: str, result: dict | None = None) -> dict[str, Any]:
        for e in entries:
            (out / e["file"]).unlink(missing_ok=True)
        return {"used": False, "reason": reason, **(result or {})}

    manifest["fp16"] = {"used": False, "graphs": entries}
    write_manifest(out, manifest)
    fp32 = OnnxPolicy(out, device="cpu", precision="fp32")
    try:
        fp16 = OnnxPolicy(out, device="cpu", precision="fp16")
    except Exception as e:  # onnxruntime's CPU provider lacks some fp16 kernels
        return drop(f"onnxruntime could not run the fp16 graphs here: {e}"[:300])
    rng = np.random.default_rng(seed + 1)
    same, diff = 0, 0.0
    tasks = list(spec.get("tasks") or [])
    for i in range(samples):
        obs = random_observation(spec, policy.normalizer, rng)
        if tasks:  # a multi-task model: every task's embedding in turn
            select_task([fp32, fp16], tasks[i % len(tasks)])
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
        return drop(f"tokens differ from fp32 on {samples - same}/{samples} observations", result)
    return {"used": True, "graphs": entries, **result}
